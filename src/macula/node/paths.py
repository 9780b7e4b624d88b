"""The paths to one remote node, and the hole punch that finds the direct one (sans-IO).

The gateway relay is always there underneath. A punch attempt sends paced connectivity
checks from our one socket to the peer's candidate addresses; the first check that is
answered proves the direct path both ways (our packet reached them, theirs reached us), and
it becomes the session's path. Keepalive checks then watch it; when it goes quiet the
session falls back to the relay and a new punch is tried later. QUIC never notices any of
this: it sees one virtual address per peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..identity import NodeId
from ..net.endpoint import Address
from ..nat.checks import Check, check_request, check_response, verify

# Checks go out every 20 ms for the first 200 ms of an attempt (the packets must cross
# while both NATs have fresh mappings), then every 100 ms until the attempt times out.
_FAST_INTERVAL, _FAST_PERIOD, _SLOW_INTERVAL = 0.02, 0.2, 0.1
MAX_CANDIDATES = 16
_KEYS_REMEMBERED = 4
_EPS = 1e-9  # deadlines compare with a tolerance: a - b rounds, and fake clocks are exact


@dataclass
class DirectPath:
    addr: Address
    key: bytes
    validated_at: float
    rtt: float
    last_rx: float  # anything from the peer on this path: proves peer -> us only
    last_answer: float  # an answer to one of our checks: proves us -> peer -> us
    last_check: float = 0.0
    pending: dict[bytes, float] = field(default_factory=dict)  # keepalive tid -> sent at
    # The first of the checks sent since the last answer, and how many there are.
    unanswered_since: float | None = None
    unanswered: int = 0


@dataclass
class PunchAttempt:
    number: int
    key: bytes
    candidates: list[Address]
    began_at: float  # when this node's part began (request sent, or punch order received)
    start_at: float  # synchronised moment to start sending
    deadline: float
    next_send: float
    sent: dict[bytes, tuple[Address, float]] = field(default_factory=dict)
    checks_sent: int = 0
    requests_heard: int = 0

    def add_candidate(self, addr: Address) -> bool:
        if addr in self.candidates or len(self.candidates) >= MAX_CANDIDATES:
            return False
        self.candidates.append(addr)
        return True


class PeerPaths:
    def __init__(
        self,
        local: NodeId,
        peer: NodeId,
        *,
        keepalive: float = 0.5,
        dead_after: float = 1.5,
        idle_keepalive: float = 2.5,
    ) -> None:
        self.local = local
        self.peer = peer
        self.keepalive = keepalive
        self.idle_keepalive = idle_keepalive
        self.dead_after = dead_after
        self.last_activity = -1e9
        self.attempt: PunchAttempt | None = None
        self.direct: DirectPath | None = None
        self._keys: list[bytes] = []
        self._out: list[tuple[bytes, Address]] = []
        self.outcomes: list[dict[str, Any]] = []
        self.retry_at: float | None = None
        self.attempts_made = 0
        self.requested_at: float | None = None
        # The first upgrade's timeline, as the matrix and stats report it.
        self.upgrade: dict[str, Any] | None = None
        self._awaiting_first_rx = False
        self.upgrades = 0
        self.fallbacks = 0

    # ------------------------------------------------------------------ attempts
    def begin(self, number: int, key: bytes, candidates: list[Address], *, began_at: float,
              start_at: float, timeout: float) -> None:
        """Start (or restart) an attempt ordered by the gateway."""
        self.attempt = PunchAttempt(
            number=number, key=key, candidates=list(dict.fromkeys(candidates))[:MAX_CANDIDATES],
            began_at=began_at, start_at=start_at, deadline=began_at + timeout,
            next_send=start_at,
        )
        self.attempts_made = max(self.attempts_made, number)
        if key not in self._keys:
            self._keys = (self._keys + [key])[-_KEYS_REMEMBERED:]
        self.retry_at = None

    def end_attempt(self, outcome: str, reason: str, now: float) -> dict[str, Any]:
        attempt = self.attempt
        assert attempt is not None
        self.attempt = None
        record = {"attempt": attempt.number, "outcome": outcome, "reason": reason,
                  "elapsed_ms": round((now - attempt.began_at) * 1000, 3),
                  "checks_sent": attempt.checks_sent}
        self.outcomes.append(record)
        return record

    # ------------------------------------------------------------------ checks in
    def on_check(self, check: Check, src: Address, now: float) -> str | None:
        """Handle a check addressed to us from this peer. Returns "validated" when this
        answer made the direct path, "answered" for a request, None if it was not valid."""
        key = next((k for k in reversed(self._keys) if verify(check, k)), None)
        if key is None:
            return None
        direct = self.direct
        if check.is_request:
            self._out.append((check_response(check, src, key), src))
            if direct is not None and direct.addr == src:
                direct.last_rx = now
            attempt = self.attempt
            if attempt is not None:
                attempt.requests_heard += 1
            if attempt is not None and attempt.add_candidate(src):
                # Peer-reflexive: the peer reached us from an address we did not know
                # (its NAT maps per destination). Check it back at once.
                self._send_check(attempt, src, now)
            return "answered"
        tid = check.message.transaction_id
        if direct is not None and tid in direct.pending:
            sent_at = direct.pending.pop(tid)
            direct.last_rx = now
            direct.last_answer = now
            direct.unanswered_since, direct.unanswered = None, 0
            direct.rtt = 0.8 * direct.rtt + 0.2 * (now - sent_at)
            return "answered"
        attempt = self.attempt
        if attempt is None or tid not in attempt.sent:
            return None
        addr, sent_at = attempt.sent[tid]
        if addr != src:
            return None  # answers must come back from where the check went (RFC 8445 7.2.5.2.1)
        self.direct = DirectPath(addr=addr, key=attempt.key, validated_at=now,
                                 rtt=now - sent_at, last_rx=now, last_answer=now,
                                 last_check=now)
        self.upgrades += 1
        if self.upgrade is None:
            self.upgrade = {"started_at": attempt.began_at, "validated_at": now,
                            "first_direct_rx_at": None, "upgrade_ms": None,
                            "attempt": attempt.number}
            self._awaiting_first_rx = True
        self.end_attempt("success", "success", now)
        return "validated"

    def on_direct_rx(self, addr: Address, now: float) -> None:
        """A session packet arrived straight from the peer."""
        direct = self.direct
        if direct is None or direct.addr != addr:
            return
        direct.last_rx = now
        if self._awaiting_first_rx and self.upgrade is not None:
            self._awaiting_first_rx = False
            self.upgrade["first_direct_rx_at"] = now
            self.upgrade["upgrade_ms"] = round((now - self.upgrade["started_at"]) * 1000, 3)

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float) -> list[str]:
        """Advance; returns what happened: "attempt_timeout", "direct_dead"."""
        happened = []
        attempt = self.attempt
        if attempt is not None:
            if now >= attempt.deadline - _EPS:
                happened.append("attempt_timeout")
            elif now >= attempt.next_send - _EPS:
                for addr in attempt.candidates:
                    self._send_check(attempt, addr, now)
                fast = now - attempt.start_at < _FAST_PERIOD
                attempt.next_send = now + (_FAST_INTERVAL if fast else _SLOW_INTERVAL)
        direct = self.direct
        if direct is not None:
            # Only answers to our own checks prove our packets still arrive: hearing the
            # peer proves just the other direction (a one-way failure must not fool us).
            if (direct.unanswered >= 2 and direct.unanswered_since is not None
                    and now - direct.unanswered_since >= self.dead_after - _EPS):
                self.direct = None
                self.fallbacks += 1
                happened.append("direct_dead")
            elif now - direct.last_check >= self._interval(direct.last_check) - _EPS:
                data, tid = check_request(self.peer, self.local, direct.key)
                direct.pending = {t: s for t, s in direct.pending.items() if now - s < 30.0}
                direct.pending[tid] = now
                direct.last_check = now
                if direct.unanswered_since is None:
                    direct.unanswered_since = now
                direct.unanswered += 1
                self._out.append((data, direct.addr))
        return happened

    def note_activity(self, now: float) -> None:
        """Session data used the direct path: watch it closely while it matters."""
        self.last_activity = now

    def _interval(self, since: float) -> float:
        """Gap after a check sent at `since`: 0.5 s when data flowed around then (a dead
        path is found within ~1.5 s), 2.5 s on an idle session (enough for any NAT
        mapping timeout we know of). One function for handle_timer and next_timer, so
        the two always agree on when the next check is due."""
        return self.keepalive if self.last_activity > since - 2.0 else self.idle_keepalive

    def next_timer(self) -> float | None:
        times = []
        if self.attempt is not None:
            times += [self.attempt.deadline, self.attempt.next_send]
        if self.direct is not None:
            d = self.direct
            times.append(d.last_check + self._interval(d.last_check))
            if d.unanswered >= 2 and d.unanswered_since is not None:
                times.append(d.unanswered_since + self.dead_after)
        if self.retry_at is not None:
            times.append(self.retry_at)
        return min(times) if times else None

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def _send_check(self, attempt: PunchAttempt, addr: Address, now: float) -> None:
        data, tid = check_request(self.peer, self.local, attempt.key)
        attempt.sent[tid] = (addr, now)
        attempt.checks_sent += 1
        self._out.append((data, addr))

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        return {
            "direct_address": f"{self.direct.addr[0]}:{self.direct.addr[1]}" if self.direct else None,
            "direct_rtt_ms": round(self.direct.rtt * 1000, 3) if self.direct else None,
            "attempts": self.attempts_made,
            "outcomes": list(self.outcomes[-8:]),
            "upgrades": self.upgrades,
            "fallbacks": self.fallbacks,
            **({"upgrade_ms": self.upgrade["upgrade_ms"]} if self.upgrade else {"upgrade_ms": None}),
        }
