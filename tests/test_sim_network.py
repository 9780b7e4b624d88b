"""The simulated network: sockets, routing, counters, latency, jitter, loss, determinism."""

from __future__ import annotations

import asyncio
import errno
import statistics

import pytest

from macula.net.endpoint import Address, DatagramEndpoint
from macula_lab.sim import (
    GilbertElliott,
    LinkConfig,
    SimEndpoint,
    SimNetwork,
    build_pair_topology,
    run_simulation,
    simulate,
)

SERVER = ("203.0.113.10", 3478)


def _collect(ep: SimEndpoint) -> list[tuple[float, bytes, Address]]:
    """Record (virtual arrival time, data, source) of everything `ep` receives."""
    loop = asyncio.get_running_loop()
    got: list[tuple[float, bytes, Address]] = []
    ep.set_receiver(lambda data, src: got.append((loop.time(), data, src)))
    return got


def test_sim_endpoint_satisfies_the_endpoint_protocol() -> None:
    async def main(net: SimNetwork) -> None:
        host = net.add_host("h", net.internet, "203.0.113.5")
        ep: DatagramEndpoint = host.open_endpoint(4000)
        assert ep.local_address == ("203.0.113.5", 4000)
        ep.close()

    simulate(main, seed=1)


def test_binding_follows_socket_rules() -> None:
    async def main(net: SimNetwork) -> None:
        host = net.add_host("h", net.internet, ["203.0.113.5", "203.0.113.6"])
        ephemeral = {host.open_endpoint().local_address[1] for _ in range(20)}
        assert len(ephemeral) == 20 and all(32768 <= p <= 60999 for p in ephemeral)

        host.open_endpoint(5000)
        with pytest.raises(OSError) as info:
            host.open_endpoint(5000)
        assert info.value.errno == errno.EADDRINUSE
        # Same port on the other address is fine, but a wildcard then conflicts.
        host.open_endpoint(5000, "203.0.113.6")
        with pytest.raises(OSError):
            host.open_endpoint(5000, "0.0.0.0")
        wild = host.open_endpoint(6000, "0.0.0.0")
        assert wild.local_address == ("0.0.0.0", 6000)
        with pytest.raises(OSError):
            host.open_endpoint(6000, "203.0.113.5")

        with pytest.raises(OSError) as info:
            host.open_endpoint(7000, "203.0.113.99")
        assert info.value.errno == errno.EADDRNOTAVAIL

        wild.close()
        assert host.open_endpoint(6000).local_address == ("203.0.113.5", 6000)
        opened = await host.open_udp_endpoint()
        assert opened.local_address[0] == "0.0.0.0"

    simulate(main, seed=1)


def test_send_never_raises_and_counts_errors() -> None:
    async def main(net: SimNetwork) -> None:
        ep = net.add_host("h", net.internet, "203.0.113.5").open_endpoint()
        bad_targets: list[object] = [("not-an-ip", 1), ("203.0.113.6", 0), ("203.0.113.6", 70000), "x", ("0.0.0.0", 9)]
        for target in bad_targets:
            ep.send(b"x", target)  # type: ignore[arg-type]
        ep.send(b"x" * 70000, ("203.0.113.6", 9))
        ep.send("text", ("203.0.113.6", 9))  # type: ignore[arg-type]
        assert ep.send_errors == 7
        ep.close()
        ep.send(b"x", ("203.0.113.6", 9))
        assert ep.send_errors == 8
        assert net.counters.sent == 0

    simulate(main, seed=1)


def test_delivery_is_asynchronous_and_addressed() -> None:
    async def main(net: SimNetwork) -> None:
        a = net.add_host("a", net.internet, "203.0.113.5").open_endpoint(1111)
        b = net.add_host("b", net.internet, "203.0.113.6").open_endpoint(2222)
        got = _collect(b)
        a.send(bytearray(b"hello"), ("203.0.113.6", 2222))
        assert got == []  # never delivered from inside send()
        await asyncio.sleep(0.001)
        assert got == [(0.0, b"hello", ("203.0.113.5", 1111))]

    simulate(main, seed=1)


def test_loopback_and_multi_address_hosts() -> None:
    async def main(net: SimNetwork) -> None:
        server = net.add_host("server", net.internet, ["203.0.113.10", "203.0.113.20"])
        client = net.add_host("c", net.internet, "203.0.113.30").open_endpoint(999)
        wild = server.open_endpoint(3478, "0.0.0.0")
        on_ip2 = server.open_endpoint(3479, "203.0.113.20")
        got_wild, got_client = _collect(wild), _collect(client)
        on_ip2.set_receiver(lambda data, src: on_ip2.send(data, src))

        client.send(b"1", ("203.0.113.10", 3478))
        client.send(b"2", ("203.0.113.20", 3478))
        client.send(b"3", ("203.0.113.20", 3479))
        local = server.open_endpoint(5555, "127.0.0.1")
        local.send(b"4", ("127.0.0.1", 3478))
        await asyncio.sleep(0.01)
        assert [(d, s) for _, d, s in got_wild] == [
            (b"1", ("203.0.113.30", 999)),
            (b"2", ("203.0.113.30", 999)),
            (b"4", ("127.0.0.1", 5555)),
        ]
        # A socket bound to the second address answers from it.
        assert [(d, s) for _, d, s in got_client] == [(b"3", ("203.0.113.20", 3479))]

    simulate(main, seed=1)


def test_unroutable_and_unheard_packets_are_dropped_and_counted() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "port_restricted", "open")
        server = topo.server.open_endpoint(3478)
        a = topo.host_a.open_endpoint()
        a.send(b"x", ("203.0.113.99", 1))  # nobody holds it
        server.send(b"x", ("192.168.1.2", a.local_address[1]))  # private: not on the internet
        a.send(b"x", ("192.168.1.77", 1))  # on A's LAN, but nobody there
        a.send(b"x", ("203.0.113.10", 4444))  # host exists, port closed
        a.send(b"x", ("203.0.113.10", 3478))  # open, but no receiver set
        await asyncio.sleep(0.01)
        assert net.counters.sent == 5
        assert net.counters.delivered == 0
        assert net.counters.dropped == {"no_route": 3, "no_listener": 1, "no_receiver": 1}
        assert net.element("internet").counters.dropped["no_route"] == 2
        assert net.element("a.lan0").counters.dropped["no_route"] == 1
        assert net.element("server").counters.dropped == {"no_listener": 1, "no_receiver": 1}
        assert net.element("a.nat0").counters.sent == 3

    simulate(main, seed=1)


def test_one_way_latency_and_rtt_are_as_configured() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "full_cone", "open", latency_ms=25)
        server = topo.server.open_endpoint(3478)
        server.set_receiver(lambda data, src: server.send(data, src))
        a, b = topo.host_a.open_endpoint(), topo.host_b.open_endpoint(4000)
        got_a, got_b = _collect(a), _collect(b)
        a.send(b"ping", SERVER)
        a.send(b"peer", (topo.b.public_ip, 4000))
        await asyncio.sleep(1)
        assert got_a[0][0] == pytest.approx(0.050)  # RTT to the server
        assert got_b[0][0] == pytest.approx(0.050)  # A -> B crosses both uplinks
        assert topo.a.uplinks[0].counters.sent == 3

    simulate(main, seed=1)


def _burst_arrivals(net: SimNetwork, link: LinkConfig, count: int) -> list[tuple[float, bytes, Address]]:
    """Send `count` numbered packets 1 ms apart over a shaped link; return what arrived."""

    async def main() -> list[tuple[float, bytes, Address]]:
        src_host = net.add_host("src", net.internet, "203.0.113.5", link=link)
        dst = net.add_host("dst", net.internet, "203.0.113.6").open_endpoint(9)
        got = _collect(dst)
        src = src_host.open_endpoint()
        for i in range(count):
            src.send(i.to_bytes(4, "big"), ("203.0.113.6", 9))
            await asyncio.sleep(0.001)
        await asyncio.sleep(2)
        return got

    return run_simulation(main, seed=net.seed)


def test_jitter_spreads_delay_but_keeps_order() -> None:
    net = SimNetwork(3)
    got = _burst_arrivals(net, LinkConfig.ms(40, jitter_ms=10), 300)
    delays = [t - int.from_bytes(d, "big") * 0.001 for t, d, _ in got]
    seqs = [int.from_bytes(d, "big") for _, d, _ in got]
    assert len(got) == 300
    assert seqs == sorted(seqs)  # FIFO link
    assert min(delays) >= 0.030 - 1e-9 and max(delays) <= 0.050 + 2e-3
    assert statistics.pstdev(delays) > 0.002
    # Packets 1 ms apart queue behind slower predecessors, so FIFO skews the mean upwards.
    assert 0.040 < statistics.mean(delays) < 0.050


def test_jitter_with_reordering_allowed_reorders() -> None:
    got = _burst_arrivals(SimNetwork(3), LinkConfig.ms(40, jitter_ms=10, reorder=True), 300)
    seqs = [int.from_bytes(d, "big") for _, d, _ in got]
    delays = [t - int.from_bytes(d, "big") * 0.001 for t, d, _ in got]
    assert sorted(seqs) == list(range(300))
    assert seqs != sorted(seqs)
    assert min(delays) >= 0.030 - 1e-9 and max(delays) <= 0.050 + 1e-9
    assert statistics.mean(delays) == pytest.approx(0.040, abs=0.002)


def _loss_pattern(seed: int, link: LinkConfig, count: int) -> list[bool]:
    got = _burst_arrivals(SimNetwork(seed), link, count)
    arrived = {int.from_bytes(d, "big") for _, d, _ in got}
    return [i not in arrived for i in range(count)]


def _mean_run(lost: list[bool]) -> float:
    runs, current = [], 0
    for flag in lost + [False]:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return statistics.mean(runs)


def test_random_loss_rate_within_tolerance() -> None:
    lost = _loss_pattern(11, LinkConfig(loss=0.1), 5000)
    assert sum(lost) / len(lost) == pytest.approx(0.1, abs=0.02)


def test_bursty_loss_has_longer_runs_than_uniform_at_same_mean() -> None:
    count = 6000
    model = GilbertElliott.from_mean(0.1, mean_burst=5)
    assert model.mean_loss == pytest.approx(0.1)
    bursty = _loss_pattern(12, LinkConfig(burst=model), count)
    uniform = _loss_pattern(12, LinkConfig(loss=0.1), count)
    assert sum(bursty) / count == pytest.approx(0.1, abs=0.035)
    assert sum(uniform) / count == pytest.approx(0.1, abs=0.02)
    assert _mean_run(uniform) < 1.4
    assert _mean_run(bursty) > 3.0


def _lossy_trace(seed: int) -> list[tuple]:
    async def main(net: SimNetwork) -> list[tuple]:
        topo = build_pair_topology(net, "symmetric", "cgnat", latency_ms=10, jitter_ms=5, loss=0.2)
        server = topo.server.open_endpoint(3478)
        server.set_receiver(lambda data, src: server.send(data, src))
        a, b = topo.host_a.open_endpoint(), topo.host_b.open_endpoint()
        for i in range(50):
            a.send(b"a%d" % i, SERVER)
            b.send(b"b%d" % i, SERVER)
            await asyncio.sleep(0.005)
        await asyncio.sleep(1)
        assert net.trace is not None
        return list(net.trace)

    return simulate(main, seed=seed, trace=True)


def test_same_seed_gives_identical_packet_traces() -> None:
    first = _lossy_trace(21)
    assert any(event[1] == "drop" for event in first)
    assert _lossy_trace(21) == first
    assert _lossy_trace(22) != first


def test_link_down_drops_and_link_config_changes_live() -> None:
    async def main(net: SimNetwork) -> None:
        host = net.add_host("h", net.internet, "203.0.113.5")
        dst = net.add_host("d", net.internet, "203.0.113.6").open_endpoint(9)
        got = _collect(dst)
        src = host.open_endpoint()
        host.link.up = False
        src.send(b"1", ("203.0.113.6", 9))
        host.link.up = True
        host.link.config = LinkConfig.ms(100)
        src.send(b"2", ("203.0.113.6", 9))
        await asyncio.sleep(1)
        assert [(t, d) for t, d, _ in got] == [(pytest.approx(0.1), b"2")]
        assert host.link.counters.dropped == {"link_down": 1}

    simulate(main, seed=1)
