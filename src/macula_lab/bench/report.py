"""The four ratios, the goals they are held to, and the summary a person reads.

Ratios are computed here, and only here, from the raw figures the cases return, so the
JSON always holds both and anyone can recompute one from the other:
  direct_vs_aioquic  = best macula direct MB/s / best raw aioquic MB/s   (higher is better)
  relay_vs_coturn    = gateway delivered datagrams/s / coturn's, at the highest paced
                       offered load both senders held (the unpaced "max" row only when
                       there is no paced one: unpaced senders do not offer equal loads)
                                                                         (higher is better)
  ice_vs_aioice      = median connect()->direct ms / median aioice gather+exchange+connect
                       ms                                                (lower is better)
  relayed_byte_share = bytes sent on any path but "direct" / all bytes sent, in the mixed
                       population                                        (lower is better)
"""

from __future__ import annotations

from typing import Any

# name: (comparison, target)
GOALS: dict[str, tuple[str, float]] = {
    "direct_vs_aioquic": (">=", 0.9),
    "relay_vs_coturn": (">=", 1.0),
    "ice_vs_aioice": ("<=", 0.5),
    "relayed_byte_share": ("<=", 0.05),
}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 4)


def _get(tree: dict[str, Any] | None, *path: Any) -> Any:
    node: Any = tree
    for key in path:
        if node is None:
            return None
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def relay_rows(relay: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(our row, coturn's row, offered load) that relay_vs_coturn compares."""
    ours, theirs = _get(relay, "gateway", "loads"), _get(relay, "coturn", "loads")
    if not ours:
        return None, None, None
    if not theirs:
        return ours[-1], None, ours[-1]["offered"]
    paced = [(o, t) for o, t in zip(ours, theirs)
             if o["offered"] != "max" and o["offered"] == t["offered"]
             and o["offered_pps"] >= 0.95 * o["offered"] and t["offered_pps"] >= 0.95 * t["offered"]]
    o, t = paced[-1] if paced else (ours[-1], theirs[-1])
    return o, t, o["offered"]


def ratios(cases: dict[str, Any]) -> dict[str, float | None]:
    thr, relay, ice, pop = (cases.get(k) for k in ("throughput", "relay", "ice", "population"))
    total = _get(pop, "total_bytes")
    return {
        "direct_vs_aioquic": ratio(_get(thr, "macula_direct", "mbytes_per_s"),
                                   _get(thr, "aioquic", "mbytes_per_s")),
        "relay_vs_coturn": ratio(_get(relay_rows(relay)[0], "delivered_pps"),
                                 _get(relay_rows(relay)[1], "delivered_pps")),
        "ice_vs_aioice": ratio(_get(ice, "macula", "connect_to_direct_ms", "p50"),
                               _get(ice, "aioice", "total_ms", "p50")),
        "relayed_byte_share": ratio(_get(pop, "relayed_bytes"), total) if total else None,
    }


HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
DEFAULT_RELAY_PRICE_PER_GB = 0.08  # a typical cloud egress list price, USD; pass your own


def cost(cases: dict[str, Any], price_per_gb: float = DEFAULT_RELAY_PRICE_PER_GB
         ) -> dict[str, Any]:
    """Relayed traffic of the population run (shipped defaults) per 1,000 node-hours,
    gateway relay and TURN apart, and what a month of 1,000 such nodes costs at
    `price_per_gb` (docs/COST.md explains the model and its limits)."""
    pop = cases.get("population") or {}
    nodes, seconds = pop.get("nodes"), pop.get("virtual_seconds")
    if not nodes or not seconds:
        return {"relay_gb_per_1000_node_hours": None, "turn_gb_per_1000_node_hours": None,
                "relay_price_per_gb": price_per_gb, "monthly_relay_cost_per_1000_nodes": None}
    node_hours = nodes * seconds / 3600
    by_path = pop.get("bytes_by_path") or {}

    def per_1000_node_hours(byte_count: int) -> float:
        return round(byte_count / 1e9 / node_hours * 1000, 4)

    relay = per_1000_node_hours(by_path.get("relay", 0))
    turn = per_1000_node_hours(by_path.get("turn", 0))
    monthly = (relay + turn) * HOURS_PER_MONTH * price_per_gb  # 1,000 nodes x 730 h
    return {
        "relay_gb_per_1000_node_hours": relay,
        "turn_gb_per_1000_node_hours": turn,
        "total_gb_per_1000_node_hours": per_1000_node_hours(pop.get("total_bytes", 0)),
        "population_node_hours": round(node_hours, 4),
        "relay_price_per_gb": price_per_gb,
        "monthly_relay_cost_per_1000_nodes": round(monthly, 2),
    }


def goals(values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (op, target) in GOALS.items():
        value = values.get(name)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"value": value, "target": target, "op": op, "met": met}
    return out


def figures(cases: dict[str, Any]) -> dict[str, Any]:
    """The raw numbers behind the ratios (and a few more), flat, for scripts and tables."""
    thr, relay, ice, pop, sim, cap = (cases.get(k) for k in (
        "throughput", "relay", "ice", "population", "sim_timing", "capacity"))
    rows = relay_rows(relay)
    return {
        "direct_mbytes_per_s": _get(thr, "macula_direct", "mbytes_per_s"),
        "aioquic_mbytes_per_s": _get(thr, "aioquic", "mbytes_per_s"),
        "relay_session_mbytes_per_s": _get(thr, "macula_relay_session", "mbytes_per_s"),
        "relay_tls_session_mbytes_per_s": _get(thr, "macula_relay_tls_session", "mbytes_per_s"),
        "relay_compared_at_offered": rows[2],
        "gateway_delivered_pps": _get(rows[0], "delivered_pps"),
        "coturn_delivered_pps": _get(rows[1], "delivered_pps"),
        "gateway_delivered_mbytes_per_s": _get(rows[0], "delivered_mbytes_per_s"),
        "coturn_delivered_mbytes_per_s": _get(rows[1], "delivered_mbytes_per_s"),
        "gateway_max_delivered_pps": _get(relay, "gateway", "loads", -1, "delivered_pps"),
        "coturn_max_delivered_pps": _get(relay, "coturn", "loads", -1, "delivered_pps"),
        # Datagrams relayed per CPU-second of the relay process, at the compared load:
        # steadier than delivered/s on a busy machine, where the relay may not be scheduled.
        "gateway_relay_pps_per_core": _get(rows[0], "relay_pps_per_core"),
        "coturn_relay_pps_per_core": _get(rows[1], "relay_pps_per_core"),
        "relay_per_core_vs_coturn": ratio(_get(rows[0], "relay_pps_per_core"),
                                          _get(rows[1], "relay_pps_per_core")),
        "macula_connect_to_direct_ms_p50": _get(ice, "macula", "connect_to_direct_ms", "p50"),
        "aioice_total_ms_p50": _get(ice, "aioice", "total_ms", "p50"),
        "relayed_bytes": _get(pop, "relayed_bytes"),
        "total_bytes": _get(pop, "total_bytes"),
        "off_relayed_byte_share": _get(cases.get("population_off"), "relayed_byte_share"),
        "on_relayed_byte_share": _get(cases.get("population_on"), "relayed_byte_share"),
        "relayed_before_upgrade_share": _get(pop, "relayed_before_upgrade_share"),
        "sim_first_byte_ms_p50": _get(sim, "first_byte", "p50_ms"),
        "sim_first_byte_ms_p95": _get(sim, "first_byte", "p95_ms"),
        "sim_first_byte_udp_blocked_ms_p50": _get(sim, "first_byte_udp_blocked", "p50_ms"),
        "sim_first_byte_udp_blocked_x_floor": _get(sim, "first_byte_udp_blocked", "p50_x_floor"),
        "sim_upgrade_ms_p50": _get(sim, "upgrade", "p50_ms"),
        "sim_upgrade_ms_p95": _get(sim, "upgrade", "p95_ms"),
        "sim_ice_ms_p50": _get(sim, "ice", "p50_ms"),
        "gateway_bytes_per_idle_node": _get(cap, "scaling", "bytes_per_idle_node"),
        # Per-node costs at the largest level over the smallest (issue 17's goal: <= 1.5).
        "gateway_idle_cpu_growth": _get(cap, "scaling", "idle_cpu_growth"),
        "gateway_registration_growth": _get(cap, "scaling", "registration_growth"),
        "cluster_bytes_per_node": _get(cap, "cluster_scaling", "levels", -1,
                                       "gateway_bytes_per_node"),
        "cluster_registrations_per_cpu_s": _get(cap, "cluster_scaling", "levels", -1,
                                                "registrations_per_cpu_s"),
        "cluster_idle_us_per_node_per_s": _get(cap, "cluster_scaling", "levels", -1,
                                               "idle_gateway_us_per_node_per_s"),
        "mesh_relay_delivered_pps": _get(relay, "mesh", "loads", -1, "delivered_pps"),
        "mesh_relay_mbytes_per_s": _get(relay, "mesh", "loads", -1, "delivered_mbytes_per_s"),
        "gateway_core_relay_pps_per_core": _get(cap, "core_relay", -1, "pps_per_core"),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value}{unit}"


def summary(result: dict[str, Any]) -> str:
    f, g, m = result["figures"], result["goals"], result["machine"]
    lines = [f"macula bench ({result['mode']}) on {m['cpu_model']}, {m['cores']} cores, "
             f"python {m['python']}, aioquic {m['aioquic']}, aioice {m['aioice']}, "
             f"coturn {m['coturn']}; {result['elapsed_s']} s"]
    rows = [
        ("direct_vs_aioquic", f"macula direct {_fmt(f['direct_mbytes_per_s'], ' MB/s')} vs raw "
                              f"aioquic {_fmt(f['aioquic_mbytes_per_s'], ' MB/s')} (relayed session "
                              f"{_fmt(f['relay_session_mbytes_per_s'], ' MB/s')}, over the TLS "
                              f"link {_fmt(f['relay_tls_session_mbytes_per_s'], ' MB/s')})"),
        ("relay_vs_coturn", f"gateway {_fmt(f['gateway_delivered_pps'], ' dgram/s')} vs coturn "
                            f"{_fmt(f['coturn_delivered_pps'], ' dgram/s')} delivered at "
                            f"{_fmt(f['relay_compared_at_offered'])} offered/s (unpaced: "
                            f"{_fmt(f['gateway_max_delivered_pps'])} vs "
                            f"{_fmt(f['coturn_max_delivered_pps'])})"),
        ("ice_vs_aioice", f"connect()->direct p50 {_fmt(f['macula_connect_to_direct_ms_p50'], ' ms')} "
                          f"vs aioice p50 {_fmt(f['aioice_total_ms_p50'], ' ms')}"),
        ("relayed_byte_share", f"{_fmt(f['relayed_bytes'])} of {_fmt(f['total_bytes'])} bytes "
                               f"relayed as shipped ({_fmt(f['relayed_before_upgrade_share'])} "
                               f"before an upgrade); everything off "
                               f"{_fmt(f['off_relayed_byte_share'])}, everything on "
                               f"{_fmt(f['on_relayed_byte_share'])}"),
    ]
    for name, detail in rows:
        goal = g[name]
        verdict = {True: "MET", False: "NOT MET", None: "NO DATA"}[goal["met"]]
        lines.append(f"  {name:<19} {_fmt(goal['value']):>8}  goal {goal['op']} {goal['target']:<5} "
                     f"{verdict:<8} {detail}")
    c = result.get("cost") or {}
    lines.append(f"  cost (population, shipped defaults): relay "
                 f"{_fmt(c.get('relay_gb_per_1000_node_hours'), ' GB')} + TURN "
                 f"{_fmt(c.get('turn_gb_per_1000_node_hours'), ' GB')} per 1,000 node-hours "
                 f"(of {_fmt(c.get('total_gb_per_1000_node_hours'), ' GB')}); "
                 f"{_fmt(c.get('monthly_relay_cost_per_1000_nodes'))} per month per 1,000 "
                 f"nodes at {c.get('relay_price_per_gb')}/GB")
    lines.append(f"  sim 10 ms/uplink: first byte p50 {_fmt(f['sim_first_byte_ms_p50'], ' ms')} "
                 f"p95 {_fmt(f['sim_first_byte_ms_p95'], ' ms')}, upgrade p50 "
                 f"{_fmt(f['sim_upgrade_ms_p50'], ' ms')} p95 {_fmt(f['sim_upgrade_ms_p95'], ' ms')}, "
                 f"ICE p50 {_fmt(f['sim_ice_ms_p50'], ' ms')}; UDP blocked: first byte p50 "
                 f"{_fmt(f['sim_first_byte_udp_blocked_ms_p50'], ' ms')} "
                 f"({_fmt(f['sim_first_byte_udp_blocked_x_floor'])} x floor)")
    lines.append(f"  gateway: {_fmt(f['gateway_bytes_per_idle_node'], ' B')} per idle node, "
                 f"{_fmt(f['gateway_relay_pps_per_core'])} relayed pkt/s per core (process; coturn "
                 f"{_fmt(f['coturn_relay_pps_per_core'])}), "
                 f"{_fmt(f['gateway_core_relay_pps_per_core'])} (core alone, no sockets)")
    lines.append(f"  mesh relay (two members, one hop): "
                 f"{_fmt(f['mesh_relay_delivered_pps'], ' dgram/s')} "
                 f"({_fmt(f['mesh_relay_mbytes_per_s'], ' MB/s')}) unpaced, beside "
                 f"{_fmt(f['gateway_max_delivered_pps'])} through one gateway")
    cap = result["cases"].get("capacity") or {}
    for title, key in (("one gateway", "scaling"), ("3-gateway cluster", "cluster_scaling")):
        scaling = cap.get(key) or {}
        if len(scaling.get("levels") or []) > 1:
            lines.append(f"  {title}: idle CPU per node x{_fmt(scaling.get('idle_cpu_growth'))}"
                         f", registration x{_fmt(scaling.get('registration_growth'))} from the "
                         f"smallest to the largest level")
        for row in scaling.get("levels", []):
            lines.append(f"    {row['registered']:>6} nodes: {row['gateway_retained_bytes'] / 1e6:8.1f} MB "
                         f"({row['gateway_bytes_per_node']:,} B/node), register "
                         f"{row['registration_gateway_ms_per_node']} ms/node "
                         f"({row.get('registrations_per_cpu_s')}/CPU-s), idle "
                         f"{row['idle_gateway_us_per_node_per_s']} us/node/s")
    if cap.get("note"):
        lines.append(f"    ({cap['note']})")
    qh3 = result["cases"].get("qh3")
    if qh3 and qh3.get("qh3_vs_aioquic") is not None:
        lines.append(f"  qh3 {qh3['qh3']['mbytes_per_s']} MB/s vs aioquic {qh3['aioquic']['mbytes_per_s']} "
                     f"MB/s: qh3_vs_aioquic {qh3['qh3_vs_aioquic']}")
    for case, error in result.get("errors", {}).items():
        lines.append(f"  ! {case}: {error}")
    return "\n".join(lines)
