"""`macula lab cluster` in the simulator: the issue's acceptance runs, at 3 gateways and 24
nodes behind the NAT presets (the kernel-lab runs are under `make lab`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from macula_lab.cluster import ClusterOptions, cluster_ok, run_sim_cluster
from macula_lab.kernel import kernel_lab_available
from macula_lab.redis_server import redis_available

pytestmark = pytest.mark.timeout(300)
FIELDS = {"gateways", "nodes", "sessions", "connected", "direct", "relayed", "lost",
          "duplicated", "failover_ms_p50", "failover_ms_max", "max_pause_ms"}


def test_sessions_across_gateways_all_connect_and_punchable_pairs_go_direct():
    result = run_sim_cluster(ClusterOptions(gateways=3, nodes=24))
    assert cluster_ok(result), result
    assert result["connected"] == result["sessions"] == 12
    assert result["cross_gateway_sessions"] == 12 and result["homes"] == [8, 8, 8]
    # Pairs of two symmetric NATs relay across the mesh; every other pair of these presets
    # punches through (the kind of NAT each reported reaches the other's gateway).
    for pair in result["pairs"]:
        hard = pair["nat"] == ["symmetric", "symmetric"]
        assert pair["path"] == ("relay" if hard else "direct"), pair
    assert result["lost"] == result["duplicated"] == 0
    assert result["failover_ms_p50"] is None and result["failover_ms_max"] is None


def test_killing_a_gateway_rehomes_its_nodes_in_seconds_and_loses_nothing():
    result = run_sim_cluster(ClusterOptions(gateways=3, nodes=24, kill=1))
    assert cluster_ok(result), result
    assert result["failover_nodes"] == result["failover_moved"] == 8
    assert result["failover_ms_p50"] <= 3000 and result["failover_ms_max"] <= 10000
    assert result["lost"] == result["duplicated"] == 0
    # Direct sessions never noticed: no pause beyond the message spacing.
    for pair in result["pairs"]:
        if pair["path"] == "direct":
            assert pair["max_pause_ms"] < 100, pair


def test_draining_a_gateway_pauses_no_session_for_a_second():
    result = run_sim_cluster(ClusterOptions(gateways=3, nodes=24, drain=1))
    assert cluster_ok(result), result
    assert result["failover_moved"] == 8 and result["max_pause_ms"] <= 1000
    assert result["lost"] == 0


def test_with_the_directory_down_sessions_flow_and_new_ones_open_on_one_gateway():
    result = run_sim_cluster(ClusterOptions(gateways=3, nodes=24, redis_down=10))
    assert cluster_ok(result), result
    assert result["lost"] == 0 and result["connected"] == result["sessions"]
    assert result["outage_session"]["connected"] is True


def test_the_command_prints_one_json_object_last():
    run = subprocess.run([sys.executable, "-m", "macula.cli", "lab", "cluster", "--gateways",
                          "2", "--nodes", "4", "--duration", "4", "--kill", "1", "--json"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) >= FIELDS and result["gateways"] == 2 and result["nodes"] == 4
    assert result["failover_ms_max"] is not None


def test_bad_combinations_are_refused_with_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "macula.cli", "lab", "cluster", "--gateways",
                          "2", "--kill", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "at least one gateway running" in run.stderr


# --- the kernel lab: gateway processes, a real redis-server, real NATs (root) ------------------
AVAILABLE, REASON = kernel_lab_available()
needs_kernel = pytest.mark.skipif(not AVAILABLE or not redis_available()[0],
                                  reason=REASON or redis_available()[1])
needs_full = pytest.mark.skipif(os.environ.get("MACULA_LAB_FULL") != "1",
                                reason="full kernel cluster: set MACULA_LAB_FULL=1 (make lab)")


@pytest.mark.kernel
@needs_kernel
def test_kernel_cluster_a_killed_gateway_is_replaced_and_nothing_is_lost():
    from macula_lab.kernel_cluster import run_kernel_cluster

    result = run_kernel_cluster(ClusterOptions(gateways=3, nodes=8, kill=1, duration=8))
    assert cluster_ok(result), result
    assert result["failover_moved"] == result["failover_nodes"] > 0
    assert result["failover_ms_p50"] <= 3000 and result["failover_ms_max"] <= 10000
    assert result["lost"] == result["duplicated"] == 0 and result["gateway_errors"] == 0


@pytest.mark.kernel
@needs_kernel
@needs_full
@pytest.mark.parametrize("fault", [{}, {"kill": 1}, {"drain": 1}, {"redis_down": 10.0}],
                         ids=["none", "kill", "drain", "redis_down"])
def test_kernel_cluster_acceptance_runs(fault):
    from macula_lab.kernel_cluster import run_kernel_cluster

    result = run_kernel_cluster(ClusterOptions(gateways=3, nodes=24, **fault))
    assert cluster_ok(result), result
    assert result["lost"] == result["duplicated"] == 0
    if fault.get("kill"):
        assert result["failover_ms_p50"] <= 3000 and result["failover_ms_max"] <= 10000
    if fault.get("drain"):
        assert result["max_pause_ms"] <= 1000
