"""Candidate pairs: RFC 8445 6.1.2.3 priority, the check states and the nominated flag."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from macula.net.endpoint import Address

from .candidate import Candidate

__all__ = ["CandidatePair", "PairState", "pair_priority"]

SOCKET = "socket"  # `via` of every base on the node's one UDP socket


class PairState(enum.Enum):
    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def pair_priority(controlling_priority: int, controlled_priority: int) -> int:
    """RFC 8445 6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0), G = controlling side's."""
    g, d = controlling_priority, controlled_priority
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


@dataclass(eq=False)  # identity semantics: pairs are mutable state, used as dict keys
class CandidatePair:
    local: Candidate
    remote: Candidate
    # Which of our bases checks leave from: "socket", or a TURN allocation's identifier.
    via: str = SOCKET
    state: PairState = PairState.FROZEN
    nominated: bool = False
    # Controlled side: USE-CANDIDATE arrived before our own check of this pair succeeded,
    # so the valid pair it yields is nominated on success (RFC 8445 7.3.1.5).
    nominate_on_success: bool = False
    # The valid pair a successful check of this pair produced (RFC 8445 7.2.5.3.2).
    valid_pair: CandidatePair | None = None
    rtt: float | None = None

    def priority(self, controlling: bool) -> int:
        if controlling:
            return pair_priority(self.local.priority, self.remote.priority)
        return pair_priority(self.remote.priority, self.local.priority)

    @property
    def foundation(self) -> str:
        return f"{self.local.foundation}:{self.remote.foundation}"

    @property
    def local_addr(self) -> Address:
        return self.local.addr

    @property
    def remote_addr(self) -> Address:
        return self.remote.addr

    def __repr__(self) -> str:
        flag = " nominated" if self.nominated else ""
        return (f"<CandidatePair {self.local.kind} {self.local.address}:{self.local.port} -> "
                f"{self.remote.kind} {self.remote.address}:{self.remote.port} via {self.via} "
                f"{self.state.value}{flag}>")
