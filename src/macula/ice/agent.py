"""The ICE agent (RFC 8445, one component, one data stream), sans-IO.

Feed it candidates, credentials, datagrams and time; take datagrams, timers and events out:

    agent = IceAgent(ufrag, pwd, controlling=True, tie_breaker=t, now=clock())
    agent.add_local_candidate(Candidate.host("192.0.2.1", 4433))      # any time (trickle)
    agent.set_remote_credentials(peer_ufrag, peer_pwd)
    agent.add_remote_candidate(Candidate.from_sdp(line))               # any time (trickle)
    agent.end_of_local_candidates(); agent.end_of_remote_candidates()  # optional, see below
    loop:
        agent.receive(data, src, now, via)  -> True if it was this agent's ICE traffic
        agent.handle_timer(now)             when now >= agent.get_timer()
        for data, dest, via in agent.datagrams_to_send(): send it from base `via`
        while (event := agent.next_event()) is not None: ...

`via` names the local *base* a datagram leaves from and arrives on. "socket" is the node's
one UDP socket (host, server-reflexive and peer-reflexive candidates all live there; the
OS picks the source interface). A TURN relay candidate's via is whatever the caller passed
to add_local_candidate (default `turn_via(candidate)`, "turn:<relayed ip>:<port>"): send
those datagrams through that allocation (Send indication / ChannelData) and hand what
arrives through it to receive() with the same via. Gateway-relay candidates are never
checked with STUN (the gateway forwards by node id, and the session already runs over it
before ICE starts): the agent stores them and reports the pair as `gateway_pair` and as
`Failed.fallback`, the last resort when no checked pair is selected. No datagram ever has
via "gateway".

Outcomes: SelectedPair (the best nominated pair), or Failed("timeout") once check_timeout
has passed without one (Failed("failed") earlier if both ends of candidates were signalled
and every check failed). After ConsentLost the agent is "disconnected": nothing else is
tried on its own; restart() looks for a new pair.

Choices, and why:
- Ta = 5 ms, not RFC 8445's 50 ms default. The 50 ms protects media-sized check lists on
  slow links; ours holds a handful of pairs (hard limit 100) of ~100-byte checks, so 5 ms
  costs ~20 kB/s for a few tens of ms and gets every check out while both NAT mappings
  are fresh. The first INITIAL_BURST checks of a generation go out together: the pair that
  works across two NATs (host to server-reflexive) sorts behind host-to-host pairs that
  only work on one LAN, and waiting Ta for each of those delays every punch.
- Retransmissions follow RFC 8489 with a short first RTO (50 ms, doubling, 7 requests,
  then 16 x RTO): a check gives up after ~4 s, and the whole run after check_timeout.
- Aggressive nomination is the default: every check from the controlling agent carries
  USE-CANDIDATE, so the first pair that works is selected one round trip earlier. The
  price is that the first pair to work may not be the best; when a better one succeeds
  later it is selected again (a second SelectedPair), the ambiguity RFC 8445 removed
  aggressive nomination for. Our session switches paths under a live QUIC connection, so
  that late upgrade is cheap. `aggressive_nomination=False` gives RFC 8445 regular
  nomination: check, then nominate the best valid pair with one more check.
- Consent freshness (RFC 7675): a Binding request on the selected pair every
  consent_interval (randomised 0.8-1.2), retransmitted like any STUN request; only
  authenticated answers count; ConsentLost after consent_timeout without one.
- restart() starts a new generation (new local credentials, remote ones to come) while
  the old selected pair stays selected, keeps its consent checks and keeps answering the
  peer's old-credential checks, until the new generation selects a pair.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aioice.stun import Class, Message, Method

from macula.config import Ice
from macula.net.endpoint import Address
from macula.wire.stun import StunError, StunUnknownAttributes, is_stun, parse_message

from ..errors import InvalidValue
from .candidate import (
    CANDIDATE_TYPES,
    HOST,
    PRFLX,
    Candidate,
    CandidateError,
    compose_priority,
    compute_foundation,
    enabled_kinds,
    ice_pwd_line,
    ice_ufrag_line,
    local_preference_of,
    type_preferences,
    unique_foundation,
)
from .checklist import MAX_PAIRS, CheckList, pairing_base
from .events import (
    ConsentLost,
    Event,
    Failed,
    PairHeard,
    PairSucceeded,
    ProbeAnswered,
    SelectedPair,
)
from .messages import (
    ROLE_CONFLICT,
    UNKNOWN_ATTRIBUTE,
    build_error,
    build_request,
    build_success,
    read_request,
)
from .pair import SOCKET, CandidatePair, PairState

__all__ = ["GATEWAY_VIA", "IceAgent", "turn_via"]

GATEWAY_VIA = "gateway"  # via of gateway_pair; the agent never sends on it
MAX_REMOTE_CANDIDATES = 100
MAX_PROBES = 4096  # guesses whose answers we still recognise (hard-NAT port guessing)
_RM = 16  # RFC 8489 6.2.1: wait Rm x RTO after the last request

_CHECK, _NOMINATE, _CONSENT = "check", "nominate", "consent"
INITIAL_BURST = 4  # checks a generation sends before pacing by Ta


def turn_via(candidate: Candidate) -> str:
    """Default via of a TURN relay candidate: its relayed transport address."""
    host = f"[{candidate.address}]" if ":" in candidate.address else candidate.address
    return f"turn:{host}:{candidate.port}"


def _normalise(addr: Address) -> Address | None:
    try:
        return (str(ipaddress.ip_address(addr[0])), int(addr[1]))
    except (ValueError, TypeError, IndexError):
        return None


@dataclass
class _Transaction:
    pair: CandidatePair
    kind: str  # check | nominate | consent
    data: bytes
    dest: Address
    via: str
    key: bytes  # the remote password it was signed with: answers must carry the same
    priority: int  # the PRIORITY sent: a local prflx learned from the answer gets it
    controlling: bool
    use_candidate: bool
    sent_at: float
    timeout_at: float
    next_retransmit: float | None
    interval: float
    sends: int = 1


@dataclass
class _Consent:
    pair: CandidatePair
    username: str
    key: bytes
    next_at: float
    expires_at: float
    # Set while traffic on the pair goes unanswered: checks this often until one answers.
    urgent_interval: float | None = None


class IceAgent:
    def __init__(
        self,
        local_ufrag: str,
        local_pwd: str,
        *,
        controlling: bool,
        tie_breaker: int,
        now: float,
        ta: float = 0.005,
        initial_burst: int = INITIAL_BURST,
        check_timeout: float = 10.0,
        candidate_types: Sequence[str] = CANDIDATE_TYPES,
        rto: float = 0.05,
        max_requests: int = 7,
        aggressive_nomination: bool = True,
        nomination_wait: float = 0.2,
        consent_interval: float = 5.0,
        consent_timeout: float = 30.0,
        max_pairs: int = MAX_PAIRS,
        rng: random.Random | None = None,
    ) -> None:
        _check_credentials(local_ufrag, local_pwd)
        if not 0 <= tie_breaker < 2**64:
            raise InvalidValue("the tie-breaker is a 64-bit unsigned integer")
        if ta < 0 or check_timeout <= 0 or rto <= 0 or max_requests < 1:
            raise InvalidValue("ta >= 0, check_timeout > 0, rto > 0, max_requests >= 1")
        if consent_interval <= 0 or consent_timeout <= 0 or nomination_wait < 0:
            raise InvalidValue("consent_interval and consent_timeout > 0, nomination_wait >= 0")
        self._local_ufrag, self._local_pwd = local_ufrag, local_pwd
        self._controlling = controlling
        self.tie_breaker = tie_breaker
        self._order = tuple(candidate_types)
        self._prefs = type_preferences(self._order)
        self._enabled = enabled_kinds(self._order)
        self._ta, self._check_timeout, self._rto = ta, check_timeout, rto
        self._initial_burst = max(1, initial_burst)
        self._max_requests = max_requests
        self._tx_lifetime = rto * (2 ** (max_requests - 1) - 1) + _RM * rto
        self._aggressive = aggressive_nomination
        self._nomination_wait = nomination_wait
        self._consent_interval, self._consent_timeout = consent_interval, consent_timeout
        self._max_pairs = max_pairs
        self._rng = rng or random.SystemRandom()

        self._now = now
        self._local: list[Candidate] = []  # gathered + learned prflx (not gateway)
        self._bases: list[tuple[Candidate, str]] = []  # what checks leave from, with via
        self._base_via: dict[Address, str] = {}
        self._remote: list[Candidate] = []
        self._local_gateway: Candidate | None = None
        self._remote_gateway: Candidate | None = None
        self._gateway_pair: CandidatePair | None = None
        self._tx: dict[bytes, _Transaction] = {}
        self._out: list[tuple[bytes, Address, str]] = []
        self._events: deque[Event] = deque()
        self._selected: CandidatePair | None = None
        self._consent: _Consent | None = None
        self._old_local: tuple[str, str] | None = None  # previous generation, still answered
        self._probes: dict[bytes, tuple[Address, str]] = {}  # probe() ids, oldest first
        self._new_generation(now)

    def verify_consent_now(self, now: float, window: float, interval: float) -> None:
        """Traffic on the selected pair went unanswered: check consent at once and every
        `interval`, and count it lost unless an answer comes within `window` (RFC 7675
        lets an agent check more often; the normal pace resumes at the first answer)."""
        consent = self._consent
        if consent is None or window <= 0 or interval <= 0:
            return
        consent.next_at = now
        consent.expires_at = min(consent.expires_at, now + window)
        consent.urgent_interval = interval

    def set_consent_timing(self, interval: float, timeout: float) -> None:
        """Change how often consent is checked and how long it may go unanswered: the node
        watches a pair closely while data flows and relaxes on an idle session."""
        if interval <= 0 or timeout <= 0:
            raise InvalidValue("consent interval and timeout must be > 0")
        if (interval, timeout) == (self._consent_interval, self._consent_timeout):
            return
        self._consent_interval, self._consent_timeout = interval, timeout
        consent = self._consent
        if consent is not None:
            consent.next_at = min(consent.next_at, self._now + interval)
            consent.expires_at = min(consent.expires_at, self._now + timeout)

    @classmethod
    def from_config(cls, ice: Ice, local_ufrag: str, local_pwd: str, *, controlling: bool,
                    tie_breaker: int, now: float, **options: Any) -> IceAgent:
        """An agent using the [ice] config section (check_timeout is in milliseconds
        there); `options` pass any other keyword through."""
        options.setdefault("check_timeout", ice.check_timeout / 1000)
        options.setdefault("candidate_types", ice.candidate_types)
        return cls(local_ufrag, local_pwd, controlling=controlling, tie_breaker=tie_breaker,
                   now=now, **options)

    def _new_generation(self, now: float) -> None:
        self._remote_ufrag: str | None = None
        self._remote_pwd: str | None = None
        self._checklist = CheckList(controlling=self._controlling, max_pairs=self._max_pairs)
        self._deadline = now + self._check_timeout
        self._next_check_at = now
        self._burst = self._initial_burst - 1  # the first check is one of them
        self._generation_selected = False
        self._heard = False  # PairHeard reported for this generation
        self._failed = False
        self._first_valid_at: float | None = None
        self._nominating: CandidatePair | None = None
        self._nominate_pending = False
        self._remote_ended = False
        self._local_ended = False
        self._probes.clear()  # answers to the old credentials' guesses mean nothing now

    # ------------------------------------------------------------------ views
    @property
    def controlling(self) -> bool:
        return self._controlling

    @property
    def local_ufrag(self) -> str:
        return self._local_ufrag

    @property
    def local_pwd(self) -> str:
        return self._local_pwd

    @property
    def selected_pair(self) -> CandidatePair | None:
        """The pair to use now (after restart(): the old one until a new one is selected)."""
        return self._selected

    @property
    def state(self) -> str:
        """new | checking | completed | disconnected (consent lost) | failed."""
        if self._failed:
            return "failed"
        if self._generation_selected:
            return "completed" if self._selected is not None else "disconnected"
        return "checking" if self._remote_pwd is not None else "new"

    @property
    def local_candidates(self) -> tuple[Candidate, ...]:
        gateway = (self._local_gateway,) if self._local_gateway else ()
        return tuple(self._local) + gateway

    @property
    def remote_candidates(self) -> tuple[Candidate, ...]:
        gateway = (self._remote_gateway,) if self._remote_gateway else ()
        return tuple(self._remote) + gateway

    @property
    def checklist(self) -> CheckList:
        return self._checklist

    @property
    def gateway_pair(self) -> CandidatePair | None:
        """Local and remote gateway-relay candidates, when both sides offered one."""
        return self._gateway_pair

    # ------------------------------------------------------------------ feeding
    def add_local_candidate(self, candidate: Candidate, via: str | None = None) -> bool:
        """Offer a gathered candidate. False if refused: a kind ice.candidate_types leaves
        out, a duplicate, not UDP component 1, or prflx (those are learned, not gathered)."""
        kind = candidate.kind
        if (candidate.component != 1 or candidate.transport.lower() != "udp"
                or kind == PRFLX or kind not in self._enabled):
            return False
        if kind == "gateway":
            if self._local_gateway is not None and self._local_gateway.addr == candidate.addr:
                return False
            if self._local_gateway is None or candidate.priority > self._local_gateway.priority:
                self._local_gateway = candidate
                self._update_gateway_pair()
            return True
        if any(c.addr == candidate.addr and c.type == candidate.type for c in self._local):
            return False
        if via is None:
            via = turn_via(candidate) if kind == "turn" else SOCKET
        self._local.append(candidate)
        host_priority = compose_priority(self._prefs["host"],
                                         local_preference_of(candidate.priority),
                                         candidate.component)
        base = pairing_base(candidate, self._local, host_priority)
        via = self._base_via.setdefault(base.addr, via)
        self._add_base(base, via)
        return True

    def _add_base(self, base: Candidate, via: str) -> None:
        for i, (known, _) in enumerate(self._bases):
            if known.addr == base.addr:
                if base.type == HOST and known is not base:
                    # The real host arrived after a base made up for its srflx.
                    self._bases[i] = (base, via)
                    for pair in self._checklist.pairs:
                        if pair.local is known:
                            pair.local = base
                return
        self._bases.append((base, via))
        if not self._generation_selected:
            for remote in self._remote:
                self._checklist.add(base, remote, via)

    def add_remote_candidate(self, candidate: Candidate) -> bool:
        """A peer's candidate, at any time (trickle). False if ignored (duplicate, not UDP
        component 1, or over the limit of 100)."""
        if candidate.component != 1 or candidate.transport.lower() != "udp":
            return False
        if candidate.kind == "gateway":
            if self._remote_gateway is None or candidate.priority > self._remote_gateway.priority:
                self._remote_gateway = candidate
                self._update_gateway_pair()
                return True
            return False
        existing = self._find_remote(candidate.addr)
        if existing is not None:
            if existing.type == PRFLX and candidate.type != PRFLX:
                # RFC 8445 7.3.1.3: the signalled candidate replaces the learned one.
                self._remote[self._remote.index(existing)] = candidate
                self._checklist.replace_remote(existing, candidate)
                return True
            return False
        if len(self._remote) >= MAX_REMOTE_CANDIDATES:
            return False
        self._remote.append(candidate)
        if not self._generation_selected:
            for base, via in self._bases:
                self._checklist.add(base, candidate, via)
        return True

    def probe(self, dest: Address, via: str = SOCKET) -> bool:
        """Send one check to an address no candidate names: a guess at a port a hard
        (endpoint-dependent) NAT may have opened. Nothing is retransmitted or timed out;
        an authenticated answer makes `dest` a peer-reflexive candidate, checks it at
        once and reports ProbeAnswered. False when no check can be built yet."""
        if self._failed or self._remote_pwd is None or self._remote_ufrag is None:
            return False
        addr = _normalise(dest)
        if addr is None:
            return False
        tid = secrets.token_bytes(12)
        data = build_request(transaction_id=tid,
                             username=f"{self._remote_ufrag}:{self._local_ufrag}",
                             key=self._remote_pwd.encode(),
                             priority=compose_priority(self._prefs["prflx"], 65535, 1),
                             controlling=self._controlling,
                             tie_breaker=self.tie_breaker, use_candidate=False)
        if len(self._probes) >= MAX_PROBES:
            del self._probes[next(iter(self._probes))]
        self._probes[tid] = (addr, via)
        self._out.append((data, addr, via))
        return True

    def _on_probe_answer(self, message: Message, src: Address, now: float, via: str) -> bool:
        sent = self._probes.get(message.transaction_id)
        if sent is None or self._remote_pwd is None:
            return False
        if not message.check_message_integrity(self._remote_pwd.encode()):
            return False
        del self._probes[message.transaction_id]
        if (src, via) != sent or message.message_class != Class.RESPONSE or self._failed:
            return True  # ours, but not a usable path
        self._probes.clear()  # one path found: the other guesses no longer matter
        pair = self._pair_for_request(src, via, compose_priority(self._prefs["prflx"], 65535, 1))
        if pair is not None:
            self._trigger(pair)
        self._events.append(ProbeAnswered(src, via))
        return True

    def set_remote_credentials(self, ufrag: str, pwd: str) -> None:
        """The peer's ice-ufrag / ice-pwd for this generation (ValueError if malformed,
        or if they change without a restart())."""
        _check_credentials(ufrag, pwd)
        if self._remote_ufrag is not None and (ufrag, pwd) != (self._remote_ufrag,
                                                                self._remote_pwd):
            raise InvalidValue("remote credentials changed: that is an ICE restart")
        self._remote_ufrag, self._remote_pwd = ufrag, pwd

    def end_of_remote_candidates(self) -> None:
        self._remote_ended = True

    def end_of_local_candidates(self) -> None:
        """Gathering is done: with end_of_remote_candidates, lets the agent report
        Failed("failed") as soon as every check failed instead of waiting for the timeout."""
        self._local_ended = True

    def restart(self, new_ufrag: str, new_pwd: str, *, now: float | None = None) -> None:
        """ICE restart (RFC 8445 9): new local credentials, forget the remote ones and the
        remote candidates (the peer re-signals), keep local candidates and the role. The
        selected pair stays selected, with consent, until the new generation selects."""
        _check_credentials(new_ufrag, new_pwd)
        now = self._now if now is None else now
        self._now = now
        self._old_local = ((self._local_ufrag, self._local_pwd)
                           if self._selected is not None else None)
        self._local_ufrag, self._local_pwd = new_ufrag, new_pwd
        self._remote = []
        self._remote_gateway = None
        self._gateway_pair = None
        self._local = [c for c in self._local if c.type != PRFLX]
        self._tx = {tid: tx for tid, tx in self._tx.items() if tx.kind == _CONSENT}
        self._new_generation(now)

    # ------------------------------------------------------------------ output
    def datagrams_to_send(self) -> list[tuple[bytes, Address, str]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When handle_timer must run next (may be <= now: run it at once), or None."""
        times: list[float] = []
        if self._has_check_work():
            times.append(self._next_check_at)
        for tx in self._tx.values():
            times.append(tx.timeout_at if tx.next_retransmit is None else tx.next_retransmit)
        nomination = self._nomination_due()
        if nomination is not None:
            times.append(nomination)
        if self._consent is not None:
            times += [self._consent.next_at, self._consent.expires_at]
        if not self._failed and not self._generation_selected:
            times.append(self._deadline)
        return min(times) if times else None

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float) -> None:
        self._now = now
        for tid, tx in list(self._tx.items()):
            if tx.next_retransmit is not None and now >= tx.next_retransmit:
                self._out.append((tx.data, tx.dest, tx.via))
                tx.sends += 1
                tx.interval *= 2
                later = now + tx.interval
                tx.next_retransmit = (later if tx.sends < self._max_requests
                                      and later < tx.timeout_at else None)
            elif tx.next_retransmit is None and now >= tx.timeout_at:
                del self._tx[tid]
                self._on_timeout(tx)
        self._consent_tick(now)
        if not self._failed and not self._generation_selected:
            if now >= self._deadline:
                self._fail("timeout")
            else:
                self._maybe_nominate(now)
                self._maybe_fail_early()
        self._pump(now)

    # ------------------------------------------------------------------ datagrams in
    def receive(self, data: bytes, addr: Address, now: float, via: str = SOCKET) -> bool:
        """Offer one datagram. True if it was an authenticated ICE check or answer for this
        agent (and was handled); False for anything else, which is left to the caller."""
        self._now = now
        if not is_stun(data):
            return False
        src = _normalise(addr)
        if src is None:
            return False
        try:
            message = parse_message(data)
        except StunUnknownAttributes as exc:
            return self._on_unknown_attributes(exc, src, via)
        except StunError:
            return False
        if message.message_method != Method.BINDING:
            return False
        if message.message_class == Class.REQUEST:
            handled = self._on_request(message, src, now, via)
        elif message.message_class in (Class.RESPONSE, Class.ERROR):
            handled = self._on_response(message, src, now, via)
        else:
            return False
        if handled:  # dropped datagrams must not drive our timing
            self._pump(now)
        return handled

    def _on_unknown_attributes(self, exc: StunUnknownAttributes, src: Address,
                               via: str) -> bool:
        message = exc.message
        if message.message_class != Class.REQUEST or message.message_method != Method.BINDING:
            return False
        username = message.attributes.get("USERNAME")
        if not isinstance(username, str) or username.partition(":")[0] != self._local_ufrag:
            return False
        key = self._local_pwd.encode()
        if not message.check_message_integrity(key):
            return False
        self._out.append((build_error(message.transaction_id, UNKNOWN_ATTRIBUTE,
                                      "Unknown Attribute", key, exc.attributes), src, via))
        return True

    def _on_request(self, message: Message, src: Address, now: float, via: str) -> bool:
        username = message.attributes.get("USERNAME")
        if not isinstance(username, str):
            return False
        left, sep, right = username.partition(":")
        if not sep or not left or not right:
            return False
        if left == self._local_ufrag:
            pwd, current = self._local_pwd, True
        elif self._old_local is not None and left == self._old_local[0]:
            pwd, current = self._old_local[1], False
        else:
            return False
        key = pwd.encode()
        if not message.check_message_integrity(key):
            return False
        if current and self._remote_ufrag is not None and right != self._remote_ufrag:
            return False
        request = read_request(message)
        if request is None:
            return False
        tid = message.transaction_id
        if not current:
            # Old generation: consent checks on the still-selected pair. Answer like a
            # STUN server, learn nothing.
            self._out.append((build_success(tid, src, key), src, via))
            return True
        if self._failed:
            return False  # answering would let the peer select a pair we gave up on

        # Role conflict (RFC 8445 7.3.1.1).
        if request.controlling and self._controlling:
            if self.tie_breaker >= request.tie_breaker:
                self._out.append((build_error(tid, ROLE_CONFLICT, "Role Conflict", key),
                                  src, via))
                return True
            self._set_role(False)
        elif not request.controlling and not self._controlling:
            if self.tie_breaker >= request.tie_breaker:
                self._set_role(True)
            else:
                self._out.append((build_error(tid, ROLE_CONFLICT, "Role Conflict", key),
                                  src, via))
                return True

        self._out.append((build_success(tid, src, key), src, via))
        pair = self._pair_for_request(src, via, request.priority)
        if pair is None:
            return True
        self._trigger(pair)
        if not self._heard and not self._generation_selected:
            self._heard = True
            self._events.append(PairHeard(pair))
        if request.use_candidate and not self._controlling:
            # RFC 8445 7.3.1.5: nominated now if our own check already succeeded, else
            # as soon as it does.
            if pair.state == PairState.SUCCEEDED and pair.valid_pair is not None:
                pair.valid_pair.nominated = True
                self._update_selection(now)
            else:
                pair.nominate_on_success = True
        return True

    def _pair_for_request(self, src: Address, via: str, priority: int) -> CandidatePair | None:
        remote = self._find_remote(src)
        if remote is None:
            # Peer-reflexive remote candidate (7.3.1.3): the peer reached us from an
            # address it never signalled (its NAT mapped it per destination, say).
            if len(self._remote) >= MAX_REMOTE_CANDIDATES:
                return None
            foundation = unique_foundation(compute_foundation("prflx", src[0]),
                                           (r.foundation for r in self._remote))
            try:
                remote = Candidate(foundation, 1, "udp", priority, src[0], src[1], PRFLX)
            except CandidateError:
                return None  # e.g. source port 0
            self._remote.append(remote)
            if not self._generation_selected:
                for base, base_via in self._bases:
                    self._checklist.add(base, remote, base_via)
        pairs = self._checklist.find(src, via)
        if pairs:
            return pairs[0]
        bases = [b for b, v in self._bases if v == via and b.family == remote.family]
        if not bases:
            return None
        best = max(bases, key=lambda b: b.priority)
        return self._checklist.add(best, remote, via)

    def _on_response(self, message: Message, src: Address, now: float, via: str) -> bool:
        tx = self._tx.get(message.transaction_id)
        if tx is None:
            return self._on_probe_answer(message, src, now, via)
        if not message.check_message_integrity(tx.key):
            return False
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        if message.message_class == Class.RESPONSE:
            mapped = _normalise(mapped) if isinstance(mapped, tuple) else None
            if mapped is None:
                return False  # not an answer we can use; keep waiting for a real one
        del self._tx[message.transaction_id]
        if (src, via) != (tx.dest, tx.via):
            # Not symmetric (7.2.5.2.1): the path that answered is not the one checked.
            if tx.kind == _CHECK and tx.pair.state == PairState.IN_PROGRESS:
                tx.pair.state = PairState.FAILED
            return True
        if message.message_class == Class.ERROR:
            self._on_error(tx, message.error_code)
        else:
            assert mapped is not None
            self._on_success(tx, mapped, now)
        return True

    def _on_error(self, tx: _Transaction, code: int | None) -> None:
        if tx.kind == _CONSENT:
            return
        if code == ROLE_CONFLICT:
            # 7.2.5.1: switch to the role opposite to the one the request claimed (unless
            # an incoming check already made us switch), then check the pair again.
            if self._controlling == tx.controlling:
                self._set_role(not tx.controlling)
            if tx.kind == _CHECK and not any(t.pair is tx.pair and t.kind == _CHECK
                                             for t in self._tx.values()):
                self._trigger(tx.pair)
            return
        if tx.kind == _CHECK:
            tx.pair.state = PairState.FAILED
        else:
            self._nomination_failed(tx.pair)

    def _on_success(self, tx: _Transaction, mapped: Address, now: float) -> None:
        pair = tx.pair
        rtt = now - tx.sent_at if tx.sends == 1 else None  # Karn: retransmitted, ambiguous
        if tx.kind == _CONSENT:
            consent = self._consent
            if consent is not None and consent.pair is pair:
                consent.expires_at = now + self._consent_timeout
                if consent.urgent_interval is not None:
                    consent.urgent_interval = None
                    consent.next_at = now + self._consent_delay()
                if rtt is not None:
                    pair.rtt = rtt
            return
        if self._failed:
            return
        if tx.kind == _NOMINATE:
            if self._nominating is pair:
                self._nominating = None
            if self._controlling and tx.controlling:
                pair.nominated = True
                self._update_selection(now)
            return

        local = next((c for c in self._local if c.addr == mapped), None)
        if local is None:
            if (6 if ":" in mapped[0] else 4) != pair.local.family:
                pair.state = PairState.FAILED
                return
            # Peer-reflexive local candidate (7.2.5.3.1): a NAT we did not know about.
            base = pair.local.base
            try:
                local = Candidate.peer_reflexive(mapped[0], mapped[1], base=base,
                                                 priority=tx.priority)
            except CandidateError:
                pair.state = PairState.FAILED
                return
            self._local.append(local)
        self._checklist.succeeded(pair)
        # The valid pair is the one whose local candidate the peer actually saw (7.2.5.3.2).
        valid: CandidatePair | None
        if local.addr == pair.local.addr:
            valid = pair
        else:
            valid = self._checklist.valid_pair_for(local, pair.remote) or next(
                (p for p in self._checklist.pairs
                 if p.local.addr == local.addr and p.remote.addr == pair.remote.addr), None)
            if valid is None:
                valid = CandidatePair(local, pair.remote, pair.via, PairState.SUCCEEDED)
        pair.valid_pair = valid
        if rtt is not None:
            valid.rtt = rtt
        if tx.use_candidate and tx.controlling and self._controlling:
            valid.nominated = True
        if not self._controlling and pair.nominate_on_success:
            valid.nominated = True
        if self._checklist.add_valid(valid):
            if self._first_valid_at is None:
                self._first_valid_at = now
            self._events.append(PairSucceeded(valid))
        self._update_selection(now)
        self._maybe_nominate(now)

    # ------------------------------------------------------------------ checks out
    def _has_check_work(self) -> bool:
        if self._failed or self._remote_pwd is None:
            return False
        if self._nominate_pending or self._checklist.triggered:
            return True
        return not self._generation_selected and self._checklist.peek_ordinary() is not None

    def _next_check(self) -> tuple[CandidatePair, str] | None:
        if self._nominate_pending and self._nominating is not None:
            self._nominate_pending = False
            return self._nominating, _NOMINATE
        while (pair := self._checklist.pop_triggered()) is not None:
            if pair.state != PairState.SUCCEEDED and pair in self._checklist.pairs:
                return pair, _CHECK
        if not self._generation_selected:
            pair = self._checklist.next_ordinary()
            if pair is not None:
                return pair, _CHECK
        return None

    def _pump(self, now: float) -> None:
        """Send at most one new check per Ta (retransmissions run on their own RTO)."""
        if self._failed or self._remote_pwd is None or now < self._next_check_at:
            return
        picked = self._next_check()
        if picked is None:
            return
        pair, kind = picked
        assert self._remote_ufrag is not None
        use_candidate = kind == _NOMINATE or (self._controlling and self._aggressive)
        self._start_transaction(pair, kind, f"{self._remote_ufrag}:{self._local_ufrag}",
                                self._remote_pwd.encode(), use_candidate, now)
        if kind == _CHECK:
            pair.state = PairState.IN_PROGRESS
        if kind == _CHECK and self._burst > 0:
            self._burst -= 1
            self._next_check_at = now
        else:
            self._next_check_at = now + self._ta

    def _start_transaction(self, pair: CandidatePair, kind: str, username: str, key: bytes,
                           use_candidate: bool, now: float) -> None:
        tid = secrets.token_bytes(12)  # RFC 7675 5.1: unpredictable transaction ids
        # PRIORITY: what a prflx candidate learned from this check would get (7.1.1).
        priority = compose_priority(self._prefs["prflx"],
                                    local_preference_of(pair.local.priority),
                                    pair.local.component)
        data = build_request(transaction_id=tid, username=username, key=key,
                             priority=priority, controlling=self._controlling,
                             tie_breaker=self.tie_breaker, use_candidate=use_candidate)
        timeout_at = now + self._tx_lifetime
        first_retry = now + self._rto
        self._tx[tid] = _Transaction(
            pair=pair, kind=kind, data=data, dest=pair.remote.addr, via=pair.via, key=key,
            priority=priority, controlling=self._controlling, use_candidate=use_candidate,
            sent_at=now, timeout_at=timeout_at,
            next_retransmit=first_retry if self._max_requests > 1 else None,
            interval=self._rto)
        self._out.append((data, pair.remote.addr, pair.via))

    def _trigger(self, pair: CandidatePair) -> None:
        """A triggered check (7.3.1.4) of the pair an incoming check arrived on."""
        if pair.state == PairState.SUCCEEDED:
            return
        selected = self._selected
        if (self._generation_selected and selected is not None
                and self._checklist.priority(pair) <= self._checklist.priority(selected)):
            return
        if pair.state == PairState.IN_PROGRESS:
            # The running check stops retransmitting but may still be answered.
            for tx in self._tx.values():
                if tx.pair is pair and tx.kind == _CHECK:
                    tx.next_retransmit = None
        self._checklist.push_triggered(pair)

    def _on_timeout(self, tx: _Transaction) -> None:
        if tx.kind == _CHECK:
            pair = tx.pair
            if pair.state == PairState.IN_PROGRESS and not any(
                    t.pair is pair and t.kind == _CHECK for t in self._tx.values()):
                pair.state = PairState.FAILED
        elif tx.kind == _NOMINATE:
            self._nomination_failed(tx.pair)

    # ------------------------------------------------------------------ roles, nomination
    def _set_role(self, controlling: bool) -> None:
        self._controlling = controlling
        self._checklist.set_controlling(controlling)
        self._nominating, self._nominate_pending = None, False
        if not self._generation_selected:
            # Nominations made under the old role mean nothing under the new one.
            for pair in self._checklist.valid:
                pair.nominated = False
            for pair in self._checklist.pairs:
                pair.nominate_on_success = False

    def _nomination_due(self) -> float | None:
        if (not self._controlling or self._aggressive or self._failed
                or self._generation_selected or self._nominating is not None
                or self._first_valid_at is None
                or all(v.state == PairState.FAILED for v in self._checklist.valid)):
            return None
        return self._first_valid_at + self._nomination_wait

    def _maybe_nominate(self, now: float) -> None:
        """Regular nomination (8.1.1): nominate the best valid pair once nothing better is
        still pending, or nomination_wait after the first valid pair, whichever is first."""
        due = self._nomination_due()
        if due is None or self._remote_pwd is None:
            return
        valid = [v for v in self._checklist.valid if v.state != PairState.FAILED]
        if not valid:
            return
        best = valid[0]
        floor = self._checklist.priority(best)
        better_pending = any(
            self._checklist.priority(p) > floor
            and p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
            for p in self._checklist.pairs)
        if better_pending and now < due:
            return
        self._nominating, self._nominate_pending = best, True

    def _nomination_failed(self, pair: CandidatePair) -> None:
        if self._nominating is pair:
            self._nominating, self._nominate_pending = None, False
        pair.state = PairState.FAILED
        self._checklist.drop_valid(pair)

    def _update_selection(self, now: float) -> None:
        if self._failed:
            return
        nominated = [v for v in self._checklist.valid
                     if v.nominated and v.state != PairState.FAILED]
        if not nominated:
            return
        best = nominated[0]
        if self._generation_selected:
            current = self._selected
            if current is None or best is current or (
                    self._checklist.priority(best) <= self._checklist.priority(current)):
                return  # consent lost needs a restart(); otherwise keep the better pair
        self._select(best, now)

    def _select(self, pair: CandidatePair, now: float) -> None:
        assert self._remote_ufrag is not None and self._remote_pwd is not None
        self._selected = pair
        self._generation_selected = True
        self._old_local = None
        self._nominating, self._nominate_pending = None, False
        self._consent = _Consent(pair, f"{self._remote_ufrag}:{self._local_ufrag}",
                                 self._remote_pwd.encode(), now + self._consent_delay(),
                                 now + self._consent_timeout)
        self._checklist.settle(pair)
        floor = self._checklist.priority(pair)
        for tx in self._tx.values():
            if tx.kind == _CHECK and self._checklist.priority(tx.pair) <= floor:
                tx.next_retransmit = None
        self._events.append(SelectedPair(pair))

    # ------------------------------------------------------------------ endings
    def _maybe_fail_early(self) -> None:
        if not (self._remote_ended and self._local_ended) or self._remote_pwd is None:
            return
        if self._checklist.pending() or self._nominating is not None:
            return
        if any(tx.kind != _CONSENT for tx in self._tx.values()):
            return
        if any(v.state != PairState.FAILED for v in self._checklist.valid):
            return  # a working pair exists: the controlling side may still nominate it
        self._fail("failed")

    def _fail(self, reason: str) -> None:
        self._failed = True
        self._checklist.triggered.clear()
        self._nominating, self._nominate_pending = None, False
        self._tx = {tid: tx for tid, tx in self._tx.items() if tx.kind == _CONSENT}
        self._events.append(Failed(reason, self._gateway_pair))

    def _consent_tick(self, now: float) -> None:
        consent = self._consent
        if consent is None:
            return
        if now >= consent.expires_at:
            self._consent = None
            if self._selected is consent.pair:
                self._selected = None
            self._old_local = None
            self._events.append(ConsentLost(consent.pair))
            return
        if now >= consent.next_at:
            self._start_transaction(consent.pair, _CONSENT, consent.username, consent.key,
                                    False, now)
            consent.next_at = now + (consent.urgent_interval or self._consent_delay())

    def _consent_delay(self) -> float:
        # RFC 7675 5.1: randomised 0.8-1.2 x interval so consent checks do not synchronise.
        return self._consent_interval * self._rng.uniform(0.8, 1.2)

    # ------------------------------------------------------------------ helpers
    def _find_remote(self, addr: Address) -> Candidate | None:
        return next((c for c in self._remote if c.addr == addr), None)

    def _update_gateway_pair(self) -> None:
        if self._local_gateway is None or self._remote_gateway is None:
            self._gateway_pair = None
            return
        self._gateway_pair = CandidatePair(self._local_gateway, self._remote_gateway,
                                           GATEWAY_VIA, PairState.SUCCEEDED)


def _check_credentials(ufrag: str, pwd: str) -> None:
    try:
        ice_ufrag_line(ufrag)
        ice_pwd_line(pwd)
    except CandidateError as exc:
        raise InvalidValue(f"bad ICE credentials: {exc}") from None
