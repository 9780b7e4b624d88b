"""Case: time to first byte, upgrade and ICE time in the simulator, against physical floors.

Every pair of NAT presets, N trials each, with `latency_ms` one way on each peer's uplink
(the gateway's own link is ideal). Then A and B are 2L apart one way through the gateway
and 2L apart directly, so one round trip between them is RTT = 4L on either path, and:

  first byte (connect() to the first message arriving): the QUIC handshake is one round
      trip over the relay, and the first message rides with the client's Finished, one
      more one-way trip: floor = 1.5 RTT (60 ms at 10 ms per uplink).
  upgrade (punch request to the first QUIC packet arriving on the direct path): request to
      the gateway and the punch order back out (2L = RTT/2), one check round trip (RTT),
      then the first direct packet one way (RTT/2): floor = 2 RTT (80 ms).
  ICE (stats()["ice"]["ice_ms"], when the session reports one: attempt start to the
      selected pair): candidates signalled through the gateway (RTT/2), then one check
      round trip (RTT); no data packet is waited for: floor = 1.5 RTT (60 ms).

Each figure is reported in ms and as a multiple of RTT and of its floor.
"""

from __future__ import annotations

from typing import Any

from macula_lab.bench.ice import distribution, percentile


def _figures(values: list[float], rtt: float, floor: float) -> dict[str, Any]:
    d = distribution(values)
    p50, p95 = d["p50"], d["p95"]
    return {
        "n": d["n"], "p50_ms": p50, "p95_ms": p95,
        "p50_rtts": round(p50 / rtt, 3) if p50 is not None else None,
        "p95_rtts": round(p95 / rtt, 3) if p95 is not None else None,
        "floor_ms": floor, "floor_rtts": round(floor / rtt, 3),
        "p50_x_floor": round(p50 / floor, 3) if p50 is not None else None,
        "p95_x_floor": round(p95 / floor, 3) if p95 is not None else None,
        "samples": d["samples"],
    }


def run(trials: int, *, latency_ms: float = 10.0, seed: int = 1,
        presets: tuple[str, ...] | None = None) -> dict[str, Any]:
    from macula_lab.matrix import pairs
    from macula_lab.sim.presets import PRESETS
    from macula_lab.sim_trial import TrialOptions, run_sim_trial

    options = TrialOptions(latency_ms=latency_ms, messages=20, interval=0.01)
    rows = []
    for a, b in pairs(presets or PRESETS):
        for t in range(trials):
            r = run_sim_trial(a, b, t, seed, options)
            rows.append({"a": a, "b": b, "trial": t, "connected": r.get("connected"),
                         "path": r.get("path"), "first_byte_ms": r.get("first_byte_ms"),
                         "upgrade_ms": r.get("upgrade_ms"), "ice_ms": r.get("ice_ms")})
    # Networks that drop UDP (issue 13): the relay runs over the TLS link on their side.
    blocked = [run_sim_trial(a, b, t, seed, options)
               for a, b in (("udp_blocked", "open"), ("udp_blocked", "port_restricted"),
                            ("proxy_only", "symmetric"), ("udp_blocked", "udp_blocked"))
               for t in range(trials)]
    rtt = 4 * latency_ms
    blocked_first = [r["first_byte_ms"] for r in blocked if r.get("first_byte_ms") is not None]
    first = [r["first_byte_ms"] for r in rows if r["first_byte_ms"] is not None]
    upgrade = [r["upgrade_ms"] for r in rows if r["upgrade_ms"] is not None]
    ice = [r["ice_ms"] for r in rows if r["ice_ms"] is not None]
    return {
        "latency_ms_per_uplink": latency_ms, "rtt_ms": rtt, "trials_per_pair": trials,
        "pairs": len(rows) // max(1, trials), "runs": len(rows),
        "connected": sum(1 for r in rows if r["connected"]),
        "direct": sum(1 for r in rows if r["path"] == "direct"),
        "first_byte": _figures(first, rtt, 1.5 * rtt),
        # The same floor: the link adds no round trip once the node is registered on it.
        "first_byte_udp_blocked": {**_figures(blocked_first, rtt, 1.5 * rtt),
                                   "connected": sum(1 for r in blocked if r.get("connected")),
                                   "tcp": sum(1 for r in blocked if r.get("tcp")),
                                   "runs": len(blocked)},
        "upgrade": _figures(upgrade, rtt, 2 * rtt),
        "ice": _figures(ice, rtt, 1.5 * rtt) if ice else {"n": 0, "note": "no ice_ms in session stats yet"},
        "slowest_upgrade_pairs": sorted(
            ({"pair": f"{r['a']}x{r['b']}", "upgrade_ms": r["upgrade_ms"]} for r in rows
             if r["upgrade_ms"] is not None and r["upgrade_ms"] >= (percentile(upgrade, 95) or 0)),
            key=lambda x: -x["upgrade_ms"])[:5],
    }
