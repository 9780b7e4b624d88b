"""The paths to one remote node, found and watched by an ICE agent (sans-IO).

The gateway relay is always there underneath. When the gateway orders a punch it hands
both nodes fresh ICE credentials and each other's candidates, timed so both start
checking together; more candidates (TURN relays, addresses from STUN servers) trickle in
through the gateway afterwards. The agent's checks run on our one socket (or through a
TURN allocation); the pair it selects becomes the session's path, "direct" or "turn".
Consent checks (RFC 7675) then watch it: when they go unanswered the session falls back
to the relay and a new punch is tried later. QUIC never notices: it sees one virtual
address per peer.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..ice import Candidate, IceAgent
from ..ice.events import ConsentLost, Failed, PairHeard, ProbeAnswered, SelectedPair
from ..ice.pair import SOCKET
from ..identity import NodeId
from ..nat.hard_nat import HardNatRun
from ..net.endpoint import Address, format_address
from .options import NodeOptions

log = logging.getLogger(__name__)

# Consent checks while data flows (a dead path is found within ~1.5 s), and on an idle
# session (enough for any NAT mapping timeout we know of).
_ACTIVE_CONSENT = (0.5, 1.5)
_IDLE_CONSENT = (2.5, 7.5)
_ACTIVE_FOR = 2.0
# Session packets sent on the selected path with nothing back from the peer for this
# long (or 4 RTTs, if longer) make consent be checked at once, every _VERIFY_EVERY, and
# lost after _VERIFY_WINDOW (or 3 RTTs) unanswered: a dead path (a NAT that rebound, a
# firewall) is found in about half a second instead of the 1-1.5 s of consent's pace.
_QUIET_SUSPECT = 0.25
_VERIFY_EVERY = 0.1
_VERIFY_WINDOW = 0.3
# After the peer's first check arrives on a pair, session packets still go over the relay
# but a copy also goes straight back on that pair, for at most this long or until a pair
# is selected: the peer's NAT opened towards us to send that check, so the copies arrive
# one check round trip before our own check could prove the pair (QUIC drops whichever
# copy comes second). The peer then has our data on the direct path as soon as it
# selects it (the acceptor's upgrade in the simulator: 45 ms instead of 62).
_EARLY_COPY_FOR = 0.5


class PathEvent(enum.Enum):
    """What a peer's paths report to the node core."""

    SELECTED = "selected"  # a pair was selected: the session moves onto it
    ATTEMPT_TIMEOUT = "attempt_timeout"  # this attempt's checks ran out of time
    DIRECT_DEAD = "direct_dead"  # the selected pair lost consent
    HARD_NAT_DONE = "hard_nat_done"  # port guessing ended (hit, selected, or out of time)
    GATHER_TIMEOUT = "gather_timeout"  # ice.gather_timeout passed with candidates pending


@dataclass
class ActivePath:
    """The selected pair, as the node sends on it."""
    addr: Address  # the peer's address on this path
    via: str  # "socket", or the TURN allocation the packets leave through
    kind: Literal["direct", "turn"]
    rtt: float
    selected_at: float


class PeerPaths:
    def __init__(self, local: NodeId, peer: NodeId, options: NodeOptions,
                 rng: random.Random,
                 observe: Callable[[str, float], None] = lambda name, seconds: None) -> None:
        """`observe(name, seconds)` hears each finished timing ("ice", "upgrade")."""
        self._observe = observe
        self.local = local
        self.peer = peer
        self.options = options
        self.candidate_types = options.ice.candidate_types
        self._rng = rng
        self.agent: IceAgent | None = None
        self.direct: ActivePath | None = None  # the selected path, direct or TURN
        self.attempt_number = 0
        self.began_at: float | None = None
        self.outcomes: list[dict[str, Any]] = []
        self.retry_at: float | None = None
        self.attempts_made = 0
        self.requested_at: float | None = None
        # A request the gateway has not answered (order or refusal) is sent again then:
        # in a cluster it crosses the mesh, which may be re-forming.
        self.order_due: float | None = None
        self.requested_attempt = 0
        self.order_asks = 0  # times this attempt was asked for
        self.upgrade: dict[str, Any] | None = None  # the first upgrade's timeline
        self.ice: dict[str, Any] | None = None  # the first negotiation's timeline
        self._awaiting_first_rx = False
        self.upgrades = 0
        self.fallbacks = 0
        self.last_activity = -1e9
        self.relayed_at = -1e9  # session data last went over the relay (after a fallback)
        self._consent = _IDLE_CONSENT
        self.hard_nat: HardNatRun | None = None  # this attempt's port guessing, if any
        self.hard_nat_log: dict[str, Any] | None = None  # the last run's figures
        # Gathering for this attempt: until when, and what waits to be sent at its end
        # when candidates are not trickled (ice.enable_trickling = false).
        self.gather_until: float | None = None
        self.untrickled: list[Candidate] = []
        # Session packets waiting for a direct path (direct_only, or no relay fallback).
        self.held: list[bytes] = []
        # We asked for this peer's punches (so we retry them); the peer may ask too.
        self.we_requested = False
        # First session packet sent on the selected path since the peer's last one came.
        self.quiet_since: float | None = None
        self._verify_until: float | None = None  # consent is being checked urgently
        # Where relayed session packets are copied before a pair is selected (the pair the
        # peer's first check came on), until when, and how many copies went.
        self._early: tuple[Address, str] | None = None
        self._early_until = 0.0
        self.early_copies = 0

    # ------------------------------------------------------------------ attempts
    def begin(self, number: int, *, local_ufrag: str, local_pwd: str, remote_ufrag: str,
              remote_pwd: str, controlling: bool, local_candidates: list[tuple[Candidate, str]],
              remote_candidates: list[Candidate], began_at: float, start_at: float,
              timeout: float, hard_nat: HardNatRun | None = None) -> None:
        """Start ICE (or restart it) as the gateway ordered. Checks wait for `start_at`."""
        self.attempt_number = number
        self.attempts_made = max(self.attempts_made, number)
        self.began_at = began_at
        # The old generation's pair loses its consent checks with its agent: until the new
        # generation selects a pair, the session rides the relay (warm, and lossless).
        self.direct = None
        self.retry_at = None
        self._early = None
        agent = IceAgent(local_ufrag, local_pwd, controlling=controlling,
                         tie_breaker=self._rng.getrandbits(64), now=start_at,
                         check_timeout=timeout, candidate_types=self.candidate_types,
                         consent_interval=self._consent[0], consent_timeout=self._consent[1],
                         # Jitter only (ids stay unpredictable): drawn from the node's
                         # generator, which the simulator seeds, so simulated runs repeat.
                         rng=random.Random(self._rng.getrandbits(64)))
        for candidate, via in local_candidates:
            agent.add_local_candidate(candidate, via=via)
        agent.set_remote_credentials(remote_ufrag, remote_pwd)
        for candidate in remote_candidates:
            agent.add_remote_candidate(candidate)
        self.agent = agent
        self.hard_nat = hard_nat
        self.gather_until = began_at + self.options.ice.gather_timeout
        self.untrickled = []

    def gathering_expired(self, now: float) -> bool:
        return self.gather_until is None or now >= self.gather_until

    def add_remote_candidates(self, candidates: list[Candidate], end: bool) -> None:
        """Trickled candidates from the peer (TURN relays, STUN-server addresses)."""
        if self.agent is None:
            return
        for candidate in candidates:
            self.agent.add_remote_candidate(candidate)
        if end:
            self.agent.end_of_remote_candidates()

    def add_local_candidate(self, candidate: Candidate, via: str) -> None:
        if self.agent is not None:
            self.agent.add_local_candidate(candidate, via=via)

    def _end_attempt(self, outcome: str, reason: str, now: float) -> dict[str, Any]:
        record = {"attempt": self.attempt_number, "outcome": outcome, "reason": reason,
                  "elapsed_ms": round((now - (self.began_at or now)) * 1000, 3)}
        self.outcomes.append(record)
        log.info("punch %d with %s: %s (%s) after %.0f ms", self.attempt_number, self.peer,
                 outcome, reason, record["elapsed_ms"])
        return record

    # ------------------------------------------------------------------ datagrams in
    def receive(self, data: bytes, addr: Address, now: float, via: str) -> bool:
        """A STUN datagram from `addr` (arrived on `via`): True if it was this agent's."""
        agent = self.agent
        return agent is not None and agent.receive(data, addr, now, via)

    def on_direct_tx(self, now: float) -> None:
        """A session packet left on the selected path."""
        if self.direct is not None and self.quiet_since is None:
            self.quiet_since = now

    def _suspect_at(self) -> float | None:
        if self.quiet_since is None or self._verify_until is not None or self.direct is None:
            return None
        return self.quiet_since + max(_QUIET_SUSPECT, 4 * self.direct.rtt)

    def on_direct_rx(self, addr: Address, now: float) -> None:
        """A session packet (not an ICE check: those prove nothing about delivery of
        messages) arrived from the peer on the selected path."""
        if self.direct is None or self.direct.addr != addr:
            return
        self.quiet_since = self._verify_until = None
        if self._awaiting_first_rx and self.upgrade is not None:
            self._awaiting_first_rx = False
            self.upgrade["first_direct_rx_at"] = now
            self.upgrade["upgrade_ms"] = round((now - self.upgrade["started_at"]) * 1000, 3)
            self._observe("upgrade", now - self.upgrade["started_at"])

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float) -> list[PathEvent]:
        """Advance; returns what happened."""
        agent = self.agent
        if agent is None:
            return []
        self._tune_consent(now)
        if (suspect := self._suspect_at()) is not None and now >= suspect:
            assert self.direct is not None
            window = max(_VERIFY_WINDOW, 3 * self.direct.rtt)
            self._verify_until = now + window
            agent.verify_consent_now(now, window, _VERIFY_EVERY)
        elif self._verify_until is not None and now >= self._verify_until:
            # Consent was answered through the window: the path lives, the peer is quiet.
            self.quiet_since = self._verify_until = None
        run = self.hard_nat
        happened: list[PathEvent] = []
        if self.gather_until is not None and now >= self.gather_until:
            self.gather_until = None
            happened.append(PathEvent.GATHER_TIMEOUT)
        if run is not None and not run.done:
            for dest, via in run.handle_timer(now):
                agent.probe(dest, via or SOCKET)
            if run.done:
                happened.append(self._hard_nat_done(now))
        if (t := agent.get_timer()) is not None and now >= t:
            agent.handle_timer(now)
        return happened + self.drain_events(now)

    @property
    def hard_nat_running(self) -> bool:
        return self.hard_nat is not None and not self.hard_nat.done

    def _hard_nat_done(self, now: float, hit: tuple[Address, str] | None = None) -> PathEvent:
        """The run ended (answered guess, direct pair selected, or out of time)."""
        run = self.hard_nat
        assert run is not None
        run.stop(hit)
        self.hard_nat_log = run.stats(now)
        return PathEvent.HARD_NAT_DONE

    def drain_events(self, now: float) -> list[PathEvent]:
        happened: list[PathEvent] = []
        agent = self.agent
        while agent is not None and (event := agent.next_event()) is not None:
            if isinstance(event, SelectedPair):
                happened.append(self._selected(event, now))
                if self.direct is not None and self.direct.kind == "direct" \
                        and self.hard_nat_running:
                    happened.append(self._hard_nat_done(now))
            elif isinstance(event, PairHeard):
                pair = event.pair
                if self.direct is None and "relay" not in (pair.local.type, pair.remote.type):
                    self._early = (pair.remote.addr, pair.via)
                    self._early_until = now + _EARLY_COPY_FOR
            elif isinstance(event, ProbeAnswered):
                if self.hard_nat_running:
                    happened.append(self._hard_nat_done(now, (event.addr, event.via)))
            elif isinstance(event, Failed):
                happened.append(PathEvent.ATTEMPT_TIMEOUT)
                self._end_attempt("timeout", event.reason, now)
            elif isinstance(event, ConsentLost):
                if self.direct is not None:
                    self.lose_path()
                    happened.append(PathEvent.DIRECT_DEAD)
        return happened

    def early_copy_to(self, now: float) -> tuple[Address, str] | None:
        """(address, via) a relayed session packet is also sent to now, if any."""
        if self._early is None or self.direct is not None or now >= self._early_until:
            return None
        self.early_copies += 1
        return self._early

    def _selected(self, event: SelectedPair, now: float) -> PathEvent:
        pair = event.pair
        self._early = None
        turn = "relay" in (pair.local.type, pair.remote.type)
        first = self.direct is None
        self.quiet_since = self._verify_until = None
        self.direct = ActivePath(addr=pair.remote.addr, via=pair.via,
                                 kind="turn" if turn else "direct",
                                 rtt=pair.rtt if pair.rtt is not None else 0.0, selected_at=now)
        if first:
            self.upgrades += 1
            self._end_attempt("success", "turn" if turn else "direct", now)
        started = self.began_at if self.began_at is not None else now
        if self.ice is None:
            self.ice = {"started_at": started, "selected_at": now,
                        "ice_ms": round((now - started) * 1000, 3)}
            self._observe("ice", now - started)
        if self.upgrade is None:
            self.upgrade = {"started_at": started, "validated_at": now,
                            "first_direct_rx_at": None, "upgrade_ms": None,
                            "attempt": self.attempt_number, "path": self.direct.kind}
            self._awaiting_first_rx = True
        return PathEvent.SELECTED

    def lose_path(self) -> None:
        """The selected path stopped working (consent lost, TURN allocation gone)."""
        self.direct = None
        self.fallbacks += 1
        self.quiet_since = self._verify_until = None

    def note_activity(self, now: float) -> None:
        """Session data used the selected path: watch it closely while it matters."""
        self.last_activity = now
        self._tune_consent(now)

    def _tune_consent(self, now: float) -> None:
        wanted = _ACTIVE_CONSENT if now - self.last_activity < _ACTIVE_FOR else _IDLE_CONSENT
        if wanted != self._consent and self.agent is not None:
            self._consent = wanted
            self.agent.set_consent_timing(*wanted)

    def get_timer(self) -> float | None:
        times = []
        if self.agent is not None and (t := self.agent.get_timer()) is not None:
            times.append(t)
        if self.retry_at is not None:
            times.append(self.retry_at)
        if self.order_due is not None:
            times.append(self.order_due)
        if self.gather_until is not None and self.agent is not None:
            times.append(self.gather_until)
        if self.hard_nat is not None and (t := self.hard_nat.get_timer()) is not None:
            times.append(t)
        if self.last_activity > 0 and self._consent == _ACTIVE_CONSENT:
            times.append(self.last_activity + _ACTIVE_FOR)  # relax consent when idle
        if (suspect := self._suspect_at()) is not None:
            times.append(suspect)
        if self._verify_until is not None:
            times.append(self._verify_until)
        return min(times) if times else None

    def datagrams_to_send(self) -> list[tuple[bytes, Address, str]]:
        return self.agent.datagrams_to_send() if self.agent is not None else []

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        d = self.direct
        return {
            "direct_address": format_address(d.addr) if d else None,
            "direct_rtt_ms": round(d.rtt * 1000, 3) if d else None,
            "selected_kind": d.kind if d else None,
            "attempts": self.attempts_made,
            "outcomes": list(self.outcomes[-8:]),
            "upgrades": self.upgrades,
            "fallbacks": self.fallbacks,
            "early_copies": self.early_copies,
            "upgrade_ms": self.upgrade["upgrade_ms"] if self.upgrade else None,
            "ice_ms": self.ice["ice_ms"] if self.ice else None,
            "ice_state": self.agent.state if self.agent is not None else None,
            "hard_nat": self.hard_nat_log or (self.hard_nat.stats(self.hard_nat.started_at)
                                              if self.hard_nat is not None else None),
        }
