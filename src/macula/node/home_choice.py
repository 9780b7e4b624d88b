"""Which gateway of a cluster a node homes on (sans-IO).

With several gateways configured (node.gateways) the node first asks each one a STUN
Binding at once and homes on the lowest RTT; RTTs within TIE of the best count as equal
and the operator's order decides among them (the first to answer waits that long for
gateways listed before it). When none answers within CHOOSE_WITHIN it starts with the
first listed. When its home stops answering (or
drains) it moves to the next: the fastest of the others by the RTTs measured, skipping
one that failed in the last AVOID_FOR seconds unless every one has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..identity import NodeId
from ..net.endpoint import Address
from ..wire.stun import StunError, binding_request, is_stun, parse_message

CHOOSE_WITHIN = 0.3  # seconds the first choice waits for an answer


def tie(rtt: float) -> float:
    """RTTs this close to the best are equal: 10% of it, at least a millisecond."""
    return max(0.001, 0.1 * rtt)
AVOID_FOR = 10.0  # seconds a gateway that failed is tried last


@dataclass
class Candidate:
    address: Address
    pinned: NodeId | None
    rtt: float | None = None
    failed_at: float | None = None
    probe_id: bytes = b""
    probe_sent: float = 0.0


class HomeChoice:
    def __init__(self, gateways: tuple[tuple[Address, NodeId | None], ...]) -> None:
        self.candidates = [Candidate(address, pinned) for address, pinned in gateways]
        self.current = 0
        self.chosen = len(self.candidates) < 2  # nothing to choose among
        self.decide_at: float | None = None
        self.moves = 0

    @property
    def home(self) -> Candidate:
        return self.candidates[self.current]

    def probes(self, now: float) -> list[tuple[bytes, Address]]:
        """The first choice: a Binding request to each gateway, all at once."""
        out = []
        for candidate in self.candidates:
            candidate.probe_id, candidate.probe_sent = os.urandom(12), now
            out.append((binding_request(candidate.probe_id, software=None), candidate.address))
        self.decide_at = now + CHOOSE_WITHIN
        return out

    def owns(self, data: bytes, addr: Address) -> bool:
        """A STUN answer to one of our probes (from a gateway address)."""
        return (is_stun(data) and any(c.address == addr and c.probe_id
                                      and data[8:20] == c.probe_id for c in self.candidates))

    def on_answer(self, data: bytes, addr: Address, now: float) -> bool:
        """A probe was answered: its RTT is known. True when this decides the first
        choice (the caller connects to `home` then)."""
        try:
            message = parse_message(data)
        except StunError:
            return False
        answered = None
        for candidate in self.candidates:
            if candidate.address == addr and message.transaction_id == candidate.probe_id:
                candidate.rtt = now - candidate.probe_sent
                candidate.probe_id = b""
                answered = candidate
        if answered is None or self.chosen or answered.rtt is None:
            return False
        best = min(c.rtt for c in self.candidates if c.rtt is not None)
        if self._first_equal(best) is not None and not any(
                c.rtt is None for c in self.candidates[:self.candidates.index(answered)]):
            self.decide_now()  # nobody listed earlier can still tie
            return True
        # Gateways listed earlier may still answer within the tie: wait that long.
        self.decide_at = min(self.decide_at or now + CHOOSE_WITHIN, now + tie(best))
        return False

    def _first_equal(self, best: float) -> int | None:
        """The first listed gateway whose RTT is within the tie of the best."""
        return next((i for i, c in enumerate(self.candidates)
                     if c.rtt is not None and c.rtt <= best + tie(best)), None)

    def decide_now(self) -> None:
        """Time is up: the first listed of the fastest, or the first listed at all."""
        rtts = [c.rtt for c in self.candidates if c.rtt is not None]
        if rtts:
            first = self._first_equal(min(rtts))
            self.current = first if first is not None else 0
        self.chosen, self.decide_at = True, None

    def next_home(self, now: float) -> Candidate:
        """The home failed (or drains): move to the best other gateway."""
        self.home.failed_at = now
        others = [i for i in range(len(self.candidates)) if i != self.current] or [self.current]

        def rank(i: int) -> tuple[bool, float, int]:
            c = self.candidates[i]
            recent = c.failed_at is not None and now - c.failed_at < AVOID_FOR
            return recent, c.rtt if c.rtt is not None else 1e9, (i - self.current) % len(
                self.candidates)

        self.current = min(others, key=rank)
        self.moves += 1
        return self.home
