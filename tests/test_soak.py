"""The soak: 12 nodes behind mixed NATs with churn for a (virtual) minute, exactly as `make
test` runs it through the CLI, plus the accounting it rests on. The kernel soak (real
minutes, a process per node) runs with MACULA_LAB_FULL=1 as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from macula_lab.kernel import kernel_lab_available
from macula_lab.soak_member import Flow, _Counter
from macula_lab.soak_plan import MAX_RSS_GROWTH, merge_records, neighbours, soak_ok

AVAILABLE, REASON = kernel_lab_available()
FULL = os.environ.get("MACULA_LAB_FULL") == "1"


def assert_clean(result: dict) -> None:
    summary = json.dumps({k: v for k, v in result.items() if k != "logged"})
    assert result["failures"] == [], summary
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["errors"] == 0, summary
    assert result["unfinished"] == 0 and result["messages"] == result["sent"] > 0, summary
    assert result["rss_growth"] is not None and result["rss_growth"] <= MAX_RSS_GROWTH, summary
    assert result["churn"] >= 5 and result["nodes_started"] == 12 + result["churn"], summary
    assert soak_ok(result)


@pytest.mark.timeout(300)
def test_one_minute_soak_of_twelve_nodes_through_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "macula.cli", "lab", "soak", "--minutes", "1",
                          "--nodes", "12", "--json"], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "simulator"
    assert_clean(result)
    assert result["messages"] > 10_000
    # Every NAT kind took part: sessions ended on both paths.
    assert result["paths"].get("direct", 0) > 0 and result["paths"].get("relay", 0) > 0
    assert result["gateway_nodes_online"] == 12  # no registration outlived its node
    assert result["gateway_retained_kb_end"] <= 1.1 * result["gateway_retained_kb_warm"]
    assert "soak (simulator)" in out.stderr


def test_ring_neighbours() -> None:
    assert neighbours(0, 12) == [1, 3, 9, 11]
    assert neighbours(5, 12) == [2, 4, 6, 8]
    assert neighbours(0, 2) == [1] and neighbours(1, 3) == [0, 2]
    # Symmetric: if j is i's neighbour, i is j's.
    for n in (2, 3, 5, 7, 12):
        for i in range(n):
            assert all(i in neighbours(j, n) for j in neighbours(i, n))


def test_merge_counts_every_flow_once() -> None:
    records = [
        {"from": "a", "to": "b", "sent": 10, "conversations": 1},
        {"from": "a", "to": "b", "sent": 5, "conversations": 1},  # a second conversation
        {"from": "a", "to": "b", "delivered": 14, "duplicated": 1, "reordered": 0,
         "fin_total": 15, "unfinished": 0},
        {"from": "b", "to": "a", "sent": 3, "conversations": 1},  # never received at all
    ]
    merged = merge_records(records)
    assert merged == {"flows": 2, "sent": 18, "messages": 14, "lost": 4, "duplicated": 1,
                      "reordered": 0, "unfinished": 0}


def test_receiver_counter_finds_duplicates_and_reordering_in_bounded_memory() -> None:
    flow, counter = Flow(), _Counter()
    for seq in [0, 1, 2, 4, 3, 3, 1, 5]:
        counter.record(seq, flow)
    assert (flow.delivered, flow.duplicated, flow.reordered) == (6, 2, 1)
    assert counter.next == 6 and not counter.ahead


@pytest.mark.kernel
@pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
@pytest.mark.skipif(not FULL, reason="kernel soak (90 s real time): set MACULA_LAB_FULL=1")
@pytest.mark.timeout(600)
def test_kernel_soak_one_minute() -> None:
    from macula_lab.kernel_soak import run_kernel_soak

    result = run_kernel_soak(minutes=1, nodes=12)
    assert result["backend"] == "kernel"
    assert_clean(result)
