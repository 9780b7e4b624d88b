"""STUN Binding client (RFC 8489) over the node's shared socket: public address discovery.

`StunClient` is sans-IO. It never owns a socket: it hands back (datagram, address) pairs
to send and consumes the STUN answers the caller routes to it (`owns()` tells, by
transaction id, whether an answer is ours). Requests are retransmitted RFC 8489-style
(RTO doubling, Rc sends, then Rm * RTO of patience). A query may ask several servers at
once: the first good answer settles it, later answers still feed each server's cache and
statistics, so operators see which configured servers are slow or dead.

`AsyncStunClient` drives it over a DatagramEndpoint on the event loop's clock (call_at,
never sleep), the same way `macula.nat.behavior.detect_nat_behavior` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from macula.net.endpoint import Address, format_address
from macula.wire.stun import (
    DEFAULT_SOFTWARE,
    Class,
    Message,
    Method,
    StunError,
    binding_request,
    is_stun,
    mapped_address,
    parse_message,
)

from ..errors import InvalidValue, MaculaError

__all__ = [
    "ConnectivityResult",
    "RetransmitPolicy",
    "ServerStats",
    "StunAllFailed",
    "StunBadResponse",
    "StunCancelled",
    "StunClient",
    "StunClientError",
    "StunErrorResponse",
    "StunQuery",
    "StunTimeout",
    "format_address",
]

# RFC 6298's smoothing factor, the same one RFC 8489 points to for its RTO estimate.
SMOOTHING = 0.125


def _addr(addr: Address) -> Address:
    # Sockets report (ip, port, flow, scope) for IPv6; keys are always (ip, port).
    return (addr[0], addr[1])


# -- errors ---------------------------------------------------------------------------------


class StunClientError(MaculaError):
    """A Binding transaction (or a whole query) failed. `server` is None for a query."""

    def __init__(self, message: str, server: Address | None = None) -> None:
        super().__init__(message)
        self.server = server


class StunTimeout(StunClientError):
    def __init__(self, server: Address, waited: float, requests: int) -> None:
        super().__init__(
            f"no STUN answer from {format_address(server)} after {waited:.2f} s "
            f"({requests} request{'s' if requests != 1 else ''} sent)",
            server,
        )
        self.waited = waited
        self.requests = requests


class StunErrorResponse(StunClientError):
    def __init__(self, server: Address, code: int, reason: str) -> None:
        super().__init__(
            f"STUN server {format_address(server)} answered error {code} {reason}".rstrip(), server
        )
        self.code = code
        self.reason = reason


class StunBadResponse(StunClientError):
    """The server answered, but with nothing usable (no mapped address)."""


class StunCancelled(StunClientError):
    """The client was closed while the transaction was still running."""


class StunAllFailed(StunClientError):
    def __init__(self, errors: dict[Address, StunClientError]) -> None:
        detail = "; ".join(str(e) for e in errors.values())
        super().__init__(f"no STUN server gave an address: {detail}")
        self.errors = errors


# -- retransmission -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetransmitPolicy:
    """RFC 8489 section 6.2.1: send at 0, RTO, 3 RTO, 7 RTO...; Rc sends in all, then give
    up Rm * RTO after the last one. The defaults (100 ms, 7, 16) give up after 7.9 s."""

    rto: float = 0.1
    rc: int = 7
    rm: int = 16

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.rc < 1 or self.rm < 1:
            raise InvalidValue("rto must be positive, rc and rm at least 1")
        if self.rc > 16:
            raise InvalidValue("rc above 16 would wait for hours")

    @property
    def total_wait(self) -> float:
        """Seconds from the first send until the transaction times out."""
        return float(self.rto * (2 ** (self.rc - 1) - 1) + self.rm * self.rto)


@dataclass
class Retransmission:
    """The send schedule of one transaction; shared with the TURN client."""

    policy: RetransmitPolicy
    started: float
    sends: int = 1
    next_send: float | None = None
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = self.started + self.policy.total_wait
        self.next_send = self.started + self.policy.rto if self.policy.rc > 1 else None

    def next_time(self) -> float:
        return self.next_send if self.next_send is not None else self.deadline

    def due(self, now: float) -> bool:
        """True when a retransmission is due at `now` (and books it)."""
        if self.next_send is None or now < self.next_send:
            return False
        self.sends += 1
        interval = self.policy.rto * 2 ** (self.sends - 1)
        self.next_send = self.next_send + interval if self.sends < self.policy.rc else None
        return True

    def expired(self, now: float) -> bool:
        return self.next_send is None and now >= self.deadline


# -- per-server statistics ------------------------------------------------------------------------


@dataclass
class ServerStats:
    """What one STUN server has done for us lately (the per-server cache)."""

    server: Address
    requests: int = 0  # transactions started
    successes: int = 0
    failures: int = 0  # timeouts, error answers, unusable answers
    consecutive_timeouts: int = 0
    malformed: int = 0  # answers with our transaction id that failed to parse
    last_latency: float | None = None
    smoothed_latency: float | None = None
    last_error: StunClientError | None = None
    last_mapped: Address | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None

    @property
    def success_rate(self) -> float | None:
        """Successes over finished transactions; None before the first one finishes."""
        done = self.successes + self.failures
        return self.successes / done if done else None

    @property
    def unreachable(self) -> bool:
        """The most recent transaction got no answer at all."""
        return self.consecutive_timeouts > 0


@dataclass(frozen=True)
class ConnectivityResult:
    server: Address
    ok: bool
    mapped: Address | None = None
    latency: float | None = None
    error: StunClientError | None = None


# -- queries and transactions ------------------------------------------------------------------------


@dataclass(eq=False)
class StunQuery:
    """One discover_address / test_connectivity request; `done` once settled."""

    kind: Literal["discover", "connectivity"]
    servers: tuple[Address, ...]
    started: float
    address: Address | None = None
    server: Address | None = None  # the server whose answer settled it
    latency: float | None = None
    error: StunClientError | None = None
    errors: dict[Address, StunClientError] = field(default_factory=dict)
    done: bool = False

    def connectivity(self) -> ConnectivityResult:
        server = self.servers[0]
        return ConnectivityResult(server, self.error is None and self.done, self.address, self.latency, self.error)


@dataclass(eq=False)
class _Transaction:
    tid: bytes
    server: Address
    data: bytes
    schedule: Retransmission
    query: StunQuery


class StunClient:
    """Binding transactions against any number of servers, sharing the caller's socket."""

    def __init__(
        self,
        *,
        rto: float = 0.1,
        rc: int = 7,
        rm: int = 16,
        software: str | None = DEFAULT_SOFTWARE,
        smoothing: float = SMOOTHING,
    ) -> None:
        if not 0 < smoothing <= 1:
            raise InvalidValue("smoothing must be in (0, 1]")
        self.policy = RetransmitPolicy(rto, rc, rm)
        self._software = software
        self._smoothing = smoothing
        self._outbox: list[tuple[bytes, Address]] = []
        self._transactions: dict[bytes, _Transaction] = {}
        self.stats: dict[Address, ServerStats] = {}

    # -- starting queries ------------------------------------------------------------------

    def discover_address(self, servers: Iterable[Address], now: float) -> StunQuery:
        """Ask every server at once; the first mapped address that comes back wins."""
        unique = tuple(dict.fromkeys(_addr(s) for s in servers))
        if not unique:
            raise InvalidValue("discover_address needs at least one server")
        query = StunQuery("discover", unique, now)
        for server in unique:
            self._start(server, query, now)
        return query

    def test_connectivity(self, server: Address, now: float) -> StunQuery:
        """One Binding transaction; `query.connectivity()` reads as ok | error."""
        query = StunQuery("connectivity", (_addr(server),), now)
        self._start(_addr(server), query, now)
        return query

    def _start(self, server: Address, query: StunQuery, now: float) -> None:
        tid = os.urandom(12)
        data = binding_request(tid, software=self._software)
        self._transactions[tid] = _Transaction(tid, server, data, Retransmission(self.policy, now), query)
        self.server_stats(server).requests += 1
        self._outbox.append((data, server))

    # -- the sans-IO interface -----------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` must next run; None while nothing is pending."""
        times = [tx.schedule.next_time() for tx in self._transactions.values()]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for tx in list(self._transactions.values()):
            if tx.schedule.due(now):
                self._outbox.append((tx.data, tx.server))
            elif tx.schedule.expired(now):
                waited = now - tx.schedule.started
                self._finish(tx, now, StunTimeout(tx.server, waited, tx.schedule.sends))

    def owns(self, data: bytes) -> bool:
        """Routing test for the socket demux: is this STUN datagram an answer of ours?"""
        return is_stun(data) and bytes(data[8:20]) in self._transactions

    @property
    def pending(self) -> int:
        return len(self._transactions)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """Offer one datagram; True if it was ours (consumed). Never raises on bad bytes."""
        if not is_stun(data):
            return False
        tx = self._transactions.get(bytes(data[8:20]))
        if tx is None:
            return False
        if _addr(addr) != tx.server:
            return True  # our id from the wrong source: spoofed or misrouted; keep waiting
        try:
            message = parse_message(data)
        except StunError:
            self.server_stats(tx.server).malformed += 1
            return True  # retransmissions go on; a later answer may parse
        if message.message_method != Method.BINDING:
            return True
        if message.message_class == Class.RESPONSE:
            mapped = mapped_address(message)
            if mapped is None:
                self._finish(tx, now, StunBadResponse(
                    f"STUN server {format_address(tx.server)} answered without a mapped address", tx.server))
            else:
                self._finish(tx, now, None, mapped)
        elif message.message_class == Class.ERROR:
            code, reason = _error_code(message)
            self._finish(tx, now, StunErrorResponse(tx.server, code, reason))
        return True

    def cancel(self, now: float) -> None:
        """Abandon every transaction (the socket is going away); queries fail as cancelled."""
        for tx in list(self._transactions.values()):
            del self._transactions[tx.tid]
            if not tx.query.done:
                self._settle_failure(tx.query, tx.server, StunCancelled("STUN client closed", tx.server))

    # -- statistics -------------------------------------------------------------------------------

    def server_stats(self, server: Address) -> ServerStats:
        key = _addr(server)
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = ServerStats(key)
        return stats

    def unreachable_servers(self) -> list[Address]:
        """Servers whose latest transaction went unanswered: the gauge operators watch."""
        return [s.server for s in self.stats.values() if s.unreachable]

    # -- outcomes ------------------------------------------------------------------------------

    def _finish(
        self, tx: _Transaction, now: float, error: StunClientError | None, mapped: Address | None = None
    ) -> None:
        del self._transactions[tx.tid]
        stats = self.server_stats(tx.server)
        latency = now - tx.schedule.started
        if error is None:
            stats.successes += 1
            stats.consecutive_timeouts = 0
            stats.last_latency = latency
            # Karn: an answer after a retransmission could belong to any of the sends, so
            # only unambiguous samples move the smoothed estimate.
            if tx.schedule.sends == 1:
                if stats.smoothed_latency is None:
                    stats.smoothed_latency = latency
                else:
                    stats.smoothed_latency += self._smoothing * (latency - stats.smoothed_latency)
            stats.last_mapped = mapped
            stats.last_success_at = now
            query = tx.query
            if not query.done:
                query.done = True
                query.address, query.server, query.latency = mapped, tx.server, latency
            return
        stats.failures += 1
        stats.last_error = error
        stats.last_failure_at = now
        if isinstance(error, StunTimeout):
            stats.consecutive_timeouts += 1
        else:
            stats.consecutive_timeouts = 0  # it answered, so it is reachable
        if not tx.query.done:
            self._settle_failure(tx.query, tx.server, error)

    def _settle_failure(self, query: StunQuery, server: Address, error: StunClientError) -> None:
        query.errors[server] = error
        if len(query.errors) < len(query.servers):
            return  # another server may still answer
        query.done = True
        query.error = error if len(query.servers) == 1 else StunAllFailed(dict(query.errors))


def _error_code(message: Message) -> tuple[int, str]:
    value = message.attributes.get("ERROR-CODE")
    if not isinstance(value, tuple) or len(value) != 2:
        return 0, "(no ERROR-CODE)"
    return int(value[0]), str(value[1])
