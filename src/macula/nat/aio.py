"""Asyncio runners for the NAT clients, for tools and tests (netcheck, the lab).

Each runs a sans-IO client (StunClient, BehaviorProbe, TurnClient) with the one `Driver`
and turns its results into awaitables. A node never uses them: its socket demux feeds the
same clients directly. A runner *borrows* a socket: what its client does not take goes to
`passthrough`, which gets the socket back when the runner closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from ..driver import Core, Driver
from ..net.endpoint import Address, DatagramEndpoint, Receiver
from .behavior import BehaviorProbe, NatBehavior
from .binding_lifetime import SCHEDULE, BindingLifetime, BindingLifetimeProbe
from .stun_client import ConnectivityResult, StunCancelled, StunClient, StunQuery
from .stun_responder import StunResponder
from .turn import (
    MAX_AUTH_RETRIES,
    Allocation,
    StreamFramer,
    TurnClient,
    TurnCounters,
    TurnData,
    TurnError,
    TurnEvent,
    normalize_peer_ip,
)

T = TypeVar("T")  # what a probe run by _until_result ends with
T_co = TypeVar("T_co", covariant=True)

# ------------------------------------------------------------------------------ STUN


class AsyncStunClient:
    """Drives a StunClient over a borrowed DatagramEndpoint on the loop clock."""

    def __init__(
        self,
        endpoint: DatagramEndpoint,
        client: StunClient | None = None,
        *,
        passthrough: Receiver | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client = client if client is not None else StunClient()
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[StunQuery, asyncio.Future[StunQuery]]] = []
        self._driver = Driver(self.client, endpoint, borrow=True, passthrough=passthrough,
                              after_activity=self._settle)

    async def discover_address(self, servers: Sequence[Address]) -> Address:
        """The public (server-reflexive) address; raises StunClientError when none answer."""
        query = await self._run(self.client.discover_address(servers, self._driver.now()))
        if query.error is not None:
            raise query.error
        assert query.address is not None
        return query.address

    async def test_connectivity(self, server: Address) -> ConnectivityResult:
        query = await self._run(self.client.test_connectivity(server, self._driver.now()))
        return query.connectivity()

    async def _run(self, query: StunQuery) -> StunQuery:
        if self._driver.closed:
            raise StunCancelled("STUN client closed")
        future: asyncio.Future[StunQuery] = self._loop.create_future()
        self._waiters.append((query, future))
        self._driver.flush()
        return await future

    def close(self) -> None:
        """Stop: pending queries fail as cancelled, the endpoint goes back to passthrough."""
        if self._driver.closed:
            return
        self.client.cancel(self._driver.now())
        self._settle()
        self._driver.close()

    async def __aenter__(self) -> AsyncStunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _settle(self) -> None:
        still: list[tuple[StunQuery, asyncio.Future[StunQuery]]] = []
        for query, future in self._waiters:
            if query.done:
                if not future.done():
                    future.set_result(query)
            else:
                still.append((query, future))
        self._waiters = still


async def discover_address(
    endpoint: DatagramEndpoint,
    servers: Sequence[Address],
    *,
    rto: float = 0.1,
    rc: int = 7,
    rm: int = 16,
    passthrough: Receiver | None = None,
) -> Address:
    """One-shot helper: our public address as `servers` see it, over `endpoint`."""
    runner = AsyncStunClient(endpoint, StunClient(rto=rto, rc=rc, rm=rm), passthrough=passthrough)
    try:
        return await runner.discover_address(servers)
    finally:
        runner.close()


# ------------------------------------------------------------------------------ RFC 5780


async def detect_nat_behavior(
    endpoint: DatagramEndpoint,
    server: Address,
    *,
    timeout: float = 3.0,
    local_address: Address | None = None,
    alternate_port: int | None = None,
    test_hairpin: bool = True,
    passthrough: Receiver | None = None,
) -> NatBehavior:
    """Classify the NAT in front of `endpoint` against an RFC 5780 server at `server`.

    `local_address` defaults to the endpoint's; a wildcard bind (0.0.0.0) can never equal
    the mapped address, so pass the real source address to recognise "open".
    """
    probe = BehaviorProbe(
        server,
        asyncio.get_running_loop().time(),
        local_address=local_address if local_address is not None else endpoint.local_address,
        alternate_port=alternate_port,
        timeout=timeout,
        test_hairpin=test_hairpin,
    )
    return await _until_result(probe, endpoint, passthrough)


async def measure_binding_lifetime(
    endpoint: DatagramEndpoint,
    primary: Address,
    alternate: Address,
    *,
    schedule: Sequence[float] = SCHEDULE,
) -> BindingLifetime:
    """How long the NAT in front of `endpoint` keeps state for an idle remote, against a
    server's two ports on one IP (binding_lifetime.py; minutes with the default schedule)."""
    probe = BindingLifetimeProbe(primary, alternate, asyncio.get_running_loop().time(),
                                 schedule=schedule)
    return await _until_result(probe, endpoint)


class _Probe(Core, Protocol[T_co]):
    """A sans-IO probe that ends with a `result` by its own clock."""

    @property
    def result(self) -> T_co | None: ...


async def _until_result(probe: _Probe[T], endpoint: DatagramEndpoint,
                        passthrough: Receiver | None = None) -> T:
    """Run `probe` on a borrowed `endpoint` until its result is in."""
    finished: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def settle() -> None:
        if probe.result is not None and not finished.done():
            finished.set_result(probe.result)

    driver = Driver(probe, endpoint, borrow=True, passthrough=passthrough, after_activity=settle)
    try:
        driver.flush()
        return await finished
    finally:
        driver.close()


# ------------------------------------------------------------------------------ TURN


class _Writer:
    """A DatagramEndpoint over a write function (a TCP stream, or a socket the caller
    demultiplexes itself): every datagram goes to the one server."""

    def __init__(self, write: Callable[[bytes], object], local: Address) -> None:
        self._write = write
        self.local_address = local

    def send(self, data: bytes, addr: Address) -> None:
        self._write(data)

    def set_receiver(self, receiver: Receiver) -> None:
        """Datagrams are fed to the driver by the runner itself."""

    def close(self) -> None:
        """The runner releases the real transport."""


async def _nothing() -> None:
    return None


class AsyncTurnClient:
    """Drives a TurnClient over UDP (a DatagramEndpoint it borrows) or TCP (a connection
    it owns), on the event loop clock.

    Relayed data lands in a bounded queue read by `recv()`, or goes to `on_data`.
    """

    def __init__(
        self,
        client: TurnClient,
        write: Callable[[bytes], object],
        *,
        on_data: Callable[[Address, bytes], None] | None = None,
        queue_size: int = 1024,
        borrow: DatagramEndpoint | None = None,
        passthrough: Receiver | None = None,
    ) -> None:
        """`write` sends to the server; the caller feeds what comes back (`feed`), unless
        the runner `borrow`s a socket: then it takes the server's datagrams from it and
        hands the rest to `passthrough`, which gets the socket back on close."""
        self.client = client
        self._write = write
        self._on_data = on_data
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue(queue_size)
        self._waiters: dict[tuple[str, Any], list[asyncio.Future[Any]]] = {}
        self._release: Callable[[], Awaitable[None]] = _nothing
        self._closed = False
        self.queue_drops = 0
        self.errors: list[TurnError] = []
        if borrow is not None:
            self._driver = Driver(client, borrow, borrow=True, passthrough=passthrough,
                                  after_activity=self._dispatch_all)
        else:
            self._driver = Driver(client, _Writer(write, ("0.0.0.0", 0)), attach=False,
                                  after_activity=self._dispatch_all)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def over_udp(
        cls,
        endpoint: DatagramEndpoint,
        server: Address,
        username: str,
        password: str,
        *,
        passthrough: Receiver | None = None,
        on_data: Callable[[Address, bytes], None] | None = None,
        **options: Any,
    ) -> AsyncTurnClient:
        """Borrow `endpoint`: datagrams from the server feed the client, the rest go to
        `passthrough` (which gets the endpoint back when the runner closes)."""
        client = TurnClient(server, username, password, transport="udp", **options)
        return cls(client, lambda data: endpoint.send(data, client.server), on_data=on_data,
                   borrow=endpoint, passthrough=passthrough)

    @classmethod
    async def over_tcp(
        cls,
        server: Address,
        username: str,
        password: str,
        *,
        connect_timeout: float = 5.0,
        on_data: Callable[[Address, bytes], None] | None = None,
        **options: Any,
    ) -> AsyncTurnClient:
        """Open a TCP connection to the server and run the client over it (RFC 8656 11.5)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server[0], server[1]),
                                                connect_timeout)
        client = TurnClient(server, username, password, transport="tcp", **options)
        runner = cls(client, writer.write, on_data=on_data)
        framer = StreamFramer()

        async def read_loop() -> None:
            # Ends when the server closes, the framing breaks, or the runner closes.
            try:
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    for frame in framer.feed(chunk):
                        runner.feed(frame)
                    if framer.error is not None:
                        break
            except (ConnectionError, OSError):
                pass
            writer.close()  # a broken stream cannot be resynchronised
            runner._lost()

        task = asyncio.ensure_future(read_loop())

        async def release() -> None:
            task.cancel()
            writer.close()
            # Bounded: a peer that never acknowledges the FIN must not hold us up.
            await asyncio.wait([task], timeout=1.0)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

        runner._release = release
        return runner

    # -- operations ----------------------------------------------------------------------------

    @property
    def allocation(self) -> Allocation | None:
        return self.client.allocation

    @property
    def counters(self) -> TurnCounters:
        return self.client.counters

    def _bound(self) -> float:
        # The core settles every operation by its own schedule; this only guards the await.
        per_try = (self.client.policy.total_wait if self.client.transport == "udp"
                   else self.client.tcp_timeout)
        return per_try * (MAX_AUTH_RETRIES + 2) + 1.0

    async def _wait(self, key: tuple[str, Any], start: Callable[[float], Any]) -> Any:
        """Start an operation and wait for its outcome (its own result type)."""
        if self._closed:
            raise TurnError("TURN runner closed", operation=key[0])  # type: ignore[arg-type]
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            result = start(self._driver.now())
        except BaseException:
            self._waiters[key].remove(future)
            raise
        self._driver.flush()
        value = await asyncio.wait_for(future, self._bound())
        return value if result is None else result

    async def allocate_relay(self, *, lifetime: int | None = None) -> Allocation:
        """Allocate; returns the relayed (XOR-RELAYED-ADDRESS) and mapped addresses."""
        allocation: Allocation = await self._wait(
            ("allocate", None), lambda now: self.client.allocate_relay(now, lifetime=lifetime))
        return allocation

    async def refresh(self, *, lifetime: int | None = None) -> Allocation:
        allocation: Allocation = await self._wait(
            ("refresh", None), lambda now: self.client.refresh(now, lifetime=lifetime))
        return allocation

    async def create_permission(self, ip: str) -> None:
        ip = normalize_peer_ip(ip)
        await self._wait(("permission", ip), lambda now: self.client.create_permission(ip, now))

    async def bind_channel(self, peer: Address) -> int:
        peer = (normalize_peer_ip(peer[0]), peer[1])
        number: int = await self._wait(("channel", peer),
                                       lambda now: self.client.bind_channel(peer, now))
        return number

    def send_via_relay(self, peer: Address, data: bytes) -> None:
        self._write(self.client.send_via_relay(peer, data))

    async def recv(self, timeout: float = 5.0) -> tuple[Address, bytes]:
        """The next relayed (peer, payload); asyncio.TimeoutError after `timeout`."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """Deallocate (bounded by `timeout`), then let go of the socket or connection."""
        if self._closed:
            return
        if self.client.state == "allocated":
            future: asyncio.Future[Any] = self._loop.create_future()
            self._waiters.setdefault(("deallocate", None), []).append(future)
            self.client.close(self._driver.now())
            self._driver.flush()
            with contextlib.suppress(TurnError, asyncio.TimeoutError):
                await asyncio.wait_for(future, timeout)
        self.client.close(self._driver.now())
        self._closed = True
        self._fail_all(TurnError("TURN runner closed"))
        self._driver.close()
        await self._release()

    async def __aenter__(self) -> AsyncTurnClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """One datagram or frame from the server."""
        if not self._closed:
            self._driver.on_datagram(data, self.client.server)

    def _lost(self) -> None:
        if self._closed:
            return
        self.client.connection_lost(self._driver.now())
        self._driver.flush()

    def _dispatch_all(self) -> None:
        while (event := self.client.next_event()) is not None:
            self._dispatch(event)

    def _dispatch(self, event: TurnEvent) -> None:
        if isinstance(event, TurnData):
            if self._on_data is not None:
                self._on_data(event.peer, event.data)
            elif self._queue.full():
                self.queue_drops += 1
            else:
                self._queue.put_nowait((event.peer, event.data))
            return
        kind, value = event.kind, event.value
        if kind == "error":
            self.errors.append(value)
            if value.operation == "allocation":
                self._fail_all(value)
            else:
                self._settle((value.operation, value.key), error=value)
        elif kind == "allocated":
            self._settle(("allocate", None), value)
        elif kind == "refreshed":
            self._settle(("refresh", None), value)
        elif kind == "permission":
            self._settle(("permission", value), None)
        elif kind == "channel":
            self._settle(("channel", value[0]), value[1])
        elif kind == "deallocated":
            self._settle(("deallocate", None), None)
            self._settle(("refresh", None), None)

    def _settle(self, key: tuple[str, Any], value: Any = None, *,
                error: BaseException | None = None) -> None:
        for future in self._waiters.pop(key, []):
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)

    def _fail_all(self, error: BaseException) -> None:
        for key in list(self._waiters):
            self._settle(key, error=error)


# ------------------------------------------------------------------------------ STUN server


def run_responder(endpoints: list[DatagramEndpoint]) -> StunResponder:
    """Serve STUN on dedicated endpoints (2 or 4, in StunResponder's order).

    Takes over each endpoint's receiver; a gateway that shares its sockets with QUIC calls
    `StunResponder.handle` from its own demux instead.
    """
    responder = StunResponder([ep.local_address for ep in endpoints])

    def serve(index: int) -> Receiver:
        def receive(data: bytes, src: Address) -> None:
            out = responder.handle(data, src, index)
            if out is not None:
                endpoints[out.socket].send(out.data, out.destination(src))

        return receive

    for i, ep in enumerate(endpoints):
        ep.set_receiver(serve(i))
    return responder
