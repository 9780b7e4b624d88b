"""A sans-IO PCP (RFC 6887) client for one UDP MAP mapping of the node's socket.

Same shape as `NatPmpClient`: fed datagrams from (gateway, 5351) and time, it hands back
datagrams and its next wake-up time; the requests must leave from the node's own socket.

- The first request (and a delete) is retransmitted per RFC 6887 8.1.1 until answered or,
  when a `timeout` is given, until it passes (RFC: no limit by default).
- Renewals are single packets at a random point in [1/2, 5/8] of the lifetime, then
  [3/4, 3/4 + 1/16], [7/8, 7/8 + 1/32] ..., never closer than 4 s apart (11.2.1).
- Every response's epoch is checked (8.5). A server that lost state is asked again at once;
  after an unsolicited ANNOUNCE that shows a restart, after a random 0-5 s (14.1.3).
- A server that answers with a NAT-PMP message (first byte 0) speaks NAT-PMP only (9).
- The nonce stays the same for the mapping's life; it is what authorises renewal and
  deletion (lifetime 0).
"""

from __future__ import annotations

import os
import random

from macula.net.endpoint import Address

from ...errors import InvalidValue
from . import natpmp, pcp
from .epoch import EpochTracker
from .errors import MalformedMessage
from .mapping import ClientState, PortMapping, SansIoClient
from .netinfo import same_source
from .retransmit import PCP_IRT, PCP_MRT, Retransmitter, pcp_backoff

State = ClientState
DEFAULT_LIFETIME = 7200
MIN_RENEWAL_GAP = 4.0  # RFC 6887 11.2.1: renewals MUST NOT be less than 4 s apart
ANNOUNCE_SPREAD = 5.0  # RFC 6887 14.1.3: wait a random 0-5 s after a restart ANNOUNCE


class PcpClient(SansIoClient):
    protocol = "pcp"

    def __init__(self, gateway: str, client_ip: str, internal_port: int, now: float, *,
                 lifetime: int = DEFAULT_LIFETIME, external_port: int | None = None,
                 external_ip: str = pcp.NO_ADDRESS_V4, nonce: bytes | None = None,
                 server_port: int = pcp.SERVER_PORT, timeout: float | None = None,
                 irt: float = PCP_IRT, mrt: float = PCP_MRT,
                 rng: random.Random | None = None) -> None:
        if lifetime <= 0:
            raise InvalidValue("lifetime must be positive (0 means delete)")
        self.server: Address = (gateway, server_port)
        self.client_ip = client_ip
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.nonce = nonce if nonce is not None else os.urandom(pcp.NONCE_SIZE)
        if len(self.nonce) != pcp.NONCE_SIZE:
            raise InvalidValue("a PCP nonce is 12 bytes")
        self.state: State = "requesting"
        self.mapping: PortMapping | None = None
        self.error: str | None = None
        self.result_code: int | None = None  # the last non-success result, if any
        self.answered = False  # a PCP (version 2) answer arrived
        self.natpmp_only = False  # the server answered in NAT-PMP: it does not speak PCP
        self._rng = rng or random.Random()
        self._backoff = pcp_backoff(irt, mrt, self._rng)
        self._epoch = EpochTracker("pcp")
        self._outbox: list[tuple[bytes, Address]] = []
        self._deadline = now + timeout if timeout is not None else None
        self._renew_at: float | None = None
        self._renewals = 0
        self._tx: Retransmitter | None = Retransmitter(
            self._map_request(self.lifetime, internal_port if external_port is None
                              else external_port, external_ip), now, self._backoff)
        self._flush(now)

    # -- the sans-IO interface (done, datagrams_to_send: SansIoClient) ----------------------

    def get_timer(self) -> float | None:
        if self.done:
            return None
        times: list[float] = []
        if self._tx is not None:
            times.append(self._tx.next_send)
        elif self._renew_at is not None:
            times.append(self._renew_at)
        if self._deadline is not None:
            times.append(self._deadline)
        if self.state == "mapped" and self.mapping is not None:
            times.append(self.mapping.expires_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        mapping = self.mapping
        if self.state == "mapped" and mapping is not None:
            if now >= mapping.expires_at:
                self._end("expired", "mapping expired: renewals went unanswered")
                return
            if self._tx is None and self._renew_at is not None and now >= self._renew_at:
                self._outbox.append((self._renewal(mapping), self.server))
                self._renewals += 1
                self._renew_at = self._renewal_time(now + MIN_RENEWAL_GAP)
        if self._deadline is not None and now >= self._deadline:
            if self.state == "deleting":
                self._end("deleted", "delete unconfirmed: no answer from the PCP server")
            else:
                self._end("failed", "no answer from the PCP server" if not self.answered
                          else "PCP server answered but gave no mapping in time")
            return
        self._flush(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """Offer one datagram; True when it came from the server's PCP port (consumed)."""
        if not same_source(addr, self.server):
            return False
        if self.done or not data:
            return True
        if data[0] == natpmp.VERSION:
            # RFC 6887 section 9: a NAT-PMP-only gateway answers with a NAT-PMP error.
            self.natpmp_only = True
            if self.state == "requesting":
                self._end("failed", "server speaks NAT-PMP only (answered PCP with version 0)")
            return True
        try:
            response = pcp.decode_response(data)
        except MalformedMessage:
            return True
        self.answered = True
        if (not self._epoch.observe(response.epoch, now) and self.state == "mapped"
                and self._tx is None and self.mapping is not None):
            # The server restarted and lost our mapping (8.5). After an unsolicited
            # ANNOUNCE every client hears it at once, so spread out (14.1.3).
            if response.opcode == pcp.OP_ANNOUNCE:
                self._renewals = 0
                self._renew_at = now + self._rng.uniform(0, ANNOUNCE_SPREAD)
            else:
                self._tx = Retransmitter(self._renewal(self.mapping), now, self._backoff)
                self._flush(now)
        if response.opcode == pcp.OP_ANNOUNCE:
            return True
        body = response.map
        if body is None:
            # An error too early to echo our MAP data (e.g. UNSUPP_VERSION, MALFORMED_REQUEST).
            if not response.ok and self._tx is not None:
                self._refused(response)
            return True
        if (body.nonce != self.nonce or body.protocol != pcp.PROTO_UDP
                or body.internal_port != self.internal_port):
            return True  # not our mapping
        if self.state == "deleting":
            if response.ok and response.lifetime == 0:
                self._tx = None
                self.state = "deleted"
            elif not response.ok:
                self._end("deleted", f"delete refused: {pcp.result_name(response.result)}")
            return True
        if not response.ok:
            if self._tx is not None or self.state == "mapped":
                self._refused(response)
            return True
        if response.lifetime == 0:
            return True  # a late answer to an old delete
        self._tx = None
        self.mapping = PortMapping("pcp", (body.external_ip, body.external_port),
                                   (self.client_ip, self.internal_port), self.server[0],
                                   float(response.lifetime), now)
        self.state = "mapped"
        self.error = None
        self._deadline = None
        self._renewals = 0
        self._renew_at = self._renewal_time(now)
        return True

    def delete(self, now: float, timeout: float = 2.0) -> None:
        """Ask the server to drop the mapping: the same nonce with lifetime 0 (RFC 6887 15)."""
        if self.state in ("deleting", "deleted"):
            return
        had_contact = self.answered or self.state == "requesting"
        current = self.mapping
        self.mapping = None
        self._renew_at = None
        if not had_contact or self.natpmp_only:
            self._tx = None
            self.state = "deleted"
            return
        port, ip = (current.external[1], current.external[0]) if current else (0, pcp.NO_ADDRESS_V4)
        self.state = "deleting"
        self._deadline = now + timeout
        self._tx = Retransmitter(self._map_request(0, port, ip), now, self._backoff)
        self._flush(now)

    # -- internals ---------------------------------------------------------------------------

    def _map_request(self, lifetime: int, external_port: int, external_ip: str) -> bytes:
        return pcp.map_request(client_ip=self.client_ip, nonce=self.nonce,
                               internal_port=self.internal_port, lifetime=lifetime,
                               external_port=external_port, external_ip=external_ip)

    def _renewal(self, mapping: PortMapping) -> bytes:
        # Suggest what we hold, so a server that lost state gives the same port back.
        return self._map_request(self.lifetime, mapping.external[1], mapping.external[0])

    def _renewal_time(self, not_before: float) -> float | None:
        mapping = self.mapping
        if mapping is None:
            return None
        k = self._renewals
        start, width = 1 - 2.0 ** -(k + 1), 2.0 ** -(k + 3)
        at = max(not_before, mapping.obtained_at + mapping.lifetime
                 * (start + self._rng.uniform(0, width)))
        return at if at < mapping.expires_at else None

    def _flush(self, now: float) -> None:
        if self._tx is not None and self._tx.due(now):
            self._outbox.append((self._tx.data, self.server))
            self._tx.mark_sent(now)

    def _refused(self, response: pcp.Response) -> None:
        self.result_code = response.result
        reason = f"PCP {pcp.result_name(response.result)}"
        if self.state == "mapped" and response.result in pcp.SHORT_LIVED:
            self.error = reason  # keep renewing: the server expects this to pass
            return
        self._end("failed", reason)

    def _end(self, state: State, reason: str) -> None:
        self.state = state
        self.error = reason
        self.mapping = None
        self._tx = None
        self._renew_at = None
