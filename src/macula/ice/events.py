"""What an IceAgent reports through next_event()."""

from __future__ import annotations

from dataclasses import dataclass

from .pair import CandidatePair

__all__ = ["ConsentLost", "Event", "Failed", "PairHeard", "PairSucceeded", "ProbeAnswered",
           "SelectedPair"]


@dataclass(frozen=True, slots=True)
class PairSucceeded:
    """A check succeeded and `pair` joined the valid list: the path works both ways."""
    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class PairHeard:
    """The peer's first authenticated check of this generation arrived on `pair`, before
    any pair was selected: the peer's NAT has opened towards us there (it just sent us
    that check), so what we send back on it likely arrives, one check round trip before
    our own check of it can succeed. Reported once per generation; proves nothing (our
    answer may still be dropped), so a user of it must keep another way for its data."""
    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class SelectedPair:
    """Nomination completed on `pair`: use it. With aggressive nomination a later
    SelectedPair may follow for a strictly higher-priority pair; the last one wins."""
    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class Failed:
    """No pair was selected: reason "timeout" (ice check_timeout passed) or "failed"
    (both sides ended their candidates and every check failed). `fallback` is the
    gateway-relay pair when both sides offered one, else None."""
    reason: str
    fallback: CandidatePair | None = None


@dataclass(frozen=True, slots=True)
class ConsentLost:
    """RFC 7675: the selected pair went unanswered for consent_timeout; stop using it."""
    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """An authenticated answer to one of probe()'s guesses came from `addr` (on `via`):
    a path no candidate named exists, and a check of it is under way."""
    addr: tuple[str, int]
    via: str


Event = PairSucceeded | PairHeard | SelectedPair | Failed | ConsentLost | ProbeAnswered
