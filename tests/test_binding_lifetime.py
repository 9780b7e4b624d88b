"""Binding-lifetime discovery (RFC 5780 section 4.6 on one socket): the sans-IO probe on a
fake clock against a model NAT and the real gateway STUN responder, then a node in the
simulator that measures its NAT, keeps its keepalives under what it found, and remembers
it for its network."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from macula.errors import InvalidValue
from macula.identity import Identity
from macula.nat import lifetime_cache
from macula.nat.binding_lifetime import BindingLifetime, BindingLifetimeProbe
from macula.nat.stun_responder import StunResponder
from macula.net.endpoint import Address
from macula.node.node import Node
from macula.status import node_status
from macula_lab.sim import SERVER_IPS, SimNetwork, build_site, run_simulation
from macula_lab.sim.presets import PORT_RESTRICTED
from macula_lab.sim_trial import GATEWAY_PORT, start_sim_gateway

GW = "203.0.113.10"
P1, P2 = (GW, 3478), (GW, 3479)
PUBLIC_IP = "198.51.100.7"


class PortRestrictedNat:
    """One EIM mapping, state per remote that lives `lifetime` s after our last packet to
    that remote (what Linux conntrack does per 5-tuple)."""

    def __init__(self, lifetime: float, port: int = 40000) -> None:
        self.lifetime = lifetime
        self.port = port
        self.last_sent: dict[Address, float] = {}

    def outbound(self, dest: Address, now: float) -> Address:
        self.last_sent[dest] = now
        return PUBLIC_IP, self.port

    def admits(self, src: Address, dest_port: int, now: float) -> bool:
        seen = self.last_sent.get(src)
        return dest_port == self.port and seen is not None and now - seen <= self.lifetime


def run(probe: BindingLifetimeProbe, nat: PortRestrictedNat, *, answer_p2: bool = True,
        interrupt_at: float | None = None, limit: float = 2000.0) -> BindingLifetime:
    """Drive the probe on a fake clock; the gateway answers at once (no latency)."""
    responder = StunResponder([P1, P2])
    now = probe.now
    for _ in range(10_000):
        for data, dest in probe.datagrams_to_send(now):
            src = nat.outbound(dest, now)
            if dest == P2 and not answer_p2:
                continue
            answer = responder.handle(data, src, [P1, P2].index(dest))
            assert answer is not None
            origin = [P1, P2][answer.socket]
            target = answer.destination(src)
            if nat.admits(origin, target[1], now):
                probe.receive_datagram(answer.data, origin, now)
        if probe.done:
            assert probe.result is not None
            return probe.result
        timer = probe.get_timer()
        assert timer is not None and timer <= limit
        if interrupt_at is not None and timer >= interrupt_at:
            now, interrupt_at = interrupt_at, None
            nat.outbound(P2, now)  # NAT discovery talked to the alternate port
            probe.interrupted(now)
            continue
        now = max(now, timer)
        probe.handle_timer(now)
    raise AssertionError("the probe never finished")


@pytest.mark.parametrize("lifetime,alive,expired", [
    (10.0, None, 15.0), (20.0, 15.0, 30.0), (100.0, 60.0, 120.0), (600.0, 240.0, None)])
def test_the_bounds_bracket_the_nats_lifetime(lifetime, alive, expired):
    found = run(BindingLifetimeProbe(P1, P2, 0.0), PortRestrictedNat(lifetime))
    assert (found.alive_s, found.expired_s, found.measurable) == (alive, expired, True)


def test_keepalives_need_half_of_what_survived():
    assert BindingLifetime(60.0, 120.0).keepalive_s == 30.0
    assert BindingLifetime(None, 15.0).keepalive_s == 3.75  # gone within the first round
    assert BindingLifetime(240.0, None).keepalive_s is None  # never expired: no constraint
    assert BindingLifetime(None, None, measurable=False).keepalive_s is None


def test_a_round_whose_state_something_else_refreshed_runs_again():
    nat = PortRestrictedNat(20.0)
    found = run(BindingLifetimeProbe(P1, P2, 0.0), nat, interrupt_at=25.0)
    # Without the rerun the 30 s round would have passed (refreshed at 25 s).
    assert (found.alive_s, found.expired_s) == (15.0, 30.0)
    assert any("run again" in note for note in found.notes)


def test_an_alternate_port_that_never_answers_measures_nothing():
    found = run(BindingLifetimeProbe(P1, P2, 0.0), PortRestrictedNat(100.0), answer_p2=False)
    assert not found.measurable and found.keepalive_s is None


def test_bad_setups_are_refused():
    with pytest.raises(InvalidValue):
        BindingLifetimeProbe(P1, ("203.0.113.20", 3479), 0.0)  # another IP
    with pytest.raises(InvalidValue):
        BindingLifetimeProbe(P1, P2, 0.0, schedule=(30.0, 15.0))


def test_the_cache_survives_restarts_and_bad_files(tmp_path):
    path = tmp_path / lifetime_cache.FILE_NAME
    lifetime_cache.remember(path, "192.168.1.2>198.51.100.7", BindingLifetime(60.0, 120.0))
    assert lifetime_cache.load(path) == {"192.168.1.2>198.51.100.7": BindingLifetime(60.0, 120.0)}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.write_text("{not json")
    assert lifetime_cache.load(path) == {}  # logged, measured again: never fatal
    path.write_text(json.dumps({"n": {"alive_s": "soon"}}))
    assert lifetime_cache.load(path) == {}


def test_a_node_measures_its_nat_follows_it_and_remembers_it(tmp_path):
    """A port-restricted NAT that forgets an idle remote after 8 s: the node finds it
    lives 5 s but not 10 (schedule 5, 10, 20), sends its gateway keepalives 2.5 s apart
    (configured: 5 s), and the next node on the same network starts knowing it."""
    known = tmp_path / "known_gateways"

    async def main() -> tuple:
        net = SimNetwork(seed=3)
        server = net.add_host("server", net.internet, SERVER_IPS, seed=3)
        gateway = await start_sim_gateway(server)
        nat = dataclasses.replace(PORT_RESTRICTED, mapping_timeout=8.0)
        site = build_site(net, "a", nat, latency_ms=10, seed=4)
        options = dict(gateway=(SERVER_IPS[0], GATEWAY_PORT), known_gateways=str(known),
                       lifetime_schedule=(5.0, 10.0, 20.0))
        node = await Node.start(Identity.generate(), endpoint=site.host.open_endpoint(40000),
                                **options)
        for _ in range(400):
            if node.binding_lifetime is not None:
                break
            await asyncio.sleep(0.25)
        found, keepalive = node.binding_lifetime, node.core.link.keepalive_interval
        status = node_status(node)  # what `macula status` shows
        await asyncio.sleep(30.0)  # idle at the new pace: the gateway still hears us
        registered = node.registered
        await node.close()
        again = await Node.start(Identity.generate(), endpoint=site.host.open_endpoint(40000),
                                 **options)
        await asyncio.sleep(2.0)  # NAT discovery only: the lifetime is known already
        remembered = again.binding_lifetime
        await again.close()
        await gateway.close()
        return found, keepalive, registered, remembered, status

    found, keepalive, registered, remembered, status = run_simulation(main, seed=3,
                                                                      time_limit=600)
    assert status["binding_lifetime"]["keepalive_s"] == 2.5
    assert status["gateway_keepalive_s"] == 2.5
    assert found is not None and (found.alive_s, found.expired_s) == (5.0, 10.0)
    assert keepalive == 2.5 and registered
    assert remembered == BindingLifetime(5.0, 10.0)
    assert lifetime_cache.load(lifetime_cache.beside(known))
