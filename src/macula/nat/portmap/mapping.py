"""Plain result objects: a port mapping and what a discovery run found.

The node turns `PortMapping.external` into an ICE candidate; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from macula.net.endpoint import Address

ProtocolName = Literal["pcp", "natpmp", "upnp"]
PROTOCOLS: tuple[ProtocolName, ...] = ("pcp", "natpmp", "upnp")
# A mapping client's life: requesting -> mapped (renewing) -> deleting -> deleted, or it
# ends in failed (refused, silent) or expired (renewals unanswered to the mapping's end).
ClientState = Literal["requesting", "mapped", "failed", "expired", "deleting", "deleted"]


class SansIoClient:
    """What the NAT-PMP and PCP clients share: their end states and their outbox (they
    are fed datagrams and time, and hand back datagrams to send from the node's socket)."""

    state: ClientState
    _outbox: list[tuple[bytes, Address]]

    @property
    def done(self) -> bool:
        return self.state in ("failed", "expired", "deleted")

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out


@dataclass(frozen=True)
class PortMapping:
    """The gateway forwards `external` (its public ip, port) to `internal` (us) for UDP."""

    protocol: ProtocolName
    external: Address
    internal: Address  # (our address as the gateway sees it, the node socket's port)
    gateway: str
    lifetime: float  # seconds granted at `obtained_at`
    obtained_at: float  # on the owner's clock (the event loop's, for the asyncio runner)

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime


@dataclass(frozen=True)
class DiscoveryResult:
    """What `PortMapper.discover` found.

    `answered` lists the protocols whose server replied at all (an error reply counts), in
    the order tried; `errors` says why each protocol that was tried gave no mapping.
    Protocols after the first success are not tried, so a second mapping never exists.
    """

    gateway: str | None
    mapping: PortMapping | None
    answered: tuple[ProtocolName, ...] = ()
    errors: tuple[tuple[ProtocolName, str], ...] = ()

    @property
    def external(self) -> Address | None:
        return self.mapping.external if self.mapping is not None else None

    @property
    def protocol(self) -> ProtocolName | None:
        return self.mapping.protocol if self.mapping is not None else None
