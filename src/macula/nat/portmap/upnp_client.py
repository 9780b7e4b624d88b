"""A UPnP-IGD control point on asyncio: SSDP search, device description, SOAP calls.

UPnP names the internal client and port inside the request, so unlike PCP and NAT-PMP it
does not need the node's socket: the search uses a throwaway UDP socket and SOAP runs
over HTTP (http.client in a worker thread, with per-call deadlines and size limits).
Every URL we fetch must point back at the IP that answered the search (`igd.check_url`).

SSDP goes to 239.255.255.250:1900 with TTL 2 (UDA 1.1) unless `search_target` says
otherwise; tests keep it inside lab namespaces or on loopback.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from macula.net.endpoint import Address

from . import igd
from .errors import MalformedMessage, PortMapError

HTTP_TIMEOUT = 2.0
MAX_BODY = 128 * 1024
MULTICAST_TTL = 2
DEFAULT_DESCRIPTION = "macula"
CONFLICT_RETRIES = 3  # AddPortMapping attempts on other ports when ours is taken


class UpnpError(PortMapError):
    """The device answered a SOAP call with a UPnPError."""

    def __init__(self, action: str, code: int, description: str) -> None:
        super().__init__(f"{action}: UPnP error {code} {description}".rstrip())
        self.action = action
        self.code = code
        self.description = description


class NoIgdFound(PortMapError):
    """Nothing answered the SSDP search."""


@dataclass(frozen=True)
class IgdControl:
    """A usable port-mapping service and how we reach it."""

    host: str  # the device's IP (it answered the search)
    location: str
    service: igd.IgdService
    local_ip: str  # our address as the device sees it: the internal client to map to


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[tuple[bytes, Address]]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))


def _http(url: str, method: str, body: bytes | None, headers: dict[str, str],
          timeout: float) -> tuple[int, bytes, str]:
    """One blocking HTTP exchange: (status, body, our local IP). Runs in a worker thread."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers)
        local_ip = str(conn.sock.getsockname()[0]) if conn.sock is not None else ""
        response = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        # Bounded by size and by the deadline, so a slow-drip device cannot hold us.
        while size <= MAX_BODY and time.monotonic() < deadline:
            chunk = response.read1(16384)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        else:
            raise PortMapError(f"{method} {url}: body over {MAX_BODY} bytes or too slow")
        return response.status, b"".join(chunks), local_ip
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise PortMapError(f"{method} {url}: {exc}") from None
    finally:
        conn.close()


class UpnpClient:
    def __init__(self, *, http_timeout: float = HTTP_TIMEOUT,
                 search_target: Address = (igd.SSDP_GROUP, igd.SSDP_PORT),
                 description: str = DEFAULT_DESCRIPTION, rng: random.Random | None = None) -> None:
        self.http_timeout = http_timeout
        self.search_target = search_target
        self.description = description
        self._rng = rng or random.Random()

    # -- discovery ---------------------------------------------------------------------------

    async def search(self, *, timeout: float = 2.0, gateway: str | None = None,
                     local_ip: str | None = None) -> list[tuple[str, igd.SsdpResponse]]:
        """SSDP M-SEARCH; the (device IP, answer) pairs heard, the gateway's first.

        Returns early once the gateway (or, without a hint, anyone) has answered.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
            if local_ip:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local_ip))
            sock.bind((local_ip or "0.0.0.0", 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: _Collector(queue), sock=sock)
        found: dict[str, tuple[str, igd.SsdpResponse]] = {}
        try:
            deadline = loop.time() + timeout
            resend_at = loop.time() + min(1.0, timeout / 2)
            sent_twice = False
            for st in igd.SEARCH_TARGETS:
                transport.sendto(igd.msearch(st), self.search_target)
            while (now := loop.time()) < deadline:
                if not sent_twice and now >= resend_at:
                    # SSDP is UDP: one more round in case the first was lost.
                    sent_twice = True
                    for st in igd.SEARCH_TARGETS:
                        transport.sendto(igd.msearch(st), self.search_target)
                wait_until = deadline if sent_twice else min(deadline, resend_at)
                try:
                    data, addr = await asyncio.wait_for(queue.get(), max(0.0, wait_until - now))
                except TimeoutError:
                    continue
                try:
                    answer = igd.parse_ssdp_response(data)
                    igd.check_url(answer.location, addr[0])
                except MalformedMessage:
                    continue
                found.setdefault(answer.location, (addr[0], answer))
                if gateway is None or addr[0] == gateway:
                    break
        finally:
            transport.close()
        return sorted(found.values(), key=lambda pair: pair[0] != gateway)

    async def describe(self, host: str, location: str) -> IgdControl:
        """Fetch the device description and pick its best port-mapping service."""
        status, body, local_ip = await self._fetch(igd.check_url(location, host), "GET", None, {})
        if status != 200:
            raise PortMapError(f"GET {location}: HTTP {status}")
        services = igd.parse_device_description(body, location)
        for service in services:
            try:
                igd.check_url(service.control_url, host)
            except MalformedMessage:
                continue
            return IgdControl(host, location, service, local_ip)
        raise PortMapError(f"{location}: no WANIPConnection/WANPPPConnection service")

    async def discover(self, *, timeout: float = 2.0, gateway: str | None = None,
                       local_ip: str | None = None) -> IgdControl:
        """Search, then describe each device heard until one offers port mapping."""
        answers = await self.search(timeout=timeout, gateway=gateway, local_ip=local_ip)
        if not answers:
            raise NoIgdFound("no UPnP IGD answered the SSDP search")
        problems: list[str] = []
        for host, answer in answers:
            try:
                return await self.describe(host, answer.location)
            except PortMapError as exc:
                problems.append(str(exc))
        raise PortMapError("; ".join(problems))

    # -- actions -----------------------------------------------------------------------------

    async def call(self, control: IgdControl, action: str,
                   args: list[tuple[str, str]]) -> dict[str, str]:
        """One SOAP action; the out-arguments, or UpnpError for a UPnPError fault."""
        body, headers = igd.soap_request(control.service.service_type, action, args)
        status, reply, _ = await self._fetch(control.service.control_url, "POST", body, headers)
        try:
            parsed = igd.parse_soap_reply(reply, action)
        except MalformedMessage as exc:
            raise PortMapError(f"{action}: HTTP {status}, unreadable reply ({exc})") from None
        if parsed.fault is not None:
            raise UpnpError(action, *parsed.fault)
        if status != 200:
            raise PortMapError(f"{action}: HTTP {status}")
        return parsed.values

    async def external_ip(self, control: IgdControl) -> str:
        values = await self.call(control, "GetExternalIPAddress", [])
        return igd.ip_value(values, "NewExternalIPAddress")

    async def add_mapping(self, control: IgdControl, *, internal_port: int, external_port: int,
                          lease: int, any_port: bool = True) -> tuple[int, int]:
        """Map UDP `external_port` (or another one) to our `internal_port`.

        Returns (external port, lease granted; 0 = permanent). With `any_port`, IGDv2's
        AddAnyPortMapping lets the device pick when our port is taken; otherwise a
        conflict is retried on a few random ports. A device that only takes permanent
        leases (error 725) gets lease 0, and we delete it ourselves on close.
        """
        if any_port and control.service.version == 2:
            try:
                values = await self.call(control, "AddAnyPortMapping", self._args(
                    control, internal_port, external_port, lease))
                return igd.port_value(values, "NewReservedPort"), lease
            except UpnpError as exc:
                if exc.code not in (igd.ERR_INVALID_ACTION, igd.ERR_NOT_IMPLEMENTED):
                    raise
        port = external_port
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                await self.call(control, "AddPortMapping",
                                self._args(control, internal_port, port, lease))
                return port, lease
            except UpnpError as exc:
                if exc.code == igd.ERR_ONLY_PERMANENT_LEASES and lease != 0:
                    lease = 0
                    await self.call(control, "AddPortMapping",
                                    self._args(control, internal_port, port, lease))
                    return port, lease
                if exc.code != igd.ERR_CONFLICT or not any_port or attempt == CONFLICT_RETRIES:
                    raise
                port = self._rng.randint(1024, 65535)
        raise PortMapError("AddPortMapping: no free external port")

    async def delete_mapping(self, control: IgdControl, external_port: int) -> None:
        await self.call(control, "DeletePortMapping", igd.delete_port_mapping_args(external_port))

    def _args(self, control: IgdControl, internal_port: int, external_port: int,
              lease: int) -> list[tuple[str, str]]:
        return igd.add_port_mapping_args(
            external_port=external_port, internal_port=internal_port,
            internal_client=control.local_ip, lease=lease, description=self.description)

    async def _fetch(self, url: str, method: str, body: bytes | None,
                     headers: dict[str, str]) -> tuple[int, bytes, str]:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(_http, url, method, body, headers, self.http_timeout),
                self.http_timeout * 2)
        except TimeoutError:
            raise PortMapError(f"{method} {url}: no answer in time") from None
