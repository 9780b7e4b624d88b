"""The simulated network: segments, hosts, links and NAT boxes moving datagrams in virtual time.

Shape: a tree of segments (LANs). The top segment is the internet. A `NatBox` joins an inside
segment (whose default gateway it is) to an outside segment; NAT behind NAT (CGNAT) is a NAT
whose outside is another NAT's inside. Every attachment (host or NAT side) hangs off its
segment by a `Link` with one-way latency, jitter, random loss and Gilbert-Elliott burst loss,
applied in both directions. Packets move hop by hop, each link crossing scheduled with
`loop.call_at`, so a NAT decides with the state it has when the packet actually reaches it.

`SimEndpoint` implements `macula.net.endpoint.DatagramEndpoint`, so code written against real
UDP runs here unmodified. All randomness comes from per-element `random.Random`s derived from
the network seed: a run is a pure function of its seed.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import random
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from macula.net.endpoint import Address, Receiver
from macula_lab.sim.clock import DEFAULT_MAX_ITERATIONS, DEFAULT_TIME_LIMIT, run_simulation
from macula_lab.sim.nat import DROP_NO_PORT, DROP_UDP_BLOCKED, Nat, NatConfig

T = TypeVar("T")

# Documentation ranges (RFC 5737): the only "public" addresses the simulator hands out.
SERVER_SUBNET = "203.0.113.0/24"
NAT_WAN_SUBNET = "198.51.100.0/24"
OPEN_HOST_SUBNET = "192.0.2.0/24"
INTERNET_SUBNETS = (SERVER_SUBNET, NAT_WAN_SUBNET, OPEN_HOST_SUBNET)

WILDCARD = "0.0.0.0"
# Linux's default ip_local_port_range.
EPHEMERAL_PORTS = (32768, 60999)
# Largest UDP payload over IPv4; bigger sends fail with EMSGSIZE on a real socket.
MAX_DATAGRAM = 65507
# Hop limit: the topology is a tree, but a bounded TTL keeps any misconfiguration finite.
DEFAULT_TTL = 64

# Drop reasons the counters use.
DROP_LOSS = "loss"
DROP_LINK_DOWN = "link_down"
DROP_NO_ROUTE = "no_route"
DROP_TTL = "ttl_expired"
DROP_NO_LISTENER = "no_listener"
DROP_NO_RECEIVER = "no_receiver"
DROP_FIREWALL = "firewall"

# (virtual time, event, element, src, dst, size, crc32 of payload or drop reason)
TraceEvent = tuple[float, str, str, Address, Address, int, "int | str"]


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state bursty loss: in Good a packet is lost with `loss_good`, in Bad with
    `loss_bad`; before each packet the state flips G->B with `p_good_to_bad`, B->G with
    `p_bad_to_good`. Mean burst length in Bad is 1 / p_bad_to_good packets."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p_good_to_bad", "p_bad_to_good", "loss_good", "loss_bad"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, got {value}")
        if self.p_bad_to_good == 0.0 and self.p_good_to_bad > 0.0:
            raise ValueError("p_bad_to_good = 0 would make the Bad state absorbing")

    @classmethod
    def from_mean(cls, loss: float, mean_burst: float) -> GilbertElliott:
        """A model losing `loss` of packets on average in bursts of `mean_burst` packets."""
        if not 0.0 <= loss < 1.0 or mean_burst < 1.0:
            raise ValueError("need 0 <= loss < 1 and mean_burst >= 1")
        r = 1.0 / mean_burst
        return cls(p_good_to_bad=loss * r / (1.0 - loss), p_bad_to_good=r)

    @property
    def mean_loss(self) -> float:
        total = self.p_good_to_bad + self.p_bad_to_good
        if total == 0.0:
            return self.loss_good
        bad = self.p_good_to_bad / total
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good


@dataclass(frozen=True)
class LinkConfig:
    """One-way properties of an attachment's link, applied to each direction separately.
    Times are seconds. Jitter adds uniform(-jitter, +jitter) to the latency; unless
    `reorder`, a link is FIFO (a packet never overtakes the one before it)."""

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    burst: GilbertElliott | None = None
    reorder: bool = False

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss must be a probability")

    @classmethod
    def ms(
        cls,
        latency_ms: float = 0.0,
        *,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        burst: GilbertElliott | None = None,
        reorder: bool = False,
    ) -> LinkConfig:
        return cls(latency_ms / 1000.0, jitter_ms / 1000.0, loss, burst, reorder)


@dataclass
class Counters:
    """Per-element packet counters. What `sent`/`delivered` mean depends on the element:
    datagrams handed in / handed on (see each element's docstring)."""

    sent: int = 0
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Packet:
    __slots__ = ("src", "dst", "data", "ttl", "id")

    def __init__(self, src: Address, dst: Address, data: bytes, packet_id: int) -> None:
        self.src = src
        self.dst = dst
        self.data = data
        self.ttl = DEFAULT_TTL
        self.id = packet_id


class _Direction:
    __slots__ = ("bad", "last_arrival")

    def __init__(self) -> None:
        self.bad = False
        self.last_arrival = float("-inf")


class Link:
    """The wire between an attachment and its segment. `sent` counts packets that entered,
    `delivered` those that came out the other end. `config` and `up` may be changed live."""

    def __init__(self, name: str, config: LinkConfig, rng: random.Random) -> None:
        self.name = name
        self.config = config
        self.up = True
        self.counters = Counters()
        self._rng = rng
        self._dirs = (_Direction(), _Direction())

    def _transit(self, upward: bool, now: float) -> float | str:
        """Arrival time at the far end, or the drop reason."""
        if not self.up:
            return DROP_LINK_DOWN
        cfg = self.config
        rng = self._rng
        state = self._dirs[0 if upward else 1]
        if cfg.burst is not None:
            ge = cfg.burst
            if state.bad:
                if rng.random() < ge.p_bad_to_good:
                    state.bad = False
            elif rng.random() < ge.p_good_to_bad:
                state.bad = True
            if rng.random() < (ge.loss_bad if state.bad else ge.loss_good):
                return DROP_LOSS
        if cfg.loss > 0.0 and rng.random() < cfg.loss:
            return DROP_LOSS
        delay = cfg.latency
        if cfg.jitter > 0.0:
            delay = max(0.0, delay + rng.uniform(-cfg.jitter, cfg.jitter))
        arrival = now + delay
        if not cfg.reorder:
            arrival = max(arrival, state.last_arrival)
            state.last_arrival = arrival
        return arrival


class Interface:
    """An attachment point: `owner` (host or NAT side) joined to `segment` by `link`."""

    def __init__(self, owner: SimHost | NatBox, segment: Segment, ips: tuple[str, ...], link: Link) -> None:
        self.owner = owner
        self.segment = segment
        self.ips = ips
        self.link = link


class Segment:
    """A LAN (or the internet): who holds which address here, and the default gateway.
    `sent` counts packets routed into it, `delivered` those handed to an attachment."""

    def __init__(self, network: SimNetwork, name: str, subnets: Sequence[str], first_offset: int) -> None:
        self.network = network
        self.name = name
        self.subnets = tuple(ipaddress.IPv4Network(s) for s in subnets)
        self.counters = Counters()
        self.gateway: Interface | None = None
        self._attached: dict[str, Interface] = {}
        self._first_offset = first_offset
        # (source IP, destination IP) pairs this segment drops: a firewall between two
        # sites that leaves both their paths to everyone else open (see block()).
        self.blocked: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {[str(s) for s in self.subnets]})"

    def block(self, ip_a: str, ip_b: str, blocked: bool = True) -> None:
        """Drop (or again route) everything between two addresses, both ways."""
        for pair in ((ip_a, ip_b), (ip_b, ip_a)):
            if blocked:
                self.blocked.add(pair)
            else:
                self.blocked.discard(pair)

    def contains(self, ip: str) -> bool:
        addr = ipaddress.IPv4Address(ip)
        return any(addr in subnet for subnet in self.subnets)

    def holder(self, ip: str) -> SimHost | NatBox | None:
        iface = self._attached.get(ip)
        return None if iface is None else iface.owner

    def allocate(self, subnet: str | None = None) -> str:
        """The lowest free address (from `first_offset` up) in `subnet` or the first one."""
        net = self.subnets[0] if subnet is None else ipaddress.IPv4Network(subnet)
        if net not in self.subnets:
            raise ValueError(f"{subnet} is not a subnet of {self.name}")
        for offset in range(self._first_offset, net.num_addresses - 1):
            ip = str(net.network_address + offset)
            if ip not in self._attached:
                return ip
        raise ValueError(f"{net} on {self.name} is full")

    def _attach(self, iface: Interface) -> None:
        for ip in iface.ips:
            if not self.contains(ip):
                raise ValueError(f"{ip} is outside {self.name}'s subnets")
            if ip in self._attached:
                raise ValueError(f"{ip} is already held on {self.name}")
        for ip in iface.ips:
            self._attached[ip] = iface

    def _detach(self, iface: Interface) -> None:
        for ip in iface.ips:
            if self._attached.get(ip) is iface:
                del self._attached[ip]
        if self.gateway is iface:
            self.gateway = None

    def _route(self, packet: Packet, came_from: Interface) -> None:
        net = self.network
        self.counters.sent += 1
        packet.ttl -= 1
        if packet.ttl <= 0:
            net._drop(self, DROP_TTL, packet)
            return
        ip = packet.dst[0]
        if self.blocked and (packet.src[0], ip) in self.blocked:
            net._drop(self, DROP_FIREWALL, packet)
            return
        target = self._attached.get(ip)
        if target is None and not self.contains(ip) and self.gateway is not None:
            target = self.gateway
        if target is None or target is came_from:
            net._drop(self, DROP_NO_ROUTE, packet)
            return
        self.counters.delivered += 1
        owner = target.owner
        net._cross(target.link, False, packet, lambda p: owner._receive(p, target))


class SimEndpoint:
    """One bound UDP socket on a simulated host (implements DatagramEndpoint)."""

    def __init__(self, host: SimHost, ip: str, port: int) -> None:
        self.host = host
        self._local = (ip, port)
        self._receiver: Receiver | None = None
        self._closed = False
        self.send_errors = 0

    def __repr__(self) -> str:
        return f"SimEndpoint({self.host.name!r}, {self._local})"

    @property
    def local_address(self) -> Address:
        return self._local

    @property
    def closed(self) -> bool:
        return self._closed

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def send(self, data: bytes, addr: Address) -> None:
        # Never raises, like UdpEndpoint: bad input is counted, not thrown.
        if (
            self._closed
            or not isinstance(data, (bytes, bytearray, memoryview))
            or len(data) > MAX_DATAGRAM
        ):
            self.send_errors += 1
            return
        dst = _parse_address(addr)
        if dst is None or not self.host._send(self, bytes(data), dst):
            self.send_errors += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.host._unbind(self)

    def _deliver(self, packet: Packet) -> None:
        net = self.host.network
        if self._receiver is None:
            net._drop(self.host, DROP_NO_RECEIVER, packet)
            return
        self.host.counters.delivered += 1
        net.counters.delivered += 1
        net._record("deliver", self.host.name, packet, zlib.crc32(packet.data))
        self._receiver(packet.data, packet.src)


class SimHost:
    """A machine with one interface (one or more IPs) and UDP sockets. `sent` counts
    datagrams its endpoints sent, `delivered` those handed to a receiver."""

    def __init__(self, network: SimNetwork, name: str, ips: tuple[str, ...], rng: random.Random) -> None:
        self.network = network
        self.name = name
        self.ips = ips
        self.counters = Counters()
        self.iface: Interface | None = None
        self._rng = rng
        self._bound: dict[tuple[str, int], SimEndpoint] = {}

    def __repr__(self) -> str:
        return f"SimHost({self.name!r}, {list(self.ips)})"

    @property
    def ip(self) -> str:
        """The primary address: the source of packets from wildcard-bound sockets."""
        return self.ips[0]

    @property
    def link(self) -> Link:
        assert self.iface is not None
        return self.iface.link

    def open_endpoint(self, port: int = 0, ip: str | None = None) -> SimEndpoint:
        """Bind a UDP socket. `ip` None means the primary address, "0.0.0.0" all of them;
        port 0 picks a free ephemeral port. Raises OSError like a real bind."""
        ip = self.ip if ip is None else ip
        if not 0 <= port <= 65535:
            raise OverflowError("bind(): port must be 0-65535.")
        if ip != WILDCARD and ip not in self.ips and not _is_loopback(ip):
            raise OSError(errno.EADDRNOTAVAIL, f"cannot assign requested address {ip}")
        if port == 0:
            port = self._ephemeral_port(ip)
        elif not self._port_free(ip, port):
            raise OSError(errno.EADDRINUSE, f"address already in use: {ip}:{port}")
        endpoint = SimEndpoint(self, ip, port)
        self._bound[(ip, port)] = endpoint
        return endpoint

    async def open_udp_endpoint(self, host: str = WILDCARD, port: int = 0) -> SimEndpoint:
        """Same signature as `macula.net.udp.open_udp_endpoint`, bound on this host."""
        return self.open_endpoint(port, host)

    def endpoints(self) -> list[SimEndpoint]:
        return list(self._bound.values())

    def _port_free(self, ip: str, port: int) -> bool:
        # A wildcard bind conflicts with every address on the port, and vice versa.
        if ip == WILDCARD:
            return all(p != port for (_, p) in self._bound)
        return (ip, port) not in self._bound and (WILDCARD, port) not in self._bound

    def _ephemeral_port(self, ip: str) -> int:
        lo, hi = EPHEMERAL_PORTS
        for _ in range(64):
            port = self._rng.randint(lo, hi)
            if self._port_free(ip, port):
                return port
        for port in range(lo, hi + 1):
            if self._port_free(ip, port):
                return port
        raise OSError(errno.EADDRINUSE, "no free ephemeral port")

    def _unbind(self, endpoint: SimEndpoint) -> None:
        key = endpoint.local_address
        if self._bound.get(key) is endpoint:
            del self._bound[key]

    def _is_local(self, ip: str) -> bool:
        return ip in self.ips or _is_loopback(ip)

    def _send(self, endpoint: SimEndpoint, data: bytes, dst: Address) -> bool:
        net = self.network
        bound_ip, port = endpoint.local_address
        if bound_ip == WILDCARD:
            src_ip = "127.0.0.1" if _is_loopback(dst[0]) else self.ip
        elif _is_loopback(bound_ip) and not _is_loopback(dst[0]):
            return False  # EINVAL on a real socket: loopback cannot reach the network
        elif not _is_loopback(bound_ip) and bound_ip not in self.ips:
            return False  # the address went away (host moved): EINVAL on a real socket
        else:
            src_ip = bound_ip
        packet = Packet((src_ip, port), dst, data, net._next_packet_id())
        self.counters.sent += 1
        net.counters.sent += 1
        net._record("send", self.name, packet, zlib.crc32(data))
        if self._is_local(dst[0]):
            # Loopback: no link, but still asynchronous so send() never re-enters a receiver.
            net._schedule(net.now(), None, self._receive_local, packet)
        else:
            assert self.iface is not None
            iface = self.iface
            net._cross(iface.link, True, packet, lambda p: iface.segment._route(p, iface), inline=False)
        return True

    def _receive_local(self, packet: Packet) -> None:
        self._dispatch(packet)

    def _receive(self, packet: Packet, iface: Interface) -> None:
        if packet.dst[0] not in self.ips:
            self.network._drop(self, DROP_NO_ROUTE, packet)
            return
        self._dispatch(packet)

    def _dispatch(self, packet: Packet) -> None:
        endpoint = self._bound.get(packet.dst) or self._bound.get((WILDCARD, packet.dst[1]))
        if endpoint is None:
            # A real host answers ICMP port unreachable; UDP senders ignore it anyway.
            self.network._drop(self, DROP_NO_LISTENER, packet)
            return
        endpoint._deliver(packet)


class NatBox:
    """A router running a `Nat` between its inside (LAN) and outside (WAN) interfaces.
    `sent` counts packets translated outbound, `delivered` those admitted inbound."""

    def __init__(self, network: SimNetwork, name: str, nat: Nat) -> None:
        self.network = network
        self.name = name
        self.nat = nat
        self.counters = Counters()
        self.inside: Interface | None = None
        self.outside: Interface | None = None

    def __repr__(self) -> str:
        return f"NatBox({self.name!r}, wan={self.wan_ip}, {self.config})"

    @property
    def config(self) -> NatConfig:
        return self.nat.config

    @property
    def wan_ip(self) -> str:
        return self.nat.external_ip

    @property
    def lan_ip(self) -> str:
        assert self.inside is not None
        return self.inside.ips[0]

    @property
    def uplink(self) -> Link:
        assert self.outside is not None
        return self.outside.link

    def _receive(self, packet: Packet, iface: Interface) -> None:
        net = self.network
        if self.nat.config.udp_blocked:
            net._drop(self, DROP_UDP_BLOCKED, packet)
            return
        now = net.now()
        if iface is self.outside:
            if packet.dst[0] != self.wan_ip:
                net._drop(self, DROP_NO_ROUTE, packet)
                return
            internal, reason = self.nat.inbound_verdict(packet.src, packet.dst, now)
            if internal is None:
                net._drop(self, reason, packet)
                return
            self.counters.delivered += 1
            packet.dst = internal
            self._emit(self.inside, packet)
            return
        dst_ip = packet.dst[0]
        if dst_ip == self.lan_ip:
            net._drop(self, DROP_NO_LISTENER, packet)
            return
        if dst_ip == self.wan_ip:
            # Hairpin: from inside to our own external address, looped back translated.
            translated, reason = self.nat.hairpin_verdict(packet.src, packet.dst, now)
            if translated is None:
                net._drop(self, reason, packet)
                return
            self.counters.sent += 1
            self.counters.delivered += 1
            packet.src, packet.dst = translated
            self._emit(self.inside, packet)
            return
        mapped = self.nat.outbound(packet.src, packet.dst, now)
        if mapped is None:
            net._drop(self, DROP_NO_PORT, packet)
            return
        self.counters.sent += 1
        packet.src = mapped
        self._emit(self.outside, packet)

    def _emit(self, iface: Interface | None, packet: Packet) -> None:
        assert iface is not None
        self.network._cross(iface.link, True, packet, lambda p: iface.segment._route(p, iface))


Element = SimHost | NatBox | Segment | Link


class SimNetwork:
    """The whole simulated network. Create it anywhere; it binds to the running event loop
    on first use (normally a `VirtualTimeLoop`). `counters` totals every element's drops,
    every datagram sent by an endpoint and every one delivered to a receiver."""

    def __init__(self, seed: int = 0, *, trace: bool = False, trace_limit: int = 1_000_000) -> None:
        self.seed = seed
        self.counters = Counters()
        # Opt-in packet log: two runs with the same seed produce identical traces.
        self.trace: deque[TraceEvent] | None = deque(maxlen=trace_limit) if trace else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[tuple[float, int, Link | None, Callable[[Packet], None], Packet]] = []
        self._seq = 0
        self._packet_ids = 0
        self._names: dict[str, Element] = {}
        self.segments: list[Segment] = []
        self.hosts: list[SimHost] = []
        self.nats: list[NatBox] = []
        self.internet = self.add_segment("internet", INTERNET_SUBNETS, first_offset=11)

    # -- building ------------------------------------------------------------------------

    def rng_for(self, name: str, seed: int | None = None) -> random.Random:
        """An independent stream per element: changing traffic on one link never shifts
        the random draws of another. String seeds hash deterministically (sha512)."""
        return random.Random(f"{self.seed if seed is None else seed}/{name}")

    def add_segment(self, name: str, subnets: Sequence[str] | str, *, first_offset: int = 1) -> Segment:
        subnet_list = [subnets] if isinstance(subnets, str) else list(subnets)
        segment = Segment(self, name, subnet_list, first_offset)
        self._register(name, segment)
        self.segments.append(segment)
        return segment

    def add_host(
        self,
        name: str,
        segment: Segment,
        ips: Sequence[str] | str | None = None,
        *,
        link: LinkConfig | None = None,
        seed: int | None = None,
    ) -> SimHost:
        """A host on `segment`. `ips` None allocates the segment's next free address."""
        if ips is None:
            ip_tuple: tuple[str, ...] = (segment.allocate(),)
        elif isinstance(ips, str):
            ip_tuple = (ips,)
        else:
            ip_tuple = tuple(ips)
        if not ip_tuple:
            raise ValueError("a host needs at least one address")
        host = SimHost(self, name, ip_tuple, self.rng_for(f"host:{name}", seed))
        wire = self._new_link(f"link:{name}", link, seed)
        iface = Interface(host, segment, ip_tuple, wire)
        segment._attach(iface)
        host.iface = iface
        self._register(name, host)
        self.hosts.append(host)
        return host

    def add_nat(
        self,
        name: str,
        config: NatConfig,
        *,
        outside: Segment,
        inside: Segment,
        wan_ip: str | None = None,
        lan_ip: str | None = None,
        uplink: LinkConfig | None = None,
        seed: int | None = None,
    ) -> NatBox:
        """A NAT routing `inside` (it becomes its default gateway) onto `outside`.
        `uplink` shapes the WAN side; the LAN side is an ideal wire."""
        if inside.gateway is not None:
            raise ValueError(f"{inside.name} already has a gateway")
        if inside is outside:
            raise ValueError("a NAT needs two different segments")
        wan = wan_ip if wan_ip is not None else outside.allocate()
        lan = lan_ip if lan_ip is not None else inside.allocate()
        box = NatBox(self, name, Nat(config, wan, self.rng_for(f"nat:{name}", seed)))
        outside_iface = Interface(box, outside, (wan,), self._new_link(f"link:{name}.wan", uplink, seed))
        inside_iface = Interface(box, inside, (lan,), self._new_link(f"link:{name}.lan", None, seed))
        outside._attach(outside_iface)
        try:
            inside._attach(inside_iface)
        except ValueError:
            outside._attached.pop(wan, None)
            raise
        box.outside = outside_iface
        box.inside = inside_iface
        inside.gateway = inside_iface
        self._register(name, box)
        self.nats.append(box)
        return box

    def move_host(self, host: SimHost, segment: Segment, ip: str | None = None) -> str:
        """Unplug `host` and plug it into `segment` with a new address (default: the
        segment's next free one), keeping its link and its sockets: a laptop moving to
        another network. Sockets bound to the wildcard carry on from the new address;
        ones bound to the old address can no longer send, as on a real host. Packets in
        flight to the old address are dropped where they arrive. Returns the new address."""
        old = host.iface
        if old is None:
            raise ValueError(f"{host.name} is not attached")
        if old.segment is segment:
            raise ValueError(f"{host.name} is already on {segment.name}")
        new_ip = ip if ip is not None else segment.allocate()
        iface = Interface(host, segment, (new_ip,), old.link)
        segment._attach(iface)
        old.segment._detach(old)
        host.iface = iface
        host.ips = (new_ip,)
        return new_ip

    def element(self, name: str) -> Element:
        return self._names[name]

    def holder(self, ip: str) -> SimHost | NatBox | None:
        """Whoever holds `ip` on the internet (public addresses are unique there)."""
        return self.internet.holder(ip)

    def elements(self) -> Iterable[tuple[str, Element]]:
        return self._names.items()

    def drop_report(self) -> dict[str, dict[str, int]]:
        """Per element, the drops by reason (elements without drops left out)."""
        report: dict[str, dict[str, int]] = {}
        for name, element in self._names.items():
            if element.counters.dropped:
                report[name] = dict(element.counters.dropped)
        return report

    def _register(self, name: str, element: Element) -> None:
        if name in self._names:
            raise ValueError(f"name {name!r} already used in this network")
        self._names[name] = element

    def _new_link(self, name: str, config: LinkConfig | None, seed: int | None) -> Link:
        wire = Link(name, config or LinkConfig(), self.rng_for(name, seed))
        self._register(name, wire)
        return wire

    # -- time and scheduling -------------------------------------------------------------

    def now(self) -> float:
        return self._bind_loop().time()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Between runs (e.g. set-up code after the loop stopped) keep using the last loop.
            if self._loop is None or self._loop.is_closed():
                raise RuntimeError("SimNetwork needs an event loop: send from inside the simulation") from None
            return self._loop
        if loop is not self._loop:
            # A new run: packets in flight on a previous loop can never arrive.
            self._loop = loop
            self._queue.clear()
        return loop

    def _next_packet_id(self) -> int:
        self._packet_ids += 1
        return self._packet_ids

    def _schedule(self, when: float, link: Link | None, deliver: Callable[[Packet], None], packet: Packet) -> None:
        # Our own heap with a sequence number keeps same-time deliveries in send order
        # (asyncio's timer heap does not promise FIFO for equal times). Each loop timer
        # pops the earliest entry, which is always due by then (one timer per entry).
        loop = self._bind_loop()
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, link, deliver, packet))
        loop.call_at(when, self._fire)

    def _fire(self) -> None:
        if not self._queue:
            return
        _, _, link, deliver, packet = heapq.heappop(self._queue)
        if link is not None:
            link.counters.delivered += 1
        deliver(packet)

    def _cross(
        self,
        link: Link,
        upward: bool,
        packet: Packet,
        deliver: Callable[[Packet], None],
        *,
        inline: bool = True,
    ) -> None:
        now = self.now()
        link.counters.sent += 1
        outcome = link._transit(upward, now)
        if isinstance(outcome, str):
            self._drop(link, outcome, packet)
            return
        if inline and outcome <= now:
            # An ideal wire: hand on now instead of paying an event-loop round trip.
            link.counters.delivered += 1
            deliver(packet)
            return
        self._schedule(outcome, link, deliver, packet)

    def _drop(self, element: Element, reason: str, packet: Packet) -> None:
        element.counters.dropped[reason] += 1
        self.counters.dropped[reason] += 1
        self._record("drop", element.name, packet, reason)

    def _record(self, kind: str, where: str, packet: Packet, detail: int | str) -> None:
        if self.trace is not None:
            self.trace.append((self.now(), kind, where, packet.src, packet.dst, len(packet.data), detail))


def simulate(
    main: Callable[[SimNetwork], Awaitable[T]],
    *,
    seed: int,
    trace: bool = False,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
) -> T:
    """Run `main(network)` on a fresh network and virtual-time loop, both seeded by `seed`."""
    network = SimNetwork(seed, trace=trace)
    return run_simulation(
        lambda: main(network), seed=seed, time_limit=time_limit, max_iterations=max_iterations
    )


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.")


def _parse_address(addr: object) -> Address | None:
    """A valid IPv4 (ip, port) destination, or None (sendto would raise on a real socket)."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    ip, port = addr[0], addr[1]
    if not isinstance(ip, str) or not isinstance(port, int) or not 0 < port <= 65535:
        return None
    try:
        parsed = ipaddress.IPv4Address(ip)
    except ValueError:
        return None
    if parsed.is_unspecified or parsed.is_multicast:
        return None
    return (str(parsed), port)
