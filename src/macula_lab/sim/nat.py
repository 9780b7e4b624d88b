"""RFC 4787 NAT behaviour as two pure decisions: translate outbound, admit inbound.

A `Nat` only decides; moving packets is the network's job (`network.NatBox`). The interface is
the one Tailscale's natlab uses:

    outbound(src, dst, now) -> mapped external source, or None to drop
    inbound(src, dst, now)  -> internal destination, or None to drop

`src`/`dst` are (ip, port). For inbound, `src` is the remote peer and `dst` is the NAT's own
external address. Mappings carry their own expiry and the set of remote endpoints they were
used towards, which is what the filtering behaviours consult.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from macula.net.endpoint import Address


class Behavior(str, enum.Enum):
    """RFC 4787 section 4.1 (mapping) and 5 (filtering): what a mapping/permission is keyed by."""

    ENDPOINT_INDEPENDENT = "endpoint_independent"
    ADDRESS_DEPENDENT = "address_dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address_and_port_dependent"


class PortAllocation(str, enum.Enum):
    """RFC 4787 section 4.2: how the external port of a new mapping is chosen."""

    PRESERVING = "preserving"  # the internal port if free, else the next free one above it
    SEQUENTIAL = "sequential"  # the next free port after the last one handed out
    RANDOM = "random"  # a uniformly random free port


@dataclass(frozen=True)
class NatConfig:
    """Everything that distinguishes one NAT from another.

    `mapping_timeout` is idle seconds until a mapping (and each of its permissions) expires;
    outbound traffic always refreshes it (RFC 4787 REQ-6), inbound traffic only when
    `inbound_refresh` (Linux conntrack does refresh on replies, hence the default).
    """

    mapping: Behavior = Behavior.ENDPOINT_INDEPENDENT
    filtering: Behavior = Behavior.ADDRESS_AND_PORT_DEPENDENT
    port_allocation: PortAllocation = PortAllocation.PRESERVING
    mapping_timeout: float = 120.0
    inbound_refresh: bool = True
    hairpinning: bool = False
    udp_blocked: bool = False
    # TCP (the stream model, sim.streams): "any", "proxy" (only to the lab's HTTP proxy)
    # or "none".
    tcp: str = "any"
    port_range: tuple[int, int] = (1024, 65535)

    def __post_init__(self) -> None:
        # Accept plain strings ("symmetric" configs are often written by hand in tests).
        object.__setattr__(self, "mapping", Behavior(self.mapping))
        object.__setattr__(self, "filtering", Behavior(self.filtering))
        object.__setattr__(self, "port_allocation", PortAllocation(self.port_allocation))
        if self.tcp not in ("any", "proxy", "none"):
            raise ValueError(f"tcp is any, proxy or none, not {self.tcp!r}")
        lo, hi = self.port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port range {self.port_range}")
        if self.mapping_timeout <= 0:
            raise ValueError("mapping_timeout must be positive")


@dataclass
class Mapping:
    """One NAT binding: internal endpoint <-> external port, plus who it may hear from."""

    internal: Address
    external_port: int
    key: tuple
    created: float
    last_active: float
    # Remote endpoint -> last time traffic refreshed the permission to hear from it.
    permissions: dict[Address, float] = field(default_factory=dict)


# Why an inbound packet was refused, as counted by the network.
DROP_NO_MAPPING = "no_mapping"
DROP_FILTERED = "nat_filtered"
DROP_NO_PORT = "no_port"
DROP_UDP_BLOCKED = "udp_blocked"
DROP_NO_HAIRPIN = "no_hairpin"


class Nat:
    """The translation state of one NAT with one external IP."""

    def __init__(self, config: NatConfig, external_ip: str, rng: random.Random | None = None) -> None:
        self.config = config
        self.external_ip = external_ip
        self._rng = rng if rng is not None else random.Random(0)
        self._by_key: dict[tuple, Mapping] = {}
        self._by_port: dict[int, Mapping] = {}
        lo, _ = config.port_range
        self._next_port = lo
        self._last_sweep = float("-inf")
        self._retired: set[int] = set()  # ports renumber() took out of service

    # -- the interface -------------------------------------------------------------------

    def outbound(self, src: Address, dst: Address, now: float) -> Address | None:
        """The external source for a packet src -> dst, creating or refreshing the mapping.
        None when UDP is blocked or no external port is free."""
        if self.config.udp_blocked:
            return None
        key = self._mapping_key(src, dst)
        mapping = self._by_key.get(key)
        if mapping is not None and self._expired(mapping, now):
            self._remove(mapping)
            mapping = None
        if mapping is None:
            port = self._allocate_port(src[1], now)
            if port is None:
                return None
            mapping = Mapping(
                internal=src, external_port=port, key=key, created=now, last_active=now
            )
            self._by_key[key] = mapping
            self._by_port[port] = mapping
        mapping.last_active = now
        mapping.permissions[dst] = now
        return (self.external_ip, mapping.external_port)

    def inbound(self, src: Address, dst: Address, now: float) -> Address | None:
        """The internal destination for a packet src -> dst (dst on our external IP)."""
        return self.inbound_verdict(src, dst, now)[0]

    def inbound_verdict(self, src: Address, dst: Address, now: float) -> tuple[Address | None, str]:
        """Like `inbound`, plus the drop reason ("" when admitted) for the counters."""
        if self.config.udp_blocked:
            return None, DROP_UDP_BLOCKED
        if dst[0] != self.external_ip:
            return None, DROP_NO_MAPPING
        mapping = self._by_port.get(dst[1])
        if mapping is None:
            return None, DROP_NO_MAPPING
        if self._expired(mapping, now):
            self._remove(mapping)
            return None, DROP_NO_MAPPING
        if not self._permitted(mapping, src, now):
            return None, DROP_FILTERED
        if self.config.inbound_refresh:
            mapping.last_active = now
            if src in mapping.permissions:
                mapping.permissions[src] = now
        return mapping.internal, ""

    def hairpin_verdict(
        self, src: Address, dst: Address, now: float
    ) -> tuple[tuple[Address, Address] | None, str]:
        """A packet from inside (`src`) to our own external address `dst`: the translated
        (source, destination) to loop back inside, or None and the drop reason. The source
        is the sender's external mapping (RFC 4787 REQ-9), and the target's filter applies
        to it as to any outside sender."""
        if self.config.udp_blocked:
            return None, DROP_UDP_BLOCKED
        if not self.config.hairpinning:
            return None, DROP_NO_HAIRPIN
        mapped = self.outbound(src, dst, now)
        if mapped is None:
            return None, DROP_NO_PORT
        internal, reason = self.inbound_verdict(mapped, dst, now)
        if internal is None:
            return None, reason
        return (mapped, internal), ""

    # -- inspection and control ----------------------------------------------------------

    def mappings(self, now: float | None = None) -> list[Mapping]:
        """Live mappings (all stored ones when `now` is None), oldest first."""
        return [m for m in self._by_port.values() if now is None or not self._expired(m, now)]

    def flush(self) -> None:
        """Forget every mapping, as a NAT reboot or a conntrack flush does."""
        self._by_key.clear()
        self._by_port.clear()

    def renumber(self) -> list[int]:
        """Forget every mapping and never hand its external port out again: the NAT
        rebinding a flow to a new port (a plain flush would let a port-preserving NAT
        give the very same port back). Returns the retired ports."""
        retired = sorted(self._by_port)
        self._retired.update(retired)
        self.flush()
        return retired

    # -- internals -----------------------------------------------------------------------

    def _mapping_key(self, src: Address, dst: Address) -> tuple:
        behavior = self.config.mapping
        if behavior is Behavior.ENDPOINT_INDEPENDENT:
            return (src,)
        if behavior is Behavior.ADDRESS_DEPENDENT:
            return (src, dst[0])
        return (src, dst)

    def _expired(self, mapping: Mapping, now: float) -> bool:
        return now - mapping.last_active > self.config.mapping_timeout

    def _permitted(self, mapping: Mapping, src: Address, now: float) -> bool:
        behavior = self.config.filtering
        if behavior is Behavior.ENDPOINT_INDEPENDENT:
            return True
        timeout = self.config.mapping_timeout
        if behavior is Behavior.ADDRESS_DEPENDENT:
            return any(
                remote[0] == src[0] and now - seen <= timeout
                for remote, seen in mapping.permissions.items()
            )
        seen = mapping.permissions.get(src)
        return seen is not None and now - seen <= timeout

    def _remove(self, mapping: Mapping) -> None:
        if self._by_key.get(mapping.key) is mapping:
            del self._by_key[mapping.key]
        if self._by_port.get(mapping.external_port) is mapping:
            del self._by_port[mapping.external_port]

    def _sweep(self, now: float) -> None:
        # Expired mappings are removed lazily; a full pass once per timeout period keeps the
        # tables bounded without paying O(n) per packet.
        if now - self._last_sweep < self.config.mapping_timeout:
            return
        self._last_sweep = now
        for mapping in list(self._by_key.values()):
            if self._expired(mapping, now):
                self._remove(mapping)

    def _port_free(self, port: int, now: float) -> bool:
        if port in self._retired:
            return False
        mapping = self._by_port.get(port)
        if mapping is None:
            return True
        if self._expired(mapping, now):
            self._remove(mapping)
            return True
        return False

    def _allocate_port(self, internal_port: int, now: float) -> int | None:
        self._sweep(now)
        lo, hi = self.config.port_range
        allocation = self.config.port_allocation
        if allocation is PortAllocation.PRESERVING:
            if lo <= internal_port <= hi:
                return self._sequential(lo, hi, now, start=internal_port)
        elif allocation is PortAllocation.RANDOM:
            # A few random draws find a free port in any sane table; the scan below is the
            # bounded fallback for a nearly full one.
            for _ in range(32):
                port = self._rng.randint(lo, hi)
                if self._port_free(port, now):
                    return port
        return self._sequential(lo, hi, now)

    def _sequential(self, lo: int, hi: int, now: float, start: int | None = None) -> int | None:
        span = hi - lo + 1
        if start is None:
            start = self._next_port if lo <= self._next_port <= hi else lo
        for offset in range(span):
            port = lo + (start - lo + offset) % span
            if self._port_free(port, now):
                self._next_port = port + 1
                return port
        return None
