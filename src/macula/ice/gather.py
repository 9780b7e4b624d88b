"""Host-candidate gathering: which interface addresses are worth offering, and (on Linux) how
to list them without extra dependencies. Server-reflexive and relay candidates are gathered
by the node, which owns the socket and the STUN/TURN clients, and passed to the agent.

Policy:
- skipped always: link-local (169.254/16, fe80::/10; need a zone id and rarely route),
  unspecified, multicast, and container/VM bridges by name (docker*, br-*, veth*, virbr*,
  vmnet*, vboxnet*, lxcbr*, lxdbr*, cni*, flannel*, cali*, podman*, kube-*): their
  addresses are private to one machine, so checks to them only waste the pair budget,
  and a peer on another host with the same 172.17.0.0/16 would even be misled.
- kept but ranked last: VPN tunnels (tun*, tap*, wg*, tailscale*, zt*, ppp*, utun*). Two
  nodes on the same VPN do reach each other through it, which beats a relay; priorities
  make a physical path win when one exists.
- loopback only when nothing else is left, so single-machine tests still get a candidate.
Local preference (RFC 8445 5.1.2.1 for multihomed hosts): physical before VPN, IPv6 before
IPv4 (RFC 8421), then interface order, 128 apart from 65535 down.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence

from .candidate import CANDIDATE_TYPES, Candidate

__all__ = ["host_candidates", "host_preference", "list_interfaces", "parse_if_inet6",
           "ranked_addresses", "usable_addresses"]

SKIPPED_PREFIXES = ("docker", "br-", "veth", "virbr", "vmnet", "vboxnet", "lxcbr", "lxdbr",
                    "cni", "flannel", "cali", "podman", "kube-")
VPN_PREFIXES = ("tun", "tap", "wg", "tailscale", "zt", "ppp", "utun")

_SIOCGIFADDR = 0x8915  # linux/sockios.h
# /proc/net/if_inet6 flags (linux/if_addr.h) that make an address unusable for now.
_IFA_F_DADFAILED, _IFA_F_DEPRECATED, _IFA_F_TENTATIVE = 0x08, 0x20, 0x40
_UNUSABLE_V6_FLAGS = _IFA_F_DADFAILED | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE
_PREFERENCE_STEP = 128


def _is_vpn(name: str) -> bool:
    return name.startswith(VPN_PREFIXES)


def usable_addresses(interfaces: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(interface, canonical address) pairs worth offering, in input order, deduplicated."""
    kept: list[tuple[str, str]] = []
    loopback: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, text in interfaces:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        address = str(ip)
        if address in seen:
            continue
        seen.add(address)
        if ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            continue
        if ip.is_loopback:
            loopback.append((name, address))
            continue
        if name.startswith(SKIPPED_PREFIXES):
            continue
        kept.append((name, address))
    return kept or loopback


def ranked_addresses(interfaces: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """usable_addresses, best first: physical before VPN, IPv6 before IPv4, then input order."""
    usable = usable_addresses(interfaces)
    return [pair for _, pair in sorted(
        enumerate(usable), key=lambda item: (_is_vpn(item[1][0]), ":" not in item[1][1], item[0]))]


def host_preference(rank: int) -> int:
    """Local preference of the host address at `rank` in a best-first list."""
    return max(0, 65535 - _PREFERENCE_STEP * rank)


def host_candidates(interfaces: Iterable[tuple[str, str]], port: int, *,
                    order: Sequence[str] = CANDIDATE_TYPES) -> list[Candidate]:
    """Host candidates for a socket bound to `port` on all the usable addresses."""
    return [Candidate.host(address, port, order=order, local_preference=host_preference(rank))
            for rank, (_, address) in enumerate(ranked_addresses(interfaces))]


def parse_if_inet6(text: str) -> list[tuple[str, str]]:
    """(interface, address) from /proc/net/if_inet6, skipping tentative, deprecated and
    DAD-failed addresses. Malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        try:
            flags = int(fields[4], 16)
            address = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
        except ValueError:
            continue
        if flags & _UNUSABLE_V6_FLAGS:
            continue
        out.append((fields[5], address))
    return out


def list_interfaces() -> list[tuple[str, str]]:
    """(interface, address) for this machine, Linux only ([] elsewhere).

    IPv4 via the SIOCGIFADDR ioctl, which reports each interface's primary address only
    (secondary addresses need netlink; nodes rarely rely on them); IPv6 via
    /proc/net/if_inet6, which lists all of them.
    """
    try:
        import fcntl
    except ImportError:
        return []
    out: list[tuple[str, str]] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for name in names:
                request = struct.pack("256s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
                except OSError:
                    continue  # no IPv4 address on this interface
                out.append((name, socket.inet_ntoa(reply[20:24])))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            out += parse_if_inet6(f.read())
    except (OSError, UnicodeDecodeError):
        pass
    return out
