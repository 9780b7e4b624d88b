"""Run a sans-IO mapping client (PCP or NAT-PMP) on the asyncio loop over the node's socket.

The driver only moves bytes and wakes timers: it sends what the client queues from the
shared DatagramEndpoint, calls `handle_timer` on the loop's clock, and tells `on_change`
when the mapped external address appears, changes or goes away. It never touches the
endpoint's receiver: whoever owns the socket's demux passes datagrams to `receive`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from macula.driver import Driver
from macula.net.endpoint import Address, DatagramEndpoint

from .mapping import PortMapping

ChangeCallback = Callable[[PortMapping | None], None]


class MappingClient(Protocol):
    """What NatPmpClient and PcpClient have in common."""

    @property
    def state(self) -> str: ...
    @property
    def mapping(self) -> PortMapping | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def answered(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool: ...
    def delete(self, now: float, timeout: float = 2.0) -> None: ...


def _key(mapping: PortMapping | None) -> tuple[str, Address] | None:
    return (mapping.protocol, mapping.external) if mapping is not None else None


class ClientDriver:
    def __init__(self, client: MappingClient, endpoint: DatagramEndpoint, *,
                 on_change: ChangeCallback | None = None) -> None:
        self.client = client
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._reported = _key(client.mapping)
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # The socket's owner feeds us (attach=False): we never take its receiver.
        self._driver = Driver(client, endpoint, attach=False, after_activity=self._after)
        self._driver.flush()

    def receive(self, data: bytes, addr: Address) -> bool:
        """Hand over a datagram from the socket; True if it was port-mapping traffic."""
        return self._driver.on_datagram(data, addr)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds (checked after every event of the client)."""
        if predicate():
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((predicate, future))
        try:
            await future
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not future]

    async def settled(self) -> None:
        """Wait for the first request's outcome: mapped, or failed."""
        await self.wait_until(lambda: self.client.state != "requesting")

    async def delete(self, timeout: float = 2.0) -> None:
        """Delete the mapping and wait (bounded by `timeout`) for the gateway's answer."""
        self.client.delete(self._driver.now(), timeout)
        self._driver.flush()
        await self.wait_until(lambda: self.client.done)

    def stop(self) -> None:
        """Stop the timers (the gateway keeps the mapping until its lifetime ends)."""
        self._driver.close()
        for _, future in self._waiters:
            if not future.done():
                future.cancel()

    def _after(self) -> None:
        key = _key(self.client.mapping)
        if key != self._reported:
            self._reported = key
            if self._on_change is not None:
                self._on_change(self.client.mapping)
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)
