"""The node API a user holds: start, connect to a node id, send and receive, stats.

A thin asyncio layer over NodeCore: it turns core events into futures and queues, and
every call that changes the core is followed by a flush of the driver.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import STRATEGIES, ConfigError
from ..driver import Driver
from ..errors import BindError
from ..ice import list_interfaces
from ..identity import Identity, NodeId
from ..logsafe import Throttle, clip
from ..membership import Membership, MembershipError, NetworkTrust
from ..nat import lifetime_cache
from ..nat.behavior import NatBehavior
from ..nat.binding_lifetime import BindingLifetime
from ..nat.portmap import DiscoveryResult, PortMapper, PortMapping
from ..net.endpoint import Address, DatagramEndpoint, format_address
from ..net.netlink import NetworkWatcher
from ..net.udp import open_udp_endpoint
from ..net.wslink import MessageLink
from ..session import events as ev
from ..session.errors import (
    ConnectTimeout,
    GatewayKeyMismatch,
    LookupUnavailable,
    MaculaError,
    NodeReplaced,
    NoDirectPath,
    NotAdmitted,
    NotRegistered,
    PeerOffline,
    SessionClosedError,
)
from ..session.session import Session
from . import known_gateways
from .core import NodeCore
from .demux import costly_datagram
from .gateway_carrier import GatewayCarrier, LinkDialer
from .options import NodeOptions
from .turn_streams import TurnStreams

log = logging.getLogger(__name__)
_throttle = Throttle()
SocketOpener = Callable[[], Awaitable[DatagramEndpoint]]



class PeerSession:
    """The application's handle on the end-to-end session with one remote node."""

    def __init__(self, node: Node, session: Session) -> None:
        self._node = node
        self._session = session
        self.peer: NodeId = session.peer
        self._messages: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._streams: dict[int, Stream] = {}
        self._incoming_streams: asyncio.Queue[Stream | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._next_ping = 1

    def send(self, data: bytes) -> None:
        """Queue one message; raises MessageTooLarge or SessionClosedError at once."""
        self._session.send_message(data)
        self._node._touch(self._session)

    async def drain(self, high_water: int = 256 * 1024) -> None:
        """Wait until at most `high_water` bytes of messages are unacknowledged."""
        session = self._session
        while session.messages_buffered() > high_water and not session.closed:
            await asyncio.sleep(0.002)
        if session.closed and session.messages_buffered() > high_water:
            raise SessionClosedError(
                f"session with {self.peer} closed with data unacknowledged: {session.close_reason}")

    async def recv(self, timeout: float | None = None) -> bytes:
        item = await asyncio.wait_for(self._messages.get(), timeout)
        if item is None:
            self._messages.put_nowait(None)  # keep later readers informed too
            raise SessionClosedError(f"session with {self.peer} closed: {self.close_reason}")
        return item

    async def open_stream(self) -> Stream:
        stream_id = self._session.open_stream()
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self, timeout: float | None = None) -> Stream:
        stream = await asyncio.wait_for(self._incoming_streams.get(), timeout)
        if stream is None:
            raise SessionClosedError(f"session with {self.peer} closed: {self.close_reason}")
        return stream

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds of one QUIC PING over the session's current path.

        The peer's QUIC stack answers it: no application on the other side is involved.
        Raises ConnectTimeout when no answer comes within `timeout`, SessionClosedError
        when the session closes first."""
        uid, self._next_ping = self._next_ping, self._next_ping + 1
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        self._pings[uid] = answered
        started = loop.time()
        try:
            self._session.ping(uid)
            self._node._touch(self._session)
            closed = asyncio.ensure_future(self.closed.wait())
            waits: list[asyncio.Future[Any]] = [answered, closed]
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if answered.done():
                return loop.time() - started
            if self.closed.is_set():
                raise SessionClosedError(f"session with {self.peer} closed: {self.close_reason}")
            raise ConnectTimeout(f"no answer from {self.peer} within {timeout} s")
        finally:
            self._pings.pop(uid, None)

    def stats(self) -> dict[str, Any]:
        stats = self._session.connection_stats()
        stats["transport"] = self._node._transport_of(self._session)
        return stats

    @property
    def connection_type(self) -> str:
        return self._session.path

    async def close(self) -> None:
        self._session.close()
        self._node._touch(self._session)
        try:
            await asyncio.wait_for(self.closed.wait(), 5.0)
        except TimeoutError:
            pass

    # fed by Node
    def _on_event(self, event: object) -> None:
        if isinstance(event, ev.MessageReceived):
            self._messages.put_nowait(event.data)
        elif isinstance(event, ev.StreamOpened):
            stream = Stream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            self._incoming_streams.put_nowait(stream)
        elif isinstance(event, ev.StreamData):
            known = self._streams.get(event.stream_id)
            if known is not None:
                known._feed(event.data, event.end)
        elif isinstance(event, ev.PingAnswered):
            waiter = self._pings.get(event.uid)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, ev.SessionClosed):
            self.close_reason = event.reason
            self.closed.set()
            self._messages.put_nowait(None)
            self._incoming_streams.put_nowait(None)
            for stream in self._streams.values():
                stream._feed(b"", True)


class Stream:
    """A bidirectional byte stream inside a session, for bulk data."""

    def __init__(self, owner: PeerSession, stream_id: int) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._eof = False

    def write(self, data: bytes, end: bool = False) -> None:
        self._owner._session.write_stream(self.stream_id, data, end)
        self._owner._node._touch(self._owner._session)

    async def drain(self, high_water: int = 1 << 20) -> None:
        session = self._owner._session
        while session.stream_buffered(self.stream_id) > high_water and not session.closed:
            await asyncio.sleep(0.002)

    async def read(self) -> bytes:
        """The next chunk, or b"" at end of stream.

        The peer may send at most one window (QUIC `max_stream_data`, 1 MiB) ahead of what
        has been read here, so a reader that stops holds the writer back."""
        if self._eof and self._chunks.empty():
            return b""
        chunk = await self._chunks.get()
        session = self._owner._session
        if not session.closed and session.stream_consumed(self.stream_id, len(chunk),
                                                          finished=not chunk):
            self._owner._node._touch(session)  # the window update goes out now
        return chunk

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.put_nowait(data)
        if end and not self._eof:
            self._eof = True
            self._chunks.put_nowait(b"")


def _join_network(identity: Identity, options: NodeOptions
                  ) -> tuple[Identity, NetworkTrust | None]:
    """A CA network member presents its membership in every handshake and checks its
    peers'. A membership that cannot count stops the start with one line saying why."""
    membership = Membership.load(options.membership) if options.membership else None
    trust = NetworkTrust.load(options.ca, options.acl, options.revoked) if options.ca else None
    if membership is not None:
        assert options.membership is not None
        try:
            if trust is not None:
                membership.check(trust.ca, identity.node_id, time.time(), trust.revoked)
            elif membership.node != identity.node_id.text:
                raise MembershipError("wrong_node", f"membership names node {membership.node}, "
                                                    f"not {identity.node_id}")
        except MembershipError as exc:
            raise ConfigError(options.membership, f"node.membership: {exc}") from None
        identity = identity.with_membership(membership.encode())
    return identity, trust


def _link_dialer(options: NodeOptions) -> LinkDialer:
    """The real TLS (WebSocket) dialer for `options.gateway_tls`, through the proxy if any.
    The certificate is checked only when the gateway id is not pinned: a pinned id is
    proven inside the QUIC handshake that runs over the link."""
    from ..net import wslink

    assert options.gateway_tls is not None
    target = options.gateway_tls
    proxy = wslink.ProxySpec.parse(options.https_proxy) if options.https_proxy else None
    context = wslink.client_tls_context(verify=options.gateway_id is None)

    async def dial() -> MessageLink:
        return await wslink.dial(target, tls=context, proxy=proxy)

    return dial


class Node:
    def __init__(self, core: NodeCore, endpoint: DatagramEndpoint,
                 socket_opener: SocketOpener | None = None,
                 link_dialer: LinkDialer | None = None) -> None:
        self.core = core
        # Under the driver: TURN over TCP/TLS connections, then the gateway's TLS link.
        self._turn_streams: TurnStreams | None = None
        if core.turn.stream_servers:
            self._turn_streams = TurnStreams(endpoint, core.turn.stream_servers,
                                             self._turn_stream_lost)
            endpoint = self._turn_streams
        self._carrier: GatewayCarrier | None = None
        if link_dialer is not None:
            self._carrier = GatewayCarrier(endpoint, core.gateway, link_dialer,
                                           self._carrier_changed)
            endpoint = self._carrier
        self._driver = Driver(core, endpoint, after_activity=self._dispatch,
                              costly=costly_datagram)
        self.options = core.options
        self.strategy = core.options.strategy
        self._handles: dict[NodeId, PeerSession] = {}
        self._connecting: dict[NodeId, asyncio.Future[PeerSession]] = {}
        self._accepted: asyncio.Queue[PeerSession] = asyncio.Queue()
        self._registered = asyncio.Event()
        self._refused = asyncio.Event()
        self._refusal: MaculaError | None = None
        self._remember_gateway = False
        self._pinned_by_file = False
        self._lookup_waiters: dict[NodeId, list[asyncio.Future[bool]]] = {}
        self._mapper: PortMapper | None = None
        self._mapper_task: asyncio.Task[None] | None = None
        self.port_mapping_result: DiscoveryResult | None = None
        self._lifetimes_file: pathlib.Path | None = None  # where binding lifetimes are kept
        # Extra sockets for hard-NAT port guessing, by via name.
        local_ip = endpoint.local_address[0]
        self._open_socket: SocketOpener = socket_opener or (
            lambda: open_udp_endpoint(local_ip, 0))
        self._sockets: dict[str, DatagramEndpoint] = {}
        self._socket_tasks: set[asyncio.Task[None]] = set()
        self._registrations = 0
        self._watcher: NetworkWatcher | None = None

    # ---------------------------------------------------------------- start / stop
    @classmethod
    async def start(
        cls,
        identity: Identity | None = None,
        options: NodeOptions | None = None,
        *,
        endpoint: DatagramEndpoint | None = None,
        socket_opener: SocketOpener | None = None,
        link_dialer: LinkDialer | None = None,
        register_timeout: float | None = 10.0,
        interfaces: Callable[[], list[tuple[str, str]]] = list_interfaces,
        **changes: Any,
    ) -> Node:
        """Start a node with `options` (NodeOptions.from_config(config), or the defaults),
        changed by any NodeOptions field given by name (`gateway=...`, `strategy=...`,
        `hard_nat=True`, `candidate_types=[...]`).

        Without `identity` a new key is made for this run only: a node that must keep its
        id loads one (Identity.load_or_create). `endpoint` adopts an open socket instead
        of binding `options.listen`; `socket_opener` opens the extra sockets hard-NAT
        guessing asks for (default: UDP on our address); `link_dialer` opens the link to
        the gateway's TLS port (default: a real one when `options.gateway_tls` is set)."""
        identity = identity or Identity.generate()
        options = options or NodeOptions()
        if changes:
            options = options.with_changes(**changes)
        options = await options.resolved()
        trust_on_first_use, pinned_by_file = False, False
        if options.gateway_id is None and options.known_gateways:
            pinned = known_gateways.load(options.known_gateways).get(options.gateway)
            trust_on_first_use, pinned_by_file = pinned is None, pinned is not None
            options = options.with_changes(gateway_id=pinned) if pinned else options
        identity, trust = _join_network(identity, options)
        own_socket = endpoint is None  # a real one: the kernel can tell us when it moves
        if endpoint is None:
            try:
                endpoint = await open_udp_endpoint(*options.listen)
            except OSError as exc:
                raise BindError("node", *options.listen, exc) from None
        # Binding lifetimes measured on earlier runs live beside known_gateways.
        lifetimes_file = (lifetime_cache.beside(options.known_gateways)
                          if options.known_gateways else None)
        core = NodeCore(identity, options, local_address=endpoint.local_address,
                        interfaces=interfaces, trust=trust,
                        lifetimes=lifetime_cache.load(lifetimes_file) if lifetimes_file else None)
        if link_dialer is None and options.gateway_tls is not None:
            link_dialer = _link_dialer(options)
        node = cls(core, endpoint, socket_opener, link_dialer)
        node._lifetimes_file = lifetimes_file
        node._remember_gateway = trust_on_first_use
        node._pinned_by_file = pinned_by_file
        core.start(asyncio.get_running_loop().time())
        node._driver.flush()
        if own_socket and core.nat_traversal:
            node._watcher = NetworkWatcher.start(node._network_changed)
        if options.port_mapping and core.nat_traversal:
            node._start_port_mapping()
        if register_timeout is not None:
            try:
                await node.wait_registered(register_timeout)
            except MaculaError:
                await node.close()
                raise
        return node

    def _carrier_changed(self, udp_works: bool) -> None:
        if not self._driver.closed:
            self.core.carrier_changed(udp_works, asyncio.get_running_loop().time())
            self._driver.flush()

    def _turn_stream_lost(self, server: Address) -> None:
        if not self._driver.closed:
            self.core.turn_stream_lost(server, asyncio.get_running_loop().time())
            self._driver.flush()

    @property
    def gateway_transport(self) -> str:
        """What carries our gateway traffic now: "udp", or "tls" (the WebSocket link)."""
        return self._carrier.transport if self._carrier is not None else "udp"

    def _transport_of(self, session: Session) -> str:
        """The transport under a session's current path: the relay's is the gateway's."""
        if session.path == "relay":
            return self.gateway_transport
        if session.path == "turn":
            paths = self.core.paths.get(session.peer)
            if paths is not None and paths.direct is not None:
                return self.core.turn.transport_of(paths.direct.via)
        return "udp"

    def _network_changed(self) -> None:
        if not self._driver.closed and self.core.network_changed(
                asyncio.get_running_loop().time()):
            self._driver.flush()

    async def wait_registered(self, timeout: float | None = 10.0) -> None:
        """Until the gateway welcomed us: NotRegistered after `timeout`, or at once
        GatewayKeyMismatch when the gateway there is not the one this node pins."""
        registered = asyncio.ensure_future(self._registered.wait())
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait([registered, refused], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
            refused.cancel()
        if self._registered.is_set():
            return
        if self._refusal is not None:
            raise self._refusal
        raise NotRegistered(
            f"could not register with gateway {self.core.gateway[0]}:{self.core.gateway[1]} "
            f"within {timeout} s"
        )

    async def wait_refused(self) -> MaculaError:
        """Until the gateway refuses this node for good: its key is not the pinned one, it
        is not admitted, or another process registered with this node's key."""
        await self._refused.wait()
        assert self._refusal is not None
        return self._refusal

    async def close(self, linger: float = 0.06) -> None:
        """Close every session and leave the gateway. `linger` first lets delayed QUIC
        ACKs (25 ms) go out, so peers learn their last messages arrived."""
        loop = asyncio.get_running_loop()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if linger > 0 and not self._driver.closed and self.core.sessions:
            await asyncio.sleep(linger)
        if self._mapper is not None:
            if self._mapper_task is not None:
                self._mapper_task.cancel()
            await self._mapper.close()  # delete the router's mapping while we still can
        self.core.close(loop.time())
        self._driver.flush()
        await asyncio.sleep(0)
        self._driver.close()
        for task in list(self._socket_tasks):
            task.cancel()
        for endpoint in self._sockets.values():
            endpoint.close()
        self._sockets.clear()
        for handle in self._handles.values():
            handle._on_event(ev.SessionClosed(handle.peer, "node closed"))
        for fut in self._connecting.values():
            if not fut.done():
                fut.set_exception(SessionClosedError("node closed"))

    # ---------------------------------------------------------------- properties
    @property
    def node_id(self) -> NodeId:
        return self.core.node_id

    @property
    def registered(self) -> bool:
        return self.core.registered

    @property
    def local_address(self) -> Address:
        return self._driver.endpoint.local_address

    def detect_nat_type(self) -> NatBehavior | None:
        """The NAT behaviour found by RFC 5780 discovery (None until it finishes)."""
        return self.core.detect_nat_type()

    @property
    def binding_lifetime(self) -> BindingLifetime | None:
        """How long this network's NAT keeps state for an idle remote (RFC 5780 section
        4.6; nat/binding_lifetime.py): measured in the background after NAT discovery
        where the NAT filters by address and port, or remembered from an earlier run on
        the same network. None until known."""
        return self.core.probing.lifetime

    def discover_public_address(self) -> Address | None:
        """Our address as the gateway observes it (seed: discover_public_address)."""
        return self.core.observed

    @property
    def handler_errors(self) -> int:
        return self._driver.errors

    # ---------------------------------------------------------------- sessions
    async def connect(self, peer: NodeId | str, timeout: float = 10.0) -> PeerSession:
        """The end-to-end session with `peer`, established over the gateway relay."""
        peer = NodeId.parse(peer) if isinstance(peer, str) else peer
        if self.strategy == "direct_only" and not self.core.nat_traversal:
            raise NoDirectPath("connection_strategy direct_only needs nat_traversal.enabled")
        handle = self._handles.get(peer)
        if handle is not None and not handle.closed.is_set():
            return handle
        if not self.core.registered:
            await self.wait_registered(timeout)
        fut = self._connecting.get(peer)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._connecting[peer] = fut
            self.core.connect(peer, asyncio.get_running_loop().time())
            self._driver.flush()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if self._connecting.get(peer) is fut:
                del self._connecting[peer]
            fut.cancel()
            session = self.core.sessions.get(peer)
            if session is not None and not session.established:
                session.close("connect timed out")
                self._touch(session)
            raise ConnectTimeout(f"no session with {peer} within {timeout} s") from None

    async def accept(self, timeout: float | None = None) -> PeerSession:
        """The next session another node opened to us."""
        return await asyncio.wait_for(self._accepted.get(), timeout)

    async def is_online(self, peer: NodeId | str, timeout: float = 5.0) -> bool:
        peer = NodeId.parse(peer) if isinstance(peer, str) else peer
        fut = asyncio.get_running_loop().create_future()
        self._lookup_waiters.setdefault(peer, []).append(fut)
        self.core.lookup(peer)
        self._driver.flush()
        return await asyncio.wait_for(fut, timeout)

    def session(self, peer: NodeId) -> PeerSession | None:
        return self._handles.get(peer)

    def get_connection_stats(self, peer: NodeId | str) -> dict[str, Any]:
        peer = NodeId.parse(peer) if isinstance(peer, str) else peer
        handle = self._handles.get(peer)
        if handle is None:
            raise SessionClosedError(f"no session with {peer}")
        return handle.stats()

    # ---------------------------------------------------------------- port mapping
    def _start_port_mapping(self) -> None:
        """Ask the router (PCP, NAT-PMP, then UPnP-IGD) to map our socket, in the
        background: a router without any of them costs seconds we must not wait for."""
        endpoint = self._driver.endpoint
        mapper = PortMapper(endpoint, on_change=self._on_mapping)
        self._mapper = mapper
        # The router answers from its port 5351 with bytes that look like STUN: the
        # mapper takes those before the core sees them.
        def receive(data: bytes, addr: Address) -> None:
            if not mapper.receive(data, addr):
                self._driver.on_datagram(data, addr)

        endpoint.set_receiver(receive)

        async def discover() -> None:
            result = await mapper.discover()
            self.port_mapping_result = result
            if result.mapping is not None:
                self._on_mapping(result.mapping)

        self._mapper_task = asyncio.create_task(discover())

    def _on_mapping(self, mapping: PortMapping | None) -> None:
        loop = asyncio.get_running_loop()
        external = mapping.external if mapping is not None else None
        router = mapping.gateway if mapping is not None else None
        if mapping is not None:
            log.info("port mapping: %s from router %s", format_address(mapping.external),
                     mapping.gateway)
        else:
            log.info("port mapping: none (lost, or the router offers none)")
        self.core.set_mapped_address(external, router, loop.time())
        self._driver.flush()

    # ---------------------------------------------------------------- gateway trust
    def _pin_first_gateway(self) -> None:
        """Trust on first use: the first key this gateway address proved is kept."""
        gateway_id, path = self.core.link.gateway_id, self.options.known_gateways
        if not self._remember_gateway or gateway_id is None or path is None:
            return
        self._remember_gateway = False
        known_gateways.remember(path, self.core.gateway, gateway_id)
        log.info("gateway %s:%s is %s: remembered in %s", *self.core.gateway, gateway_id, path)

    def _refusal_text(self, event: ev.GatewayRefused) -> str:
        where = format_address(self.core.gateway)
        text = (f"gateway {where} presents key {event.presented}, but this node pins "
                f"{event.expected}")
        path = self.options.known_gateways
        if self._pinned_by_file:
            # Pinned from the file on first use, not by the user: say how to accept a change.
            text += (f" (first seen there, remembered in {path}); if its key changed on "
                     f"purpose: macula trust-gateway {event.presented}@{where}")
        return text

    # ---------------------------------------------------------------- internals
    def _touch(self, session: Session) -> None:
        self.core.touch(session)
        self._driver.flush()

    def _dispatch(self) -> None:
        for data, addr, via in self.core.take_socket_datagrams():
            endpoint = self._sockets.get(via)
            if endpoint is not None:
                endpoint.send(data, addr)
        while (event := self.core.next_event()) is not None:
            if isinstance(event, ev.SocketsWanted):
                task = asyncio.create_task(self._open_sockets(event.peer, event.count))
                self._socket_tasks.add(task)
                task.add_done_callback(self._socket_tasks.discard)
            elif isinstance(event, ev.BindingLifetimeFound):
                if self._lifetimes_file is not None:
                    lifetime_cache.remember(self._lifetimes_file, event.network, event.found)
            elif isinstance(event, ev.SocketsReleased):
                for via in event.vias:
                    endpoint = self._sockets.pop(via, None)
                    if endpoint is not None:
                        endpoint.close()
            elif isinstance(event, ev.Registered):
                self._registered.set()
                if self._carrier is not None:
                    self._carrier.registered(True)
                self._pin_first_gateway()
                observed = self.core.observed
                log.info("%s with gateway %s@%s over %s; it sees us at %s",
                         "re-registered" if self._registrations else "registered",
                         self.core.link.gateway_id, format_address(self.core.gateway),
                         self.gateway_transport,
                         format_address(observed) if observed else "?")
                self._registrations += 1
            elif isinstance(event, ev.GatewayRefused):
                self._refusal = GatewayKeyMismatch(self._refusal_text(event))
                self._refused.set()
                log.error("%s", self._refusal)
            elif isinstance(event, ev.GatewayError) and event.code == "replaced":
                self._registered.clear()
                self._refusal = NodeReplaced(
                    f"gateway {format_address(self.core.gateway)} closed this node's "
                    f"registration: {clip(event.message)}; another process uses this key")
                self._refused.set()
                log.error("%s", self._refusal)
            elif isinstance(event, ev.GatewayError) and event.code == "not_admitted":
                self._refusal = NotAdmitted(f"gateway {format_address(self.core.gateway)} "
                                            f"refused: {clip(event.message)}")
                self._refused.set()
            elif isinstance(event, ev.GatewayLost):
                self._registered.clear()
                if self._carrier is not None:
                    self._carrier.registered(False, self.core.link.rtt)
                log.warning("lost gateway %s: %s; registering again",
                            format_address(self.core.gateway), clip(event.reason))
            elif isinstance(event, ev.SessionEstablished):
                self._on_established(event)
            elif isinstance(event, ev.SessionFailed):
                fut = self._connecting.pop(event.peer, None)
                if fut is not None and not fut.done():
                    fut.set_exception(event.error)
            elif isinstance(event, ev.LookupResult):
                for waiter in self._lookup_waiters.pop(event.peer, []):
                    if waiter.done():
                        continue
                    if event.error is not None:
                        waiter.set_exception(LookupUnavailable(
                            f"gateway cannot say whether {event.peer} is online: "
                            f"{event.error}"))
                    else:
                        waiter.set_result(event.online)
            elif isinstance(event, (ev.MessageReceived, ev.StreamOpened, ev.StreamData,
                                    ev.SessionClosed, ev.PathChanged, ev.PingAnswered)):
                handle = self._handles.get(event.peer)
                if isinstance(event, ev.PathChanged):
                    self._log_path_change(event)
                elif isinstance(event, ev.SessionClosed) and handle is not None:
                    log.info("session with %s closed: %s", event.peer, clip(event.reason))
                if handle is not None:
                    handle._on_event(event)
                    if isinstance(event, ev.SessionClosed):
                        del self._handles[event.peer]

    async def _open_sockets(self, peer: NodeId, count: int) -> None:
        """Open what hard-NAT traversal asked for and hand them to the core together."""
        opened: list[tuple[str, Address]] = []
        for _ in range(count):
            try:
                endpoint = await self._open_socket()
            except OSError as exc:  # out of ports or descriptors: guess with fewer
                log.warning("extra socket for port guessing: %s", exc)
                break
            if self._driver.closed:
                endpoint.close()
                break
            via = f"aux:{endpoint.local_address[1]}"
            self._sockets[via] = endpoint
            endpoint.set_receiver(functools.partial(self._on_socket_datagram, via))
            opened.append((via, endpoint.local_address))
        if opened and not self._driver.closed:
            self.core.sockets_opened(peer, opened, self._driver.now())
            self._driver.flush()

    def _on_socket_datagram(self, via: str, data: bytes, addr: Address) -> None:
        if self._driver.closed:
            return
        try:
            self.core.receive_on(via, data, addr, self._driver.now())
        except Exception:  # a bug must cost one packet, never the node
            self._driver.errors += 1
            _throttle.log(log, logging.ERROR, f"aux:{via}", "error handling datagram on %s "
                          "from %s", via, clip(addr, 64), exc_info=True)
        self._driver.flush()

    def _log_path_change(self, event: ev.PathChanged) -> None:
        session = self.core.sessions.get(event.peer)
        if session is None or len(session.path_history) < 2:
            return
        before, now = session.path_history[-2], session.path_history[-1]
        log.info("session with %s: %s -> %s, %.0f ms after it opened", event.peer,
                 before.path, now.path, (now.at - session.started_at) * 1000)

    def _on_established(self, event: ev.SessionEstablished) -> None:
        session = self.core.sessions.get(event.peer)
        if session is None:
            return
        log.info("session with %s %s (path %s)", event.peer,
                 "opened" if session.dialled else "accepted", session.path)
        handle = PeerSession(self, session)
        self._handles[event.peer] = handle
        fut = self._connecting.pop(event.peer, None)
        if fut is not None and not fut.done():
            fut.set_result(handle)  # our dial, or the peer's that won a simultaneous open
        else:
            self._accepted.put_nowait(handle)


__all__ = ["Node", "PeerSession", "Stream", "MaculaError", "PeerOffline", "STRATEGIES"]
