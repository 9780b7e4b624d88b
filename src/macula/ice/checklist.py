"""The check list (RFC 8445 6.1.2): forming, pruning and ordering pairs, the frozen/waiting
algorithm per foundation, the triggered-check queue and the valid list.

Only *bases* are paired: host candidates and TURN relay candidates, the places checks can
actually leave from. A server-reflexive candidate is replaced by its base before pairing
(6.1.2.4), which usually makes its pairs redundant with the host's; `pairing_base` builds
the base when the host itself was not gathered (ice.candidate_types without "local").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .candidate import HOST, SRFLX, Candidate, compute_foundation
from .pair import CandidatePair, PairState

__all__ = ["MAX_PAIRS", "CheckList", "can_pair", "pairing_base"]

# RFC 8445 6.1.2.5 suggests 100: plenty for a node's handful of interfaces, and it bounds
# what hostile signalling can make us spend.
MAX_PAIRS = 100

_ACTIVE = (PairState.WAITING, PairState.IN_PROGRESS)


def can_pair(local: Candidate, remote: Candidate) -> bool:
    """Same component and address family, both UDP (6.1.2.2)."""
    return (local.component == remote.component and local.family == remote.family
            and local.transport.lower() == "udp" and remote.transport.lower() == "udp")


def pairing_base(candidate: Candidate, known: Iterable[Candidate],
                 host_priority: int) -> Candidate:
    """The candidate checks from `candidate` leave from (6.1.2.4).

    Host and relay candidates are their own base. A srflx candidate's base is the host
    candidate at its raddr/rport; when that host was not gathered, one is made up with
    `host_priority` (it pairs, but is never offered to the peer).
    """
    if candidate.type != SRFLX:
        return candidate
    for c in known:
        if c.type == HOST and c.addr == candidate.base:
            return c
    address, port = candidate.base
    return Candidate(compute_foundation("host", address), candidate.component,
                     candidate.transport, host_priority, address, port, HOST)


class CheckList:
    def __init__(self, *, controlling: bool, max_pairs: int = MAX_PAIRS) -> None:
        self.controlling = controlling
        self.max_pairs = max_pairs
        self.pairs: list[CandidatePair] = []  # highest priority first
        self.valid: list[CandidatePair] = []  # the valid list, highest priority first
        self.triggered: deque[CandidatePair] = deque()

    def priority(self, pair: CandidatePair) -> int:
        return pair.priority(self.controlling)

    def set_controlling(self, controlling: bool) -> None:
        """A role switch changes every pair priority (G and D swap)."""
        self.controlling = controlling
        self._sort()

    def _sort(self) -> None:
        self.pairs.sort(key=self.priority, reverse=True)
        self.valid.sort(key=self.priority, reverse=True)

    # ------------------------------------------------------------------ forming
    def add(self, local: Candidate, remote: Candidate, via: str) -> CandidatePair | None:
        """Pair a base with a remote candidate; None if unpairable, redundant or over limit."""
        if not can_pair(local, remote):
            return None
        new = CandidatePair(local, remote, via)
        for pair in self.pairs:
            # Redundant: same base, same remote (6.1.2.4). Keep the higher priority one,
            # but never rewrite a pair whose check is already under way.
            if (pair.via == via and pair.local.base == local.base
                    and pair.remote.addr == remote.addr):
                if (self.priority(new) > self.priority(pair)
                        and pair.state in (PairState.FROZEN, PairState.WAITING)):
                    pair.local = local
                    self._sort()
                return None
        new.state = self._initial_state(new)
        self.pairs.append(new)
        self._sort()
        if len(self.pairs) > self.max_pairs:
            # 6.1.2.5: drop the lowest-priority pairs that have not started.
            for victim in reversed(self.pairs):
                if victim.state in (PairState.FROZEN, PairState.WAITING):
                    self.remove(victim)
                    break
            if new not in self.pairs:
                return None
        return new

    def _initial_state(self, new: CandidatePair) -> PairState:
        # RFC 8838 (trickle) section 10 applied to every pair: a foundation that already
        # works starts Waiting; one with a check pending waits its turn Frozen.
        same = [p for p in self.pairs if p.foundation == new.foundation]
        if any(p.state == PairState.SUCCEEDED for p in same):
            return PairState.WAITING
        if any(p.state in _ACTIVE for p in same):
            return PairState.FROZEN
        return PairState.WAITING

    def remove(self, pair: CandidatePair) -> None:
        if pair in self.pairs:
            self.pairs.remove(pair)
        if pair in self.triggered:
            self.triggered.remove(pair)

    def replace_remote(self, old: Candidate, new: Candidate) -> None:
        """A signalled candidate replaces the peer-reflexive one learned for its address."""
        for pair in self.pairs + self.valid:
            if pair.remote == old:
                pair.remote = new
        self._sort()

    # ------------------------------------------------------------------ lookups
    def find(self, remote_addr: tuple[str, int], via: str) -> list[CandidatePair]:
        """Pairs from base(s) on `via` to `remote_addr`, highest priority first."""
        return [p for p in self.pairs if p.via == via and p.remote.addr == remote_addr]

    def valid_pair_for(self, local: Candidate, remote: Candidate) -> CandidatePair | None:
        for pair in self.valid:
            if pair.local == local and pair.remote.addr == remote.addr:
                return pair
        return None

    # ------------------------------------------------------------------ scheduling
    def push_triggered(self, pair: CandidatePair) -> None:
        """Queue a triggered check (7.3.1.4); the pair goes (back) to Waiting."""
        if pair.state != PairState.SUCCEEDED:
            pair.state = PairState.WAITING
        if pair not in self.triggered:
            self.triggered.append(pair)

    def pop_triggered(self) -> CandidatePair | None:
        return self.triggered.popleft() if self.triggered else None

    def peek_ordinary(self) -> CandidatePair | None:
        return self._ordinary(unfreeze=False)

    def next_ordinary(self) -> CandidatePair | None:
        """6.1.4.2: the best Waiting pair; failing that, unfreeze the best Frozen pair whose
        foundation has nothing Waiting or In-Progress."""
        return self._ordinary(unfreeze=True)

    def _ordinary(self, unfreeze: bool) -> CandidatePair | None:
        for pair in self.pairs:
            if pair.state == PairState.WAITING:
                return pair
        busy = {p.foundation for p in self.pairs if p.state in _ACTIVE}
        for pair in self.pairs:
            if pair.state == PairState.FROZEN and pair.foundation not in busy:
                if unfreeze:
                    pair.state = PairState.WAITING
                return pair
        return None

    def has_work(self) -> bool:
        return bool(self.triggered) or self.peek_ordinary() is not None

    def pending(self) -> bool:
        """Anything that could still produce a valid pair."""
        return bool(self.triggered) or any(
            p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
            for p in self.pairs)

    # ------------------------------------------------------------------ results
    def succeeded(self, pair: CandidatePair) -> None:
        """7.2.5.3.3: success unfreezes the other pairs of the same foundation."""
        pair.state = PairState.SUCCEEDED
        if pair in self.triggered:
            self.triggered.remove(pair)  # a queued re-check would only repeat the proof
        for other in self.pairs:
            if other.foundation == pair.foundation and other.state == PairState.FROZEN:
                other.state = PairState.WAITING

    def add_valid(self, pair: CandidatePair) -> bool:
        if pair in self.valid:
            return False
        self.valid.append(pair)
        self._sort()
        return True

    def drop_valid(self, pair: CandidatePair) -> None:
        if pair in self.valid:
            self.valid.remove(pair)

    def settle(self, selected: CandidatePair) -> None:
        """After selection (RFC 8445 8.1.2): no more ordinary checks, and only triggered
        checks that could still beat the selected pair."""
        floor = self.priority(selected)
        for pair in list(self.pairs):
            if pair.state in (PairState.FROZEN, PairState.WAITING) and pair not in self.triggered:
                self.remove(pair)
        for pair in list(self.triggered):
            if self.priority(pair) <= floor:
                self.triggered.remove(pair)
                if pair.state == PairState.WAITING:
                    self.remove(pair)
