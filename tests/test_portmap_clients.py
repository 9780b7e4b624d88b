"""The sans-IO NAT-PMP and PCP clients on a fake clock, and the epoch rules."""

from __future__ import annotations

import random

import pytest

from macula.nat.portmap import NatPmpClient, PcpClient, natpmp, pcp
from macula.nat.portmap.epoch import EpochTracker
from macula.nat.portmap.retransmit import Retransmitter, natpmp_backoff, pcp_backoff

GW = "192.168.1.1"
SERVER = (GW, 5351)
PORT = 40000
CLIENT_IP = "192.168.1.2"


def run_until(client: NatPmpClient | PcpClient, until: float, now: float = 0.0) -> list[tuple[float, bytes]]:
    """Fire the client's timers up to `until`; the datagrams it sent, with their times."""
    sent = [(now, d) for d, _ in client.datagrams_to_send(0.0)]
    for _ in range(10_000):
        when = client.get_timer()
        if when is None or when > until:
            break
        client.handle_timer(when)
        sent += [(when, d) for d, a in client.datagrams_to_send(0.0)]
    return sent


# -- NAT-PMP ---------------------------------------------------------------------------------------


def pmp_addr(epoch: int, ip: str = "198.51.100.11", result: int = 0) -> bytes:
    return natpmp.encode_response(natpmp.Response(0, result, epoch, external_ip=ip))


def pmp_map(epoch: int, external: int = PORT, lifetime: int = 7200, result: int = 0,
            internal: int = PORT) -> bytes:
    return natpmp.encode_response(natpmp.Response(1, result, epoch, internal_port=internal,
                                                  external_port=external, lifetime=lifetime))


def mapped_natpmp(lifetime: int = 7200) -> NatPmpClient:
    client = NatPmpClient(GW, PORT, 0.0, lifetime=lifetime, client_ip=CLIENT_IP)
    sent = client.datagrams_to_send(0.0)
    assert [d for d, _ in sent] == [natpmp.external_address_request(),
                                    natpmp.map_request(PORT, PORT, lifetime)]
    assert all(addr == SERVER for _, addr in sent)
    assert client.receive_datagram(pmp_addr(100), SERVER, 0.01)
    assert client.state == "requesting"  # the map answer is still missing
    assert client.receive_datagram(pmp_map(100, 40001, lifetime), SERVER, 0.02)
    return client


def test_natpmp_maps_and_renews_at_half_lifetime() -> None:
    client = mapped_natpmp()
    assert client.state == "mapped" and client.answered
    mapping = client.mapping
    assert mapping is not None and mapping.external == ("198.51.100.11", 40001)
    assert mapping.internal == (CLIENT_IP, PORT) and mapping.protocol == "natpmp"
    assert client.get_timer() == pytest.approx(0.02 + 3600)
    client.handle_timer(3600.02)
    renewal = [d for d, _ in client.datagrams_to_send(0.0)]
    assert renewal == [natpmp.external_address_request(), natpmp.map_request(PORT, 40001, 7200)]
    client.receive_datagram(pmp_addr(3700), SERVER, 3600.1)
    client.receive_datagram(pmp_map(3700, 40001), SERVER, 3600.1)
    assert client.mapping is not None and client.mapping.obtained_at == pytest.approx(3600.1)


def test_natpmp_retransmits_nine_times_then_fails() -> None:
    client = NatPmpClient(GW, PORT, 0.0)
    sent = run_until(client, 1000.0)
    times = sorted({t for t, _ in sent})
    assert times == pytest.approx([0, 0.25, 0.75, 1.75, 3.75, 7.75, 15.75, 31.75, 63.75])
    assert len(sent) == 18  # address + map requests, nine times each
    assert client.state == "failed" and client.error == "no answer from the gateway"
    assert client.mapping is None and client.get_timer() is None


def test_natpmp_timeout_budget_and_foreign_datagrams() -> None:
    client = NatPmpClient(GW, PORT, 0.0, timeout=1.0)
    assert not client.receive_datagram(pmp_addr(1), ("192.168.1.9", 5351), 0.1)  # not the gateway
    assert not client.receive_datagram(pmp_addr(1), (GW, 3478), 0.1)
    assert client.receive_datagram(b"\x00", SERVER, 0.1)  # the gateway's, unusable: consumed, ignored
    assert client.receive_datagram(pmp_addr(1), ("::ffff:192.168.1.1", 5351), 0.2)  # dual-stack form
    run_until(client, 5.0)
    assert client.state == "failed" and "did not complete" in (client.error or "")


@pytest.mark.parametrize("reply, why", [
    (pmp_map(5, result=natpmp.NOT_AUTHORIZED), "not authorized"),
    (pmp_addr(5, result=natpmp.NETWORK_FAILURE), "network failure"),
    (pmp_addr(5, ip="0.0.0.0"), "no external address"),
])
def test_natpmp_refusals_fail_discovery(reply: bytes, why: str) -> None:
    client = NatPmpClient(GW, PORT, 0.0)
    client.receive_datagram(reply, SERVER, 0.1)
    assert client.state == "failed" and why in (client.error or "")


def test_natpmp_transient_errors_during_renewal_keep_the_mapping() -> None:
    client = mapped_natpmp()
    client.handle_timer(3600.02)
    client.datagrams_to_send(0.0)
    client.receive_datagram(pmp_map(3700, result=natpmp.OUT_OF_RESOURCES), SERVER, 3601)
    assert client.state == "mapped" and client.mapping is not None
    assert "out of resources" in (client.error or "")
    # Nobody answers any more: the mapping ends when its lifetime does.
    run_until(client, 8000.0, 3601)
    assert client.state == "expired" and client.mapping is None


def test_natpmp_gateway_reboot_triggers_immediate_rerequest() -> None:
    client = mapped_natpmp()
    client.datagrams_to_send(0.0)
    # 100 s later the gateway's epoch says 3: it restarted and lost our mapping.
    assert client.receive_datagram(pmp_addr(3), SERVER, 100.0)
    out = [d for d, _ in client.datagrams_to_send(0.0)]
    assert natpmp.map_request(PORT, 40001, 7200) in out
    client.receive_datagram(pmp_map(3, 40001), SERVER, 100.1)
    assert client.state == "mapped" and client.mapping is not None
    assert client.mapping.obtained_at == pytest.approx(100.1)


def test_natpmp_delete() -> None:
    client = mapped_natpmp()
    client.datagrams_to_send(0.0)
    client.delete(10.0)
    assert client.state == "deleting" and client.mapping is None
    assert [d for d, _ in client.datagrams_to_send(0.0)] == [natpmp.map_request(PORT, 0, 0)]
    client.receive_datagram(pmp_map(110, external=0, lifetime=0), SERVER, 10.1)
    assert client.state == "deleted" and client.error is None
    silent = mapped_natpmp()
    silent.delete(10.0, timeout=1.0)
    run_until(silent, 20.0, 10.0)
    assert silent.state == "deleted" and "unconfirmed" in (silent.error or "")
    never = NatPmpClient(GW, PORT, 0.0, timeout=0.5)
    run_until(never, 5.0)
    never.delete(5.0)
    assert never.state == "deleted" and never.datagrams_to_send(0.0) == []


# -- PCP -------------------------------------------------------------------------------------------

NONCE = bytes(range(12))


def pcp_map(epoch: int, *, lifetime: int = 7200, external: int = PORT, result: int = 0,
            nonce: bytes = NONCE, with_map: bool = True) -> bytes:
    body = pcp.MapData(nonce, 17, PORT, external, "198.51.100.11") if with_map else None
    return pcp.encode_response(pcp.Response(pcp.OP_MAP, result, lifetime, epoch, body))


def new_pcp(**kwargs: object) -> PcpClient:
    kwargs.setdefault("rng", random.Random(7))
    return PcpClient(GW, CLIENT_IP, PORT, 0.0, nonce=NONCE, **kwargs)  # type: ignore[arg-type]


def mapped_pcp(lifetime: int = 7200) -> PcpClient:
    client = new_pcp(lifetime=lifetime)
    [(data, addr)] = client.datagrams_to_send(0.0)
    request = pcp.decode_request(data)
    assert addr == SERVER and request.client_ip == CLIENT_IP and request.lifetime == lifetime
    assert request.map == pcp.MapData(NONCE, 17, PORT, PORT, "0.0.0.0")
    assert data[8:20] == bytes(10) + b"\xff\xff"  # the client IP as IPv4-mapped IPv6
    client.receive_datagram(pcp_map(50, lifetime=lifetime, external=40002), SERVER, 0.05)
    return client


def test_pcp_retransmission_follows_rfc6887_8_1_1() -> None:
    client = new_pcp(timeout=3000.0)
    sent = run_until(client, 3000.0)
    times = [t for t, _ in sent]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 2.7 <= gaps[0] <= 3.3  # RT = (1 + RAND) * IRT
    for prev, gap in zip(gaps, gaps[1:]):
        if gap < 900:  # below MRT: (1 + RAND) * 2 * RTprev
            assert 1.8 * prev <= gap <= 2.2 * prev
        else:  # capped: (1 + RAND) * MRT
            assert 0.9 * 1024 <= gap <= 1.1 * 1024
    assert any(gap > 900 for gap in gaps)
    assert client.state == "failed" and client.error == "no answer from the PCP server"


def test_pcp_maps_and_renews_on_rfc_schedule() -> None:
    client = mapped_pcp(lifetime=1000)
    mapping = client.mapping
    assert client.state == "mapped" and mapping is not None
    assert mapping.external == ("198.51.100.11", 40002) and mapping.protocol == "pcp"
    first = client.get_timer()
    assert first is not None and 0.05 + 500 <= first <= 0.05 + 625
    client.handle_timer(first)
    [(renewal, _)] = client.datagrams_to_send(0.0)
    request = pcp.decode_request(renewal)
    assert request.map == pcp.MapData(NONCE, 17, PORT, 40002, "198.51.100.11")  # same nonce
    second = client.get_timer()
    assert second is not None and 0.05 + 750 <= second <= 0.05 + 812.5
    client.handle_timer(second)
    client.datagrams_to_send(0.0)
    client.receive_datagram(pcp_map(900, lifetime=1000, external=40002), SERVER, second + 0.1)
    assert client.mapping is not None and client.mapping.obtained_at == pytest.approx(second + 0.1)
    # Silence from now on: the mapping expires at its end, with renewals >= 4 s apart.
    sent = run_until(client, 5000.0, second + 0.1)
    times = [t for t, _ in sent]
    assert all(b - a >= 4 for a, b in zip(times, times[1:]))
    assert client.state == "expired"


def test_pcp_against_natpmp_only_gateway() -> None:
    client = new_pcp()
    assert client.receive_datagram(natpmp.encode_response(natpmp.Response(1, natpmp.UNSUPPORTED_VERSION, 9)),
                          SERVER, 0.1)
    assert client.state == "failed" and client.natpmp_only and not client.answered
    assert "NAT-PMP only" in (client.error or "")


def test_pcp_ignores_other_nonces_and_reports_errors() -> None:
    client = new_pcp()
    assert client.receive_datagram(pcp_map(1, nonce=bytes(12)), SERVER, 0.1)
    assert client.state == "requesting"
    client.receive_datagram(pcp_map(1, result=pcp.NOT_AUTHORIZED, lifetime=0), SERVER, 0.2)
    assert client.state == "failed" and client.error == "PCP NOT_AUTHORIZED"
    early = new_pcp()
    early.receive_datagram(pcp_map(1, result=pcp.UNSUPP_VERSION, with_map=False), SERVER, 0.1)
    assert early.state == "failed" and early.result_code == pcp.UNSUPP_VERSION


def test_pcp_short_lived_error_during_renewal_keeps_mapping() -> None:
    client = mapped_pcp(lifetime=1000)
    at = client.get_timer()
    assert at is not None
    client.handle_timer(at)
    client.datagrams_to_send(0.0)
    client.receive_datagram(pcp_map(600, result=pcp.NO_RESOURCES, lifetime=30), SERVER, at + 0.1)
    assert client.state == "mapped" and client.error == "PCP NO_RESOURCES"
    client.receive_datagram(pcp_map(601, result=pcp.NOT_AUTHORIZED, lifetime=30), SERVER, at + 1)
    assert client.state == "failed" and client.mapping is None


def test_pcp_epoch_reset_and_announce() -> None:
    client = mapped_pcp()
    client.datagrams_to_send(0.0)
    # An ANNOUNCE whose epoch went backwards: renew within 0-5 s (RFC 6887 14.1.3).
    announce = pcp.encode_response(pcp.Response(pcp.OP_ANNOUNCE, 0, 0, 1))
    assert client.receive_datagram(announce, SERVER, 100.0)
    at = client.get_timer()
    assert at is not None and 100.0 <= at <= 105.0
    client.handle_timer(at)
    assert len(client.datagrams_to_send(0.0)) == 1
    # A MAP answer with a reset epoch: re-map at once, retransmitting per 8.1.1.
    again = mapped_pcp()
    again.datagrams_to_send(0.0)
    again.receive_datagram(pcp_map(2, lifetime=7200, external=40002, nonce=bytes(12)), SERVER, 200.0)
    [(data, _)] = again.datagrams_to_send(0.0)
    assert pcp.decode_request(data).map.external_port == 40002  # type: ignore[union-attr]


def test_pcp_delete_uses_the_same_nonce() -> None:
    client = mapped_pcp()
    client.delete(10.0)
    [(data, _)] = client.datagrams_to_send(0.0)
    request = pcp.decode_request(data)
    assert request.lifetime == 0 and request.map is not None and request.map.nonce == NONCE
    client.receive_datagram(pcp_map(60, lifetime=0), SERVER, 10.1)
    assert client.state == "deleted" and client.error is None
    silent = mapped_pcp()
    silent.delete(10.0, timeout=1.0)
    run_until(silent, 30.0, 10.0)
    assert silent.state == "deleted" and "unconfirmed" in (silent.error or "")


def test_client_argument_checks() -> None:
    with pytest.raises(ValueError):
        NatPmpClient(GW, PORT, 0.0, lifetime=0)
    with pytest.raises(ValueError):
        PcpClient(GW, CLIENT_IP, PORT, 0.0, nonce=b"x")


# -- epochs and schedules -------------------------------------------------------------------------


def test_natpmp_epoch_rule() -> None:
    tracker = EpochTracker("natpmp")
    assert tracker.observe(1000, 0.0)
    assert tracker.observe(1100, 100.0)
    assert tracker.observe(1186, 200.0)  # 7/8 of 100 s, minus the 2 s slack, is enough
    assert not tracker.observe(1190, 300.0)  # only 4 s in 100 s: rebooted


def test_pcp_epoch_rule() -> None:
    tracker = EpochTracker("pcp")
    assert tracker.observe(500, 0.0)
    assert tracker.observe(600, 100.0)
    assert not tracker.observe(598, 101.0)  # went backwards by more than a second
    tracker.reset()
    assert tracker.observe(10, 0.0)
    assert not tracker.observe(200, 100.0)  # server clock ran far ahead of ours
    assert not tracker.observe(210, 200.0)  # and now far behind


def test_retransmitter_schedules() -> None:
    tx = Retransmitter(b"x", 0.0, natpmp_backoff(), max_sends=3)
    assert tx.due(0.0)
    for now in (0.0, 0.25, 0.75):
        tx.mark_sent(now)
    assert tx.exhausted and not tx.due(100.0) and tx.next_send == pytest.approx(1.75)
    backoff = pcp_backoff(rng=random.Random(1))
    rt, seen = None, []
    for _ in range(12):
        rt = backoff(rt)
        seen.append(rt)
    assert 2.7 <= seen[0] <= 3.3 and max(seen) <= 1.1 * 1024 * 1.0001
