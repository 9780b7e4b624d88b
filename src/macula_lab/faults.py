"""The chaos catalogue: which faults exist, the sessions each one disturbs, and the scoring.

A fault runs one or more node pairs (each a session with a timed stream both ways, see
lab.timed_stream) and disturbs them once. The backends (lab.chaos for the simulator,
lab.kernel_chaos for network namespaces) only inject; scoring is shared and reads the
receivers' logs, so "recovered" means the same thing everywhere:

- recovery is measured from `clear_at`, the moment the fault stops acting: the injection
  itself for instantaneous faults (nat_rebind, uplink_switch, turn_down), the end of the
  impaired window otherwise (gateway back up, loss over, traffic resuming after the quiet
  period) - before then no path can be expected to work.
- resume_ms: until the first message *sent* at or after clear_at is delivered, in each
  direction (the larger of the two).
- path_ms: until the session is on its best path again (the pair's expected path after the
  fault, on both sides, and staying there to the end); 0 when it never left it.
- recovery_ms = max(resume_ms, path_ms).
- recovered: both sides connected, every message delivered exactly once, both directions
  resumed, and both sides end on the expected path.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from macula_lab.timed_stream import StreamPlan

DIRECT = "direct"
RELAY = "relay"
TURN = "turn"
# Chaos nodes run without hard-NAT guessing (on as shipped): the faults' relayed sessions
# pair a symmetric NAT with another NAT and must stay relayed for the fault to hit the
# relay path. The matrix measures what guessing does.
CHAOS_HARD_NAT = False


@dataclass(frozen=True)
class PairSpec:
    """One session a fault disturbs: dialer behind `a`, acceptor behind `b`.

    `expected` is the best path before the fault, `after` the one it must come back to
    (default the same); `move_to` is the preset of the network the dialer moves to
    (uplink_switch)."""

    a: str
    b: str
    expected: str
    after: str | None = None
    strategy: str = "opportunistic"
    move_to: str | None = None
    turn: bool = False

    @property
    def label(self) -> str:
        moved = f" -> {self.move_to}" if self.move_to else ""
        return f"{self.a}{moved} x {self.b}" + ("" if self.strategy == "opportunistic"
                                                 else f" ({self.strategy})")

    @property
    def expected_after(self) -> str:
        return self.after or self.expected


@dataclass(frozen=True)
class FaultSpec:
    """`warmup` s of stream before the fault, `window` s of fault (0 = instantaneous),
    `tail` s of stream after it; `mapping_timeout` shortens every NAT's mappings."""

    name: str
    description: str
    pairs: tuple[PairSpec, ...]
    warmup: float = 3.0
    window: float = 0.0
    tail: float = 12.0
    mapping_timeout: int | None = None
    target_ms: float | None = None
    quiet: bool = False  # the window is a quiet period of the stream itself
    # The sessions must have left their path within this long of the injection.
    fallback_target_ms: float | None = None
    # Nodes know the gateway's TLS path (node.gateway_tls); with `udp_blocked_from_start`
    # the dialers' networks drop UDP until the fault lifts it.
    gateway_tls: bool = False
    udp_blocked_from_start: bool = False

    def plan(self, interval: float = 0.02, *, tail: float | None = None) -> StreamPlan:
        tail = self.tail if tail is None else tail
        if self.quiet:
            before = int(self.warmup / interval)
            return StreamPlan(messages=before + int(tail / interval), interval=interval,
                              pauses=((before, self.window),))
        return StreamPlan(messages=int((self.warmup + self.window + tail) / interval),
                          interval=interval)


_PR, _SYM = "port_restricted", "symmetric"

FAULTS: dict[str, FaultSpec] = {f.name: f for f in (
    FaultSpec(
        "gateway_restart",
        "the gateway stops and a new one starts on the same address a second later; "
        "direct sessions must not notice, relayed ones resume once both nodes re-register",
        (PairSpec(_PR, _PR, DIRECT), PairSpec(_SYM, _SYM, RELAY),
         PairSpec(_PR, _PR, RELAY, strategy="always_relay")),
        window=1.0),
    FaultSpec(
        "gateway_crash",
        "the gateway dies without a word (no CONNECTION_CLOSE) and a new one starts on the "
        "same address a second later; nodes must notice by themselves",
        (PairSpec(_PR, _PR, DIRECT), PairSpec(_SYM, _SYM, RELAY)),
        window=1.0),
    FaultSpec(
        "nat_rebind",
        "the dialer's NAT drops every mapping and gives new ports; QUIC retransmits, the "
        "gateway follows the new address, the direct path re-validates or re-punches",
        (PairSpec(_PR, _PR, DIRECT), PairSpec(_SYM, _SYM, RELAY)),
        tail=15.0),
    FaultSpec(
        "mapping_expiry",
        "every NAT forgets idle mappings after 10 s and the stream goes quiet for 15 s; "
        "keepalives must hold the mappings open",
        (PairSpec(_PR, _PR, DIRECT), PairSpec(_SYM, _SYM, RELAY)),
        window=15.0, tail=5.0, mapping_timeout=10, quiet=True),
    FaultSpec(
        "loss_25",
        "25% bursty loss (Gilbert-Elliott, mean burst 3 packets) on the dialer's uplink "
        "for 5 s; nothing may be lost end to end",
        (PairSpec(_PR, _PR, DIRECT), PairSpec(_SYM, _SYM, RELAY)),
        window=5.0, tail=15.0),
    FaultSpec(
        "turn_down",
        "the TURN server carrying a symmetric x symmetric session dies; the session must "
        "fall back to the gateway relay",
        (PairSpec(_SYM, _SYM, TURN, after=RELAY, turn=True),),
        tail=15.0),
    FaultSpec(
        "uplink_switch",
        "the dialer moves to another network (another NAT) mid-stream; the session comes "
        "back, direct again when the new NAT pair allows it",
        (PairSpec(_PR, _PR, DIRECT, move_to=_PR), PairSpec(_PR, _PR, DIRECT, after=RELAY,
                                                           move_to=_SYM)),
        tail=15.0, target_ms=2000.0),
    FaultSpec(
        "direct_outage",
        "a firewall between the two NATs blocks the direct path for 12 s while the gateway "
        "stays reachable; the session falls back to the relay and goes direct again once "
        "the path returns, each within 5 s",
        (PairSpec(_PR, _PR, DIRECT),),
        window=12.0, tail=12.0, target_ms=5000.0, fallback_target_ms=5000.0),
    FaultSpec(
        "udp_cut",
        "the dialer's network starts dropping every UDP packet mid-session and keeps doing "
        "so; its gateway traffic moves to the TLS link and the sessions carry on over the "
        "relay within 3 s, nothing lost",
        (PairSpec(_PR, _PR, DIRECT, after=RELAY), PairSpec(_SYM, _SYM, RELAY)),
        tail=12.0, target_ms=3000.0, gateway_tls=True),
    FaultSpec(
        "udp_restore",
        "the dialer's network drops UDP from the start (it registers over TLS), then lets "
        "it through again; gateway traffic moves back to UDP and the session goes direct "
        "again when the NAT pair allows it",
        (PairSpec(_PR, _PR, RELAY, after=DIRECT), PairSpec(_SYM, _SYM, RELAY)),
        tail=20.0, target_ms=10000.0, gateway_tls=True, udp_blocked_from_start=True),
)}

# Loss model of loss_25 (the kernel delay line gets the same parameters).
LOSS_RATE = 0.25
LOSS_BURST = 3.0


# ------------------------------------------------------------------------------- scoring

@dataclass
class Marks:
    """When the fault began to act and when it stopped (same clock as the streams)."""

    inject_at: float
    clear_at: float
    notes: list[str] = field(default_factory=list)


def quiet_marks(sides: list[dict[str, Any]]) -> Marks:
    """For a quiet-period fault: from the first side going quiet to the last resuming."""
    quiet = [q for side in sides for q in side.get("quiet", [])]
    if not quiet:
        return Marks(math.nan, math.nan, ["the stream never went quiet"])
    return Marks(min(q[0] for q in quiet), max(q[1] for q in quiet))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 3)


def _resume_after(side: dict[str, Any], clear_at: float) -> float | None:
    """Delay until the first message sent at/after clear_at arrived at this receiver."""
    times = [r for s, r in side.get("rx", []) if s >= clear_at]
    return min(times) - clear_at if times else None


def _path_back(side: dict[str, Any], want: str, clear_at: float) -> float | None:
    """When this side settled on `want` for good (clear_at at the earliest), or None."""
    history = side.get("path_history") or []
    if not history or history[-1][0] != want:
        return None
    return max(history[-1][1], clear_at)


def _path_at(side: dict[str, Any], at: float) -> str | None:
    """The path this side was on at `at` (from its history)."""
    current = None
    for path, since in side.get("path_history") or []:
        if since > at:
            break
        current = path
    return current


def score_session(pair: PairSpec, dialer: dict[str, Any], acceptor: dict[str, Any],
                  marks: Marks) -> dict[str, Any]:
    sides = (dialer, acceptor)
    paths_before = (_path_at(dialer, marks.inject_at), _path_at(acceptor, marks.inject_at))
    errors = [e for e in (dialer.get("error"), acceptor.get("error")) if e]
    connected = all(s.get("connected", True) and "expected" in s for s in sides)
    out: dict[str, Any] = {
        "pair": pair.label, "strategy": pair.strategy, "expected": pair.expected_after,
        "path_before": _agreed(paths_before), "path_after": None, "path_changes": None,
        "resume_ms": None, "path_ms": None, "recovery_ms": None, "lost": 0,
        "duplicated": 0, "reordered": 0, "messages": 0, "recovered": False, "errors": errors,
    }
    if not connected:
        out["errors"] = errors or ["session never came up"]
        return out
    out["messages"] = sum(s["expected"] for s in sides)
    out["lost"] = sum(s["lost"] for s in sides)
    out["duplicated"] = sum(s["duplicated"] for s in sides)
    out["reordered"] = sum(s["reordered"] for s in sides)
    out["path_after"] = _agreed((dialer.get("path"), acceptor.get("path")))
    # Path switches after the injection, in ms from it: the story of the recovery.
    out["history"] = {
        name: [[path, _ms(at - marks.inject_at)] for path, at in (s.get("path_history") or [])[1:]
               if at >= marks.inject_at]
        for name, s in (("dialer", dialer), ("acceptor", acceptor))}
    out["path_changes"] = sum(len(h) for h in out["history"].values())
    # When both sides had left the path they were on as the fault began (None: one never did).
    left = [next((at for path, at in (s.get("path_history") or [])[1:]
                  if at >= marks.inject_at and path != before), None)
            for s, before in zip(sides, paths_before)]
    if all(at is not None for at in left):
        out["fallback_ms"] = _ms(max(at for at in left if at is not None) - marks.inject_at)
    if math.isnan(marks.clear_at):
        return out
    resumes = [_resume_after(s, marks.clear_at) for s in sides]
    backs = [_path_back(s, pair.expected_after, marks.clear_at) for s in sides]
    if all(r is not None for r in resumes):
        out["resume_ms"] = _ms(max(r for r in resumes if r is not None))
    if all(b is not None for b in backs):
        out["path_ms"] = _ms(max(b for b in backs if b is not None) - marks.clear_at)
    if out["resume_ms"] is not None and out["path_ms"] is not None:
        out["recovery_ms"] = max(out["resume_ms"], out["path_ms"])
    out["recovered"] = (out["recovery_ms"] is not None and out["lost"] == 0
                        and out["duplicated"] == 0 and not errors)
    return out


def _agreed(paths: tuple[str | None, str | None]) -> str | None:
    """Both sides' path when they agree, else "a/b" so a split is visible."""
    a, b = paths
    return a if a == b else f"{a}/{b}"


def score_fault(spec: FaultSpec, sessions: list[dict[str, Any]], marks: Marks, *,
                backend: str, error: str | None = None) -> dict[str, Any]:
    """One row of the chaos report: the fault's own verdict over all its sessions."""
    recovery = [s["recovery_ms"] for s in sessions]
    result: dict[str, Any] = {
        "fault": spec.name,
        "backend": backend,
        "recovered": bool(sessions) and error is None and all(s["recovered"] for s in sessions),
        "recovery_ms": (max(r for r in recovery if r is not None)
                        if sessions and all(r is not None for r in recovery) else None),
        "lost": sum(s["lost"] for s in sessions),
        "duplicated": sum(s["duplicated"] for s in sessions),
        "reordered": sum(s["reordered"] for s in sessions),
        "messages": sum(s["messages"] for s in sessions),
        "fault_ms": _ms(marks.clear_at - marks.inject_at) if sessions else None,
        "sessions": sessions,
    }
    if spec.target_ms is not None:
        result["target_ms"] = spec.target_ms
        result["within_target"] = (result["recovered"] and result["recovery_ms"] is not None
                                   and result["recovery_ms"] <= spec.target_ms)
    if spec.fallback_target_ms is not None:
        fallbacks = [s.get("fallback_ms") for s in sessions]
        result["fallback_ms"] = (max(f for f in fallbacks if f is not None)
                                 if sessions and all(f is not None for f in fallbacks) else None)
        result["fallback_target_ms"] = spec.fallback_target_ms
        result["within_target"] = (result.get("within_target", result["recovered"])
                                   and result["fallback_ms"] is not None
                                   and result["fallback_ms"] <= spec.fallback_target_ms)
    if marks.notes:
        result["notes"] = list(marks.notes)
    if error is not None:
        result["error"] = error
    return result


def unsupported(spec: FaultSpec, backend: str, error: str) -> dict[str, Any]:
    """The row of a fault this build cannot run: not recovered, with the reason."""
    return score_fault(spec, [], Marks(math.nan, math.nan), backend=backend, error=error)


def format_row(row: dict[str, Any]) -> str:
    rec = "recovered" if row["recovered"] else "NOT recovered"
    ms = f" in {row['recovery_ms']:.0f} ms" if row.get("recovery_ms") is not None else ""
    target = ""
    if "target_ms" in row:
        target = f" (target {row['target_ms']:.0f} ms: {'met' if row['within_target'] else 'missed'})"
    if row.get("fallback_target_ms") is not None:
        target += f", fell back in {row['fallback_ms']} ms"
    line = (f"{row['fault']:<16} {rec}{ms}{target}, lost {row['lost']}, "
            f"duplicated {row['duplicated']} of {row['messages']}")
    if row.get("error"):
        line += f" - {row['error']}"
    for s in row["sessions"]:
        line += (f"\n    {s['pair']:<42} {s['path_before']} -> {s['path_after']} "
                 f"(want {s['expected']}), resume {s['resume_ms']} ms, path {s['path_ms']} ms, "
                 f"lost {s['lost']} dup {s['duplicated']}")
        if s["errors"]:
            line += f"  errors: {'; '.join(s['errors'])[:200]}"
    return line


# The TURN server of chaos runs, and the seed each fault derives from the run's seed.
TURN_IP, TURN_PORT = "203.0.113.30", 3478
TURN_USERS = {"macula": "chaos-secret"}


def fault_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/chaos/{name}".encode()).digest()[:4], "big")
