"""`macula netcheck`: what the network between this host and its servers does to UDP.

Seeded by the monitoring checklist and Tailscale's netcheck. Everything a node would send
goes from ONE UDP socket, in phases that each get `timeout` seconds:

1. names: resolve the configured hosts (IP literals cost nothing).
2. STUN: a few Binding round trips to the gateway's STUN port and every configured STUN
   server: UDP reachability (any answer at all), the public address each one sees, the
   best latency, and which servers send RFC 5780's OTHER-ADDRESS.
3. NAT behaviour: the RFC 5780 classifier against the gateway (its two ports, and two IPs
   when it has them), else against a STUN server that sent OTHER-ADDRESS, else "unknown"
   with the reason. It runs alone on the socket: other traffic would open the very
   filters it measures.
4. TURN: allocate on every configured TURN server (UDP on the socket, TCP on a connection
   of its own), report the relayed address and how long the allocation took, deallocate.
5. Port mapping: which of PCP, NAT-PMP and UPnP-IGD the router answers, through
   `macula.nat.portmap` when it is installed ("not checked" otherwise).
6. TLS link: when the gateway's TLS port is known (node.gateway_tls, --gateway-tls), open
   the link a node falls back to when UDP is blocked (TCP, TLS, WebSocket upgrade, through
   the HTTP proxy when one is set), and report which step failed if one did.

Only servers the operator configured are contacted (plus the local router, for port
mapping, unless disabled): there are no public defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import logs
from .config import (
    LOG_FORMATS,
    LOG_LEVELS,
    TURN_TRANSPORTS,
    Config,
    NodeSection,
    TurnServer,
    format_host_port,
    load_config,
    parse_host_port,
    split_gateway,
)
from .errors import InvalidValue
from .nat import lifetime_cache
from .nat.aio import (
    AsyncStunClient,
    AsyncTurnClient,
    detect_nat_behavior,
    measure_binding_lifetime,
)
from .nat.behavior import NatBehavior
from .nat.binding_lifetime import SCHEDULE, BindingLifetime, network_key
from .nat.portmap.netinfo import local_ip_toward
from .nat.stun_client import StunClient
from .nat.turn import TurnAuthError, TurnClient, TurnError
from .net.endpoint import Address, Receiver, format_address
from .net.udp import UdpEndpoint, open_udp_endpoint
from .session.errors import MaculaError
from .wire.stun import StunError, is_stun, parse_message

__all__ = [
    "DEFAULT_TIMEOUT",
    "GatewayResult",
    "NatResult",
    "NetcheckError",
    "PortmapOptions",
    "PortmapResult",
    "Report",
    "StunResult",
    "Targets",
    "TlsLinkResult",
    "TurnResult",
    "add_netcheck_parser",
    "cmd_netcheck",
    "format_report",
    "parse_turn_arg",
    "run_netcheck",
]

DEFAULT_TIMEOUT = 5.0
# Binding round trips per STUN server; the best is the latency (one sample can be unlucky).
SAMPLES = 3
# TURN: the share of the phase for allocating; the rest is kept for deallocating, so an
# allocation made late in the phase is still released within it.
ALLOCATE_SHARE = 0.8
_BINDING_SUCCESS = 0x0101
_RESPONSE_BIT = 0x0100  # STUN class bit C1: set in success and error responses


class NetcheckError(MaculaError):
    """The check cannot run at all (e.g. the socket cannot be bound)."""


# -- what to check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The servers to check. Hosts may be names; they are resolved in the first phase."""

    gateway: str | None = None
    gateway_source: str = "flag"  # "flag", "config" or "default": the report says which
    stun: tuple[str, ...] = ()
    turn: tuple[TurnServer, ...] = ()
    listen: str = "0.0.0.0:0"
    gateway_tls: str | None = None  # the gateway's TLS (WebSocket) port
    https_proxy: str | None = None
    gateway_id: str | None = None  # pinned ("ID@host:port"): the TLS certificate needs no CA

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        gateway: str | None = None,
        stun: Iterable[str] = (),
        turn: Iterable[TurnServer] = (),
        gateway_tls: str | None = None,
        https_proxy: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Targets:
        """Config servers plus flag servers (flags add to the lists; --gateway replaces).
        The proxy: the flag, node.https_proxy, then HTTPS_PROXY unless NO_PROXY exempts
        the gateway host, as a node decides."""
        from .node.options import environment_proxy

        tls = gateway_tls or config.node.gateway_tls or None
        proxy = https_proxy or config.node.https_proxy or None
        if tls and not proxy:
            proxy = environment_proxy(parse_host_port(tls)[0],
                                      os.environ if env is None else env)
        if gateway is not None:
            source = "flag"
        else:
            gateway = config.node.gateway
            source = "default" if gateway == NodeSection().gateway else "config"
        gateway_id, gateway = split_gateway(gateway)
        return cls(
            gateway=gateway,
            gateway_id=gateway_id,
            gateway_source=source,
            stun=tuple(dict.fromkeys([*config.stun_servers, *stun])),
            turn=tuple(dict.fromkeys([*config.turn_servers, *turn])),
            listen=config.node.listen,
            gateway_tls=tls,
            https_proxy=proxy,
        )


@dataclass(frozen=True)
class PortmapOptions:
    enabled: bool = True
    router: str | None = None  # None: the router of the default route
    server_port: int = 5351  # PCP and NAT-PMP
    protocols: tuple[str, ...] = ("pcp", "natpmp", "upnp")


# -- results -------------------------------------------------------------------------------


@dataclass
class StunResult:
    server: str  # as configured
    address: Address | None = None  # resolved
    ok: bool = False
    latency_ms: float | None = None  # best round trip
    mapped: str | None = None
    error: str | None = None
    other_address: str | None = None  # RFC 5780: the server can classify NATs
    answered: int = 0  # samples answered

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "latency_ms": self.latency_ms, "mapped": self.mapped,
                "error": self.error, "other_address": self.other_address}


@dataclass
class TlsLinkResult:
    """The TLS (WebSocket) path to the gateway: whether it opens, how long it took, through
    which proxy, and which step failed (tcp_connect, proxy, tls, upgrade, timeout)."""

    address: str
    proxy: str | None = None
    ok: bool = False
    latency_ms: float | None = None
    step: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "ok": self.ok, "proxy": self.proxy,
                "via_proxy": self.proxy is not None, "latency_ms": self.latency_ms,
                "failed_step": self.step, "error": self.error}


@dataclass
class GatewayResult(StunResult):
    source: str = "flag"
    answering: list[str] = field(default_factory=list)  # its STUN sockets that answered us

    def to_json(self) -> dict[str, Any]:
        return {"address": self.server, "source": self.source, **super().to_json(),
                "stun_sockets_answering": self.answering}


@dataclass
class TurnResult:
    server: str
    username: str
    transport: str
    address: Address | None = None
    ok: bool = False
    relayed: str | None = None
    mapped: str | None = None
    latency_ms: float | None = None  # the whole allocation, 401 challenge included
    error: str | None = None
    deallocated: bool | None = None
    note: str | None = None
    label: str = ""  # unique within the report; set by run_netcheck

    @property
    def name(self) -> str:
        # Never the credential: reports end up in tickets and logs.
        return self.label or f"{self.username}@{self.server}/{self.transport}"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "relayed": self.relayed, "latency_ms": self.latency_ms,
                "error": self.error, "transport": self.transport, "mapped": self.mapped,
                "deallocated": self.deallocated, "note": self.note}


@dataclass
class NatResult:
    type: str = "unknown"
    mapping: str = "unknown"
    filtering: str = "unknown"
    hairpinning: bool | None = None
    port_allocation: str = "unknown"
    tested_by: str | None = None
    reason: str | None = None  # why the answer is "unknown" or partial
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, notes=list(self.notes))


@dataclass(frozen=True)
class LifetimeOptions:
    """The binding-lifetime test: `measure` its idle times (None: only look the network
    up in `cache`, the file nodes write beside their key)."""

    measure: tuple[float, ...] | None = None
    cache: str | None = None


@dataclass
class LifetimeResult:
    network: str | None = None  # our local IP > our public IP: what lifetimes are kept by
    source: str | None = None  # "measured", "cache", or None (not known)
    found: BindingLifetime | None = None
    reason: str | None = None  # why there is none

    def to_json(self) -> dict[str, Any]:
        found = self.found.to_json() if self.found is not None else {}
        return {"network": self.network, "source": self.source, "reason": self.reason,
                **found}


@dataclass
class PortmapResult:
    checked: bool = False
    router: str | None = None
    answered: list[str] = field(default_factory=list)
    mapping: str | None = None  # the external address the router granted (then deleted)
    protocol: str | None = None
    errors: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, answered=list(self.answered), errors=dict(self.errors))


@dataclass
class Report:
    local: str
    timeout: float
    gateway: GatewayResult | None
    stun: list[StunResult]
    turn: list[TurnResult]
    nat: NatResult = field(default_factory=NatResult)
    lifetime: LifetimeResult = field(default_factory=LifetimeResult)
    portmap: PortmapResult = field(default_factory=PortmapResult)
    udp: bool = False
    tls: TlsLinkResult | None = None  # None: no TLS port known, not checked
    notes: list[str] = field(default_factory=list)
    # This host's IPv6 addresses a node would offer (no link-local, no loopback): IPv6
    # paths cross no NAT, only stateful firewalls (both sides send first), so they rank
    # first among host candidates.
    ipv6: list[str] = field(default_factory=list)
    behavior: NatBehavior | None = None  # what the NAT phase found, for the lifetime phase

    def hard_nat(self) -> str | None:
        """What hard-NAT guessing (nat_traversal.hard_nat) would do from here."""
        nat = self.nat
        if nat.type == "symmetric" and nat.port_allocation == "preserving":
            return ("this side predicts its port (a fresh socket keeps it): no guessing "
                    "against port-restricted peers or other port-keeping symmetric NATs")
        if nat.type == "symmetric":
            return (f"this side guesses as the hard side against port-restricted peers "
                    f"({nat.port_allocation} port allocation)")
        if nat.type == "port_restricted":
            return "this side guesses ports of symmetric-NAT peers"
        return None if nat.type in ("unknown", "udp_blocked") else "not needed from this side"

    def stun_servers(self) -> list[StunResult]:
        """The gateway first (it is a STUN server too), then the configured ones."""
        return ([self.gateway] if self.gateway is not None else []) + self.stun

    def public_addresses(self) -> list[dict[str, Any]]:
        """Each distinct public address and who saw it: several mean the mapping varies."""
        seen: dict[str, list[str]] = {}
        for result in self.stun_servers():
            if result.mapped is not None:
                who = "gateway" if result is self.gateway else f"stun {result.server}"
                seen.setdefault(result.mapped, []).append(who)
        for turn in self.turn:
            if turn.mapped is not None and turn.transport == "udp":
                seen.setdefault(turn.mapped, []).append(f"turn {turn.server}")
        return [{"address": address, "seen_by": who} for address, who in seen.items()]

    def summary(self) -> str:
        answered = [r for r in self.stun_servers() if r.ok]
        parts = []
        if self.udp:
            parts.append("UDP ok")
            addresses = [a["address"] for a in self.public_addresses()]
            if addresses:
                parts.append("public " + ", ".join(addresses))
        else:
            parts.append("no UDP answer from any server (UDP blocked, or every server down)")
        parts.append(f"NAT {self.nat.type}")
        stun_total = len(self.stun_servers())
        if stun_total:
            best = min((r.latency_ms for r in answered if r.latency_ms is not None), default=None)
            stun = f"STUN {len(answered)}/{stun_total} ok"
            parts.append(stun + (f" (best {best:.2f} ms)" if best is not None else ""))
        if self.turn:
            parts.append(f"TURN {sum(t.ok for t in self.turn)}/{len(self.turn)} ok")
        if self.tls is not None:
            proxy = f" through proxy {self.tls.proxy}" if self.tls.proxy else ""
            parts.append(f"TLS link ok{proxy}" if self.tls.ok else
                         f"TLS link failed at {self.tls.step}{proxy}")
        if not self.portmap.checked:
            parts.append("port mapping not checked")
        elif self.portmap.answered:
            parts.append("port mapping: " + ", ".join(self.portmap.answered) + " answered")
        else:
            parts.append("port mapping: none answered")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "udp": self.udp,
            "tls": self.tls.to_json() if self.tls is not None else None,
            "public_addresses": self.public_addresses(),
            "nat": self.nat.to_json(),
            "binding_lifetime": self.lifetime.to_json(),
            "stun": {r.server: r.to_json() for r in self.stun},
            "turn": {t.name: t.to_json() for t in self.turn},
            "portmap": self.portmap.to_json(),
            "hard_nat": self.hard_nat(),
            "ipv6": list(self.ipv6),
            "gateway": self.gateway.to_json() if self.gateway is not None else None,
            "local": self.local,
            "timeout": self.timeout,
            "notes": list(self.notes),
            "summary": self.summary(),
        }


# -- the shared socket ---------------------------------------------------------------------


def _drop(data: bytes, addr: Address) -> None:
    """Receiver between phases: late answers to finished transactions."""


class _SharedSocket:
    """The one UDP socket, lent to one phase's clients at a time (as a DatagramEndpoint).

    It sees every datagram before the borrower does, so the check learns what no single
    client reports: whether anything answered at all, which sockets answered, and the
    OTHER-ADDRESS in Binding answers (StunClient only hands back the mapped address).
    """

    def __init__(self, endpoint: UdpEndpoint) -> None:
        self._endpoint = endpoint
        self._receiver: Receiver = _drop
        self.stun_answers = 0
        self.responders: set[Address] = set()  # sources of STUN answers; phases clear it
        self.other_address: dict[Address, Address] = {}
        endpoint.set_receiver(self._on_datagram)

    @property
    def local_address(self) -> Address:
        return self._endpoint.local_address

    def send(self, data: bytes, addr: Address) -> None:
        self._endpoint.send(data, addr)

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def close(self) -> None:
        """Borrowers do not close the socket; run_netcheck does, once, at the end."""

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        source = (addr[0], addr[1])
        if is_stun(data) and int.from_bytes(data[:2], "big") & _RESPONSE_BIT:
            # Requests are not answers: a hairpin test's own request comes back as one.
            self.stun_answers += 1
            self.responders.add(source)
            if int.from_bytes(data[:2], "big") == _BINDING_SUCCESS:
                try:
                    other = parse_message(data).attributes.get("OTHER-ADDRESS")
                except StunError:
                    other = None
                if other is not None:
                    self.other_address[source] = (other[0], other[1])
        self._receiver(data, addr)


def _schedule(budget: float) -> dict[str, float | int]:
    """An RFC 8489 retransmission schedule (rto, rc, rm) whose whole wait fits `budget`."""
    rto = min(0.1, budget / 10)
    rm = max(1, min(16, int(budget / 2 / rto + 1e-9)))
    rc = 1
    while rc < 7 and rto * (2**rc - 1) + rm * rto <= budget:
        rc += 1
    return {"rto": rto, "rc": rc, "rm": rm}


def _is_wildcard(ip: str) -> bool:
    return ip in ("", "0.0.0.0", "::")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- phase 1: names --------------------------------------------------------------------------


async def _resolve(text: str, family: int, budget: float) -> tuple[Address | None, str | None]:
    """(ip, port) for "host:port", or (None, why not)."""
    host, port = parse_host_port(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if (family == socket.AF_INET6) != (":" in host):
            kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
            return None, f"{host} is not an {kind} address, and the check's socket is {kind}"
        return (host, port), None
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM), budget
        )
    except TimeoutError:
        return None, f"cannot resolve {host}: no answer within {budget:g} s"
    except OSError as exc:
        return None, f"cannot resolve {host}: {exc.strerror or exc}"
    if not infos:
        return None, f"cannot resolve {host}: no address"
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1])), None


# -- phase 2: STUN ---------------------------------------------------------------------------


async def _sample(runner: AsyncStunClient, result: StunResult, deadline: float) -> None:
    assert result.address is not None
    loop = asyncio.get_running_loop()
    first = await runner.test_connectivity(result.address)
    if not first.ok:
        result.error = str(first.error) if first.error else "no answer"
        return
    best, mapped, answered = first.latency, first.mapped, 1
    for _ in range(SAMPLES - 1):
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            more = await asyncio.wait_for(runner.test_connectivity(result.address), left)
        except TimeoutError:
            break
        if more.ok and more.latency is not None:
            best = more.latency if best is None else min(best, more.latency)
            mapped, answered = more.mapped, answered + 1
    result.ok, result.answered = True, answered
    result.latency_ms = _ms(best) if best is not None else None
    result.mapped = format_address(mapped) if mapped is not None else None


async def _stun_phase(sock: _SharedSocket, results: list[StunResult], budget: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    runner = AsyncStunClient(sock, StunClient(**_schedule(budget)))  # type: ignore[arg-type]
    try:
        await asyncio.gather(*(_sample(runner, r, deadline) for r in results if r.address))
    finally:
        runner.close()
    for result in results:
        other = sock.other_address.get(result.address) if result.address else None
        result.other_address = format_address(other) if other is not None else None


# -- phase 3: NAT behaviour ------------------------------------------------------------------


def _classifier(gateway: GatewayResult | None, stun: list[StunResult]) -> tuple[StunResult | None, str]:
    """The server to classify against, or None and the reason there is none."""
    if gateway is not None and gateway.ok:
        return gateway, f"gateway {gateway.server}"
    for result in stun:
        if result.ok and result.other_address is not None:
            return result, f"stun {result.server}"
    if not any(r.ok for r in ([gateway] if gateway else []) + stun):
        return None, "no STUN server answered, so no NAT test could run"
    why_gateway = "no gateway configured" if gateway is None else "the gateway did not answer STUN"
    return None, (f"{why_gateway}, and no configured STUN server sends OTHER-ADDRESS "
                  "(RFC 5780), which classifying the NAT needs")


async def _nat_phase(sock: _SharedSocket, report: Report, budget: float) -> None:
    server, tested_by = _classifier(report.gateway, report.stun)
    if server is None or server.address is None:
        report.nat = NatResult(reason=tested_by)
        return
    local_ip, port = sock.local_address
    if _is_wildcard(local_ip):
        # A wildcard bind never equals a mapped address; "open" needs the real source IP.
        local_ip = local_ip_toward(server.address[0]) or local_ip
    alternate = None
    if isinstance(server, GatewayResult) and server.other_address is None \
            and server.address[1] < 65535:
        # A one-IP gateway rightly sends no OTHER-ADDRESS, but its STUN also answers on its
        # alternate port (gateway.alternate_port, by default the listen port + 1; nodes
        # learn it from the welcome), and a second port is all the mapping test needs.
        # Not probed first: that would open the very filter the filtering test measures.
        alternate = server.address[1] + 1
    sock.responders.clear()
    try:
        behavior: NatBehavior = await asyncio.wait_for(
            detect_nat_behavior(sock, server.address, timeout=budget,
                                local_address=(local_ip, port), alternate_port=alternate),
            budget + 1.0,  # the probe ends by its own clock; this only guards the await
        )
    except TimeoutError:
        report.nat = NatResult(tested_by=tested_by, reason=f"the NAT test did not finish in {budget:g} s")
        return
    finally:
        sock.set_receiver(_drop)
    if isinstance(server, GatewayResult):
        server.answering = sorted(format_address(a) for a in sock.responders)
    report.behavior = behavior
    nat = NatResult(
        type=behavior.nat_type,
        mapping=behavior.mapping,
        filtering=behavior.filtering,
        hairpinning=behavior.hairpinning,
        port_allocation=behavior.port_allocation,
        tested_by=tested_by,
        notes=list(behavior.notes),
    )
    if behavior.nat_type == "udp_blocked":
        nat.type = "unknown"
        nat.reason = f"{tested_by} answered STUN earlier but not during the NAT test"
    elif behavior.nat_type == "unknown":
        nat.reason = "; ".join(behavior.notes) or "too few answers to classify"
    report.nat = nat


# -- phase 3b: binding lifetime ----------------------------------------------------------------


async def _lifetime_phase(sock: _SharedSocket, report: Report, options: LifetimeOptions) -> None:
    """Look this network's binding lifetime up, or measure it (minutes: asked for)."""
    result = report.lifetime
    behavior, gateway = report.behavior, report.gateway
    result.network = network_key(behavior) if behavior is not None else None
    if result.network is None:
        result.reason = "the NAT test found no local and public address to key it by"
        return
    known = lifetime_cache.load(options.cache).get(result.network) if options.cache else None
    if options.measure is None:
        if known is not None:
            result.source, result.found = "cache", known
        else:
            result.reason = ("not measured on this network yet: a node measures it in the "
                             "background, or run netcheck with --binding-lifetime (minutes)")
        return
    assert behavior is not None
    if behavior.filtering != "address_and_port_dependent":
        result.reason = (f"filtering is {behavior.filtering}: only a NAT that filters by "
                         "address and port drops state an idle remote needs")
        return
    if gateway is None or not gateway.ok or gateway.address is None:
        result.reason = "the test runs against the gateway's two STUN ports: no gateway answered"
        return
    primary = gateway.address
    other = sock.other_address.get(primary)
    alternate = (primary[0], other[1] if other is not None else primary[1] + 1)
    # The runner borrows the socket and leaves it dropping what arrives when it is done.
    found = await measure_binding_lifetime(sock, primary, alternate, schedule=options.measure)
    result.source, result.found = "measured", found
    if options.cache and found.measurable:
        lifetime_cache.remember(options.cache, result.network, found)


# -- phase 4: TURN ---------------------------------------------------------------------------


class _TurnPhase:
    """Allocations within one phase budget; UDP ones on the shared socket."""

    def __init__(self, sock: _SharedSocket, budget: float) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.sock = sock
        start = loop.time()
        self.alloc_deadline = start + budget * ALLOCATE_SHARE
        self.deadline = start + budget
        self.schedule = _schedule(budget * ALLOCATE_SHARE / 2)  # a challenge, then the request
        self.udp_runners: list[AsyncTurnClient] = []

    def demux(self, data: bytes, addr: Address) -> None:
        # Several checks may share a server; each client drops answers that are not its own.
        for runner in list(self.udp_runners):
            if runner.client.owns(data, addr):
                runner.feed(data)

    def left(self) -> float:
        return max(0.01, self.alloc_deadline - self.loop.time())

    async def check(self, result: TurnResult, credential: str) -> None:
        error = await self._attempt(result, credential, None)
        if result.transport == "udp" and error is not None and error.code == 437 \
                and self.alloc_deadline - self.loop.time() > 0.05:
            # Our 5-tuple still holds the allocation of an earlier check on this server
            # (coturn reaps a deallocated one only after about a second): these
            # credentials were never tried, so try them from a socket of their own.
            local_ip = self.sock.local_address[0]
            try:
                own = await open_udp_endpoint(local_ip, 0)
            except OSError:
                return
            try:
                await self._attempt(result, credential, own)
            finally:
                own.close()
            result.mapped = None  # another socket's mapping says nothing about ours
            if result.error is None:
                result.note = "checked from a second socket: ours still held an earlier allocation"

    async def _attempt(self, result: TurnResult, credential: str,
                       own: UdpEndpoint | None) -> TurnError | None:
        """One allocation and its release; returns the TURN error, if that is how it failed."""
        assert result.address is not None
        server, loop = result.address, self.loop
        runner: AsyncTurnClient | None = None
        failure: TurnError | None = None
        try:
            if result.transport == "udp":
                client = TurnClient(server, result.username, credential, transport="udp",
                                    **self.schedule)  # type: ignore[arg-type]
                if own is None:
                    runner = AsyncTurnClient(client, lambda data: self.sock.send(data, server))
                    self.udp_runners.append(runner)
                else:
                    runner = AsyncTurnClient.over_udp(own, server, result.username, credential,
                                                      **self.schedule)  # type: ignore[arg-type]
            else:
                runner = await AsyncTurnClient.over_tcp(
                    server, result.username, credential,
                    connect_timeout=self.left(), tcp_timeout=self.left(),
                )
            started = loop.time()
            allocation = await asyncio.wait_for(runner.allocate_relay(), self.left())
            result.ok, result.error = True, None
            result.latency_ms = _ms(loop.time() - started)
            result.relayed = format_address(allocation.relayed)
            result.mapped = format_address(allocation.mapped) if allocation.mapped else None
        except TurnAuthError as exc:
            result.error, failure = f"bad credentials: {_clean(str(exc))}", exc
        except TurnError as exc:
            result.error, failure = _clean(str(exc)), exc
        except TimeoutError:
            result.error = (f"no allocation from {result.server} over {result.transport} "
                            f"within the phase timeout")
        except OSError as exc:
            result.error = f"cannot connect to {result.server} over TCP: {exc.strerror or exc}"
        finally:
            if runner is not None:
                allocated = runner.client.state == "allocated"
                # The rest of the phase is kept for this: a check must not leak allocations.
                await runner.close(timeout=max(0.05, self.deadline - loop.time()))
                if allocated:
                    result.deallocated = runner.client.counters.deallocations > 0
                if runner in self.udp_runners:
                    self.udp_runners.remove(runner)
        return failure


def _clean(text: str) -> str:
    # Some servers pad their reason phrases with NULs.
    return text.replace("\x00", "")


async def _turn_phase(
    sock: _SharedSocket, pairs: list[tuple[TurnResult, str]], budget: float
) -> None:
    phase = _TurnPhase(sock, budget)
    # Checks on one UDP server share our 5-tuple, which holds one allocation at a time:
    # they run in turn; everything else runs at once.
    lanes: dict[Any, list[tuple[TurnResult, str]]] = {}
    for index, (result, credential) in enumerate(pairs):
        if result.address is None:
            continue
        key = result.address if result.transport == "udp" else index
        lanes.setdefault(key, []).append((result, credential))

    async def run_lane(lane: list[tuple[TurnResult, str]]) -> None:
        for result, credential in lane:
            await phase.check(result, credential)

    sock.set_receiver(phase.demux)
    try:
        await asyncio.gather(*(run_lane(lane) for lane in lanes.values()))
    finally:
        sock.set_receiver(_drop)


# -- phase 5: port mapping -------------------------------------------------------------------


async def _portmap_phase(sock: _SharedSocket, options: PortmapOptions, budget: float) -> PortmapResult:
    if not options.enabled:
        return PortmapResult(reason="not checked: disabled (--no-portmap)")
    try:
        from .nat.portmap import PortMapError, PortMapper
    except ImportError as exc:
        return PortmapResult(reason=f"not checked: macula.nat.portmap is not available ({exc})")
    share = budget * ALLOCATE_SHARE / max(1, len(options.protocols))
    mapper = PortMapper(
        sock,
        protocols=options.protocols,  # type: ignore[arg-type]
        pcp_timeout=share, natpmp_timeout=share, upnp_timeout=share,
        server_port=options.server_port,
    )
    mapper.install_receiver()
    result = PortmapResult(checked=True, router=options.router)
    try:
        found = await asyncio.wait_for(mapper.discover(options.router), budget * ALLOCATE_SHARE)
    except TimeoutError:
        result.reason = f"no protocol finished within {budget * ALLOCATE_SHARE:g} s"
    except (PortMapError, OSError) as exc:
        result.reason = f"port mapping check failed: {exc}"
    else:
        result.router = found.gateway
        result.answered = list(found.answered)
        result.errors = {protocol: why for protocol, why in found.errors}
        if found.mapping is not None:
            result.mapping = format_address(found.mapping.external)
            result.protocol = found.mapping.protocol
        if found.gateway is None:
            result.reason = "no router: none given and no default route"
    finally:
        # The check only asks; the mapping it got is deleted again.
        await mapper.close(timeout=budget * (1 - ALLOCATE_SHARE))
        sock.set_receiver(_drop)
    return result


# -- the whole check -------------------------------------------------------------------------


async def _bind(listen: str, notes: list[str]) -> UdpEndpoint:
    host, port = parse_host_port(listen)
    try:
        return await open_udp_endpoint(host, port)
    except OSError as exc:
        if port == 0:
            raise NetcheckError(f"cannot bind a UDP socket on {listen}: {exc.strerror or exc}") from None
        # The node's own port is probably taken by a running node: any port will do.
        notes.append(f"node.listen {listen} is in use ({exc.strerror or exc}); checked from another port")
    try:
        return await open_udp_endpoint(host, 0)
    except OSError as exc:
        raise NetcheckError(f"cannot bind a UDP socket on {host}: {exc.strerror or exc}") from None


async def _tls_phase(targets: Targets, budget: float) -> TlsLinkResult:
    """Open the TLS link a node would fall back to, once, and close it again."""
    from .net import wslink

    assert targets.gateway_tls is not None
    result = TlsLinkResult(targets.gateway_tls)
    try:
        target = parse_host_port(targets.gateway_tls)
        proxy = wslink.ProxySpec.parse(targets.https_proxy) if targets.https_proxy else None
    except ValueError as exc:
        result.step, result.error = "config", str(exc)
        return result
    if proxy is not None:
        result.proxy = proxy.describe()
    # A pinned gateway id is what nodes trust; without one the certificate must verify.
    pinned = targets.gateway_id is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        link = await wslink.dial(target, tls=wslink.client_tls_context(verify=not pinned),
                                 proxy=proxy, timeout=budget)
    except wslink.LinkSetupError as exc:
        result.step, result.error = exc.step, exc.detail
        return result
    result.ok, result.latency_ms = True, _ms(loop.time() - started)
    link.close("netcheck done")
    return result


async def run_netcheck(
    targets: Targets,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    portmap: PortmapOptions = PortmapOptions(),
    lifetime: LifetimeOptions = LifetimeOptions(),
) -> Report:
    """Run every phase (each bounded by `timeout` seconds) and return the report."""
    if timeout <= 0:
        raise InvalidValue("timeout must be positive")
    notes: list[str] = []
    endpoint = await _bind(targets.listen, notes)
    sock = _SharedSocket(endpoint)
    family = socket.AF_INET6 if ":" in sock.local_address[0] else socket.AF_INET
    gateway = (GatewayResult(targets.gateway, source=targets.gateway_source)
               if targets.gateway else None)
    report = Report(
        local=format_address(sock.local_address),
        timeout=timeout,
        gateway=gateway,
        stun=[StunResult(s) for s in targets.stun],
        turn=[TurnResult(t.server, t.username, t.transport) for t in targets.turn],
        notes=notes,
        ipv6=_usable_ipv6(),
    )
    seen: dict[str, int] = {}
    for turn in report.turn:
        # Same user and server with another password: still one JSON key each.
        seen[turn.name] = count = seen.get(turn.name, 0) + 1
        turn.label = turn.name if count == 1 else f"{turn.name}#{count}"
    if not targets.stun and not targets.turn:
        notes.append("no STUN or TURN servers configured (stun_servers, turn_servers, --stun, "
                     "--turn): checking the gateway only")
    try:
        named: list[StunResult | TurnResult] = [*report.stun_servers(), *report.turn]
        resolved = await asyncio.gather(*(_resolve(r.server, family, timeout) for r in named))
        for result, (address, error) in zip(named, resolved):
            result.address, result.error = address, error

        await _stun_phase(sock, report.stun_servers(), timeout)
        if sock.stun_answers:
            await _nat_phase(sock, report, timeout)
            await _lifetime_phase(sock, report, lifetime)
        else:
            report.nat = NatResult(reason="no STUN server answered, so no NAT test could run")
        credentials = [t.credential for t in targets.turn]
        await _turn_phase(sock, list(zip(report.turn, credentials)), timeout)
        report.portmap = await _portmap_phase(sock, portmap, timeout)
        if targets.gateway_tls:
            report.tls = await _tls_phase(targets, timeout)
        # Any STUN answer on the socket (Binding, TURN, classifier) shows UDP gets through.
        report.udp = sock.stun_answers > 0
        distinct = {a["address"] for a in report.public_addresses()}
        if len(distinct) > 1:
            notes.append("servers see different public addresses: the NAT maps each "
                         "destination to its own public port")
    finally:
        endpoint.close()
    return report


# -- output ----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _yes(value: bool | None, none: str = "-") -> str:
    return none if value is None else ("yes" if value else "no")


def _latency(value: float | None) -> str:
    return f"{value:.2f} ms" if value is not None else "-"


_SOURCES = {"flag": "from --gateway", "config": "node.gateway", "default": "the default node.gateway"}


def _usable_ipv6() -> list[str]:
    from .ice import list_interfaces, usable_addresses

    return [ip for _name, ip in usable_addresses(list_interfaces()) if ":" in ip][:8]


def _lifetime_text(result: LifetimeResult) -> str:
    found = result.found
    if found is None:
        return f"unknown ({result.reason})" if result.reason else "unknown"
    if not found.measurable:
        return "not measurable: " + "; ".join(found.notes)
    lives = (f"state for an idle remote lives {found.alive_s:g} s"
             if found.alive_s is not None else "state for an idle remote does not live")
    gone = (f", gone by {found.expired_s:g} s" if found.expired_s is not None
            else " (longest tried)")
    keep = (f"; keepalives every {found.keepalive_s:g} s"
            if found.keepalive_s is not None else "")
    return f"{lives}{gone}{keep} ({result.source})"


def format_report(report: Report) -> str:
    """The human-readable table."""
    lines = [f"macula netcheck from UDP {report.local}, at most {report.timeout:g} s per phase"]
    lines += [f"note: {note}" for note in report.notes]
    nat = report.nat
    public = report.public_addresses()
    lines += ["", f"  UDP              {_yes(report.udp)}"]
    if report.tls is not None:
        tls = report.tls
        via = f" through proxy {tls.proxy}" if tls.proxy else ""
        state = (f"yes ({_latency(tls.latency_ms)} to open)" if tls.ok
                 else f"no: {tls.step} failed: {tls.error}")
        lines.append(f"  TLS link         {tls.address}{via}: {state}")
    lines.append(f"  IPv6 addresses   {', '.join(report.ipv6) if report.ipv6 else 'none'}")
    if public:
        for item in public:
            lines.append(f"  public address   {item['address']}  (seen by {', '.join(item['seen_by'])})")
    else:
        lines.append("  public address   unknown")
    tested = f"  (tested against {nat.tested_by})" if nat.tested_by else ""
    lines.append(f"  NAT type         {nat.type}{tested}")
    lines.append(f"    mapping        {nat.mapping}")
    lines.append(f"    filtering      {nat.filtering}")
    hairpin = _yes(nat.hairpinning, "not tested (no NAT in the way)" if nat.type == "open" else "not tested")
    lines.append(f"    hairpinning    {hairpin}")
    lines.append(f"    port alloc     {nat.port_allocation}")
    if (hard := report.hard_nat()) is not None:
        lines.append(f"    hard-NAT       {hard}")
    if nat.reason:
        lines.append(f"    why            {nat.reason}")
    for note in nat.notes:
        if note not in (nat.reason or ""):
            lines.append(f"    note           {note}")
    lines.append(f"  binding lifetime {_lifetime_text(report.lifetime)}")
    gw = report.gateway
    if gw is not None:
        heard = f"; STUN sockets that answered: {', '.join(gw.answering)}" if gw.answering else ""
        source = _SOURCES.get(gw.source, gw.source)
        state = "answers STUN" if gw.ok else "no STUN answer"
        lines += ["", f"  gateway {gw.server} ({source}): {state}{heard}"]
    servers = report.stun_servers()
    if servers:
        rows = [
            ["gateway " + r.server if r is gw else r.server, _yes(r.ok), _latency(r.latency_ms),
             r.mapped or "-", r.other_address or "-", r.error or ""]
            for r in servers
        ]
        lines += [""] + _table(["STUN server", "ok", "latency", "mapped", "other-address", "error"], rows)
    if report.turn:
        rows = [
            [t.name, _yes(t.ok), t.relayed or "-", _latency(t.latency_ms),
             _yes(t.deallocated), t.error or t.note or ""]
            for t in report.turn
        ]
        lines += [""] + _table(["TURN server", "ok", "relayed", "allocate", "released", "error / note"], rows)
    else:
        lines += ["", "  TURN             none configured"]
    pm = report.portmap
    lines.append("")
    if not pm.checked:
        lines.append(f"  port mapping     {pm.reason or 'not checked'}")
    else:
        answered = ", ".join(pm.answered) if pm.answered else "none"
        lines.append(f"  port mapping     router {pm.router or '-'}: answered {answered}"
                     + (f"; {pm.protocol} mapped {pm.mapping} (deleted again)" if pm.mapping else ""))
        for protocol, why in pm.errors.items():
            lines.append(f"    {protocol:<14} {why}")
        if pm.reason:
            lines.append(f"    why            {pm.reason}")
    lines += ["", f"summary: {report.summary()}"]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def _gateway_arg(text: str) -> str:
    """`[NODE_ID@]host:port`: with the id, the TLS link's certificate is not checked (the
    id is what a node trusts)."""
    gateway_id, address = split_gateway(text)
    where = _server_arg(address)
    return f"{gateway_id}@{where}" if gateway_id else where


def _server_arg(text: str) -> str:
    try:
        host, port = parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text}: a server needs a port other than 0")
    return format_host_port(host, port)


def parse_turn_arg(text: str) -> TurnServer:
    """`user:pass@host:port[/tcp]`, like MACULA_TURN_SERVERS (the last @ ends the password)."""
    creds, at, address = text.rpartition("@")
    username, colon, credential = creds.partition(":")
    if not at or not colon or not username:
        # Never echo the text back: it holds a password.
        raise argparse.ArgumentTypeError("expected user:password@host:port[/tcp]")
    server, slash, transport = address.partition("/")
    transport = transport.lower() if slash else "udp"
    if transport not in TURN_TRANSPORTS:
        raise argparse.ArgumentTypeError(
            f"transport must be one of {', '.join(TURN_TRANSPORTS)}, got {transport!r}"
        )
    return TurnServer(_server_arg(server), username, credential, transport)


def _schedule_arg(text: str) -> tuple[float, ...]:
    try:
        schedule = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds separated by commas, not {text!r}") from None
    if not schedule or any(s <= 0 or s > 3600 for s in schedule) \
            or any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise argparse.ArgumentTypeError("increasing seconds, each in (0, 3600]")
    return schedule


def _timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 600 seconds, got {text}")
    return value


def add_netcheck_parser(sub: Any) -> argparse.ArgumentParser:
    """The `netcheck` subcommand, for cli.build_parser()."""
    p: argparse.ArgumentParser = sub.add_parser(
        "netcheck",
        help="check UDP, public address, NAT type, STUN latency, TURN and port mapping",
        description="Check what the network does to this host's UDP, from one socket. Only "
                    "the servers configured (stun_servers, turn_servers, node.gateway) or "
                    "given as flags are contacted, plus the local router for port mapping.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), help="least important log lines shown")
    p.add_argument("--log-format", choices=list(LOG_FORMATS), help="text (default) or json lines")
    p.add_argument("--gateway", metavar="[NODE_ID@]HOST:PORT", type=_gateway_arg,
                   help="gateway to check (default: node.gateway)")
    p.add_argument("--gateway-tls", metavar="HOST:PORT", type=_server_arg,
                   help="the gateway's TLS port to check (default: node.gateway_tls)")
    p.add_argument("--https-proxy", metavar="URL",
                   help="HTTP CONNECT proxy for the TLS link (default: node.https_proxy, "
                        "HTTPS_PROXY)")
    p.add_argument("--stun", metavar="HOST:PORT", type=_server_arg, action="append", default=[],
                   help="also check this STUN server (repeatable)")
    p.add_argument("--turn", metavar="USER:PASS@HOST:PORT[/tcp]", type=parse_turn_arg,
                   action="append", default=[], help="also check this TURN server (repeatable)")
    p.add_argument("--timeout", metavar="S", type=_timeout_arg, default=DEFAULT_TIMEOUT,
                   help=f"seconds per phase (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--no-portmap", action="store_true",
                   help="do not ask the router about PCP, NAT-PMP or UPnP")
    p.add_argument("--binding-lifetime", nargs="?", metavar="S,S,...", type=_schedule_arg,
                   const=SCHEDULE, default=None,
                   help="measure how long the NAT keeps state for an idle remote, idling "
                        "for each of these seconds in turn (default "
                        f"{','.join(f'{s:g}' for s in SCHEDULE)}: up to "
                        f"{sum(SCHEDULE) / 60:.0f} minutes); without it the value a node "
                        "measured on this network is shown, if any")
    p.add_argument("--json", action="store_true",
                   help="the table goes to stderr; stdout's last line is one JSON object")
    p.set_defaults(func=cmd_netcheck)
    return p


def cmd_netcheck(args: argparse.Namespace) -> int:
    """Exit 0 when UDP works (any STUN answer) or the TLS link opens, 1 when neither."""
    level = "debug" if args.verbose else args.log_level
    config = load_config(args.config, overrides={"log.level": level,
                                                 "log.format": args.log_format})
    logs.setup(config.log.level, config.log.format)
    targets = Targets.from_config(config, gateway=args.gateway, stun=args.stun, turn=args.turn,
                                  gateway_tls=args.gateway_tls, https_proxy=args.https_proxy)
    cache = str(lifetime_cache.beside(config.node.key_path()))
    report = asyncio.run(run_netcheck(
        targets, timeout=args.timeout, portmap=PortmapOptions(enabled=not args.no_portmap),
        lifetime=LifetimeOptions(measure=args.binding_lifetime, cache=cache),
    ))
    print(format_report(report), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(report.to_json()), flush=True)
    return 0 if report.udp or (report.tls is not None and report.tls.ok) else 1

