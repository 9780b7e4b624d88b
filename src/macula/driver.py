"""The asyncio side of every sans-IO core: it only moves bytes and wakes timers.

Every core, from the node and the gateway down to a STUN or TURN client, has the same
method set (`Core`): `receive_datagram(data, addr, now)`, `datagrams_to_send(now)`,
`get_timer()`, `handle_timer(now)`, and its own `next_event()`. One `Driver` runs any of
them from a DatagramEndpoint on the running loop's clock, so the same core runs on real
sockets, in kernel namespaces and inside the virtual-time simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from .logsafe import Throttle, clip
from .net.endpoint import Address, DatagramEndpoint, Receiver

log = logging.getLogger(__name__)
_throttle = Throttle()

_PAST_DEADLINE = 1e-6  # seconds


class Core(Protocol):
    """The sans-IO method set. `receive_datagram` may answer False for a datagram that
    is not its own (a borrowed socket passes it on); `handle_timer` may return anything
    (some cores also hand back what happened): the driver ignores both."""

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> object: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> object: ...


def _drop(data: bytes, addr: Address) -> None:
    """The receiver left on a borrowed endpoint when there was nothing to hand back."""


class Driver:
    """Runs `core` over `endpoint`.

    `after_activity` runs after every pass (read the core's events there). A driver that
    `borrows` the endpoint installs itself as its receiver, passes on what the core does
    not take to `passthrough`, and on close hands the endpoint back to `passthrough`
    instead of closing it. With `attach=False` it leaves the receiver alone: its owner
    feeds `on_datagram` itself (a socket shared by several cores).

    `costly` names the datagrams the core takes long over (a TLS flight, a punch request):
    within a batch, what cheaper ones before it queued (a relayed frame, an ICE answer)
    is sent before the core starts on it, and its own answer right after, so neither
    waits behind the other. Other datagrams of a batch still share one flush.
    """

    def __init__(
        self,
        core: Core,
        endpoint: DatagramEndpoint,
        *,
        after_activity: Callable[[], None] | None = None,
        borrow: bool = False,
        passthrough: Receiver | None = None,
        attach: bool = True,
        costly: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.core = core
        self.endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._after = after_activity
        self._floor = 0.0  # the latest deadline fired: "now" never goes below it
        self._borrowed = borrow or not attach
        self._attached = attach
        self._passthrough = passthrough
        self._costly = costly
        self._unflushed = False  # a datagram of this batch was handled since the last flush
        self.errors = 0
        self.closed = False
        # Endpoints that read in batches (real UDP) say when a batch ends: an owner flushes
        # once then. A borrower, or an endpoint that delivers one datagram at a time (the
        # simulator), flushes after each.
        set_batch_end = getattr(endpoint, "set_batch_end", None)
        self._batched = set_batch_end is not None and not self._borrowed
        if self._batched and set_batch_end is not None:
            set_batch_end(self._batch_end)
        if attach:
            endpoint.set_receiver(self.on_datagram)

    def now(self) -> float:
        return max(self._loop.time(), self._floor)

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        """One datagram from the socket; False if the core did not take it."""
        if self.closed:
            return False
        costly = self._batched and self._costly is not None and self._costly(data)
        if costly and self._unflushed:
            self.flush()
        took: object = None
        try:
            took = self.core.receive_datagram(data, addr, self.now())
        except Exception as exc:  # a bug must cost one packet, never the process
            self.errors += 1
            # A flood of one bad packet must not be a flood of tracebacks.
            _throttle.log(log, logging.ERROR, f"datagram:{type(exc).__name__}",
                          "error handling datagram from %s", clip(addr, 64), exc_info=True)
        if took is False:
            if self._passthrough is not None:
                self._passthrough(data, addr)
            return False
        if not self._batched or costly:
            self.flush()
        else:
            self._unflushed = True
        return True

    def _batch_end(self) -> None:
        if not self.closed and self._unflushed:
            self.flush()

    def _on_timer(self) -> None:
        # asyncio runs a timer up to one clock resolution early, and aioquic's loss timer
        # at exactly its deadline can round to "not yet" (sent_time + d - d < sent_time)
        # and re-arm the same deadline. Either way, with a clock that only moves when we
        # wait (the simulator) that is a loop forever: we hand the core a time just past
        # the deadline, so every timer makes progress.
        due = self._timer_at
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        if due is not None:
            self._floor = max(self._floor, due + _PAST_DEADLINE)
        try:
            self.core.handle_timer(self.now())
        except Exception:
            self.errors += 1
            log.exception("error handling timer")
        self.flush()

    def flush(self) -> None:
        """Send what the core has queued, run the activity hook, re-arm the timer."""
        if self.closed:
            return
        self._unflushed = False
        now = self.now()
        try:
            for data, addr in self.core.datagrams_to_send(now):
                self.endpoint.send(data, addr)
        except Exception:
            self.errors += 1
            log.exception("error collecting datagrams")
        if self._after is not None:
            self._after()
        when = self.core.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer) if when is not None else None
            self._timer_at = when

    def close(self) -> None:
        """Stop the timer; close the endpoint if we own it, else hand it back."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._borrowed:
            self.endpoint.close()
        elif self._attached:
            self.endpoint.set_receiver(self._passthrough or _drop)
