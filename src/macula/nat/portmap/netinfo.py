"""Facts about our own network that the port-mapping clients need: which router, which of
our addresses it sees, and whether a datagram came from it.

Only local lookups: the routing table and a connected-but-unused UDP socket (connect()
on UDP sends nothing; it only asks the kernel which source address it would use).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from macula.net.endpoint import Address

PROC_ROUTE = Path("/proc/net/route")


def same_source(addr: Address, server: Address) -> bool:
    """Is `addr` the server? Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d."""
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return addr[1] == server[1] and host == server[0]


def default_gateway(route_table: str | None = None) -> str | None:
    """The IPv4 default router from Linux's /proc/net/route, or None when there is none."""
    if route_table is None:
        try:
            route_table = PROC_ROUTE.read_text(encoding="ascii")
        except OSError:
            return None
    best: tuple[int, str] | None = None
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest, gateway, flags, metric = (int(fields[1], 16), int(fields[2], 16),
                                            int(fields[3], 16), int(fields[6]))
            mask = int(fields[7], 16)
        except ValueError:
            continue
        # RTF_UP (1) and RTF_GATEWAY (2); the table is in host byte order (little endian).
        if dest == 0 and mask == 0 and flags & 3 == 3 and gateway:
            ip = str(ipaddress.IPv4Address(struct.pack("<I", gateway)))
            if best is None or metric < best[0]:
                best = (metric, ip)
    return best[1] if best is not None else None


def local_ip_toward(remote_ip: str) -> str | None:
    """The source address the kernel would use to reach `remote_ip` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_ip, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None
