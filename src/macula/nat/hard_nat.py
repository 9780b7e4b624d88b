"""Hard-NAT traversal towards one peer: who guesses, which ports, how fast (sans-IO).

An endpoint-dependent ("symmetric") NAT gives every destination its own external port, so
the port its peer must aim at is unknown, and a peer behind a port-restricted NAT (or a
CGNAT, which filters the same way) drops everything from ports it has not sent to itself.
Plain ICE fails on that pair; two tricks make it work:

- sequential allocators hand out the next ports after the last one: the easy side tries
  the ports just above the one the gateway saw first;
- random allocators: birthday probing. The hard side opens many extra sockets and sends
  one check from each to the easy side's public address, every one opening a mapping;
  the easy side sends checks to random ports of the hard side's address. With 256
  mappings among 64,512 ports, 1,000 guesses hit with p = 1 - (1 - 256/64512)^1000,
  about 98%; 2,000 guesses (the default budget), 99.96%.

Each side's first packets (the hard side's openers, one per socket; the easy side's first
256 or 512 guesses) go at up to four times `rate`, a bounded burst; the easy side's later
guesses stay under `rate` packets per second; both stop at the first guess the ICE agent
authenticates (its answer carries MESSAGE-INTEGRITY under the peer's ICE password).

A port-preserving symmetric NAT needs no guessing: a fresh socket's first mapping keeps
its local port, so that side predicts its own port (PREDICT). It opens one socket, tells
the peer "my public IP, this socket's port" (a trickled candidate marked predicted), and
sends its first packet from it to the one address the peer will answer from: a
port-restricted peer's public address, or another preserving NAT's predicted one. Two
such NATs then meet port to port, where birthday guessing never could.
The run only starts when the NAT pair calls for it: see plan_role().
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidValue
from ..net.endpoint import Address
from .behavior import NatBehavior

HARD, EASY, PREDICT = "hard", "easy", "predict"
_TICK = 0.02  # seconds between bursts; a burst is rate x _TICK packets
_PORTS = (1024, 65535)  # where NATs allocate (Linux masquerade's range, the simulator's)
_SEQUENTIAL_SOCKETS = 16  # a sequential allocator needs few mappings, found by prediction
_SEQUENTIAL_WINDOW = 256  # ports above the observed one tried first against it
# Each side's first packets go at this multiple of `rate`, a bounded burst: the hard
# side's one packet per socket (`sockets` in all: only mappings that exist when a guess
# arrives can be hit), and the easy side's first guesses (against a sequential allocator
# the walk over the _SEQUENTIAL_WINDOW ports above the last one seen: on a busy NAT the
# next mapping is a few hundred ports on; against a random one _RANDOM_BURST guesses,
# starting when half the hard side's mappings are open). Modelled against 256 random
# mappings at 200/s: median hit 1.08 s and 90th percentile 3.2 s with no bursts, 0.45 s
# and 1.4 s with them.
_BURST_FASTER = 4
_RANDOM_BURST = 512
# A predicting side checks the peer's address from its one socket this often (the peer's
# mapping may not exist yet: its first check opens it), for at most _PREDICT_FOR.
_PREDICT_EVERY = 0.025
_PREDICT_FOR = 3.0


@dataclass(frozen=True)
class HardNatConfig:
    """nat_traversal.hard_nat*: on by default. A run costs sockets and packets, but only
    the NAT pairs plan_role() names get one, it ends at the first hit, and without it those
    pairs stay on the relay for good (docs/CONFIG.md)."""

    enabled: bool = True
    rate: int = 200  # packets per second, per side
    sockets: int = 256  # extra sockets the hard side opens (random allocators)
    probes: int = 2000  # guesses the easy side sends at most

    def __post_init__(self) -> None:
        if not 1 <= self.rate <= 10_000:
            raise InvalidValue("hard_nat_rate must be 1..10000 packets/s")
        if not 1 <= self.sockets <= 1024:
            raise InvalidValue("hard_nat_sockets must be 1..1024")
        if not 1 <= self.probes <= 60_000:
            raise InvalidValue("hard_nat_probes must be 1..60000")

    @property
    def duration(self) -> float:
        """How long a run lasts at most: every guess at the capped rate, then one second
        for the last answers."""
        return max(self.probes, self.sockets) / self.rate + 1.0


def plan_role(mine: NatBehavior | None, peer_nat: str | None,
              peer_allocation: str | None) -> str | None:
    """HARD, EASY or PREDICT when this NAT pair needs hard-NAT traversal, else None (see
    role_for)."""
    if mine is None or peer_nat is None:
        return None
    return role_for(mine.nat_type, mine.port_allocation, peer_nat, peer_allocation)


def role_for(nat: str, allocation: str | None, peer_nat: str,
             peer_allocation: str | None) -> str | None:
    """Only an endpoint-dependent NAT against one that filters by address and port
    qualifies: cone filters admit the hard side's checks anyway. Two endpoint-dependent
    NATs meet only if each keeps a fresh socket's port (PREDICT both); otherwise both
    would have to guess (left to TURN)."""
    if nat == "symmetric" and allocation == "preserving" and (
            peer_nat == "port_restricted"
            or (peer_nat == "symmetric" and peer_allocation == "preserving")):
        return PREDICT
    if nat == "symmetric" and allocation != "preserving" and peer_nat == "port_restricted":
        return HARD
    if nat == "port_restricted" and peer_nat == "symmetric" and peer_allocation != "preserving":
        return EASY
    return None


def pair_needs_traversal(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    """Whether hard-NAT traversal can open a pair plain ICE cannot, given each side's
    (NAT type, port allocation): the gateway's view of plan_role."""
    return role_for(*a, *b) is not None or role_for(*b, *a) is not None


class HardNatRun:
    """One side's part in one attempt. The caller turns what handle_timer() returns into
    ICE probes (agent.probe(dest, via)) and says when a guess was answered (stop())."""

    def __init__(self, role: str, config: HardNatConfig, *, target: Address | None,
                 allocation: str, now: float, rng: random.Random) -> None:
        if role not in (HARD, EASY, PREDICT):
            raise InvalidValue(f"unknown hard-NAT role {role!r}")
        if target is None and role != PREDICT:
            raise InvalidValue("only a predicting side may start without a target")
        self.role = role
        self.config = config
        # hard: the easy side's public address; easy: the hard side's; predict: where the
        # peer answers from (None until a preserving peer's predicted candidate arrives).
        self.target = target
        self.allocation = allocation
        self.started_at = now
        self.ends_at = now + (_PREDICT_FOR if role == PREDICT else config.duration)
        self.sent = 0
        self.hit: tuple[Address, str] | None = None
        self.done = False
        self.ended_direct = False  # a direct pair was selected in this attempt
        # How many packets go at the burst pace before the rest follow at `rate`, and
        # (easy side) how long to wait first for the hard side's mappings.
        sequential = allocation == "sequential"
        hard_sockets = min(config.sockets, _SEQUENTIAL_SOCKETS) if sequential else config.sockets
        if role == HARD:
            self._fast, self._delay = hard_sockets, 0.0
        elif role == PREDICT:
            self._fast, self._delay = 0, 0.0
        else:
            self._fast = _SEQUENTIAL_WINDOW if sequential else _RANDOM_BURST
            self._delay = hard_sockets / (config.rate * _BURST_FASTER) / 2
        self._next_at = now + self._delay
        self._burst = max(1, round(config.rate * _BURST_FASTER * _TICK))
        self._slow_burst = max(1, round(config.rate * _TICK))
        self._sockets: deque[str] = deque()  # hard: opened sockets not yet sent from
        self._given = 0
        self._guesses: Iterator[int] = iter(())
        self._exhausted = False
        if role == HARD:
            self.sockets_wanted = hard_sockets
        elif role == PREDICT:
            self.sockets_wanted = 1
        else:
            assert target is not None
            self.sockets_wanted = 0
            self._guesses = _guesses(target[1], allocation, config.probes, rng)

    @property
    def duration(self) -> float:
        return self.ends_at - self.started_at

    def aim(self, target: Address) -> None:
        """A predicting side learns the peer's predicted address (trickled)."""
        if self.role == PREDICT and self.target is None:
            self.target = target

    @property
    def sockets_given(self) -> int:
        return self._given

    def add_sockets(self, vias: list[str]) -> None:
        """The hard side's extra sockets are open: each sends one check to the target."""
        if not self.done:
            self._given += len(vias)
            self._sockets.extend(vias)

    def _pending(self) -> bool:
        if self.role == PREDICT:
            return bool(self._sockets) and self.target is not None
        return bool(self._sockets) if self.role == HARD else not self._exhausted

    def get_timer(self) -> float | None:
        if self.done:
            return None
        return min(self._next_at, self.ends_at) if self._pending() else self.ends_at

    def handle_timer(self, now: float) -> list[tuple[Address, str | None]]:
        """Due probes as (destination, via); via None means the node's own socket."""
        if self.done:
            return []
        if now >= self.ends_at:
            self.done = True
            return []
        if now < self._next_at or not self._pending():
            return []
        if self.role == PREDICT:
            # The same socket to the same address every time: one mapping, whose port
            # the peer was told.
            assert self.target is not None
            self.sent += 1
            self._next_at = now + _PREDICT_EVERY
            return [(self.target, self._sockets[0])]
        target = self.target
        assert target is not None  # only a predicting side starts without one
        out: list[tuple[Address, str | None]] = []
        for _ in range(self._burst if self.sent < self._fast else self._slow_burst):
            if self.role == HARD:
                if not self._sockets:
                    break
                out.append((target, self._sockets.popleft()))
            else:
                port = next(self._guesses, None)
                if port is None:
                    self._exhausted = True
                    break
                out.append(((target[0], port), None))
        self.sent += len(out)
        # From the start, not from `now`: late timers never add up to more than the pace.
        self._next_at = max(now, self.started_at + self._due(self.sent))
        return out

    def _due(self, sent: int) -> float:
        """Seconds after the start when packet number `sent` (from 0) may leave."""
        fast_rate = self.config.rate * _BURST_FASTER
        burst = min(sent, self._fast)
        return self._delay + burst / fast_rate + max(0, sent - self._fast) / self.config.rate

    def stop(self, hit: tuple[Address, str] | None = None) -> None:
        if self.hit is None:
            self.hit = hit
        self.done = True

    def stats(self, now: float) -> dict[str, object]:
        return {"role": self.role, "allocation": self.allocation, "sent": self.sent,
                "hit": f"{self.hit[0][0]}:{self.hit[0][1]}" if self.hit else None,
                "done": self.done, "elapsed_ms": round((now - self.started_at) * 1000, 3)}


def _guesses(observed: int, allocation: str, budget: int, rng: random.Random) -> Iterator[int]:
    """Ports to try on the hard side's address, best first, never twice: against a
    sequential allocator the ones just above the observed port, then uniformly random."""
    lo, hi = _PORTS
    tried: set[int] = set()
    if allocation == "sequential":
        for port in range(observed + 1, min(hi, observed + _SEQUENTIAL_WINDOW) + 1):
            if len(tried) >= budget:
                return
            tried.add(port)
            yield port
    span = hi - lo + 1
    while len(tried) < min(budget, span):
        port = rng.randint(lo, hi)
        if port not in tried:
            tried.add(port)
            yield port
