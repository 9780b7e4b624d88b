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
    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...
    def next_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def receive(self, data: bytes, addr: Address, now: float) -> bool: ...
    def delete(self, now: float, timeout: float = 2.0) -> None: ...


def _key(mapping: PortMapping | None) -> tuple[str, Address] | None:
    return (mapping.protocol, mapping.external) if mapping is not None else None


class ClientDriver:
    def __init__(self, client: MappingClient, endpoint: DatagramEndpoint, *,
                 on_change: ChangeCallback | None = None) -> None:
        self.client = client
        self._endpoint = endpoint
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._reported = _key(client.mapping)
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._pump()

    def receive(self, data: bytes, addr: Address) -> bool:
        """Hand over a datagram from the socket; True if it was port-mapping traffic."""
        if self.client.receive(data, addr, self._loop.time()):
            self._pump()
            return True
        return False

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
        self.client.delete(self._loop.time(), timeout)
        self._pump()
        await self.wait_until(lambda: self.client.done)

    def stop(self) -> None:
        """Stop the timers (the gateway keeps the mapping until its lifetime ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, future in self._waiters:
            if not future.done():
                future.cancel()

    def _pump(self) -> None:
        for data, addr in self.client.datagrams_to_send():
            self._endpoint.send(data, addr)
        key = _key(self.client.mapping)
        if key != self._reported:
            self._reported = key
            if self._on_change is not None:
                self._on_change(self.client.mapping)
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.client.next_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer, when)

    def _on_timer(self, when: float) -> None:
        self._timer = None
        # The loop may fire a hair early (clock resolution); never let time run backwards.
        self.client.handle_timer(max(self._loop.time(), when))
        self._pump()
