"""The bench's machinery: its JSON contract, ratios as documented, figures from real runs.

One `macula bench --tiny --json` run (every case, on sizes too small to mean anything)
feeds the contract tests; nothing here asserts on speed.
"""

import json
import subprocess
import sys

import pytest

from macula_lab.bench import capacity, report
from macula_lab.bench.config import TINY
from macula_lab.bench.ice import percentile

RATIOS = ("direct_vs_aioquic", "relay_vs_coturn", "ice_vs_aioice", "relayed_byte_share")


@pytest.fixture(scope="module")
def tiny():
    out = subprocess.run([sys.executable, "-m", "macula.cli", "bench", "--tiny", "--json"],
                         capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1])


def test_last_line_is_the_json_contract(tiny):
    for name in RATIOS:
        assert name in tiny
        goal = tiny["goals"][name]
        assert set(goal) >= {"value", "target", "met"}
        assert goal["value"] == tiny[name]
    machine = tiny["machine"]
    for key in ("cpu_model", "cores", "python", "aioquic", "aioice", "coturn"):
        assert key in machine
    assert machine["cores"] >= 1 and machine["aioquic"] and machine["aioice"]
    assert tiny["mode"] == "tiny"
    assert set(tiny["cases"]) >= {"throughput", "relay", "ice", "sim_timing", "population",
                                  "population_off", "population_on", "capacity"}
    assert tiny["cases"]["population"]["settings"] == "shipped"
    assert tiny["cases"]["population"]["hard_nat"]["enabled"] is True
    assert tiny["cases"]["population_off"]["hard_nat"]["enabled"] is False
    for share in ("off_relayed_byte_share", "on_relayed_byte_share",
                  "relayed_before_upgrade_share"):
        assert 0 <= tiny["figures"][share] <= 1
    # Every case ran: a failure would be named here.
    assert {k: v for k, v in tiny["errors"].items() if k != "relay.coturn"} == {}


def test_ratios_are_ours_over_theirs_from_the_raw_figures(tiny):
    f = tiny["figures"]
    assert tiny["direct_vs_aioquic"] == round(f["direct_mbytes_per_s"] / f["aioquic_mbytes_per_s"], 4)
    assert tiny["ice_vs_aioice"] == round(
        f["macula_connect_to_direct_ms_p50"] / f["aioice_total_ms_p50"], 4)
    assert tiny["relayed_byte_share"] == round(f["relayed_bytes"] / f["total_bytes"], 4)
    if tiny["machine"]["coturn"] is None:
        assert tiny["relay_vs_coturn"] is None and "relay.coturn" in tiny["errors"]
    else:
        assert tiny["relay_vs_coturn"] == round(
            f["gateway_delivered_pps"] / f["coturn_delivered_pps"], 4)
    for name in RATIOS:
        goal = tiny["goals"][name]
        if goal["value"] is not None:
            assert goal["met"] == (goal["value"] >= goal["target"] if goal["op"] == ">="
                                   else goal["value"] <= goal["target"])


def test_figures_come_from_actual_runs(tiny):
    cases = tiny["cases"]
    thr = cases["throughput"]
    assert thr["macula_direct"]["bytes"] == TINY.bulk_bytes == thr["aioquic"]["bytes"]
    assert thr["macula_direct"]["paths"] == ["direct"]
    assert thr["macula_relay_session"]["paths"] == ["relay"]
    ours = cases["relay"]["gateway"]["loads"][-1]
    assert ours["sent"] == TINY.relay_datagrams
    assert 0 < ours["received"] <= ours["sent"] and ours["relayed_packets"] > 0
    if cases["relay"]["coturn"] is not None:
        assert cases["relay"]["coturn"]["loads"][-1]["received"] > 0
    assert len(cases["ice"]["macula"]["connect_to_direct_ms"]["samples"]) == TINY.ice_trials
    assert len(cases["ice"]["aioice"]["total_ms"]["samples"]) == TINY.ice_trials
    sim = cases["sim_timing"]
    assert sim["connected"] == sim["runs"] == 3  # open/port_restricted: 3 pairs, 1 trial
    assert sim["first_byte"]["p50_ms"] >= sim["first_byte"]["floor_ms"]
    pop = cases["population"]
    assert pop["nodes"] == TINY.population_nodes and pop["total_bytes"] > 0
    assert pop["relayed_bytes"] == pop["total_bytes"] - pop["bytes_by_path"].get("direct", 0)
    levels = cases["capacity"]["scaling"]["levels"]
    assert [row["registered"] for row in levels] == list(TINY.capacity_levels)
    assert levels[-1]["gateway_retained_bytes"] > levels[0]["gateway_retained_bytes"]
    assert cases["capacity"]["core_relay"][0]["relayed"] == TINY.core_relay_frames
    cluster = cases["capacity"]["cluster_scaling"]["levels"]
    assert [row["registered"] for row in cluster] == list(TINY.cluster_levels)
    assert cluster[0]["gateways"] == 3 and sum(cluster[0]["remote_nodes_known"]) > 0
    # Through two cluster members (a real redis-server is the directory) when there is one.
    mesh = cases["relay"]["mesh"]
    assert mesh is not None or "redis" in cases["relay"]["mesh_error"]
    if mesh is not None:
        assert 0 < mesh["loads"][-1]["received"] <= mesh["loads"][-1]["sent"]


def test_goals_and_ratios_on_known_values():
    assert report.ratio(3.0, 4.0) == 0.75
    assert report.ratio(3.0, 0) is None and report.ratio(None, 4.0) is None
    g = report.goals({"direct_vs_aioquic": 0.9, "relay_vs_coturn": 0.99,
                      "ice_vs_aioice": 0.5, "relayed_byte_share": None})
    assert g["direct_vs_aioquic"]["met"] is True
    assert g["relay_vs_coturn"]["met"] is False
    assert g["ice_vs_aioice"]["met"] is True
    assert g["relayed_byte_share"]["met"] is None
    cases = {
        "throughput": {"macula_direct": {"mbytes_per_s": 9.0}, "aioquic": {"mbytes_per_s": 10.0}},
        # Compared at the highest paced load both senders held, not the unpaced "max" row.
        "relay": {"gateway": {"loads": [
                      {"offered": 20000, "offered_pps": 19990.0, "delivered_pps": 15000.0},
                      {"offered": "max", "offered_pps": 40000.0, "delivered_pps": 30000.0}]},
                  "coturn": {"loads": [
                      {"offered": 20000, "offered_pps": 19995.0, "delivered_pps": 10000.0},
                      {"offered": "max", "offered_pps": 90000.0, "delivered_pps": 40000.0}]}},
        "ice": {"macula": {"connect_to_direct_ms": {"p50": 5.0}},
                "aioice": {"total_ms": {"p50": 20.0}}},
        "population": {"relayed_bytes": 5, "total_bytes": 200},
    }
    assert report.ratios(cases) == {"direct_vs_aioquic": 0.9, "relay_vs_coturn": 1.5,
                                    "ice_vs_aioice": 0.25, "relayed_byte_share": 0.025}
    assert set(report.ratios({}).values()) == {None}
    unpaced = {"relay": {side: {"loads": [cases["relay"][side]["loads"][1]]}
                         for side in ("gateway", "coturn")}}
    assert report.ratios(unpaced)["relay_vs_coturn"] == 0.75


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_retained_bytes_sees_aioquic_buffer_storage():
    from aioquic.buffer import Buffer

    holder = {"buffers": [Buffer(capacity=16384) for _ in range(3)]}
    assert capacity.retained_bytes(holder) >= 3 * 16384


def test_flood_bench_registers_through_retries() -> None:
    """The flood bench end to end, small: a node registers while Initials pour in."""
    import json as _json
    import subprocess as _subprocess
    import sys as _sys

    from macula_lab.bench.procs import worker_env

    out = _subprocess.run(
        [_sys.executable, "-m", "macula_lab.bench.flood", "--rate", "300", "--seconds", "4",
         "--distinct", "200"], capture_output=True, text=True, timeout=120, env=worker_env())
    assert out.returncode == 0, out.stderr
    result = _json.loads(out.stdout.strip().splitlines()[-1])
    assert result["initials_sent"] > 900 and result["registrations"] >= 1
    assert result["failed"] == 0 and result["register_ms_max"] < 1000


def test_cost_report_follows_the_population_figures(tiny):
    """relay_gb_per_1000_node_hours is the population's relayed bytes over its node-hours,
    and the monthly figure is that times 730 hours at the price per GB."""
    pop, cost = tiny["cases"]["population"], tiny["cost"]
    node_hours = pop["nodes"] * pop["virtual_seconds"] / 3600
    relay_gb = pop["bytes_by_path"].get("relay", 0) / 1e9 / node_hours * 1000
    assert tiny["relay_gb_per_1000_node_hours"] == cost["relay_gb_per_1000_node_hours"]
    assert abs(cost["relay_gb_per_1000_node_hours"] - relay_gb) <= 1e-4
    assert cost["turn_gb_per_1000_node_hours"] == 0  # the population has no TURN server
    monthly = (cost["relay_gb_per_1000_node_hours"] + cost["turn_gb_per_1000_node_hours"]) \
        * 730 * cost["relay_price_per_gb"]
    assert abs(tiny["monthly_relay_cost_per_1000_nodes"] - monthly) <= 0.01
    assert relay_gb > 0


def test_node_memory_bench_measures_a_real_gateway_process() -> None:
    """The RSS-per-node bench end to end, small (the figure itself is the bench's)."""
    import subprocess as _sp
    import sys as _sys

    out = _sp.run([_sys.executable, "-m", "macula_lab.bench.node_memory", "--nodes", "40",
                   "--settle", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 40 and result["gateway_rss_mb"] > result["gateway_rss_base_mb"] > 0
    assert set(result) >= {"rss_bytes_per_node", "target_bytes_per_node", "met"}
