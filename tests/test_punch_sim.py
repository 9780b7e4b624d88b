"""Phase 2 in the simulator: who goes direct, and nothing lost across upgrade or downgrade."""

import asyncio

import pytest

from macula.gateway.server import Gateway
from macula.identity import Identity
from macula.node.node import Node
from macula.session.errors import NoDirectPath
from macula_lab.matrix import pairs
from macula_lab.peer import run_peer, summarise_trial
from macula_lab.sim import SimNetwork, build_pair_topology, run_simulation
from macula_lab.sim.presets import PRESETS, guessing_pair
from macula_lab.sim_trial import TrialOptions, run_sim_trial


def expected_path(a: str, b: str) -> str:
    """With the shipped defaults (hard-NAT guessing on) only two symmetric NATs stay
    relayed; tests/test_hard_nat.py has the pairs that stay relayed without it."""
    return "relay" if a == b == "symmetric" else "direct"


@pytest.mark.parametrize("a,b", pairs(PRESETS))
def test_matrix_cell(a, b):
    result = run_sim_trial(a, b, 0, 5, TrialOptions(latency_ms=10, messages=60))
    assert result["connected"], result
    assert result["path"] == expected_path(a, b)
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    if result["path"] == "direct" and not guessing_pair(a, b):
        # gateway RTT (20) + check RTT (40) + one way (20) is the physical floor.
        assert 80 <= result["upgrade_ms"] <= 100


async def _pair(net, a, b, *, latency_ms=10, **node_kwargs):
    topo = build_pair_topology(net, a, b, latency_ms=latency_ms, seed=3)
    s = topo.server
    gateway = await Gateway.start(
        endpoint=s.open_endpoint(9443, "203.0.113.10"),
        stun_endpoints=[s.open_endpoint(9444, "203.0.113.10"), s.open_endpoint(9443, "203.0.113.20"),
                        s.open_endpoint(9444, "203.0.113.20")])
    kw_a = node_kwargs.pop("a_kwargs", {})
    kw_b = node_kwargs.pop("b_kwargs", {})
    na = await Node.start(Identity.generate(), gateway=("203.0.113.10", 9443),
                          endpoint=topo.host_a.open_endpoint(), **{**node_kwargs, **kw_a})
    nb = await Node.start(Identity.generate(), gateway=("203.0.113.10", 9443),
                          endpoint=topo.host_b.open_endpoint(), **{**node_kwargs, **kw_b})
    return topo, gateway, na, nb


def test_numbered_stream_survives_upgrade_downgrade_and_reupgrade():
    async def main():
        net = SimNetwork(seed=9)
        topo, gateway, na, nb = await _pair(net, "port_restricted", "cgnat")
        nat_b = topo.b.outer_nat.nat
        original = nat_b.inbound_verdict
        blocked = {"on": False}

        def cut_direct(src, dst, now):
            if blocked["on"] and src[0] == topo.a.public_ip:
                return None, "test_cut"
            return original(src, dst, now)

        nat_b.inbound_verdict = cut_direct
        loop = asyncio.get_running_loop()
        marks = {}

        async def fault():
            while not (na.session(nb.node_id) and na.session(nb.node_id).connection_type == "direct"):
                await asyncio.sleep(0.01)
            marks["direct"] = loop.time()
            await asyncio.sleep(1.0)
            blocked["on"] = True
            marks["cut"] = loop.time()
            while na.session(nb.node_id).connection_type == "direct":
                await asyncio.sleep(0.01)
            marks["relay"] = loop.time()
            await asyncio.sleep(1.0)
            blocked["on"] = False
            while na.session(nb.node_id).connection_type != "direct":
                await asyncio.sleep(0.01)
            marks["direct_again"] = loop.time()

        fault_task = asyncio.create_task(fault())
        ra, rb = await asyncio.gather(
            run_peer(na, nb.node_id, dial=True, messages=800, interval=0.01),
            run_peer(nb, na.node_id, dial=False, messages=800, interval=0.01))
        await asyncio.wait_for(fault_task, 30)
        history = [h["path"] for h in ra["path_history"]]
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return summarise_trial(ra, rb), marks, history

    result, marks, history = run_simulation(main, seed=9)
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    assert history[:4] == ["relay", "direct", "relay", "direct"]
    assert marks["relay"] - marks["cut"] <= 3.0  # fell back within 3 s
    assert result["path"] == "direct"


def test_mixed_deployment_phase1_node_talks_over_relay():
    async def main():
        net = SimNetwork(seed=4)
        topo, gateway, na, nb = await _pair(net, "full_cone", "full_cone",
                                            b_kwargs={"nat_traversal": False})
        ra, rb = await asyncio.gather(run_peer(na, nb.node_id, dial=True, messages=50),
                                      run_peer(nb, na.node_id, dial=False, messages=50))
        refusals = dict(gateway.core.punch_refusals)
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return summarise_trial(ra, rb), refusals

    result, refusals = run_simulation(main, seed=4)
    assert result["connected"] and result["path"] == "relay" and result["lost"] == 0
    assert refusals.get("peer_disabled", 0) >= 1


@pytest.mark.parametrize("strategy", ["always_relay", "opportunistic"])
def test_always_relay_never_upgrades_and_prefer_direct_false_stays(strategy):
    async def main():
        net = SimNetwork(seed=5)
        extra = {"strategy": strategy}
        if strategy == "opportunistic":
            extra["prefer_direct"] = False
        topo, gateway, na, nb = await _pair(net, "open", "open", **extra)
        ra, rb = await asyncio.gather(run_peer(na, nb.node_id, dial=True, messages=50),
                                      run_peer(nb, na.node_id, dial=False, messages=50))
        coordinated = gateway.core.punches_coordinated
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return summarise_trial(ra, rb), coordinated

    result, coordinated = run_simulation(main, seed=5)
    assert result["path"] == "relay" and result["lost"] == 0 and coordinated == 0


def test_direct_only_never_relays_payload():
    async def main():
        net = SimNetwork(seed=6)
        topo, gateway, na, nb = await _pair(net, "open", "cgnat", strategy="direct_only")
        ra, rb = await asyncio.gather(run_peer(na, nb.node_id, dial=True, messages=50),
                                      run_peer(nb, na.node_id, dial=False, messages=50))
        relayed = gateway.core.relayed_bytes
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return summarise_trial(ra, rb), relayed

    result, relayed = run_simulation(main, seed=6)
    assert result["connected"] and result["path"] == "direct" and result["lost"] == 0
    assert relayed == 0


def test_direct_only_without_a_direct_path_is_a_clear_error():
    async def main():
        net = SimNetwork(seed=7)
        topo, gateway, na, nb = await _pair(net, "symmetric", "symmetric", strategy="direct_only",
                                            hole_punch_timeout=2.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await na.connect(nb.node_id, timeout=10)
        except NoDirectPath as exc:
            return str(exc), loop.time() - t0
        finally:
            for n in (na, nb):
                await n.close()
            await gateway.close()
        return None, None

    message, elapsed = run_simulation(main, seed=7)
    assert message is not None and "hole_punch_timeout" in message
    assert 2.0 <= elapsed < 2.5


def test_nat_discovery_classifies_and_tells_the_gateway():
    async def main():
        net = SimNetwork(seed=8)
        topo, gateway, na, nb = await _pair(net, "symmetric", "restricted_cone")
        await asyncio.sleep(5)
        types = (na.detect_nat_type().nat_type, nb.detect_nat_type().nat_type)
        entry = gateway.core.registry.get(na.node_id.raw)
        seen = entry.nat_type
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return types, seen

    types, seen = run_simulation(main, seed=8)
    assert types == ("symmetric", "restricted_cone")
    assert seen == "symmetric"


def test_packets_are_copied_onto_the_pair_the_peers_check_came_on_until_one_is_selected():
    """While ICE runs, a relayed packet also goes straight to where the peer's first check
    came from: the acceptor gets the dialer's data on the direct path as soon as it selects
    it (45 ms into its attempt here), not one more one-way trip later (62 ms before).
    Nothing is lost, duplicated or reordered."""

    async def main():
        net = SimNetwork(seed=4)
        _topo, gateway, na, nb = await _pair(net, "port_restricted", "port_restricted")
        sides = await asyncio.gather(
            run_peer(na, nb.node_id, dial=True, messages=60, interval=0.005),
            run_peer(nb, na.node_id, dial=False, messages=60, interval=0.005))
        stats = [n.session(p.node_id).stats() for n, p in ((na, nb), (nb, na))]
        for n in (na, nb):
            await n.close()
        await gateway.close()
        return sides, stats

    (dialer, acceptor), (stats_a, stats_b) = run_simulation(main, seed=4)
    result = summarise_trial(dialer, acceptor)
    assert result["path"] == "direct"
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    for stats in (stats_a, stats_b):
        assert stats["upgrade"]["early_copies"] > 0
    assert acceptor["upgrade"]["upgrade_ms"] <= 50, acceptor["upgrade"]
    # Copies are not counted as sent: the relay carried the same packet, and what one side
    # sent over it is what the other received there.
    a_paths, b_paths = stats_a["bytes_by_path"], stats_b["bytes_by_path"]
    assert a_paths["relay"]["sent"] == b_paths["relay"]["received"]
