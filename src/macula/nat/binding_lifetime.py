"""How long the NAT keeps the state for an idle remote address (RFC 5780 section 4.6), sans-IO.

RFC 5780's binding-lifetime test idles one socket's binding for T seconds, then has the
server answer it through RESPONSE-PORT from another socket. A node's one socket never
idles (keepalives to the gateway go on), but what expires on a direct path to a quiet
peer is not that binding: it is the NAT's state for that one remote address and port
(Linux conntrack keeps an entry per 5-tuple; a port-restricted NAT or a CGNAT drops what
comes from a remote whose entry has gone, a symmetric NAT drops the mapping itself). The
gateway's second STUN port stands in for the quiet peer:

1. open: a Binding to the alternate port P2 creates the state for P2 (its answer proves
   it, and shows the port the NAT mapped towards P2);
2. idle: nothing goes to P2 for T seconds, while keepalives to the main port P1 go on;
3. test: a Binding to P1 asks, with CHANGE-REQUEST(port) and RESPONSE-PORT, for the answer
   from P2 to the port mapped in step 1. It gets in only while the state for P2 lives.
   Three sends (RFC 8489 backoff); no answer within the test window = gone.

T runs through `schedule` (15, 30, 60, 120, 240 s), each round from fresh state, and stops
at the first expiry: the result is the longest idle time that survived and the first that
did not. Only a NAT that filters by address and port is worth the test (the caller checks
RFC 5780 discovery's answer first): one that lets the gateway's other port in without any
state would pass every round.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ..errors import InvalidValue
from ..net.endpoint import Address
from ..wire.stun import Class, StunError, binding_request, is_stun, mapped_address, parse_message
from .behavior import NatBehavior
from .stun_client import Retransmission, RetransmitPolicy

SCHEDULE: tuple[float, ...] = (15.0, 30.0, 60.0, 120.0, 240.0)
# Three sends (0, 0.1, 0.3 s), then the open step waits until 2 s for its answer (the
# gateway answers at once) and the test step until 1 s (no answer = the state is gone).
_OPEN = RetransmitPolicy(rto=0.1, rc=3, rm=17)
_TEST = RetransmitPolicy(rto=0.1, rc=3, rm=7)


def network_key(nat: NatBehavior) -> str | None:
    """What tells one network from another: our address on it and the public one its NAT
    gives us (None while either is unknown). Lifetimes are remembered under it."""
    if nat.local_address is None or nat.public_address is None:
        return None
    return f"{nat.local_address[0]}>{nat.public_address[0]}"


@dataclass(frozen=True)
class BindingLifetime:
    """What the probe found. `alive_s`: the longest idle time the state survived (None: not
    even the first); `expired_s`: the first idle time after which it was gone (None: it
    survived the whole schedule). `measurable` is False when the test could not run (the
    alternate port never answered): then neither bound means anything."""

    alive_s: float | None
    expired_s: float | None
    measurable: bool = True
    notes: tuple[str, ...] = ()

    @property
    def keepalive_s(self) -> float | None:
        """The longest interval that keeps such state alive, with a margin: half of the
        longest idle time it survived (None when it never expired in the schedule)."""
        if not self.measurable or self.expired_s is None:
            return None
        return (self.alive_s if self.alive_s is not None else self.expired_s / 2) / 2

    def to_json(self) -> dict[str, object]:
        return {"alive_s": self.alive_s, "expired_s": self.expired_s,
                "measurable": self.measurable, "keepalive_s": self.keepalive_s,
                "notes": list(self.notes)}


@dataclass
class _Send:
    """One request and its retransmission schedule."""

    data: bytes
    dest: Address
    schedule: Retransmission
    answered: bool = False


@dataclass
class BindingLifetimeProbe:
    """One run of the test against a gateway's main port and alternate port (same IP).

    Drive it like the other sans-IO probes: datagrams_to_send, get_timer/handle_timer,
    receive_datagram (returns True for its own answers). `interrupted()` voids the current
    round (something else sent to P2 while it idled: the state was refreshed) and runs it
    again. `result` is set when done."""

    primary: Address
    alternate: Address
    now: float
    schedule: Sequence[float] = SCHEDULE
    result: BindingLifetime | None = None
    _round: int = 0
    _step: Literal["open", "idle", "test"] = "open"
    _send: _Send | None = None
    _idle_until: float = 0.0
    _alive: float | None = None
    _outbox: list[tuple[bytes, Address]] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)
    _mapped_to_alternate: Address | None = None

    def __post_init__(self) -> None:
        if self.primary[0] != self.alternate[0] or self.primary[1] == self.alternate[1]:
            raise InvalidValue("the alternate socket must share the primary's IP, not its port")
        if not self.schedule or any(b <= a for a, b in zip(self.schedule, self.schedule[1:])) \
                or self.schedule[0] <= 0:
            raise InvalidValue("the schedule is increasing idle times above 0")
        self._start_open(self.now)

    # ------------------------------------------------------------------ sans-IO
    @property
    def done(self) -> bool:
        return self.result is not None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        if self.result is not None:
            return None
        if self._step == "idle":
            return self._idle_until
        assert self._send is not None
        return self._send.schedule.next_time()

    def handle_timer(self, now: float) -> None:
        if self.result is not None:
            return
        if self._step == "idle":
            if now >= self._idle_until:
                self._start_test(now)
            return
        send = self._send
        assert send is not None
        if send.schedule.expired(now):
            self._no_answer(now)
        elif send.schedule.due(now):
            self._outbox.append((send.data, send.dest))

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        send = self._send
        if self.result is not None or send is None or not is_stun(data) \
                or data[8:20] != send.data[8:20]:
            return False
        try:
            message = parse_message(data)
        except StunError:
            return True
        if send.answered or message.message_class != Class.RESPONSE:
            return True
        send.answered = True
        if self._step == "open":
            self._mapped_to_alternate = mapped_address(message)
            self._step, self._send = "idle", None
            self._idle_until = now + self.schedule[self._round]
        else:
            self._alive = self.schedule[self._round]
            self._round += 1
            if self._round >= len(self.schedule):
                self._finish(BindingLifetime(self._alive, None))
            else:
                self._start_open(now)
        return True

    def interrupted(self, now: float) -> None:
        """Something sent to the alternate port during this round: run it again."""
        if self.result is None and self._step != "open":
            self._notes.append(f"round of {self.schedule[self._round]:g} s run again")
            self._start_open(now)

    # ------------------------------------------------------------------ steps
    def _start_open(self, now: float) -> None:
        self._step = "open"
        self._send = self._new_send(binding_request(os.urandom(12)), self.alternate, now,
                                    _OPEN)

    def _start_test(self, now: float) -> None:
        self._step = "test"
        mapped = self._mapped_to_alternate
        self._send = self._new_send(
            binding_request(os.urandom(12), change_port=True,
                            response_port=mapped[1] if mapped is not None else None),
            self.primary, now, _TEST)

    def _no_answer(self, now: float) -> None:
        if self._step == "open":
            self._finish(BindingLifetime(None, None, measurable=False, notes=(
                "the gateway's alternate port did not answer",)))
        else:
            self._finish(BindingLifetime(self._alive, self.schedule[self._round]))

    def _new_send(self, data: bytes, dest: Address, now: float,
                  policy: RetransmitPolicy) -> _Send:
        self._outbox.append((data, dest))
        return _Send(data, dest, Retransmission(policy, now))

    def _finish(self, found: BindingLifetime) -> None:
        self.result = replace(found, notes=tuple(self._notes) + found.notes)
        self._send = None
