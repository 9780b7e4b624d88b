"""A stream (TCP) model for the simulator: the gateway's TLS path and HTTP proxies.

The simulated network carries datagrams only. A node behind a UDP-blocking NAT still
reaches the gateway over TCP, and this model gives it that: a reliable, ordered link of
messages whose each direction takes the one-way latency of the path (the uplinks between
the host and the internet), refused where a NAT of the chain lets no TCP through to that
destination (`NatConfig.tcp`: "any", "proxy" = only to the lab's proxy, "none"). The
real link (TLS, WebSocket, HTTP CONNECT) is exercised on loopback and in the kernel lab;
the node and gateway code above it is the same.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from macula.gateway.stream_listener import StreamEndpoint
from macula.net.endpoint import Address, stream_address
from macula.net.wslink import LinkClosed, LinkReceiver, LinkSetupError

from .network import NatBox, SimHost, SimNetwork

PROXY_ADDRESS: Address = ("203.0.113.30", 3128)  # the lab's HTTP proxy on the internet


class SimLink:
    """One end of a simulated stream link."""

    def __init__(self, loop: asyncio.AbstractEventLoop, latency: float, *, via_proxy: bool,
                 transport: str = "tls") -> None:
        self.transport = transport
        self.via_proxy = via_proxy
        self.closed = False
        self.close_reason = ""
        self.peer: SimLink | None = None
        self._loop = loop
        self._latency = latency
        self._receiver: LinkReceiver = lambda data: None
        self._on_close: LinkClosed = lambda reason: None
        self._inbox: collections.deque[tuple[float, bytes | None]] = collections.deque()

    def start(self, receiver: LinkReceiver, on_close: LinkClosed) -> None:
        self._receiver, self._on_close = receiver, on_close
        if self._inbox:
            self._loop.call_soon(self._pump)

    def send(self, data: bytes) -> None:
        if self.closed or self.peer is None:
            return
        self.peer._arrive(bytes(data), self._latency)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._finish(reason)
        if self.peer is not None:
            self.peer._arrive(None, self._latency)  # the FIN, after the data before it

    def _arrive(self, data: bytes | None, latency: float) -> None:
        when = self._loop.time() + latency
        self._inbox.append((when, data))
        self._loop.call_at(when, self._pump)

    def _pump(self) -> None:
        now = self._loop.time()
        while self._inbox and self._inbox[0][0] <= now and not self.closed:
            _, data = self._inbox.popleft()
            if data is None:
                self._finish("connection closed by peer")
                return
            self._receiver(data)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._on_close(reason)


def _chain(host: SimHost) -> list[NatBox]:
    """The NATs between `host` and the internet, innermost first."""
    net = host.network
    assert host.iface is not None
    segment, chain = host.iface.segment, []
    while segment is not net.internet:
        nat = next((n for n in net.nats if n.inside is not None and n.inside.segment is segment),
                   None)
        if nat is None or nat.outside is None:
            break
        chain.append(nat)
        segment = nat.outside.segment
    return chain


def path_latency(host: SimHost) -> float:
    """One-way seconds from `host` to the internet: its own link and each NAT's uplink."""
    total = host.link.config.latency
    for nat in _chain(host):
        total += nat.uplink.config.latency
    return total


class SimStreams:
    """Listeners by address, and dialling from a host to one of them."""

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self._listeners: dict[Address, tuple[SimHost, Callable[[SimLink, Address], None]]] = {}
        self.refused = 0
        self._next_port = 40_000

    def listen(self, host: SimHost, addr: Address,
               on_link: Callable[[SimLink, Address], None]) -> None:
        self._listeners[addr] = (host, on_link)

    def unlisten(self, addr: Address) -> None:
        self._listeners.pop(addr, None)

    def serve_gateway(self, host: SimHost, addr: Address, endpoint: StreamEndpoint) -> None:
        """The gateway's TLS path at `addr`: links attach to its endpoint by stand-in."""
        self.listen(host, addr, lambda link, peer: endpoint.attach(stream_address(peer), link))

    async def dial(self, host: SimHost, target: Address, *,
                   proxy: Address | None = None) -> SimLink:
        """A link from `host` to the listener at `target`, through `proxy` when given.
        Raises LinkSetupError as the real dialer would (tcp_connect)."""
        loop = asyncio.get_running_loop()
        first_hop = proxy or target
        for nat in _chain(host):
            policy = nat.config.tcp
            if policy == "none" or (policy == "proxy" and first_hop != PROXY_ADDRESS):
                self.refused += 1
                # A firewall that drops SYNs: the connect times out (kept short here).
                await asyncio.sleep(1.0)
                raise LinkSetupError("tcp_connect", f"{first_hop[0]}:{first_hop[1]}: timed out")
        listener = self._listeners.get(target)
        if listener is None:
            self.refused += 1
            raise LinkSetupError("tcp_connect", f"{target[0]}:{target[1]}: connection refused")
        server_host, on_link = listener
        latency = path_latency(host) + path_latency(server_host)
        # TCP, TLS and the upgrade: three round trips (one more through a proxy).
        round_trips = 4 if proxy else 3
        await asyncio.sleep(2 * latency * round_trips)
        ours = SimLink(loop, latency, via_proxy=proxy is not None)
        theirs = SimLink(loop, latency, via_proxy=False)
        ours.peer, theirs.peer = theirs, ours
        # The gateway names the link by the address it comes from: the outermost NAT's.
        chain = _chain(host)
        source_ip = (proxy[0] if proxy else chain[-1].wan_ip if chain else host.ip)
        self._next_port += 1
        on_link(theirs, (source_ip, self._next_port))
        return ours
