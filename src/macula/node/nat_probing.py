"""What a node learns about its own NAT (sans-IO): RFC 5780 behaviour discovery against
the gateway's STUN sockets, cached; how long the NAT keeps state for an idle remote
(binding lifetime, RFC 5780 section 4.6, known per network); and its reflexive address at
configured STUN servers.

All run on the node's one socket, so what they observe is the mapping QUIC and ICE use.
The node core feeds in the STUN answers that belong here and acts on three events: the
NAT behaviour found (the gateway is told, hard-NAT guessing plans with it), a binding
lifetime found (gateway keepalives follow it, the I/O layer remembers it) and a reflexive
address that only a STUN server showed (a candidate the gateway could not offer).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..nat.behavior import BehaviorProbe, NatBehavior
from ..nat.binding_lifetime import SCHEDULE, BindingLifetime, BindingLifetimeProbe, network_key
from ..nat.stun_client import StunClient, StunQuery
from ..net.endpoint import Address

NAT_CACHE_TTL = 600.0  # re-probe the NAT this often (and whenever our address changes)
# The filtering tests wait this long plus a few gateway round trips for answers a
# filtering NAT never lets through (sends at 0 and 0.1 s, a third at 0.3 s on slow
# paths), not half of the probe's 3 s: port-restricted and symmetric NATs are known
# ~1.2 s sooner, and with them whether a punch needs port guessing. An answer lost twice
# only makes the filtering look stricter than it is, which at worst starts a guessing
# run the pair did not need.
FILTER_WAIT_BASE = 0.2
FILTER_WAIT_RTTS = 3
FILTER_WAIT_MAX = 1.5


@dataclass(frozen=True)
class NatFound:
    behavior: NatBehavior


@dataclass(frozen=True)
class ReflexiveFound:
    """A configured STUN server saw us at `address` (a server at `server_ip`)."""

    address: Address
    server_ip: str


@dataclass(frozen=True)
class LifetimeFound:
    """How long this network's NAT keeps state for an idle remote (`network`: our local IP
    and public IP, the key it is remembered under)."""

    lifetime: BindingLifetime
    network: str


ProbingEvent = NatFound | ReflexiveFound | LifetimeFound


class NatProbing:
    def __init__(self, *, discovery: bool, stun_servers: tuple[Address, ...],
                 local_address: Address | None,
                 lifetimes: dict[str, BindingLifetime] | None = None,
                 lifetime_schedule: tuple[float, ...] = SCHEDULE) -> None:
        self._discovery = discovery
        self.stun_servers = stun_servers
        self._local = local_address
        self.stun = StunClient()
        self._query: StunQuery | None = None
        self.reflexive: tuple[Address, str] | None = None  # (address, server ip)
        self.nat: NatBehavior | None = None
        self._nat_at: float | None = None
        self._probe: BehaviorProbe | None = None
        # Binding lifetimes by network (network_key), what earlier runs found included.
        self.lifetimes: dict[str, BindingLifetime] = dict(lifetimes or {})
        self._lifetime_schedule = lifetime_schedule
        self._lifetime_probe: BindingLifetimeProbe | None = None
        self._lifetime_network: str | None = None
        self._gateway_sockets: list[Address] = []

    @property
    def lifetime(self) -> BindingLifetime | None:
        """The binding lifetime of the network we are on, if known."""
        key = network_key(self.nat) if self.nat is not None else None
        return self.lifetimes.get(key) if key is not None else None

    # ------------------------------------------------------------------ starting
    def maybe_probe(self, gateway_sockets: list[Address], now: float,
                    rtt: float | None = None) -> None:
        """Run behaviour discovery against the gateway's STUN sockets, unless the cached
        answer is fresh or a probe is already running. `rtt`: the gateway's, when known."""
        if not self._discovery or self._probe is not None or not gateway_sockets:
            return
        if self._nat_at is not None and now - self._nat_at < NAT_CACHE_TTL:
            return
        self._gateway_sockets = list(gateway_sockets)
        if self._lifetime_probe is not None:
            self._lifetime_probe.interrupted(now)  # discovery talks to the alternate port
        primary = gateway_sockets[0]
        alternate = gateway_sockets[1][1] if len(gateway_sockets) > 1 else None
        wait = (min(FILTER_WAIT_MAX, FILTER_WAIT_BASE + FILTER_WAIT_RTTS * rtt)
                if rtt else None)
        self._probe = BehaviorProbe(primary, now, alternate_port=alternate,
                                    local_address=self._local, filter_wait=wait)
        self._nat_at = now

    def forget(self) -> None:
        """Our mapping moved: what we knew may be stale, so the next check re-probes (and
        a lifetime test under way was of the network we left)."""
        self._nat_at = None
        self._lifetime_probe = self._lifetime_network = None

    def query_servers(self, now: float) -> None:
        if self.stun_servers and (self._query is None or self._query.done):
            self._query = self.stun.discover_address(self.stun_servers, now)

    # ------------------------------------------------------------------ datagrams in
    def owns_server_answer(self, data: bytes, addr: Address) -> bool:
        return addr in self.stun_servers and self.stun.owns(data)

    def receive_server_answer(self, data: bytes, addr: Address, now: float) -> list[ProbingEvent]:
        self.stun.receive_datagram(data, addr, now)
        return self._after_query()

    def receive_gateway_answer(self, data: bytes, addr: Address,
                               now: float) -> list[ProbingEvent] | None:
        """An answer from the gateway's STUN sockets: None if no probe wanted it (a
        retransmission's second answer)."""
        lifetime = self._lifetime_probe
        if lifetime is not None and lifetime.receive_datagram(data, addr, now):
            return self._after_lifetime()
        probe = self._probe
        if probe is None or not probe.receive_datagram(data, addr, now):
            return None
        return self._after_probe(now)

    # ------------------------------------------------------------------ out, time
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = self.stun.datagrams_to_send(now)
        if self._probe is not None:
            out.extend(self._probe.datagrams_to_send(now))
        if self._lifetime_probe is not None:
            out.extend(self._lifetime_probe.datagrams_to_send(now))
        return out

    def get_timer(self) -> float | None:
        times = [t for t in (self._probe.get_timer() if self._probe is not None else None,
                             self._lifetime_probe.get_timer()
                             if self._lifetime_probe is not None else None,
                             self.stun.get_timer()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[ProbingEvent]:
        found: list[ProbingEvent] = []
        if self._probe is not None:
            self._probe.handle_timer(now)
            found += self._after_probe(now)
        if self._lifetime_probe is not None:
            self._lifetime_probe.handle_timer(now)
            found += self._after_lifetime()
        if (t := self.stun.get_timer()) is not None and now >= t:
            self.stun.handle_timer(now)
            found += self._after_query()
        return found

    # ------------------------------------------------------------------ results
    def _after_probe(self, now: float) -> list[ProbingEvent]:
        probe = self._probe
        if probe is None or not probe.done:
            return []
        self._probe = None
        self.nat = probe.result
        if probe.result is None:
            return []
        self._maybe_measure_lifetime(probe.result, now)
        return [NatFound(probe.result)]

    def _maybe_measure_lifetime(self, nat: NatBehavior, now: float) -> None:
        """Measure this network's binding lifetime once, where state can expire: a NAT
        that filters by address and port (other NATs let the test's answer in anyway),
        and a gateway with a second port on its main IP."""
        key = network_key(nat)
        sockets = self._gateway_sockets
        if (key is None or key in self.lifetimes or self._lifetime_probe is not None
                or nat.filtering != "address_and_port_dependent" or len(sockets) < 2
                or sockets[1][0] != sockets[0][0] or sockets[1][1] == sockets[0][1]):
            return
        self._lifetime_network = key
        self._lifetime_probe = BindingLifetimeProbe(sockets[0], sockets[1], now,
                                                    schedule=self._lifetime_schedule)

    def _after_lifetime(self) -> list[ProbingEvent]:
        probe, key = self._lifetime_probe, self._lifetime_network
        if probe is None or probe.result is None or key is None:
            return []
        self._lifetime_probe = self._lifetime_network = None
        self.lifetimes[key] = probe.result
        return [LifetimeFound(probe.result, key)]

    def _after_query(self) -> list[ProbingEvent]:
        query = self._query
        if query is None or not query.done:
            return []
        self._query = None
        if query.address is None or query.server is None:
            return []  # every server failed: their stats say why (metrics, netcheck)
        found = (query.address, query.server[0])
        if found == self.reflexive:
            return []
        self.reflexive = found
        return [ReflexiveFound(*found)]
