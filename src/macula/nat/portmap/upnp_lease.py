"""Keep one UPnP-IGD mapping alive: renew it before the lease ends, delete it on close.

Renewal is AddPortMapping again for the same external port (devices treat that as a lease
update for the same client). The first attempt comes at half the lease, then at 3/4, 7/8
... (at least 4 s apart), the same rhythm PCP uses; the external IP is read again each time
so a changed WAN address is noticed. When the lease runs out unrenewed, the mapping is
gone and `on_change(None)` says so.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from . import igd
from .errors import PortMapError
from .mapping import PortMapping
from .upnp_client import IgdControl, UpnpClient, UpnpError

MIN_RENEWAL_GAP = 4.0
DELETE_TIMEOUT = 2.0


def next_step(mapping: PortMapping, attempt: int, not_before: float) -> tuple[float, bool]:
    """When to act on a finite lease next, and whether that is a renewal (True) or its
    expiry (False): attempt 0 at half the lifetime, then 3/4, 7/8 ..., never before
    `not_before`, and expiry once no renewal fits before the lease ends."""
    at = max(not_before, mapping.obtained_at + mapping.lifetime * (1 - 2.0 ** -(attempt + 1)))
    if at >= mapping.expires_at:
        return mapping.expires_at, False
    return at, True


class UpnpLease:
    def __init__(self, client: UpnpClient, control: IgdControl, internal_port: int, *,
                 lease: int = 3600,
                 on_change: Callable[[PortMapping | None], None] | None = None) -> None:
        self.client = client
        self.control = control
        self.internal_port = internal_port
        self.lease = lease
        self.mapping: PortMapping | None = None
        self.error: str | None = None
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempt = 0
        self._closed = False

    async def start(self, external_port: int | None = None) -> PortMapping:
        """Create the mapping (the internal port is suggested as the external one)."""
        ip = await self.client.external_ip(self.control)
        port, granted = await self.client.add_mapping(
            self.control, internal_port=self.internal_port,
            external_port=external_port or self.internal_port, lease=self.lease)
        self._set((ip, port), granted)
        assert self.mapping is not None
        return self.mapping

    async def close(self) -> None:
        """Stop renewing and delete the mapping on the device (best effort, bounded)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        mapping, self.mapping = self.mapping, None
        if mapping is None:
            return
        try:
            await asyncio.wait_for(self.client.delete_mapping(self.control, mapping.external[1]),
                                   DELETE_TIMEOUT * 2)
        except (TimeoutError, PortMapError) as exc:
            self.error = f"delete: {exc}"
        if self._on_change is not None:
            self._on_change(None)

    # -- renewal -------------------------------------------------------------------------

    def _set(self, external: tuple[str, int], granted: int) -> None:
        old = self.mapping
        lifetime = float(granted) if granted > 0 else math.inf
        self.mapping = PortMapping("upnp", external, (self.control.local_ip, self.internal_port),
                                   self.control.host, lifetime, self._loop.time())
        self._attempt = 0
        self.error = None
        if self._on_change is not None and (old is None or old.external != external):
            self._on_change(self.mapping)
        self._schedule(self._loop.time())

    def _schedule(self, not_before: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        mapping = self.mapping
        if mapping is None or self._closed or math.isinf(mapping.lifetime):
            return
        at, renew = next_step(mapping, self._attempt, not_before)
        self._timer = self._loop.call_at(at, self._start_renewal if renew else self._expire)

    def _start_renewal(self) -> None:
        self._timer = None
        if not self._closed:
            self._task = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        mapping = self.mapping
        if mapping is None:
            return
        try:
            ip = await self.client.external_ip(self.control)
            try:
                port, granted = await self.client.add_mapping(
                    self.control, internal_port=self.internal_port,
                    external_port=mapping.external[1], lease=self.lease, any_port=False)
            except UpnpError as exc:
                if exc.code != igd.ERR_CONFLICT:
                    raise
                # Someone else holds our old port now: take any.
                port, granted = await self.client.add_mapping(
                    self.control, internal_port=self.internal_port,
                    external_port=mapping.external[1], lease=self.lease)
        except PortMapError as exc:
            self.error = f"renewal: {exc}"
            self._attempt += 1
            self._schedule(self._loop.time() + MIN_RENEWAL_GAP)
            return
        finally:
            self._task = None
        self._set((ip, port), granted)

    def _expire(self) -> None:
        self._timer = None
        if self.mapping is None or self._closed:
            return
        self.mapping = None
        self.error = "lease expired: renewals failed"
        if self._on_change is not None:
            self._on_change(None)
