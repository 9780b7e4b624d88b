"""The simulator matrix: every preset pair connects and loses nothing (issue 3's contract)."""

import json
import subprocess
import sys

from macula_lab.matrix import format_grid, make_row, pairs, run_matrix
from macula_lab.sim.presets import PRESETS
from macula_lab.sim_trial import TrialOptions, run_sim_trial

ROW_FIELDS = {"a", "b", "trials", "connected", "direct", "turn", "relay", "path",
              "first_byte_ms_p50", "upgrade_ms_p50", "ice_ms_p50", "lost", "duplicated"}


def test_pairs_cover_21_unordered_preset_pairs():
    all_pairs = pairs(PRESETS)
    assert len(all_pairs) == 21
    assert ("symmetric", "symmetric") in all_pairs
    assert len({frozenset(p) for p in all_pairs}) == 21


def test_full_simulated_matrix_connects_every_pair_without_loss():
    options = TrialOptions(latency_ms=5, messages=100)
    result = run_matrix(list(PRESETS), 1, lambda a, b, t: run_sim_trial(a, b, t, 7, options))
    assert len(result["pairs"]) == 21
    for row in result["pairs"]:
        assert row.keys() >= ROW_FIELDS
        assert row["connected"] == row["trials"] == 1, row
        assert row["lost"] == row["duplicated"] == row["reordered"] == 0, row
        # The first message crosses at least the 1.5 round trips of a QUIC handshake.
        assert row["first_byte_ms_p50"] >= 1.5 * 20
    assert result["summary"]["connectivity"] == 1.0
    assert "21/21 connected" in format_grid(result, list(PRESETS))


def test_trials_are_deterministic_for_a_seed():
    options = TrialOptions(latency_ms=10, loss=0.05, messages=50)
    first = run_sim_trial("cgnat", "symmetric", 0, 3, options)
    again = run_sim_trial("cgnat", "symmetric", 0, 3, options)
    assert first["first_byte_ms"] == again["first_byte_ms"]
    assert first["lost"] == 0


def test_loss_on_uplinks_costs_time_not_messages():
    options = TrialOptions(latency_ms=10, loss=0.1, messages=100)
    result = run_sim_trial("port_restricted", "cgnat", 0, 11, options)
    assert result["connected"] and result["lost"] == 0 and result["duplicated"] == 0


def test_row_counts_failed_trials_as_not_connected():
    row = make_row("open", "open", [
        {"connected": True, "path": "relay", "first_byte_ms": 5.0, "lost": 0, "duplicated": 0},
        {"connected": False, "path": None, "errors": ["ConnectTimeout: x"]},
    ])
    assert row["connected"] == 1 and row["relay"] == 1 and row["errors"] == ["ConnectTimeout: x"]


def test_cli_matrix_json_is_the_last_line(tmp_path):
    png = tmp_path / "grid.png"
    out = subprocess.run(
        [sys.executable, "-m", "macula.cli", "lab", "matrix", "--nat", "open,symmetric",
         "--trials", "1", "--messages", "20", "--json", "--png", str(png)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["a"], r["b"]) for r in result["pairs"]} == {
        ("open", "open"), ("open", "symmetric"), ("symmetric", "symmetric")}
    assert result["summary"]["backend"] == "simulator"
    assert png.stat().st_size > 1000


def test_cli_rejects_unknown_preset():
    out = subprocess.run([sys.executable, "-m", "macula.cli", "lab", "matrix", "--nat", "bogus"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "bogus" in out.stderr


def test_networks_that_drop_udp_connect_over_the_tls_link_and_count_as_tcp():
    """Issue 13 in the simulator: every lab node knows the gateway's TLS path; behind
    udp_blocked it dials it directly, behind proxy_only through the proxy."""
    options = TrialOptions(latency_ms=10, messages=60)
    results = {(a, b): run_sim_trial(a, b, 0, 1, options)
               for a, b in (("udp_blocked", "open"), ("proxy_only", "symmetric"),
                            ("udp_blocked", "proxy_only"), ("open", "port_restricted"))}
    for (a, b), result in results.items():
        assert result["connected"] and result["lost"] == result["duplicated"] == 0, result
        blocked = {a, b} & {"udp_blocked", "proxy_only"}
        assert result["tcp"] is bool(blocked), result
        assert result["path"] == ("relay" if blocked else "direct"), result
    assert results[("udp_blocked", "open")]["transports"] == ["tls", "udp"]
    row = make_row("udp_blocked", "open", [results[("udp_blocked", "open")]])
    assert row["tcp"] == 1 and row["relay"] == 1
