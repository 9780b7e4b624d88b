"""The RFC 5780 classifier against every NAT preset, in the simulator and in the kernel lab.

Both halves run the gateway's real STUN responder (two ports on two IPs) and the same
detect_nat_behavior from a host behind the preset; the answers must match natlab.md's
probe table and each other. A disagreement points at the classifier, the simulator's NAT
models or the kernel rulesets - the table says which one moved.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from macula.nat.aio import detect_nat_behavior
from macula.nat.behavior import NatBehavior
from macula_lab.kernel import PRESETS as KERNEL_PRESETS
from macula_lab.kernel import KernelLab, kernel_lab_available
from macula_lab.kernel_trial import GatewayAgent, probe_nat_behaviors
from macula_lab.sim import PRESETS, SERVER_IPS, SimNetwork, build_pair_topology, run_simulation
from macula_lab.sim_trial import GATEWAY_PORT, start_sim_gateway

AVAILABLE, REASON = kernel_lab_available()

EIM = "endpoint_independent"
ADM = "address_dependent"
APDM = "address_and_port_dependent"

# natlab.md's probe table as (nat_type, mapping, filtering). Two NATs of port-restricted
# behaviour (cgnat) look like one port-restricted NAT from outside; "open" has no NAT, so
# nothing filters and nothing remaps.
EXPECTED: dict[str, tuple[str, str, str]] = {
    "open": ("open", EIM, EIM),
    "full_cone": ("full_cone", EIM, EIM),
    "restricted_cone": ("restricted_cone", EIM, ADM),
    "port_restricted": ("port_restricted", EIM, APDM),
    "symmetric": ("symmetric", APDM, APDM),
    "cgnat": ("port_restricted", EIM, APDM),
}
# Compared between the two labs only: hairpinning is off in both by default (None = not
# tested, as for "open"); the symmetric NAT picks random ports, the others keep the port.
EXTRA_FIELDS = ("hairpinning", "port_allocation")


def _row(b: dict[str, Any]) -> tuple[Any, ...]:
    return (b["nat_type"], b["mapping"], b["filtering"])


def _extra(b: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(b[f] for f in EXTRA_FIELDS)


async def _sim_probe(preset: str, seed: int) -> NatBehavior:
    net = SimNetwork(seed=seed)
    topo = build_pair_topology(net, preset, "open", latency_ms=5, seed=seed)
    ip1 = SERVER_IPS[0]
    # The gateway's sockets exactly as in sim_trial: main + alternate port on both IPs.
    gateway = await start_sim_gateway(topo.server)
    try:
        endpoint = topo.host_a.open_endpoint()
        try:
            return await detect_nat_behavior(endpoint, (ip1, GATEWAY_PORT))
        finally:
            endpoint.close()
    finally:
        await gateway.close()


def sim_behavior(preset: str, seed: int = 5) -> dict[str, Any]:
    behavior: NatBehavior = run_simulation(lambda: _sim_probe(preset, seed), seed=seed,
                                           time_limit=60.0)
    return {"nat_type": behavior.nat_type, "mapping": behavior.mapping,
            "filtering": behavior.filtering, "hairpinning": behavior.hairpinning,
            "port_allocation": behavior.port_allocation,
            "public_address": behavior.public_address, "notes": behavior.notes}


def test_both_labs_know_the_same_presets() -> None:
    assert tuple(PRESETS) == tuple(KERNEL_PRESETS) == tuple(EXPECTED)


@pytest.mark.parametrize("preset", PRESETS)
def test_simulator_classification_matches_natlab(preset: str) -> None:
    got = sim_behavior(preset)
    assert _row(got) == EXPECTED[preset], got
    assert _extra(got) == (None if preset == "open" else False,
                           "random" if preset == "symmetric" else "preserving"), got


@pytest.mark.kernel
@pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
def test_kernel_classification_agrees_with_simulator_and_natlab() -> None:
    # All six presets in one lab, probed at once: each has its own NAT namespaces, so
    # the probes cannot see each other's state.
    with KernelLab() as lab, tempfile.TemporaryDirectory() as tmp:
        peers = [lab.add_peer(preset) for preset in PRESETS]
        with GatewayAgent(lab, Path(tmp)) as gateway:
            assert gateway.ready["stun"] == ["203.0.113.10:9443", "203.0.113.10:9444",
                                             "203.0.113.20:9443", "203.0.113.20:9444"]
            kernel = dict(zip(PRESETS, probe_nat_behaviors(
                lab, [p.host_ns for p in peers], gateway.address)))
    sim = {preset: sim_behavior(preset) for preset in PRESETS}

    table = "\n".join(f"{p:>15}: natlab {EXPECTED[p]} sim {_row(sim[p]) + _extra(sim[p])} "
                      f"kernel {_row(kernel[p]) + _extra(kernel[p]) if 'error' not in kernel[p] else kernel[p]}"
                      for p in PRESETS)
    for preset, peer in zip(PRESETS, peers):
        got = kernel[preset]
        assert "error" not in got, table
        assert _row(got) == EXPECTED[preset] == _row(sim[preset]), table
        assert _extra(got) == _extra(sim[preset]), table
        # The mapping seen is the preset's outermost public address.
        assert got["public_address"][0] == peer.public_ip, got
