"""The node's TURN allocations: relay candidates for ICE and the "turn" path (sans-IO).

Every allocation runs through the node's one socket, so the address the TURN server sees
is the same NAT mapping QUIC and ICE use. Each allocation becomes a relay candidate whose
`via` names it; whatever ICE or the session sends on that via goes to the TURN server
wrapped for the peer (a Send indication, then ChannelData once a channel is bound), and
what arrives from the server is unwrapped and handed back with the same via.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..ice import Candidate, turn_via
from ..nat.turn import TurnClient, TurnData, TurnError, TurnEvent
from ..net.endpoint import Address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayData:
    """A peer's datagram, unwrapped from the allocation `via`."""

    via: str
    peer: Address
    payload: bytes


@dataclass(frozen=True)
class RelayCandidate:
    """An allocation completed: its relayed address, as a candidate for ICE."""

    via: str
    candidate: Candidate


@dataclass(frozen=True)
class RelayLost:
    """The allocation `via` failed or closed: a path through it is dead."""

    via: str


RelayEvent = RelayData | RelayCandidate | RelayLost


@dataclass(frozen=True)
class TurnServerSpec:
    server: Address
    username: str
    credential: str
    # "udp" through the node's socket; "tcp" or "tls" over a connection the node's I/O
    # layer holds (node.turn_streams), framed as RFC 8656 section 3.1 says.
    transport: str = "udp"

    @property
    def over_stream(self) -> bool:
        return self.transport in ("tcp", "tls")


class TurnRelays:
    def __init__(self, servers: Sequence[TurnServerSpec], *,
                 candidate_types: Sequence[str]) -> None:
        self._clients = [_client(s) for s in servers]
        self._by_server = {c.server: c for c in self._clients}
        self._stream_servers = {s.server: s.transport for s in servers if s.over_stream}
        self._by_via: dict[str, TurnClient] = {}
        self._candidates: dict[str, Candidate] = {}
        self._order = tuple(candidate_types)
        self.errors: list[str] = []

    def set_servers(self, servers: Sequence[TurnServerSpec], now: float) -> None:
        """Credentials from the gateway (TURN REST API): new servers are allocated on,
        known ones carry on with the fresh credentials for their next refresh."""
        for spec in servers:
            client = self._by_server.get(spec.server)
            if client is not None:
                client.set_credentials(spec.username, spec.credential)
                continue
            client = _client(spec)
            if spec.over_stream:
                self._stream_servers[spec.server] = spec.transport
            self._clients.append(client)
            self._by_server[client.server] = client
        self.start(now)

    @property
    def configured(self) -> bool:
        return bool(self._clients)

    @property
    def pending(self) -> bool:
        """Some allocation is still being made (its candidate may yet appear)."""
        return any(c.state == "allocating" for c in self._clients)

    def start(self, now: float) -> None:
        for client in self._clients:
            if client.state in ("idle", "failed", "closed"):
                try:
                    client.allocate_relay(now)
                except TurnError as exc:
                    self.errors.append(str(exc))

    def candidates(self) -> list[tuple[Candidate, str]]:
        return [(cand, via) for via, cand in self._candidates.items()]

    def owns(self, addr: Address) -> bool:
        return addr in self._by_server

    @property
    def stream_servers(self) -> dict[Address, str]:
        """Servers spoken to over TCP or TLS, with that transport."""
        return dict(self._stream_servers)

    def is_stream_via(self, via: str) -> bool:
        """Whether the allocation `via` runs over TCP or TLS (it survives UDP going away)."""
        client = self._by_via.get(via)
        return client is not None and client.server in self._stream_servers

    def transport_of(self, via: str) -> str:
        client = self._by_via.get(via)
        return self._stream_servers.get(client.server, "udp") if client is not None else "udp"

    def stream_lost(self, server: Address, now: float) -> list[RelayEvent]:
        """The TCP or TLS connection to `server` ended: so did its allocation."""
        client = self._by_server.get(server)
        if client is None:
            return []
        client.connection_lost(now)
        return self._translate(client, _drain(client))

    def receive(self, data: bytes, addr: Address, now: float) -> list[RelayEvent]:
        """What a datagram from a TURN server means for the node."""
        client = self._by_server[addr]
        if not client.receive_datagram(data, addr, now):
            client.counters.dropped += 1  # from the server, but neither STUN nor ChannelData
        return self._translate(client, _drain(client))

    def send(self, via: str, peer: Address, data: bytes, now: float) -> tuple[bytes, Address] | None:
        client = self._by_via.get(via)
        if client is None or client.state != "allocated":
            return None
        try:
            if not client.permissions.get(peer[0]):
                client.create_permission(peer[0], now)  # idempotent while in flight
            return client.send_via_relay(peer, data), client.server
        except TurnError as exc:
            self.errors.append(str(exc))
            return None

    def bind(self, via: str, peer: Address, now: float) -> None:
        """A selected path runs through this allocation: a channel saves 32 bytes a packet."""
        client = self._by_via.get(via)
        if client is not None and client.state == "allocated":
            try:
                client.bind_channel(peer, now)
            except TurnError as exc:
                self.errors.append(str(exc))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        for client in self._clients:
            out.extend(client.datagrams_to_send(now))
        return out

    def get_timer(self) -> float | None:
        times = [t for t in (c.get_timer() for c in self._clients) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[RelayEvent]:
        out: list[RelayEvent] = []
        for client in self._clients:
            t = client.get_timer()
            if t is not None and now >= t:
                client.handle_timer(now)
                out += self._translate(client, _drain(client))
        return out

    def close(self, now: float) -> None:
        for client in self._clients:
            client.close(now)

    def stats(self) -> list[dict[str, Any]]:
        return [{"server": f"{c.server[0]}:{c.server[1]}", "state": c.state,
                 "transport": self._stream_servers.get(c.server, "udp"),
                 "relayed": (f"{c.allocation.relayed[0]}:{c.allocation.relayed[1]}"
                             if c.allocation else None),
                 "bytes_to_relay": c.counters.bytes_to_relay,
                 "bytes_from_relay": c.counters.bytes_from_relay,
                 "errors": c.counters.errors} for c in self._clients]

    def _translate(self, client: TurnClient, events: list[TurnEvent]) -> list[RelayEvent]:
        out: list[RelayEvent] = []
        for event in events:
            if isinstance(event, TurnData):
                via = self._via_of(client)
                if via is not None:
                    out.append(RelayData(via, event.peer, event.data))
            elif event.kind == "allocated" and client.allocation is not None:
                relayed = client.allocation.relayed
                candidate = Candidate.turn_relay(relayed[0], relayed[1], server=client.server[0],
                                                 mapped=client.allocation.mapped,
                                                 order=self._order)
                via = turn_via(candidate)
                self._by_via[via] = client
                self._candidates[via] = candidate
                out.append(RelayCandidate(via, candidate))
            elif event.kind == "error":
                self.errors.append(str(event.value))
                if client.state in ("failed", "closed"):
                    via = self._via_of(client)
                    if via is not None:
                        del self._by_via[via]
                        del self._candidates[via]
                        out.append(RelayLost(via))
        return out

    def _via_of(self, client: TurnClient) -> str | None:
        return next((v for v, c in self._by_via.items() if c is client), None)


def _client(spec: TurnServerSpec) -> TurnClient:
    return TurnClient(spec.server, spec.username, spec.credential,
                      transport="tcp" if spec.over_stream else "udp")


def _drain(client: TurnClient) -> list[TurnEvent]:
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events
