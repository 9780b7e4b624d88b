"""The gateway process: a GatewayCore driven on one UDP socket, plus the STUN sockets.

The main socket carries QUIC control connections, relay frames and STUN (told apart by the
first byte). Beside it the gateway binds the alternate port, and where it has one the
second IP, so nodes can classify their NAT the RFC 5780 way; those extra sockets answer
STUN only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..config import ConfigError
from ..driver import Driver
from ..errors import BindError
from ..identity import Identity, NodeId
from ..membership import NetworkTrust
from ..nat.stun_responder import StunResponder
from ..net.endpoint import Address, DatagramEndpoint
from ..net.udp import open_udp_endpoint
from .admission import read_allowlist
from .cluster_sync import ClusterSync
from .core import GatewayCore, costly_datagram
from .directory import DirectoryStore, StoreUnavailable
from .heap import HeapKeeper
from .options import GatewayOptions
from .registry import Registry
from .stream_listener import StreamEndpoint, StreamListener, self_signed_context, server_context

log = logging.getLogger(__name__)
HOUSEKEEPING_EVERY = 5.0  # seconds between allowlist checks and giving memory back
HEAP_EVERY = 1.0  # seconds between freezing what survived (gateway/heap.py): it is cheap


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


async def _bind(role: str, host: str, port: int) -> DatagramEndpoint:
    try:
        return await open_udp_endpoint(host, port)
    except OSError as exc:
        raise BindError(role, host, port, exc) from None


def _network_mtimes(options: GatewayOptions) -> tuple[int | None, ...]:
    return tuple(_mtime(p) if p else None for p in (options.ca, options.acl, options.revoked))


def _read_network(options: GatewayOptions) -> NetworkTrust:
    assert options.ca is not None
    return NetworkTrust.load(options.ca, options.acl, options.revoked)


class Gateway:
    def __init__(
        self, core: GatewayCore, driver: Driver, stun_endpoints: list[DatagramEndpoint],
        streams: StreamListener | None = None, heap: HeapKeeper | None = None,
    ) -> None:
        self.core = core
        self.cluster: ClusterSync | None = None  # a cluster member: the directory's sync
        self.heap = heap  # keeps the garbage collector off the long-lived heap
        self._driver = driver
        self.streams = streams  # the TLS (WebSocket) path, when gateway.tls_listen is set
        # Socket order is the responder's: (ip1,p1), (ip1,p2), (ip2,p1), (ip2,p2).
        self._sockets = [driver.endpoint, *stun_endpoints]
        self.stun = StunResponder([ep.local_address for ep in self._sockets])
        self.stun_dropped: Counter[str] = Counter()
        driver.endpoint.set_receiver(self._on_primary)
        self._options = core.options
        self._allowlist_mtime: int | None = None  # of the allowlist last read
        self._network_mtimes: tuple[int | None, ...] = ()  # of the CA network's files
        self._housekeeping_task: asyncio.Task[None] | None = asyncio.ensure_future(
            self._housekeeping())
        for index, endpoint in enumerate(stun_endpoints, start=1):
            endpoint.set_receiver(functools.partial(self._on_stun, index=index))

    @classmethod
    async def start(
        cls,
        identity: Identity | None = None,
        options: GatewayOptions | None = None,
        *,
        endpoint: DatagramEndpoint | None = None,
        stun_endpoints: list[DatagramEndpoint] | None = None,
        registry: Registry | None = None,
        store: DirectoryStore | None = None,
        **changes: Any,
    ) -> Gateway:
        """Bind (or adopt) the sockets and start serving with `options`
        (GatewayOptions.from_config(config), or the defaults), changed by any
        GatewayOptions field given by name (`listen=...`, `limits=...`).

        Without `endpoint`, binds `options.listen` and, for STUN, `alternate_port` (default:
        the listen port + 1, or any free port when listening on port 0) on the same IP,
        plus both ports on `second_ip` when given.

        With `cluster_redis` (or a `store`, the simulator's in-process one) it joins that
        cluster: it waits up to a second for the directory, and starts alone, saying so,
        when the store cannot be reached (it joins as soon as it can).
        """
        options = options or GatewayOptions()
        if changes:
            options = options.with_changes(**changes)
        options = await options.resolved()
        # A CA network's files are read before any socket too (errors name file:line).
        trust = _read_network(options) if options.admission == "ca" else None
        allowlist = None
        if options.admission == "allowlist" and options.allowlist:
            # Read once, before any socket: a bad file refuses the start, naming file:line.
            allowlist = (_mtime(options.allowlist), read_allowlist(options.allowlist))
        listen, alternate_port, second_ip = options.listen, options.alternate_port, options.second_ip
        identity = identity or Identity.generate()
        opened: list[DatagramEndpoint] = []
        try:
            if endpoint is None:
                endpoint = await _bind("gateway (QUIC and STUN)", *listen)
                opened.append(endpoint)
            if stun_endpoints is None:
                host, port = endpoint.local_address
                alt = alternate_port if alternate_port is not None else (port + 1 if listen[1] else 0)
                stun_endpoints = [await _bind("STUN alternate port", host, alt)]
                opened.append(stun_endpoints[0])
                if second_ip:
                    alt = stun_endpoints[0].local_address[1]
                    for p in (port, alt):
                        stun_endpoints.append(await _bind("STUN second IP", second_ip, p))
                        opened.append(stun_endpoints[-1])
        except OSError:
            for ep in opened:
                ep.close()
            raise
        core = GatewayCore(identity, options, registry=registry)
        core.stun_addresses = [ep.local_address for ep in [endpoint, *stun_endpoints]]
        streams = None
        if options.tls_listen is not None:
            try:
                tls = (server_context(options.tls_cert, options.tls_key)
                       if options.tls_cert and options.tls_key else self_signed_context())
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                for ep in opened:
                    ep.close()
                raise ConfigError(options.tls_cert or "gateway.tls_cert",
                                  f"gateway.tls_cert/tls_key: {exc}", "gateway.tls_cert"
                                  ) from None
            endpoint = StreamEndpoint(endpoint)
            streams = StreamListener(endpoint, tls, max_pending=options.limits.max_handshakes,
                                     max_links=core.max_nodes)
            try:
                await streams.start(*options.tls_listen)
            except OSError as exc:
                for ep in opened:
                    ep.close()
                raise BindError("gateway TLS", *options.tls_listen, exc) from None
        keeper = HeapKeeper() if options.manage_heap else None
        after = ((lambda: keeper.after_registrations(core.registrations))
                 if keeper is not None else None)
        gateway = cls(core, Driver(core, endpoint, after_activity=after,
                                   costly=costly_datagram), stun_endpoints,
                      streams, keeper)
        if store is not None or options.cluster_redis:
            await gateway._join_cluster(store, options)
        if allowlist is not None:
            gateway._allowlist_mtime, allowed = allowlist
            core.set_allowlist(allowed)
        if trust is not None:
            gateway._network_mtimes = _network_mtimes(options)
            core.set_trust(trust)
        return gateway

    async def _join_cluster(self, store: DirectoryStore | None, options: GatewayOptions) -> None:
        advertise = options.cluster_advertise or self.address
        if advertise[0] in ("0.0.0.0", "::"):
            await self.close()
            raise ConfigError("configuration", "gateway.cluster.advertise: the other members "
                              f"cannot reach a wildcard address ({advertise[0]}): set it to "
                              "this gateway's address as they see it",
                              "gateway.cluster.advertise")
        if store is None:
            from .redis_store import RedisStore  # redis-py only where a cluster is used
            assert options.cluster_redis is not None
            try:
                store = RedisStore(options.cluster_redis)
            except ValueError as exc:
                await self.close()
                raise ConfigError("configuration", f"gateway.cluster.redis: {exc}",
                                  "gateway.cluster.redis") from None
        self.core.enable_cluster()
        self.cluster = ClusterSync(self.core, store, advertise, self._driver.flush,
                                   self._driver.now)
        self.cluster.start()
        if await self.cluster.wait_connected(1.0):
            log.info("joined the cluster: %d other member(s)", len(self.core.cluster.members)
                     if self.core.cluster is not None else 0)

    async def drain(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask every node to move to another member, and wait (at most `timeout`, default
        gateway.cluster.drain_timeout) until they have; the caller then closes us."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        limit = self._options.drain_timeout if timeout is None else timeout
        before = self.core.nodes_online
        asked = self.core.drain()
        self._driver.flush()
        if self.cluster is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.cluster.announce()
        while self.core.nodes_online and loop.time() - began < limit:
            await asyncio.sleep(0.05)
        left = self.core.nodes_online
        log.warning("drained: %d of %d node(s) moved in %.0f ms%s", before - left, before,
                    (loop.time() - began) * 1000, f", {left} still here" if left else "")
        return {"asked": asked, "moved": before - left, "left": left,
                "elapsed_ms": round((loop.time() - began) * 1000, 1)}

    def _on_primary(self, data: bytes, addr: Address) -> None:
        if data and data[0] <= 3:
            self._on_stun(data, addr, 0)
        else:
            self._driver.on_datagram(data, addr)

    def _on_stun(self, data: bytes, addr: Address, index: int) -> None:
        if not data or data[0] > 3:
            self.stun_dropped["not_stun"] += 1
            return
        if not self.core.answers.allow(addr[0], self._driver.now()):
            return  # counted as answer_rate: no address gets more than that through us
        answer = self.stun.handle(data, addr, index)
        if answer is not None:
            self._sockets[answer.socket].send(answer.data, answer.destination(addr))

    @property
    def address(self) -> Address:
        return self._driver.endpoint.local_address

    @property
    def stun_addresses(self) -> list[Address]:
        return [ep.local_address for ep in self._sockets]

    @property
    def node_id(self) -> NodeId:
        return self.core.identity.node_id

    @property
    def handler_errors(self) -> int:
        return self._driver.errors

    async def _housekeeping(self) -> None:
        """Every few seconds: re-read a changed allowlist, and hand freed heap back to
        the OS after connections began or ended (the C allocator keeps it otherwise, so a
        gateway's RSS would not follow its live nodes through churn; glibc only)."""
        trim = _malloc_trim()
        seen = (self.core.connections_dropped, self.core.registrations)
        next_round = self._driver.now() + HOUSEKEEPING_EVERY
        while True:
            await asyncio.sleep(min(HEAP_EVERY, HOUSEKEEPING_EVERY))
            now = self._driver.now()
            if self.heap is not None:
                self.heap.tick(now, self.core.connections_dropped)
            if now < next_round:
                continue
            next_round = now + HOUSEKEEPING_EVERY
            self.reload_allowlist(only_if_changed=True)
            self.reload_network(only_if_changed=True)
            endpoint = self._driver.endpoint
            if isinstance(endpoint, StreamEndpoint):
                endpoint.sweep(self._driver.now(), self._options.node_timeout)
            if self.core.recheck_memberships():  # expired since the last look
                self._driver.flush()
            # Handshakes free their buffers once done, and connections free everything
            # when they end: either leaves holes the allocator keeps unless asked.
            now_seen = (self.core.connections_dropped, self.core.registrations)
            if trim is not None and now_seen != seen:
                seen = now_seen
                trim(0)

    def reload(self) -> None:
        """SIGHUP: read the allowlist, or a CA network's ACL and revocation list, again."""
        self.reload_allowlist()
        self.reload_network()

    def reload_network(self, only_if_changed: bool = False) -> None:
        """Read a CA network's files again; a bad file keeps the previous rules (and says
        which file and line). Members whose certificate is now revoked are disconnected."""
        if self._options.admission != "ca":
            return
        mtimes = _network_mtimes(self._options)
        if only_if_changed and mtimes == self._network_mtimes:
            return
        self._network_mtimes = mtimes
        try:
            trust = _read_network(self._options)
        except ConfigError as exc:
            log.error("CA network files not reloaded, keeping the previous rules: %s", exc)
            return
        dropped = self.core.set_trust(trust)
        self._driver.flush()
        log.info("CA network %s: %d ACL rule(s), %d revoked, %d disconnected",
                 trust.ca.ca_id, len(trust.acl.rules), len(trust.revoked), dropped)

    def reload_allowlist(self, only_if_changed: bool = False) -> None:
        """Read the allowlist again (SIGHUP, or it changed); a bad file keeps the old list."""
        path = self._options.allowlist
        if self._options.admission != "allowlist" or path is None:
            return
        mtime = _mtime(path)
        if only_if_changed and mtime == self._allowlist_mtime:
            return
        self._allowlist_mtime = mtime
        try:
            allowed = read_allowlist(path)
        except ConfigError as exc:
            log.error("allowlist not reloaded, keeping the previous one: %s", exc)
            return
        dropped = self.core.set_allowlist(allowed)
        self._driver.flush()
        log.info("allowlist %s: %d node(s) admitted, %d disconnected", path, len(allowed),
                 dropped)

    @property
    def tls_address(self) -> Address | None:
        return self.streams.address if self.streams is not None else None

    def abort(self) -> None:
        """Stop at once, telling nobody: no goodbye to nodes or members, no withdrawal
        from the directory (what a crash or kill -9 looks like to the others; the lab's
        gateway kill)."""
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
            self._housekeeping_task = None
        if self.cluster is not None:
            self.cluster.abort()
            self.cluster = None
        self._driver.close()
        for endpoint in self._sockets[1:]:
            endpoint.close()

    async def close(self) -> None:
        if self.heap is not None:
            self.heap.release()
        if self._driver.closed:  # aborted
            return
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
        if self.cluster is not None:
            await self.cluster.leave()
            await self.cluster.close()
        if self.streams is not None:
            await self.streams.close()
        self.core.close()
        self._driver.flush()
        await asyncio.sleep(0)
        self._driver.close()
        for endpoint in self._sockets[1:]:
            endpoint.close()
