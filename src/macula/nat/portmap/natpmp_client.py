"""A sans-IO NAT-PMP (RFC 6886) client for one UDP mapping of the node's socket.

It is fed datagrams and time and hands back datagrams to send and the time it next wants
to be woken, like `macula.nat.behavior.BehaviorProbe`. The requests must leave from the
node's own socket (the mapping is for that socket's port), so the node's demux hands this
client every datagram from (gateway, 5351).

Lifecycle: "requesting" (external address + map request, retransmitted per RFC 6886 3.1)
-> "mapped" (renewed from half the lifetime on, RFC 6886 3.3) -> "deleting" (lifetime 0,
RFC 6886 3.4) -> "deleted". It ends in "failed" on a refusal or silence, and in "expired"
when renewals go unanswered until the mapping's end. An epoch that runs behind our clock
means the gateway rebooted: the mapping is requested again at once (RFC 6886 3.6).
"""

from __future__ import annotations

from macula.net.endpoint import Address

from ...errors import InvalidValue
from . import natpmp
from .epoch import EpochTracker
from .errors import MalformedMessage
from .mapping import ClientState, PortMapping, SansIoClient
from .netinfo import same_source
from .retransmit import NATPMP_FIRST, NATPMP_MAX_SENDS, Retransmitter, natpmp_backoff

State = ClientState
DEFAULT_LIFETIME = 7200  # RFC 6886 3.3 recommends two hours
# Errors that may clear up by themselves: keep renewing through them.
_TRANSIENT = frozenset({natpmp.NETWORK_FAILURE, natpmp.OUT_OF_RESOURCES})


class NatPmpClient(SansIoClient):
    protocol = "natpmp"

    def __init__(self, gateway: str, internal_port: int, now: float, *,
                 lifetime: int = DEFAULT_LIFETIME, external_port: int | None = None,
                 client_ip: str = "0.0.0.0", server_port: int = natpmp.SERVER_PORT,
                 timeout: float | None = None, first_rto: float = NATPMP_FIRST,
                 max_sends: int = NATPMP_MAX_SENDS) -> None:
        if lifetime <= 0:
            raise InvalidValue("lifetime must be positive (0 means delete)")
        self.server: Address = (gateway, server_port)
        self.internal_port = internal_port
        self.client_ip = client_ip
        self.lifetime = lifetime
        self.state: State = "requesting"
        self.mapping: PortMapping | None = None
        self.error: str | None = None
        self.answered = False  # the gateway said anything at all
        self._backoff = natpmp_backoff(first_rto)
        self._max_sends = max_sends
        self._epoch = EpochTracker("natpmp")
        self._outbox: list[tuple[bytes, Address]] = []
        self._addr_tx: Retransmitter | None = None
        self._map_tx: Retransmitter | None = None
        self._ip: str | None = None
        self._grant: tuple[int, int] | None = None  # (external port, lifetime) awaiting the IP
        self._renew_at: float | None = None
        self._deadline = now + timeout if timeout is not None else None
        self._request(now, internal_port if external_port is None else external_port,
                      max_sends=max_sends)

    # -- the sans-IO interface (done, datagrams_to_send: SansIoClient) ----------------------

    def get_timer(self) -> float | None:
        if self.done:
            return None
        times = [tx.next_send for tx in self._in_flight()]
        if self._deadline is not None:
            times.append(self._deadline)
        if self.state == "mapped" and self.mapping is not None:
            times.append(self.mapping.expires_at)
            if not self._in_flight() and self._renew_at is not None:
                times.append(self._renew_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        if self.state == "mapped" and self.mapping is not None:
            if now >= self.mapping.expires_at:
                self._end("expired", "mapping expired: renewals went unanswered")
                return
            if not self._in_flight() and self._renew_at is not None and now >= self._renew_at:
                self._request(now, self.mapping.external[1], max_sends=None)
                return
        if self._deadline is not None and now >= self._deadline:
            self._deadline_passed()
            return
        for tx in self._in_flight():
            if tx.exhausted and now >= tx.next_send:
                self._deadline_passed()
                return
        self._flush(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """Offer one datagram; True when it came from the gateway's NAT-PMP port (consumed)."""
        if not same_source(addr, self.server):
            return False
        if self.done:
            return True
        try:
            response = natpmp.decode_response(data)
        except MalformedMessage:
            return True
        self.answered = True
        if not self._epoch.observe(response.epoch, now) and self.state == "mapped":
            # The gateway rebooted and forgot us: ask again now (this answer may be to it).
            if not self._in_flight() and self.mapping is not None:
                self._request(now, self.mapping.external[1], max_sends=None)
        if response.opcode == natpmp.OP_EXTERNAL_ADDRESS:
            self._on_address(response, now)
        elif response.opcode == natpmp.OP_MAP_UDP:
            self._on_map(response, now)
        return True

    def delete(self, now: float, timeout: float = 2.0) -> None:
        """Ask the gateway to drop the mapping (lifetime 0, external port 0)."""
        if self.state in ("deleting", "deleted"):
            return
        had_contact = self.answered or self.state == "requesting"
        self.mapping = None
        self._addr_tx = None
        self._map_tx = None
        if not had_contact:
            self.state = "deleted"
            return
        self.state = "deleting"
        self._deadline = now + timeout
        self._map_tx = Retransmitter(natpmp.map_request(self.internal_port, 0, 0), now,
                                     self._backoff)
        self._flush(now)

    # -- internals ---------------------------------------------------------------------------

    def _in_flight(self) -> list[Retransmitter]:
        return [tx for tx in (self._addr_tx, self._map_tx) if tx is not None]

    def _flush(self, now: float) -> None:
        for tx in self._in_flight():
            if tx.due(now):
                self._outbox.append((tx.data, self.server))
                tx.mark_sent(now)

    def _request(self, now: float, external_port: int, *, max_sends: int | None) -> None:
        # The address is asked again with every renewal: it is how we notice it changed.
        self._ip, self._grant = None, None
        self._addr_tx = Retransmitter(natpmp.external_address_request(), now, self._backoff,
                                      max_sends)
        self._map_tx = Retransmitter(
            natpmp.map_request(self.internal_port, external_port, self.lifetime), now,
            self._backoff, max_sends)
        self._flush(now)

    def _on_address(self, response: natpmp.Response, now: float) -> None:
        if self._addr_tx is None:
            return
        if not response.ok:
            self._refused(f"external address request: {natpmp.result_name(response.result)}",
                          response.result)
        elif response.external_ip in (None, "0.0.0.0"):
            self._refused("gateway has no external address", natpmp.NETWORK_FAILURE)
        else:
            self._ip, self._addr_tx = response.external_ip, None
            self._complete(now)

    def _on_map(self, response: natpmp.Response, now: float) -> None:
        if self.state == "deleting":
            if response.ok and response.lifetime == 0:
                self._map_tx = None
                self.state = "deleted"
            elif not response.ok:
                self._end("deleted", f"delete refused: {natpmp.result_name(response.result)}")
            return
        if self._map_tx is None:
            return
        if not response.ok:
            self._refused(f"map request: {natpmp.result_name(response.result)}", response.result)
        elif response.internal_port == self.internal_port and response.lifetime > 0:
            self._grant, self._map_tx = (response.external_port, response.lifetime), None
            self._complete(now)

    def _complete(self, now: float) -> None:
        if self._ip is None or self._grant is None:
            return
        port, lifetime = self._grant
        self.mapping = PortMapping("natpmp", (self._ip, port), (self.client_ip, self.internal_port),
                                   self.server[0], float(lifetime), now)
        self.state = "mapped"
        self.error = None
        self._deadline = None
        self._renew_at = now + lifetime / 2

    def _refused(self, reason: str, code: int) -> None:
        if self.state == "mapped" and code in _TRANSIENT:
            self.error = reason  # keep retransmitting the renewal until the mapping expires
            return
        self._end("failed", reason)

    def _deadline_passed(self) -> None:
        if self.state == "deleting":
            self._end("deleted", "delete unconfirmed: no answer from the gateway")
        elif self.answered:
            self._end("failed", "gateway answered but did not complete the mapping in time")
        else:
            self._end("failed", "no answer from the gateway")

    def _end(self, state: State, reason: str) -> None:
        self.state = state
        self.error = reason
        self.mapping = None
        self._addr_tx = None
        self._map_tx = None
