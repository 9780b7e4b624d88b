"""The node's socket as its driver sees it: UDP, except that gateway traffic rides the TLS
(WebSocket) link while `CarrierChoice` says so.

The node core never learns which carrier moved a datagram: it sends to the gateway's
address and hears from it, and the end-to-end sessions above see one path among others.
This layer only dials, moves bytes, sends the STUN probes the choice asks for (and keeps
their answers to itself) and wakes the choice's timer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from ..net.endpoint import Address, DatagramEndpoint, EndpointLayer, Receiver, format_address
from ..net.wslink import LinkSetupError, MessageLink
from ..wire.stun import binding_request
from .carrier_choice import CarrierChoice

log = logging.getLogger(__name__)
_PROBE_IDS_KEPT = 8


LinkDialer = Callable[[], Awaitable[MessageLink]]
CarrierChanged = Callable[[bool], None]  # called with udp_works after every move


class GatewayCarrier(EndpointLayer):
    def __init__(self, udp: DatagramEndpoint, gateway: Address, dial: LinkDialer,
                 on_change: CarrierChanged) -> None:
        super().__init__(udp)
        self.gateway = gateway
        self._dial = dial
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self.choice = CarrierChoice(self._loop.time())
        self.link: MessageLink | None = None
        self._probe_ids: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._dial_task: asyncio.Task[None] | None = None
        self.closed = False
        self.via_proxy = False
        self._rearm()

    # ------------------------------------------------------------------ DatagramEndpoint
    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.inner.set_receiver(self._on_udp)

    def send(self, data: bytes, addr: Address) -> None:
        if addr == self.gateway:
            link = self.link
            if self.choice.current == "stream" and link is not None and not link.closed:
                link.send(data)
                return
            # Per packet only a comparison: the timer moves when a quiet period starts.
            if self.choice.on_udp_sent(self._loop.time()):
                self._rearm()
        self.inner.send(data, addr)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._dial_task is not None:
            self._dial_task.cancel()
        if self.link is not None:
            self.link.close("node closing")
        self.inner.close()

    # ------------------------------------------------------------------ what the node tells us
    @property
    def transport(self) -> str:
        """What carries gateway traffic now: "udp", or the link's ("tls")."""
        if self.choice.current == "stream" and self.link is not None:
            return self.link.transport
        return "udp"

    def registered(self, registered: bool, rtt: float | None = None) -> None:
        now = self._loop.time()
        if registered:
            self.choice.on_registered(now)
        else:
            self.choice.on_unregistered(now, rtt)
        self._rearm()

    # ------------------------------------------------------------------ internals
    def _on_udp(self, data: bytes, addr: Address) -> None:
        if addr == self.gateway and not self.closed:
            # Settled on UDP (the usual case), an answer changes nothing: no timer work.
            if not self.choice.settled:
                moved = self.choice.on_udp_heard(self._loop.time())
                self._rearm()
                if moved:
                    log.info("UDP to gateway %s works again: gateway traffic back on UDP",
                             format_address(self.gateway))
                    self._changed(True)
            if len(data) >= 20 and data[0] <= 3 and data[8:20] in self._probe_ids:
                return  # our own probe's answer: not the core's business
        self._receiver(data, addr)

    def _on_link_message(self, link: MessageLink, data: bytes) -> None:
        if link is not self.link or self.closed:
            return
        self.deliver(data, self.gateway)

    def _changed(self, udp_works: bool) -> None:
        try:
            self._on_change(udp_works)
        except Exception:
            log.exception("carrier change handler")

    def _rearm(self) -> None:
        if self.closed:
            return
        when = self.choice.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer) if when is not None else None

    def _on_timer(self) -> None:
        due = self._timer_at
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        # asyncio may run a timer a hair early: the choice must see its own deadline as
        # reached, or a clock that only moves when we wait (the simulator) spins.
        now = max(self._loop.time(), due or 0.0)
        while self.choice.probes_due(now):
            probe_id = os.urandom(12)
            self._probe_ids = [*self._probe_ids[-(_PROBE_IDS_KEPT - 1):], probe_id]
            self.inner.send(binding_request(probe_id, software=None), self.gateway)
        if self.choice.wants_link_closed(now) and self.link is not None:
            self.link.close("UDP works: link no longer needed")
        if self.choice.wants_dial(now):
            self.choice.on_dial_started(now)
            self._dial_task = asyncio.ensure_future(self._dial_link())
        self._rearm()

    async def _dial_link(self) -> None:
        try:
            link = await self._dial()
        except asyncio.CancelledError:
            raise
        except (LinkSetupError, OSError) as exc:
            if not self.closed:
                if self.choice.counters.dial_failures == 0:
                    log.warning("TLS link to gateway failed: %s (retrying with backoff)", exc)
                else:
                    log.debug("TLS link to gateway failed again: %s", exc)
                self.choice.on_link_failed(self._loop.time(), str(exc))
                self._rearm()
            return
        if self.closed:
            link.close("node closing")
            return
        self.link = link
        self.via_proxy = link.via_proxy
        link.start(lambda data: self._on_link_message(link, data),
                   lambda reason: self._on_link_closed(link, reason))
        if self.choice.on_link_up(self._loop.time()):
            log.info("gateway traffic now on the %s link%s", link.transport,
                     " through the proxy" if link.via_proxy else "")
            self._changed(False)
        self._rearm()

    def _on_link_closed(self, link: MessageLink, reason: str) -> None:
        if link is not self.link or self.closed:
            return
        self.link = None
        if self.choice.on_link_closed(self._loop.time(), reason):
            log.warning("TLS link to gateway closed (%s): gateway traffic back on UDP", reason)
            self._changed(True)
        self._rearm()
