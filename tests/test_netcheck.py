"""`macula netcheck` on loopback: a real Gateway, a real coturn, a silent socket, the CLI.

Everything binds and sends to 127.0.0.0/8 only; port mapping is either off or pointed at a
fake NAT-PMP router on loopback, so the real default router is never asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from macula.config import Config, NodeSection, TurnServer
from macula.gateway.server import Gateway
from macula.nat.aio import run_responder
from macula.net.udp import UdpEndpoint, open_udp_endpoint
from macula.netcheck import (
    PortmapOptions,
    Report,
    Targets,
    _schedule,
    format_report,
    parse_turn_arg,
    run_netcheck,
)
from macula_lab.coturn import Coturn, coturn_available

LO = "127.0.0.1"
NO_PORTMAP = PortmapOptions(enabled=False)
JSON_KEYS = {"udp", "public_addresses", "nat", "stun", "turn", "portmap", "gateway", "hard_nat",
             "ipv6"}


def hp(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    ok, why = coturn_available()
    if not ok:
        pytest.skip(f"coturn unavailable: {why}")
    with Coturn() as server:
        yield server


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = await Gateway.start(listen=(LO, 0))
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A bound UDP socket that never answers: a dead STUN server (no ICMP either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LO, 0))
        yield hp(sock.getsockname())


async def check(targets: Targets, timeout: float = 1.0, portmap: PortmapOptions = NO_PORTMAP) -> Report:
    report = await run_netcheck(targets, timeout=timeout, portmap=portmap)
    format_report(report)  # the table renders whatever the outcome
    return report


# -- gateway only ----------------------------------------------------------------------------


async def test_gateway_only_on_loopback_is_open(gateway: Gateway) -> None:
    report = await check(Targets(gateway=hp(gateway.address), listen=f"{LO}:0"))
    local = report.local
    assert report.udp is True
    assert any("checking the gateway only" in note for note in report.notes)
    gw = report.gateway
    assert gw is not None and gw.ok and gw.mapped == local and gw.latency_ms is not None
    assert report.public_addresses() == [{"address": local, "seen_by": ["gateway"]}]
    nat = report.nat
    assert (nat.type, nat.mapping, nat.port_allocation) == ("open", "endpoint_independent", "preserving")
    assert nat.tested_by == f"gateway {hp(gateway.address)}" and nat.hairpinning is None
    # Both of the gateway's STUN ports answered the classifier (the second via CHANGE-PORT).
    assert gw.answering == sorted(hp(a) for a in gateway.stun_addresses)
    out = report.to_json()
    assert set(out) >= JSON_KEYS and out["stun"] == {} and out["turn"] == {}
    assert out["portmap"]["checked"] is False and "not checked" in out["portmap"]["reason"]
    assert out["summary"].startswith("UDP ok; public " + local)


async def test_wildcard_socket_still_recognises_no_nat(gateway: Gateway) -> None:
    # Bound to 0.0.0.0 the socket's own address never equals a mapped one: the check must
    # compare against the source address the kernel picks toward the server.
    report = await check(Targets(gateway=hp(gateway.address), listen="0.0.0.0:0"))
    assert report.nat.type == "open" and report.local.startswith("0.0.0.0:")


# -- STUN and TURN against coturn ------------------------------------------------------------


async def test_stun_latency_turn_allocation_dead_server_and_bad_password(
    gateway: Gateway, coturn: Coturn, silent: str
) -> None:
    server = hp(coturn.address)
    targets = Targets(
        gateway=hp(gateway.address),
        stun=(server, silent),
        turn=(
            TurnServer(server, "macula", "secret"),
            TurnServer(server, "macula", "secret", "tcp"),
            TurnServer(server, "macula", "not-the-password"),
        ),
        listen=f"{LO}:0",
    )
    report = await check(targets, timeout=1.0)
    assert report.udp is True
    live, dead = report.stun
    assert live.ok and live.error is None and live.mapped == report.local
    assert live.latency_ms is not None and 0 < live.latency_ms < 1000 and live.answered >= 1
    assert not dead.ok and dead.latency_ms is None and dead.mapped is None
    assert dead.error is not None and dead.error.startswith(f"no STUN answer from {silent} after")

    good_udp, good_tcp, wrong = report.turn
    for good in (good_udp, good_tcp):
        assert good.ok and good.error is None and good.deallocated is True, good
        assert good.relayed is not None and good.relayed.startswith(LO + ":") and good.relayed != server
        assert good.latency_ms is not None and good.latency_ms > 0
    assert good_udp.mapped == report.local  # the TURN server sees the same socket
    assert not wrong.ok and wrong.relayed is None
    assert wrong.error is not None and wrong.error.startswith("bad credentials:")
    assert "401" in wrong.error and "'macula'" in wrong.error and "not-the-password" not in wrong.error

    out = report.to_json()
    assert out["stun"][silent]["ok"] is False and out["stun"][silent]["error"] == dead.error
    assert out["stun"][server] == {"ok": True, "latency_ms": live.latency_ms, "mapped": report.local,
                                   "error": None, "other_address": None}
    # Same user and server with two passwords: two keys, no secret in either.
    assert set(out["turn"]) == {f"macula@{server}/udp", f"macula@{server}/tcp", f"macula@{server}/udp#2"}
    assert out["turn"][f"macula@{server}/udp#2"]["error"] == wrong.error
    assert "secret" not in json.dumps(out) and "secret" not in format_report(report)
    seen = {a["address"]: a["seen_by"] for a in out["public_addresses"]}
    assert seen == {report.local: ["gateway", f"stun {server}", f"turn {server}"]}
    assert "STUN 2/3 ok" in out["summary"] and "TURN 2/3 ok" in out["summary"]


async def test_nat_unknown_with_reason_when_no_server_can_classify(coturn: Coturn) -> None:
    # coturn on one IP sends no OTHER-ADDRESS, and there is no gateway.
    report = await check(Targets(stun=(hp(coturn.address),), listen=f"{LO}:0"))
    assert report.udp and report.stun[0].ok and report.stun[0].other_address is None
    assert report.nat.type == "unknown" and report.nat.tested_by is None
    assert report.nat.reason is not None and "OTHER-ADDRESS" in report.nat.reason
    assert "no gateway configured" in report.nat.reason


async def test_classifier_uses_a_stun_server_with_other_address() -> None:
    # An RFC 5780 server on 127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback on Linux).
    first = [await open_udp_endpoint(LO, 0) for _ in range(2)]
    ports = [ep.local_address[1] for ep in first]
    try:
        second = [await open_udp_endpoint("127.0.0.2", p) for p in ports]
    except OSError:
        for ep in first:
            ep.close()
        pytest.skip("ports not free on 127.0.0.2")
    endpoints: list[UdpEndpoint] = [*first, *second]
    run_responder(endpoints)
    try:
        report = await check(Targets(stun=(hp(first[0].local_address),), listen=f"{LO}:0"))
    finally:
        for ep in endpoints:
            ep.close()
    assert report.stun[0].other_address == f"127.0.0.2:{ports[1]}"
    assert report.nat.tested_by == f"stun {hp(first[0].local_address)}"
    assert (report.nat.type, report.nat.mapping, report.nat.filtering) == (
        "open", "endpoint_independent", "endpoint_independent")


# -- nothing answers ---------------------------------------------------------------------------


async def test_nothing_answered(silent: str) -> None:
    report = await check(Targets(gateway=silent, listen=f"{LO}:0"), timeout=0.5)
    assert report.udp is False and report.gateway is not None and not report.gateway.ok
    assert report.gateway.error is not None and "no STUN answer" in report.gateway.error
    assert report.nat.type == "unknown" and "no STUN server answered" in (report.nat.reason or "")
    assert report.public_addresses() == []
    assert report.summary().startswith("no UDP answer from any server")


async def test_unresolvable_server_is_reported_not_raised(gateway: Gateway) -> None:
    report = await check(Targets(gateway=hp(gateway.address), stun=("no-such-host.invalid:3478",),
                                 listen=f"{LO}:0"), timeout=0.5)
    assert report.udp and not report.stun[0].ok
    assert report.stun[0].error is not None and "cannot resolve no-such-host.invalid" in report.stun[0].error


# -- port mapping --------------------------------------------------------------------------------


class FakeNatPmpRouter(asyncio.DatagramProtocol):
    """A NAT-PMP-only router: PCP gets RFC 6887's unsupported-version answer."""

    def __init__(self, natpmp: Any) -> None:
        self.natpmp = natpmp
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[Any] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        n = self.natpmp
        assert self.transport is not None
        if data[0] != 0:
            reply = n.encode_response(n.Response(1, n.UNSUPPORTED_VERSION, 1000))
        else:
            req = n.decode_request(data)
            self.requests.append(req)
            if req.opcode == n.OP_EXTERNAL_ADDRESS:
                reply = n.encode_response(n.Response(0, 0, 1000, external_ip="203.0.113.77"))
                self.transport.sendto(reply, addr)
                return
            reply = n.encode_response(n.Response(
                1, 0, 1000, internal_port=req.internal_port,
                external_port=req.internal_port + 2 if req.lifetime else 0, lifetime=req.lifetime))
        self.transport.sendto(reply, addr)


async def test_port_mapping_protocols_that_answered(gateway: Gateway) -> None:
    portmap = pytest.importorskip("macula.nat.portmap")
    natpmp = pytest.importorskip("macula.nat.portmap.natpmp")
    assert portmap.PortMapper is not None
    loop = asyncio.get_running_loop()
    transport, router = await loop.create_datagram_endpoint(lambda: FakeNatPmpRouter(natpmp),
                                                            local_addr=(LO, 0))
    try:
        options = PortmapOptions(router=LO, server_port=transport.get_extra_info("sockname")[1],
                                 protocols=("pcp", "natpmp"))
        report = await check(Targets(gateway=hp(gateway.address), listen=f"{LO}:0"), portmap=options)
    finally:
        transport.close()
    pm = report.portmap
    assert pm.checked and pm.router == LO and pm.answered[-1] == "natpmp" and "pcp" in pm.errors, pm
    local_port = int(report.local.rsplit(":", 1)[1])
    assert pm.protocol == "natpmp" and pm.mapping == f"203.0.113.77:{local_port + 2}"
    # The check deletes the mapping it was granted (a map request with lifetime 0).
    maps = [r for r in router.requests if r.opcode == natpmp.OP_MAP_UDP]
    assert maps[0].lifetime > 0 and maps[-1].lifetime == 0
    assert "natpmp answered" in report.summary()
    assert "203.0.113.77" in format_report(report)


# -- config, flags and schedules ---------------------------------------------------------------


def test_targets_merge_config_and_flags() -> None:
    config = Config(stun_servers=("127.0.0.1:3478",),
                    turn_servers=(TurnServer("127.0.0.1:3478", "u", "p"),))
    targets = Targets.from_config(config, stun=["127.0.0.1:3478", "127.0.0.1:3479"],
                                  turn=[parse_turn_arg("v:p@127.0.0.1:3478/tcp")])
    assert targets.stun == ("127.0.0.1:3478", "127.0.0.1:3479")
    assert [t.transport for t in targets.turn] == ["udp", "tcp"]
    assert (targets.gateway, targets.gateway_source) == (NodeSection().gateway, "default")
    flagged = Targets.from_config(config, gateway="127.0.0.1:1")
    assert (flagged.gateway, flagged.gateway_source) == ("127.0.0.1:1", "flag")


def test_turn_flag_parsing_never_echoes_the_password() -> None:
    server = parse_turn_arg("alice:pa:ss@word@127.0.0.1:3478/TCP")
    assert server == TurnServer("127.0.0.1:3478", "alice", "pa:ss@word", "tcp")
    for bad in ("alice@127.0.0.1:3478", "alice:hunter2@127.0.0.1:3478/sctp", "alice:hunter2@host"):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse_turn_arg(bad)
        assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("budget", [0.05, 0.5, 1.0, 5.0, 30.0])
def test_retransmission_schedule_fits_the_phase(budget: float) -> None:
    s = _schedule(budget)
    total = s["rto"] * (2 ** (s["rc"] - 1) - 1) + s["rm"] * s["rto"]
    assert 0 < total <= budget and 1 <= s["rc"] <= 7


# -- the command line --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # No MACULA_* from the caller's environment may add servers to the check.
    return {k: v for k, v in os.environ.items() if not k.startswith("MACULA_")}


async def macula(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "macula.cli", "netcheck", "--no-portmap", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_json_last_line(gateway: Gateway, coturn: Coturn, silent: str) -> None:
    server = hp(coturn.address)
    code, out, err = await macula(
        "--gateway", hp(gateway.address), "--stun", server, "--stun", silent,
        "--turn", f"macula:secret@{server}", "--turn", f"macula:wrong@{server}/tcp",
        "--timeout", "1", "--json",
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= JSON_KEYS
    assert result["udp"] is True and result["nat"]["type"] == "open"
    assert set(result["nat"]) >= {"type", "mapping", "filtering", "hairpinning", "port_allocation"}
    assert result["stun"][server]["ok"] is True and result["stun"][silent]["ok"] is False
    for entry in result["stun"].values():
        assert set(entry) >= {"ok", "latency_ms", "mapped", "error"}
    good, bad = result["turn"][f"macula@{server}/udp"], result["turn"][f"macula@{server}/tcp"]
    assert good["ok"] is True and good["relayed"] and good["latency_ms"] > 0
    assert bad["ok"] is False and bad["error"].startswith("bad credentials")
    assert result["gateway"]["ok"] is True and result["gateway"]["address"] == hp(gateway.address)
    assert result["portmap"]["checked"] is False
    assert "summary: UDP ok" in err and "STUN server" in err  # the table went to stderr


async def test_cli_nothing_answered_exits_1(silent: str) -> None:
    code, out, err = await macula("--gateway", silent, "--timeout", "0.5", "--json")
    assert code == 1, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["udp"] is False and result["public_addresses"] == []
    assert result["gateway"]["ok"] is False and "no STUN answer" in result["gateway"]["error"]
    assert "checking the gateway only" in err


async def test_cli_human_table_and_bad_flag(gateway: Gateway) -> None:
    code, out, err = await macula("--gateway", hp(gateway.address), "--timeout", "1")
    assert code == 0, err
    assert "NAT type         open" in out and out.rstrip().splitlines()[-1].startswith("summary: UDP ok")
    code, out, err = await macula("--turn", "alice:hunter2@nowhere")
    assert code == 2 and "--turn" in err and "hunter2" not in err


@pytest.mark.parametrize("nat_type,allocation,expected", [
    ("symmetric", "random", "hard side against port-restricted peers (random port allocation)"),
    ("symmetric", "preserving", "predicts its port (a fresh socket keeps it): no guessing"),
    ("port_restricted", "preserving", "guesses ports of symmetric-NAT peers"),
    ("full_cone", "preserving", "not needed from this side"),
    ("unknown", "unknown", None),
])
def test_report_says_what_hard_nat_guessing_would_do(nat_type, allocation, expected):
    report = Report(local="0.0.0.0:1", timeout=1.0, gateway=None, stun=[], turn=[],
                    ipv6=["2001:db8:1::2"])
    report.nat.type, report.nat.port_allocation = nat_type, allocation
    hint = report.hard_nat()
    assert hint == expected if expected is None else expected in hint
    text = format_report(report)
    assert "2001:db8:1::2" in text
    assert ("hard-NAT" in text) == (expected is not None)
    assert report.to_json()["hard_nat"] == hint and report.to_json()["ipv6"] == ["2001:db8:1::2"]


# -- the TLS link (issue 13) -----------------------------------------------------------------


async def test_tls_link_opens_or_says_which_step_failed(silent: str) -> None:
    gw = await Gateway.start(listen=(LO, 0), tls_listen=(LO, 0))
    try:
        pinned = f"{gw.node_id}@{hp(gw.address)}"
        report = await check(Targets(gateway=hp(gw.address), gateway_id=gw.node_id.text,
                                     gateway_tls=hp(gw.tls_address), listen=f"{LO}:0"))
        tls = report.to_json()["tls"]
        assert tls["ok"] is True and tls["via_proxy"] is False and tls["failed_step"] is None
        assert "TLS link ok" in report.summary()
        # Unpinned, the gateway's self-signed certificate does not verify: step "tls".
        report = await check(Targets(gateway=hp(gw.address), gateway_tls=hp(gw.tls_address),
                                     listen=f"{LO}:0"))
        assert report.tls is not None and report.tls.step == "tls" and not report.tls.ok
        # The config's pinned gateway and TLS port, and a proxy nobody listens on.
        config = Config(node=NodeSection(gateway=pinned, gateway_tls=hp(gw.tls_address),
                                         https_proxy=f"http://{silent}"))
        report = await check(Targets.from_config(config, env={}))
        assert report.tls is not None and report.tls.step == "tcp_connect"
        assert report.to_json()["tls"]["via_proxy"] is True
        assert "TLS link failed at tcp_connect through proxy" in report.summary()
    finally:
        await gw.close()
