"""The kernel backend of the NAT matrix: the lab agents (loopback, always) and KernelMatrix
trials in network namespaces (root only).

The default run has one kernel pair; the full 21-pair kernel matrix runs with
MACULA_LAB_FULL=1 (and under `make lab` through the CLI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from macula.cli import main as cli_main
from macula.identity import Identity
from macula.session.errors import MaculaError
from macula_lab import kernel_trial
from macula_lab.kernel import PRESETS, kernel_lab_available, netns
from macula_lab.kernel_trial import KernelLabUnavailable, KernelMatrix
from macula_lab.matrix import run_matrix
from macula_lab.peer import summarise_trial
from macula_lab.sim_trial import TrialOptions, run_sim_trial

AVAILABLE, REASON = kernel_lab_available()
FULL = os.environ.get("MACULA_LAB_FULL") == "1"

kernel = pytest.mark.kernel
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
needs_full = pytest.mark.skipif(not FULL, reason="full kernel NAT matrix: set MACULA_LAB_FULL=1")

AGENT = [sys.executable, "-u", "-m", "macula_lab.agent"]


def _netcheck(ns: str, gateway: str, *extra: str) -> dict:
    """`macula netcheck --json` from namespace `ns` against `gateway`: its JSON line."""
    out = netns.run_in(ns, netns.python_argv(
        "macula.cli", "netcheck", "--gateway", gateway, "--no-portmap", "--timeout", "2",
        "--json", *extra), env=netns.python_env(), check=False, timeout=90)
    return _last_json(out.stdout)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _sim_trial_keys() -> set[str]:
    result = run_sim_trial("open", "open", 0, 1, TrialOptions(messages=5))
    assert result["connected"], result
    return set(result)


# --- the agents on loopback (no namespaces needed) -----------------------------------------

def test_agents_run_a_trial_on_loopback(tmp_path) -> None:
    gateway = subprocess.Popen([*AGENT, "gateway", "--listen", "127.0.0.1:0", "--max-seconds",
                                "30"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        assert gateway.stdout is not None
        ready = json.loads(gateway.stdout.readline())
        assert ready["ready"] is True and len(ready["stun"]) == 2
        keys = [tmp_path / "a.key", tmp_path / "b.key"]
        ids = [Identity.load_or_create(k).node_id.text for k in keys]
        common = ["--gateway", ready["address"], "--messages", "50", "--max-seconds", "30"]
        peers = [subprocess.Popen([*AGENT, "peer", "--key-file", str(keys[i]), "--peer",
                                   ids[1 - i], "--dial" if i == 0 else "--accept", *common],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for i in (0, 1)]
        outs = [p.communicate(timeout=40)[0] for p in peers]
        assert [p.returncode for p in peers] == [0, 0], outs
        # A "registered" line comes first; the last line is the result.
        assert json.loads(outs[0].splitlines()[0])["registered"] is True
        dialer, acceptor = (_last_json(o) for o in outs)
        assert dialer["node"] == ids[0] and acceptor["node"] == ids[1]
        assert dialer["started_at"] > 0 and dialer["started_at"] <= time.monotonic()
        trial = summarise_trial(dialer, acceptor)
        assert trial["connected"] and trial["lost"] == trial["duplicated"] == 0, trial
    finally:
        gateway.terminate()
        out = gateway.communicate(timeout=10)[0]
    final = _last_json(out)
    assert gateway.returncode == 0 and final["stopped"] == "stopped by SIGTERM"
    assert {"relayed_packets", "relayed_bytes", "nodes_online", "malformed", "dropped"} <= set(final)
    assert final["registrations"] == 2 and final["relayed_bytes"] >= 0


def test_agent_max_seconds_ends_with_a_clear_error() -> None:
    # Nobody answers on this port (loopback only); the cap ends the probe, not its timeout.
    out = subprocess.run([*AGENT, "nat-probe", "--server", "127.0.0.1:9", "--timeout", "30",
                          "--max-seconds", "0.5"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert _last_json(out.stdout) == {"error": "nat-probe --max-seconds 0.5 reached"}


def test_agent_bad_arguments_still_end_with_json(tmp_path) -> None:
    out = subprocess.run([*AGENT, "peer", "--gateway", "127.0.0.1:1", "--key-file",
                          str(tmp_path / "k"), "--peer", "not-a-node-id", "--dial"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "not a node id" in _last_json(out.stdout)["error"]


def test_kernel_matrix_refuses_clearly_when_unavailable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reason = "kernel lab needs root (network namespaces, nftables)"
    monkeypatch.setattr(kernel_trial, "kernel_lab_available", lambda: (False, reason))
    with pytest.raises(KernelLabUnavailable, match=r"cannot run here: kernel lab needs root"):
        with KernelMatrix(TrialOptions()):
            pass  # pragma: no cover
    # A MaculaError: the CLI prints it as "macula: error: ..." and exits non-zero.
    assert issubclass(KernelLabUnavailable, MaculaError)
    assert cli_main(["lab", "matrix", "--kernel", "--trials", "1"]) != 0
    assert f"macula: error: the kernel NAT lab cannot run here: {reason}" in capsys.readouterr().err


# --- kernel ----------------------------------------------------------------------------------

def _our_namespaces(prefix: str) -> list[str]:
    return [n for n in netns.list_ns() if n.startswith(prefix)]


@kernel
@needs_kernel
def test_kernel_trial_port_restricted_x_cgnat() -> None:
    started = time.monotonic()
    with KernelMatrix(TrialOptions(latency_ms=5, messages=100)) as matrix:
        assert matrix.lab is not None
        prefix = matrix.lab.prefix
        result = matrix.run_trial("port_restricted", "cgnat", 0)
        # The pair is gone at once; the lab's core stays for the next trial.
        assert sorted(_our_namespaces(prefix)) == [prefix + "inet", prefix + "srv"]
    assert _our_namespaces(prefix) == []
    assert set(result) == _sim_trial_keys()
    assert result["connected"], result
    assert result["lost"] == result["duplicated"] == 0, result
    assert result["errors"] == [], result
    assert result["path"] in ("direct", "turn", "relay")
    # Handshake over 4 uplink crossings of 5 ms each way at the very least.
    assert result["first_byte_ms"] >= 20, result
    assert time.monotonic() - started < 30


@kernel
@needs_kernel
def test_kernel_matrix_moves_to_a_fresh_lab_when_subnets_run_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_trial, "MAX_PEERS", 2)  # one pair per lab
    with KernelMatrix(TrialOptions(messages=20)) as matrix:
        assert matrix.lab is not None
        first = matrix.lab.prefix
        results = [matrix.run_trial("open", "full_cone", t) for t in range(2)]
        assert matrix.lab.prefix != first
        second = matrix.lab.prefix
    assert _our_namespaces(first) == _our_namespaces(second) == []
    for result in results:
        assert result["connected"] and result["lost"] == result["duplicated"] == 0, result


@kernel
@needs_kernel
@needs_full
def test_full_kernel_matrix() -> None:
    with KernelMatrix(TrialOptions(latency_ms=5)) as matrix:
        result = run_matrix(list(PRESETS), 1, matrix.run_trial)
    assert len(result["pairs"]) == 21
    for row in result["pairs"]:
        assert row["connected"] == row["trials"] == 1, row
        assert row["lost"] == row["duplicated"] == 0, row
    assert result["summary"]["connectivity"] == 1.0


@kernel
@needs_kernel
def test_symmetric_behind_a_mapping_router_goes_direct() -> None:
    """Plain symmetric x symmetric cannot punch; when one router maps ports on request
    (miniupnpd: PCP, NAT-PMP, UPnP-IGD) the mapping makes the pair direct."""
    from macula_lab.kernel.miniupnpd import miniupnpd_available

    ok, why = miniupnpd_available()
    if not ok:
        pytest.skip(why)
    with KernelMatrix(TrialOptions(messages=40)) as backend:
        mapped = backend.run_trial("symmetric", "symmetric_upnp", 0)
        plain = backend.run_trial("symmetric", "symmetric", 0)
    assert mapped["connected"] and mapped["path"] == "direct", mapped
    assert plain["connected"] and plain["path"] == "relay", plain
    assert mapped["lost"] == mapped["duplicated"] == plain["lost"] == 0


@kernel
@needs_kernel
def test_symmetric_against_port_restricted_goes_direct_by_birthday_probing() -> None:
    """Real masquerade fully-random against a real port-restricted NAT: plain punching
    fails (natlab.md); with hard-NAT traversal the guessed path goes direct."""
    with KernelMatrix(TrialOptions(messages=40, hard_nat=True)) as backend:
        guessed = backend.run_trial("symmetric", "port_restricted", 0)
    assert guessed["connected"] and guessed["path"] == "direct", guessed
    assert guessed["lost"] == guessed["duplicated"] == guessed["reordered"] == 0
    runs = {r["role"]: r for r in guessed["hard_nat"]}
    assert runs["hard"]["allocation"] == "random"  # what the probe found fully-random to be
    assert 0 < runs["easy"]["sent"] < 2000


@kernel
@needs_kernel
def test_kernel_networks_without_udp_ride_tls_to_the_gateway_or_to_turn() -> None:
    """Issue 13 in real namespaces: nftables drops the NAT's UDP (udp_blocked) or
    everything but TCP to a real tinyproxy (proxy_only); coturn also listens on TLS."""
    from macula_lab.proxy import tinyproxy_available

    ok, why = tinyproxy_available()
    if not ok:
        pytest.skip(why)
    with KernelMatrix(TrialOptions(latency_ms=5, messages=60, turn=True)) as backend:
        result = run_matrix(["udp_blocked", "proxy_only"], 1, backend.run_trial)
    rows = {(r["a"], r["b"]): r for r in result["pairs"]}
    for row in rows.values():
        assert row["connected"] == row["trials"] == row["tcp"] == 1, row
        assert row["lost"] == row["duplicated"] == 0, row
    # Both behind UDP-dropping firewalls: TURN over TLS beats the gateway relay.
    assert rows[("udp_blocked", "udp_blocked")]["path"] == "turn"
    # Only the proxy gets out: the gateway's TLS path through it.
    assert rows[("proxy_only", "proxy_only")]["path"] == "relay"


@kernel
@needs_kernel
def test_one_ip_gateway_still_tells_symmetric_from_port_restricted(tmp_path) -> None:
    """Issue 16: a gateway on one IP (no OTHER-ADDRESS) answers STUN on its alternate
    port; netcheck's mapping test uses it, and nodes (told the port in the welcome) find
    their NAT types, so hard-NAT guessing, on as shipped, joins symmetric x
    port_restricted."""
    from macula_lab.kernel import KernelLab
    from macula_lab.kernel_trial import Agent

    with KernelLab() as lab:
        pair = lab.build_pair("symmetric", "port_restricted", latency_ms=5)
        address = f"{lab.server_ips[0]}:9443"
        gateway = Agent(lab, lab.server_ns, ["gateway", "--listen", address,
                                             "--max-seconds", "60"], tmp_path, "gw")
        try:
            assert gateway.read_line(15)["ready"]
            found = [_netcheck(ns, address)["nat"]["type"]
                     for ns in (pair.host_a_ns, pair.host_b_ns)]
        finally:
            gateway.stop()
    assert found == ["symmetric", "port_restricted"]
    # The shipped defaults (hard-NAT guessing on) take the pair direct.
    assert TrialOptions().hard_nat
    with KernelMatrix(TrialOptions(messages=40, one_ip=True)) as backend:
        guessed = backend.run_trial("symmetric", "port_restricted", 0)
    assert guessed["connected"] and guessed["path"] == "direct", guessed
    assert guessed["lost"] == guessed["duplicated"] == 0


@kernel
@needs_kernel
def test_netcheck_measures_how_long_a_real_nat_keeps_an_idle_remote(tmp_path) -> None:
    """Issue 16: binding-lifetime discovery against the CLI gateway on one IP, behind a
    real port-restricted NAT whose conntrack forgets an idle UDP flow after 8 s: idling
    3 and 6 s the state lives, 12 s it is gone; netcheck reports it and writes it where
    a node on this network finds it."""
    from macula_lab.kernel import KernelLab
    from macula_lab.kernel_trial import Agent

    config = tmp_path / "macula.toml"
    config.write_text(f'[node]\nkey_file = "{tmp_path / "node.key"}"\n')
    with KernelLab() as lab:
        pair = lab.build_pair("port_restricted", "open", latency_ms=5, mapping_timeout=8)
        address = f"{lab.server_ips[0]}:9443"
        gateway = Agent(lab, lab.server_ns, ["gateway", "--listen", address,
                                             "--max-seconds", "90"], tmp_path, "gw")
        try:
            assert gateway.read_line(15)["ready"]
            runs = [_netcheck(pair.host_a_ns, address, "--config", str(config), *extra)
                    ["binding_lifetime"] for extra in (["--binding-lifetime", "3,6,12"], [])]
        finally:
            gateway.stop()
    measured, cached = runs
    assert measured["source"] == "measured", measured
    assert (measured["alive_s"], measured["expired_s"]) == (6.0, 12.0), measured
    assert measured["keepalive_s"] == 3.0
    assert cached["source"] == "cache" and cached["alive_s"] == 6.0, cached
