"""PortMapper: ask the router to forward a public port to the node's one UDP socket.

`discover()` tries PCP, then NAT-PMP, then UPnP-IGD, stops at the first mapping, and keeps
it alive (renewal timers) until `close()` deletes it. PCP and NAT-PMP requests leave from
the node's own socket, so the node's demux must hand this object every datagram that
comes from (gateway, 5351) - see `receive` and `owns`. UPnP runs on its own sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from macula.net.endpoint import Address, DatagramEndpoint, Receiver

from ...errors import InvalidValue
from . import natpmp
from .driver import ClientDriver
from .errors import PortMapError
from .mapping import PROTOCOLS, DiscoveryResult, PortMapping, ProtocolName
from .natpmp_client import NatPmpClient
from .netinfo import default_gateway, local_ip_toward, same_source
from .pcp_client import PcpClient
from .upnp_client import NoIgdFound, UpnpClient
from .upnp_lease import UpnpLease

DEFAULT_LIFETIME = 7200  # PCP / NAT-PMP request, seconds
DEFAULT_UPNP_LEASE = 3600
# Budgets per protocol for one discovery. PCP's first retransmission comes at ~3 s
# (RFC 6887 IRT), so 3.5 s gives it two sends; a NAT-PMP-only router answers PCP at once.
PCP_TIMEOUT = 3.5
NATPMP_TIMEOUT = 2.0
UPNP_TIMEOUT = 2.0


def _wildcard(ip: str) -> bool:
    return ip in ("", "0.0.0.0", "::")


class PortMapper:
    def __init__(self, endpoint: DatagramEndpoint, *, lifetime: int = DEFAULT_LIFETIME,
                 upnp_lease: int = DEFAULT_UPNP_LEASE,
                 protocols: Sequence[ProtocolName] = PROTOCOLS, local_ip: str | None = None,
                 pcp_timeout: float = PCP_TIMEOUT, natpmp_timeout: float = NATPMP_TIMEOUT,
                 upnp_timeout: float = UPNP_TIMEOUT, server_port: int = natpmp.SERVER_PORT,
                 upnp: UpnpClient | None = None,
                 on_change: Callable[[PortMapping | None], None] | None = None) -> None:
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown:
            raise InvalidValue(f"unknown port-mapping protocols: {sorted(unknown)}")
        self.endpoint = endpoint
        self.lifetime = lifetime
        self.upnp_lease = upnp_lease
        self.protocols = tuple(protocols)
        self.local_ip = local_ip
        self.timeouts = {"pcp": pcp_timeout, "natpmp": natpmp_timeout, "upnp": upnp_timeout}
        self.server_port = server_port
        self.upnp = upnp or UpnpClient()
        self.gateway: str | None = None
        self._on_change = on_change
        self._driver: ClientDriver | None = None
        self._closing: ClientDriver | None = None  # deleting: still hears the gateway
        self._lease: UpnpLease | None = None

    @property
    def mapping(self) -> PortMapping | None:
        """The live mapping (None before discovery, after expiry or close)."""
        if self._driver is not None:
            return self._driver.client.mapping
        return self._lease.mapping if self._lease is not None else None

    # -- the node's demux ---------------------------------------------------------------------

    def owns(self, addr: Address) -> bool:
        """Is `addr` the gateway's PCP/NAT-PMP port? Datagrams from it are ours.

        PCP (first byte 2) and NAT-PMP (first byte 0) collide with STUN's 0-3, so the
        source address, not the first byte, tells them apart: STUN never comes from
        the router's port 5351.
        """
        return self.gateway is not None and same_source(addr, (self.gateway, self.server_port))

    def receive(self, data: bytes, addr: Address) -> bool:
        """Offer a datagram from the node's socket; True if it was ours (consumed)."""
        if not self.owns(addr):
            return False
        for driver in (self._driver, self._closing):
            if driver is not None:
                driver.receive(data, addr)
        return True  # a late answer to a client already gone is still not STUN

    def install_receiver(self, passthrough: Receiver | None = None) -> None:
        """For tools and tests that own the endpoint: route ours here, the rest onwards."""
        def demux(data: bytes, addr: Address) -> None:
            if not self.receive(data, addr) and passthrough is not None:
                passthrough(data, addr)

        self.endpoint.set_receiver(demux)

    # -- discovery and lifetime -------------------------------------------------------------------

    async def discover(self, gateway: str | None = None) -> DiscoveryResult:
        """Map the socket's port with the first protocol that works; see DiscoveryResult.

        Any previous mapping is deleted first. `gateway` defaults to the default router.
        """
        await self.close()
        self.gateway = gateway or default_gateway()
        if self.gateway is None:
            return DiscoveryResult(None, None, (), tuple(
                (p, "no gateway: none given and no default route") for p in self.protocols))
        port = self.endpoint.local_address[1]
        local_ip = self.local_ip or self.endpoint.local_address[0]
        if _wildcard(local_ip):
            local_ip = local_ip_toward(self.gateway) or "0.0.0.0"
        answered: list[ProtocolName] = []
        errors: list[tuple[ProtocolName, str]] = []
        for protocol in self.protocols:
            try:
                heard, mapping = await self._try(protocol, self.gateway, local_ip, port)
            except _NoMapping as exc:
                heard, mapping = exc.answered, None
                errors.append((protocol, str(exc)))
            if heard:
                answered.append(protocol)
            if mapping is not None:
                return DiscoveryResult(self.gateway, mapping, tuple(answered), tuple(errors))
        return DiscoveryResult(self.gateway, None, tuple(answered), tuple(errors))

    async def close(self, timeout: float = 2.0) -> None:
        """Delete the mapping on the router and stop renewing (bounded by `timeout`)."""
        driver, self._driver = self._driver, None
        lease, self._lease = self._lease, None
        if driver is not None:
            self._closing = driver
            try:
                await asyncio.wait_for(driver.delete(timeout), timeout + 0.5)
            except TimeoutError:
                pass
            finally:
                driver.stop()
                self._closing = None
        if lease is not None:
            await lease.close()

    # -- one protocol ---------------------------------------------------------------------------

    async def _try(self, protocol: ProtocolName, gateway: str, local_ip: str,
                   port: int) -> tuple[bool, PortMapping | None]:
        if protocol == "upnp":
            return await self._try_upnp(gateway, local_ip, port)
        loop = asyncio.get_running_loop()
        now, budget = loop.time(), self.timeouts[protocol]
        client: PcpClient | NatPmpClient
        if protocol == "pcp":
            client = PcpClient(gateway, local_ip, port, now, lifetime=self.lifetime,
                               server_port=self.server_port, timeout=budget)
        else:
            client = NatPmpClient(gateway, port, now, lifetime=self.lifetime, client_ip=local_ip,
                                  server_port=self.server_port, timeout=budget)
        driver = ClientDriver(client, self.endpoint, on_change=self._on_change)
        self._driver = driver
        try:
            await driver.settled()
        except BaseException:
            driver.stop()
            self._driver = None
            raise
        if client.state == "mapped":
            return client.answered, client.mapping
        driver.stop()
        self._driver = None
        raise _NoMapping(client.answered, client.error or "no mapping")

    async def _try_upnp(self, gateway: str, local_ip: str,
                        port: int) -> tuple[bool, PortMapping | None]:
        try:
            control = await self.upnp.discover(timeout=self.timeouts["upnp"], gateway=gateway,
                                               local_ip=None if _wildcard(local_ip) else local_ip)
        except NoIgdFound as exc:
            raise _NoMapping(False, str(exc)) from None
        except PortMapError as exc:
            raise _NoMapping(True, str(exc)) from None
        lease = UpnpLease(self.upnp, control, port, lease=self.upnp_lease,
                          on_change=self._on_change)
        try:
            mapping = await lease.start()
        except PortMapError as exc:
            raise _NoMapping(True, str(exc)) from None
        self._lease = lease
        return True, mapping


class _NoMapping(PortMapError):
    """A protocol ran to its end without a mapping; records whether the server answered."""

    def __init__(self, answered: bool, reason: str) -> None:
        super().__init__(reason)
        self.answered = answered
