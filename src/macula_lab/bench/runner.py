"""Runs every case of one bench configuration and folds them into one result.

A case that fails is reported under "errors" with its ratio left null; the others still
run: a benchmark run is a measurement, and half a measurement beats none.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from macula_lab.bench import capacity, ice, population, relay, report, simtiming, throughput
from macula_lab.bench.config import BenchConfig
from macula_lab.bench.gateways import bench_limits
from macula_lab.bench.machine import describe
from macula_lab.bench.procs import worker_env

Progress = Callable[[str], None]


def _qh3_python(requested: str | None) -> str | None:
    if requested:
        return requested
    return sys.executable if importlib.util.find_spec("qh3") is not None else None


def _qh3_capabilities(python: str) -> dict[str, Any]:
    out = subprocess.run([python, "-m", "macula_lab.bench.qh3_eval", "qh3"], capture_output=True,
                         text=True, timeout=60, env=worker_env())
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "qh3_eval failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cases(config: BenchConfig, qh3_python: str | None) -> list[tuple[str, Callable[[], Any]]]:
    c = config
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("throughput", lambda: asyncio.run(throughput.run(
            total=c.bulk_bytes, chunk=c.bulk_chunk, repeats=c.bulk_repeats))),
        ("relay", lambda: asyncio.run(relay.run(
            list(c.relay_loads), count=c.relay_datagrams, size=c.relay_size,
            limit=c.relay_limit_s))),
        ("ice", lambda: asyncio.run(ice.run(c.ice_trials))),
        ("sim_timing", lambda: simtiming.run(c.sim_trials, presets=c.sim_presets)),
        # The same population three ways: as shipped, with every traversal extra off, and
        # with guessing turned up (population.SETTINGS).
        *[(case, functools.partial(population.run, c.population_nodes,
                                   messages=c.population_messages,
                                   size=c.population_message_bytes, settings=settings))
          for case, settings in (("population", "shipped"), ("population_off", "off"),
                                 ("population_on", "on"))],
        ("capacity", lambda: {
            "scaling": capacity.scaling(list(c.capacity_levels), idle_s=c.capacity_idle_s),
            "cluster_scaling": capacity.scaling(list(c.cluster_levels),
                                                idle_s=c.capacity_idle_s, gateways=3),
            "core_relay": [capacity.relay_core_pps(n, frames=c.core_relay_frames, size=c.relay_size)
                           for n in (c.capacity_levels[0], c.capacity_levels[-1])],
            "note": (f"--{c.mode} stops at {c.capacity_levels[-1]:,} registered nodes; the full "
                     f"run goes to 10,000" if c.capacity_levels[-1] < 10_000 else None),
        }),
    ]
    if qh3_python is not None:
        cases.append(("qh3", lambda: {
            **asyncio.run(throughput.engines(qh3_python, total=c.bulk_bytes, chunk=c.bulk_chunk,
                                             repeats=c.bulk_repeats)),
            "capabilities": _qh3_capabilities(qh3_python), "python": qh3_python}))
    return cases


def _profile(config: BenchConfig, directory: str) -> dict[str, Any]:
    """Profiled runs of the direct and relay cases (separate from the timed ones)."""
    from macula_lab.bench.profiling import cumulative_of, summarise

    Path(directory).mkdir(parents=True, exist_ok=True)
    paths = asyncio.run(throughput.profiled(directory, total=config.bulk_bytes,
                                            chunk=config.bulk_chunk))
    paths["gateway_relay"] = f"{directory}/gateway_relay.prof"
    asyncio.run(relay.gateway_relay([0], count=config.relay_datagrams, size=config.relay_size,
                                    limit=config.relay_limit_s, profile=paths["gateway_relay"]))
    paths["gateway_core_relay"] = f"{directory}/gateway_core_relay.prof"
    capacity.relay_core_pps(2, frames=config.core_relay_frames, size=config.relay_size,
                            profile=paths["gateway_core_relay"])
    hot = ["gateway/core.py:_relay", "gateway/core.py:receive_datagram",
           "gateway/core.py:datagrams_to_send", "gateway/server.py:_on_primary",
           "macula/driver.py:on_datagram", "macula/driver.py:flush",
           "net/udp.py:datagram_received", "net/udp.py:send",
           "node/core.py:receive_datagram", "node/core.py:_receive_direct",
           "node/core.py:_receive_relayed", "node/core.py:datagrams_to_send",
           "node/core.py:virtual_address", "node/core.py:get_timer", "node/node.py:_dispatch",
           "session/session.py:_on_stream_data", "node/node.py:_on_event",
           "quic/connection.py:receive_datagram", "quic/connection.py:datagrams_to_send",
           "asyncio/selector_events.py:sendto", "asyncio/selector_events.py:_read_ready"]
    out: dict[str, Any] = {"directory": directory}
    for name, path in paths.items():
        out[name] = {"file": path, **summarise(path, 12), "hot": cumulative_of(path, hot)}
    return out


def run_bench(config: BenchConfig, *, qh3_python: str | None = None,
              profile_dir: str | None = None, command: str = "macula bench",
              progress: Progress = lambda s: None,
              relay_price_per_gb: float = report.DEFAULT_RELAY_PRICE_PER_GB) -> dict[str, Any]:
    started = time.monotonic()
    qh3 = _qh3_python(qh3_python)
    cases: dict[str, Any] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name, case in _cases(config, qh3):
        progress(f"bench: {name} ...")
        t0 = time.monotonic()
        try:
            cases[name] = case()
        except Exception as exc:  # recorded; the run goes on
            errors[name] = f"{type(exc).__name__}: {exc}"
            cases[name] = None
        timings[name] = round(time.monotonic() - t0, 2)
        progress(f"bench: {name} done in {timings[name]} s" + (f" ({errors[name]})"
                                                                 if name in errors else ""))
    if cases.get("relay") and cases["relay"].get("coturn_error"):
        errors["relay.coturn"] = cases["relay"]["coturn_error"]
    result: dict[str, Any] = {"bench": "macula", "mode": config.mode,
                              "date": datetime.datetime.now(datetime.UTC).isoformat(
                                  timespec="seconds"),
                              "command": command}
    result.update(report.ratios(cases))
    if cases.get("qh3"):
        result["qh3_vs_aioquic"] = cases["qh3"]["qh3_vs_aioquic"]
    result["goals"] = report.goals(result)
    result["figures"] = report.figures(cases)
    result["cost"] = report.cost(cases, relay_price_per_gb)
    result.update({k: v for k, v in result["cost"].items() if k in (
        "relay_gb_per_1000_node_hours", "turn_gb_per_1000_node_hours",
        "monthly_relay_cost_per_1000_nodes")})
    if profile_dir:
        progress("bench: profiling the direct and relay cases ...")
        try:
            result["profile"] = _profile(config, profile_dir)
        except Exception as exc:
            errors["profile"] = f"{type(exc).__name__}: {exc}"
    result["machine"] = describe((cases.get("qh3") or {}).get("capabilities", {}).get("version"))
    result["config"] = config.as_dict()
    result["gateway_limits"] = bench_limits()[1]
    result["case_seconds"] = timings
    result["cases"] = cases
    result["errors"] = errors
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result
