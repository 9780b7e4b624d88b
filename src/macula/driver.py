"""The asyncio side of a sans-IO core: it only moves bytes and wakes timers.

A core has receive_datagram(data, addr, now), datagrams_to_send(now), get_timer() and
handle_timer(now). The driver feeds it from a DatagramEndpoint using the running loop's
clock, so the same core runs on real sockets and inside the virtual-time simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from .net.endpoint import Address, DatagramEndpoint

log = logging.getLogger(__name__)

_PAST_DEADLINE = 1e-6  # seconds


class Core(Protocol):
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


class Driver:
    def __init__(
        self,
        core: Core,
        endpoint: DatagramEndpoint,
        *,
        after_activity: Callable[[], None] | None = None,
    ) -> None:
        self.core = core
        self.endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._after = after_activity
        self._floor = 0.0  # the latest deadline fired: "now" never goes below it
        self.errors = 0
        self.closed = False
        # Endpoints that read in batches (real UDP) say when a batch ends: flush once then.
        # Others (the simulator) deliver one datagram at a time: flush after each.
        set_batch_end = getattr(endpoint, "set_batch_end", None)
        self._batched = set_batch_end is not None
        if set_batch_end is not None:
            set_batch_end(self._batch_end)
        endpoint.set_receiver(self.on_datagram)

    def now(self) -> float:
        return max(self._loop.time(), self._floor)

    def on_datagram(self, data: bytes, addr: Address) -> None:
        if self.closed:
            return
        try:
            self.core.receive_datagram(data, addr, self.now())
        except Exception:  # a bug must cost one packet, never the process
            self.errors += 1
            log.exception("error handling datagram from %s", addr)
        if not self._batched:
            self.flush()

    def _batch_end(self) -> None:
        if not self.closed:
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
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.endpoint.close()
