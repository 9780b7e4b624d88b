"""RFC 4787 NAT behaviours: the pure Nat decisions, then NAT boxes on the network."""

from __future__ import annotations

import asyncio
import random

import pytest

from macula.net.endpoint import Address
from macula_lab.sim import (
    Behavior,
    Nat,
    NatConfig,
    PortAllocation,
    SimEndpoint,
    SimNetwork,
    build_pair_topology,
    build_site,
    preset_chain,
    simulate,
)

EIM = Behavior.ENDPOINT_INDEPENDENT
ADM = Behavior.ADDRESS_DEPENDENT
APDM = Behavior.ADDRESS_AND_PORT_DEPENDENT

WAN = "198.51.100.11"
INSIDE = ("192.168.1.2", 5000)
X1 = ("203.0.113.10", 3478)
X2 = ("203.0.113.10", 3479)
Y1 = ("203.0.113.20", 3478)
Y2 = ("203.0.113.20", 3479)


def _nat(**kwargs: object) -> Nat:
    return Nat(NatConfig(**kwargs), WAN, random.Random(1))  # type: ignore[arg-type]


# -- mapping behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, same_x2, same_y1",
    [(EIM, True, True), (ADM, True, False), (APDM, False, False)],
)
def test_mapping_behaviour(mapping: Behavior, same_x2: bool, same_y1: bool) -> None:
    nat = _nat(mapping=mapping, port_allocation=PortAllocation.SEQUENTIAL)
    first = nat.outbound(INSIDE, X1, 0.0)
    assert first is not None and first[0] == WAN
    assert (nat.outbound(INSIDE, X2, 0.0) == first) is same_x2
    assert (nat.outbound(INSIDE, Y1, 0.0) == first) is same_y1
    assert nat.outbound(INSIDE, X1, 0.0) == first  # stable for the same destination


# -- filtering behaviour -------------------------------------------------------------------


@pytest.mark.parametrize(
    "filtering, admitted",
    [
        (EIM, [True, True, True, True]),
        (ADM, [True, True, False, False]),
        (APDM, [True, False, False, False]),
    ],
)
def test_filtering_behaviour(filtering: Behavior, admitted: list[bool]) -> None:
    nat = _nat(filtering=filtering)
    mapped = nat.outbound(INSIDE, X1, 0.0)
    assert mapped is not None
    verdicts = [nat.inbound_verdict(remote, mapped, 1.0) for remote in (X1, X2, Y1, Y2)]
    assert [internal == INSIDE for internal, _ in verdicts] == admitted
    assert all(reason == "nat_filtered" for internal, reason in verdicts if internal is None)


def test_inbound_without_mapping_is_dropped() -> None:
    nat = _nat(filtering=EIM)
    assert nat.inbound_verdict(X1, (WAN, 5000), 0.0) == (None, "no_mapping")
    nat.outbound(INSIDE, X1, 0.0)
    assert nat.inbound(X1, ("198.51.100.99", 5000), 0.0) is None  # not our address


# -- port allocation -----------------------------------------------------------------------


def test_port_preserving_falls_back_to_sequential_on_collision() -> None:
    nat = _nat(port_allocation=PortAllocation.PRESERVING, port_range=(1024, 65535))
    assert nat.outbound(INSIDE, X1, 0.0) == (WAN, 5000)
    other = ("192.168.1.3", 5000)
    third = ("192.168.1.4", 5000)
    assert nat.outbound(other, X1, 0.0) == (WAN, 5001)
    assert nat.outbound(third, X1, 0.0) == (WAN, 5002)
    assert nat.outbound(("192.168.1.5", 7000), X1, 0.0) == (WAN, 7000)


def test_sequential_allocation_hands_out_consecutive_ports() -> None:
    nat = _nat(mapping=APDM, port_allocation=PortAllocation.SEQUENTIAL, port_range=(20000, 30000))
    ports = [nat.outbound(INSIDE, (X1[0], 4000 + i), 0.0) for i in range(5)]
    assert ports == [(WAN, 20000 + i) for i in range(5)]


def test_random_allocation_is_spread_and_seeded() -> None:
    def ports(seed: int) -> list[int]:
        nat = Nat(NatConfig(mapping=APDM, port_allocation="random"), WAN, random.Random(seed))  # type: ignore[arg-type]
        out = [nat.outbound(INSIDE, (X1[0], 4000 + i), 0.0) for i in range(50)]
        return [mapped[1] for mapped in out if mapped is not None]

    first = ports(1)
    assert len(set(first)) == 50 and all(1024 <= p <= 65535 for p in first)
    steps = {b - a for a, b in zip(first, first[1:])}
    assert 1 not in steps or len(steps) > 10  # not a sequential run
    assert ports(1) == first and ports(2) != first


def test_port_exhaustion_drops_until_mappings_expire() -> None:
    nat = _nat(mapping=APDM, port_allocation=PortAllocation.SEQUENTIAL, port_range=(2000, 2001), mapping_timeout=10.0)
    assert nat.outbound(INSIDE, X1, 0.0) == (WAN, 2000)
    assert nat.outbound(INSIDE, X2, 0.0) == (WAN, 2001)
    assert nat.outbound(INSIDE, Y1, 1.0) is None
    assert nat.outbound(INSIDE, Y1, 11.0) is not None


# -- mapping timeout -----------------------------------------------------------------------


def test_mapping_expires_without_traffic() -> None:
    nat = _nat(filtering=APDM, mapping_timeout=5.0)
    mapped = nat.outbound(INSIDE, X1, 0.0)
    assert mapped is not None
    assert nat.inbound(X1, mapped, 4.9) == INSIDE
    nat2 = _nat(filtering=APDM, mapping_timeout=5.0, inbound_refresh=False)
    mapped2 = nat2.outbound(INSIDE, X1, 0.0)
    assert mapped2 is not None
    assert nat2.inbound_verdict(X1, mapped2, 5.1) == (None, "no_mapping")
    assert nat2.mappings(5.1) == []


def test_outbound_traffic_refreshes_the_mapping() -> None:
    nat = _nat(mapping_timeout=5.0, inbound_refresh=False)
    for t in (0.0, 4.0, 8.0, 12.0):
        mapped = nat.outbound(INSIDE, X1, t)
    assert mapped is not None
    assert nat.inbound(X1, mapped, 16.5) == INSIDE
    assert nat.inbound(X1, mapped, 17.5) is None


@pytest.mark.parametrize("inbound_refresh", [True, False])
def test_inbound_refresh_is_configurable(inbound_refresh: bool) -> None:
    nat = _nat(mapping_timeout=5.0, inbound_refresh=inbound_refresh)
    mapped = nat.outbound(INSIDE, X1, 0.0)
    assert mapped is not None
    assert nat.inbound(X1, mapped, 4.0) == INSIDE
    assert (nat.inbound(X1, mapped, 8.0) == INSIDE) is inbound_refresh


def test_permissions_expire_separately_from_the_mapping() -> None:
    nat = _nat(mapping=EIM, filtering=APDM, mapping_timeout=5.0)
    mapped = nat.outbound(INSIDE, X1, 0.0)
    for t in (3.0, 6.0, 9.0):
        assert nat.outbound(INSIDE, Y1, t) == mapped  # keeps the mapping alive
    assert mapped is not None
    assert nat.inbound_verdict(X1, mapped, 9.5) == (None, "nat_filtered")
    assert nat.inbound(Y1, mapped, 9.5) == INSIDE


def test_random_allocation_after_expiry_gives_a_new_port_and_flush_forgets() -> None:
    nat = _nat(mapping=EIM, port_allocation=PortAllocation.RANDOM, mapping_timeout=5.0)
    before = nat.outbound(INSIDE, X1, 0.0)
    after = nat.outbound(INSIDE, X1, 10.0)
    assert before != after
    nat.flush()
    assert nat.mappings() == []
    assert after is not None and nat.inbound(X1, after, 10.0) is None


def test_udp_blocked_and_hairpin_decisions() -> None:
    blocked = _nat(filtering=EIM, udp_blocked=True)
    assert blocked.outbound(INSIDE, X1, 0.0) is None
    assert blocked.inbound_verdict(X1, (WAN, 5000), 0.0) == (None, "udp_blocked")

    other = ("192.168.1.3", 6000)
    assert _nat(filtering=EIM).hairpin_verdict(INSIDE, (WAN, 6000), 0.0) == (None, "no_hairpin")
    nat = _nat(filtering=EIM, hairpinning=True)
    assert nat.hairpin_verdict(INSIDE, (WAN, 6000), 0.0) == (None, "no_mapping")
    nat.outbound(other, X1, 0.0)
    assert nat.hairpin_verdict(INSIDE, (WAN, 6000), 0.0) == (((WAN, 5000), other), "")


# -- NAT boxes on the network --------------------------------------------------------------

SERVER = ("203.0.113.10", 3478)


def _echo_address_server(ep: SimEndpoint) -> None:
    """Reply to every datagram with the source address it came from ("ip:port")."""
    ep.set_receiver(lambda data, src: ep.send(f"{src[0]}:{src[1]}".encode(), src))


def _inbox(ep: SimEndpoint) -> list[tuple[bytes, Address]]:
    got: list[tuple[bytes, Address]] = []
    ep.set_receiver(lambda data, src: got.append((data, src)))
    return got


async def _observed(ep: SimEndpoint, inbox: list[tuple[bytes, Address]], server: Address = SERVER) -> Address:
    inbox.clear()
    ep.send(b"?", server)
    await asyncio.sleep(0.5)
    assert inbox, "no reply from the server"
    ip, port = inbox[-1][0].decode().rsplit(":", 1)
    inbox.clear()
    return (ip, int(port))


def test_mapping_timeout_end_to_end_and_keepalive() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, preset_chain("port_restricted", mapping_timeout=5.0), "open")
        server = topo.server.open_endpoint(3478)
        _echo_address_server(server)
        idle, kept = topo.host_a.open_endpoint(), topo.host_a.open_endpoint()
        idle_in, kept_in = _inbox(idle), _inbox(kept)
        idle_map = await _observed(idle, idle_in)
        kept_map = await _observed(kept, kept_in)
        for _ in range(4):  # keepalive every 3 s < 5 s timeout
            kept.send(b"k", SERVER)
            await asyncio.sleep(3)
        kept_in.clear()
        server.send(b"late", idle_map)
        server.send(b"late", kept_map)
        await asyncio.sleep(0.1)
        assert idle_in == [] and kept_in == [(b"late", SERVER)]
        assert net.element("a.nat0").counters.dropped["no_mapping"] == 1

    simulate(main, seed=1)


@pytest.mark.parametrize("hairpin", [True, False])
@pytest.mark.parametrize("preset", ["full_cone", "port_restricted"])
def test_hairpinning(preset: str, hairpin: bool) -> None:
    async def main(net: SimNetwork) -> None:
        _echo_address_server(net.add_host("server", net.internet, "203.0.113.10").open_endpoint(3478))
        site = build_site(net, "lan", preset_chain(preset, hairpinning=hairpin), hosts=2)
        one, two = site.hosts[0].open_endpoint(), site.hosts[1].open_endpoint()
        in_one, in_two = _inbox(one), _inbox(two)
        map_one, map_two = await _observed(one, in_one), await _observed(two, in_two)
        assert map_one[0] == map_two[0] == site.public_ip
        for _ in range(3):  # simultaneous sends open port-restricted filters both ways
            one.send(b"from-one", map_two)
            two.send(b"from-two", map_one)
            await asyncio.sleep(0.1)
        if hairpin:
            # The looped-back packet carries the sender's external mapping, not its LAN address.
            assert (b"from-one", map_one) in in_two and (b"from-two", map_two) in in_one
        else:
            assert in_one == [] and in_two == []
            assert site.nats[0].counters.dropped["no_hairpin"] == 6

    simulate(main, seed=1)


def test_udp_blocked_drops_everything() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, preset_chain("full_cone", udp_blocked=True), "open")
        server = topo.server.open_endpoint(3478)
        _echo_address_server(server)
        a = topo.host_a.open_endpoint(5000)
        got = _inbox(a)
        a.send(b"?", SERVER)
        server.send(b"unsolicited", (topo.a.public_ip, 5000))
        await asyncio.sleep(1)
        assert got == []
        assert topo.a.nats[0].counters.dropped == {"udp_blocked": 2}
        assert topo.server.counters.delivered == 0

    simulate(main, seed=1)


def test_cgnat_translates_twice() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "cgnat", "open")
        server = topo.server.open_endpoint(3478)
        _echo_address_server(server)
        a = topo.host_a.open_endpoint(40000)
        observed = await _observed(a, _inbox(a))
        home, carrier = topo.a.nats
        assert topo.host_a.ip == "192.168.1.2"
        assert home.wan_ip.startswith("100.64.1.") and carrier.lan_ip.startswith("100.64.1.")
        assert carrier.wan_ip.startswith("198.51.100.")
        # Port-preserving at both levels: the server sees the carrier address, same port.
        assert observed == (carrier.wan_ip, 40000)
        assert [m.internal for m in home.nat.mappings()] == [("192.168.1.2", 40000)]
        assert [m.internal for m in carrier.nat.mappings()] == [(home.wan_ip, 40000)]

    simulate(main, seed=1)


@pytest.mark.parametrize("carrier_hairpin", [False, True])
def test_two_peers_behind_one_cgnat(carrier_hairpin: bool) -> None:
    async def main(net: SimNetwork) -> None:
        _echo_address_server(net.add_host("server", net.internet, "203.0.113.10").open_endpoint(3478))
        carrier_cfg = preset_chain("port_restricted", hairpinning=carrier_hairpin)
        carrier = build_site(net, "carrier", carrier_cfg, hosts=0)
        assert carrier.lan is not None and carrier.lan.subnets[0].is_private
        homes = [
            build_site(net, f"home{i}", "port_restricted", outside=carrier.lan)
            for i in (1, 2)
        ]
        one, two = (home.host.open_endpoint() for home in homes)
        in_one, in_two = _inbox(one), _inbox(two)
        map_one, map_two = await _observed(one, in_one), await _observed(two, in_two)
        assert map_one[0] == map_two[0] == carrier.public_ip
        for _ in range(3):
            one.send(b"1", map_two)
            two.send(b"2", map_one)
            await asyncio.sleep(0.1)
        assert bool(in_one and in_two) is carrier_hairpin

    simulate(main, seed=1)
