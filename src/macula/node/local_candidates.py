"""The node's own candidates for ICE: which addresses it can offer a peer, best first.

Pure decisions over what the node knows: its socket's address (or, for a wildcard bind,
the machine's interfaces, injected), the address the gateway observes, what a configured
STUN server saw, and a mapping the router made. TURN relay candidates come from the TURN
part and are added by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

from ..ice import Candidate, host_preference, ranked_addresses
from ..net.endpoint import Address, same_family

Interfaces = Callable[[], list[tuple[str, str]]]
MAX_HOSTS = 4


class LocalCandidates:
    def __init__(self, local: Address | None, interfaces: Interfaces, *,
                 candidate_types: tuple[str, ...], gateway_ip: str) -> None:
        self._local = local
        self._interfaces = interfaces
        self._order = candidate_types
        self._gateway_ip = gateway_ip
        # A mapping our router made for our socket (UPnP-IGD, NAT-PMP or PCP), if any.
        self.mapped_address: Address | None = None
        self.mapped_router: str | None = None

    def hosts(self) -> list[Address]:
        """Our socket's own addresses, best first: the bound one, or for a wildcard socket
        the usable interface addresses (no docker/veth/link-local...), IPv6 first (RFC
        8421). A "0.0.0.0" socket cannot use IPv6 ones; a "::" one is dual-stack."""
        local = self._local
        if local is not None and local[0] in ("0.0.0.0", "::"):
            interfaces = self._interfaces()
            if local[0] == "0.0.0.0":
                interfaces = [(name, ip) for name, ip in interfaces if ":" not in ip]
            return [(ip, local[1]) for _name, ip in ranked_addresses(interfaces)][:MAX_HOSTS]
        return [local] if local is not None else []

    def socket_candidates(self, observed: Address | None,
                          reflexive: tuple[Address, str] | None) -> list[Candidate]:
        """Host addresses of our socket, the address the gateway observes for us, and the
        reflexive ones only we know."""
        out: list[Candidate] = []
        hosts = self.hosts()
        # Preference by rank, as the gateway ranks the hello's list: both sides then
        # compute the same pair priorities.
        for rank, host in enumerate(hosts):
            try:
                out.append(Candidate.host(host[0], host[1], order=self._order,
                                          local_preference=host_preference(rank)))
            except ValueError:
                continue
        base = same_family(observed, hosts) if observed is not None else None
        if observed is not None and observed not in hosts and base is not None:
            out.append(Candidate.server_reflexive(
                observed[0], observed[1], base=base, server=self._gateway_ip,
                order=self._order))
        return out + self.own_reflexive(observed, reflexive)

    def own_reflexive(self, observed: Address | None,
                      reflexive: tuple[Address, str] | None) -> list[Candidate]:
        """Reflexive addresses only we know: a router mapping, and what a configured STUN
        server saw when it differs from the gateway's view (a NAT mapping per server)."""
        hosts = self.hosts()
        out = []
        if (mapped := self.mapped_candidate()) is not None:
            out.append(mapped)
        base = same_family(reflexive[0], hosts) if reflexive is not None else None
        if (reflexive is not None and base is not None and reflexive[0] != observed
                and reflexive[0] != self.mapped_address and reflexive[0] not in hosts):
            out.append(Candidate.server_reflexive(reflexive[0][0], reflexive[0][1], base=base,
                                                  server=reflexive[1], order=self._order))
        return out

    def mapped_candidate(self) -> Candidate | None:
        # A router-made mapping is reflexive like the gateway-observed one, but it admits
        # unsolicited packets: exactly what a symmetric NAT otherwise refuses.
        mapped = self.mapped_address
        base = same_family(mapped, self.hosts()) if mapped else None
        if mapped is None or base is None:
            return None
        return Candidate.server_reflexive(mapped[0], mapped[1], base=base,
                                          server=self.mapped_router, order=self._order)



