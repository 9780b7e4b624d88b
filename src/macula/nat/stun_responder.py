"""The gateway's STUN Binding responder (RFC 8489 + RFC 5780), sans-IO.

The gateway answers on two ports, and on two IPs where it has them, so nodes can tell
their NAT's mapping and filtering behaviour apart. This module only decides what to
answer and from which of the gateway's sockets; moving the bytes is the caller's job.
"""

from __future__ import annotations

from typing import NamedTuple

from macula.net.endpoint import Address
from macula.wire.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    StunError,
    StunUnknownAttributes,
    binding_error,
    binding_success,
    is_stun,
    parse_message,
)

from ..errors import InvalidValue

# A response is never bigger than this or the request, whichever is larger, so the
# responder cannot be used to amplify a spoofed flood. 548 is RFC 8489's safe UDP size
# for IPv4 (576 minus headers).
AMPLIFICATION_FLOOR = 548


class StunAnswer(NamedTuple):
    """What to send, from which of the server's sockets, and to which port of the
    requester's IP when it asked for another (RESPONSE-PORT; never another IP)."""

    data: bytes
    socket: int  # index into local_addresses
    port: int | None = None

    def destination(self, src: Address) -> Address:
        return (src[0], self.port) if self.port is not None else (src[0], src[1])


class StunResponder:
    """Answers STUN Binding requests arriving on any of the server's sockets.

    `local_addresses` lists the sockets as [(ip1, p1), (ip1, p2)] or
    [(ip1, p1), (ip1, p2), (ip2, p1), (ip2, p2)]: socket i has IP number i // 2 and port
    number i % 2, so "the other port" and "the other IP" are bit flips of the index.
    """

    def __init__(self, local_addresses: list[Address]) -> None:
        addrs = [(a[0], a[1]) for a in local_addresses]
        if len(addrs) not in (2, 4):
            raise InvalidValue("a STUN responder needs 2 or 4 local addresses")
        if addrs[0][0] != addrs[1][0] or addrs[0][1] == addrs[1][1]:
            raise InvalidValue("sockets 0 and 1 must share an IP and differ in port")
        if len(addrs) == 4:
            ip1, ip2 = addrs[0][0], addrs[2][0]
            if ip1 == ip2 or addrs[3][0] != ip2:
                raise InvalidValue("sockets 2 and 3 must share a second, different IP")
            if (addrs[2][1], addrs[3][1]) != (addrs[0][1], addrs[1][1]):
                raise InvalidValue("the second IP must listen on the same two ports")
        self.local_addresses: list[Address] = addrs
        self.requests = 0
        self.responses = 0
        self.malformed = 0
        self.errors = 0
        # Well-formed STUN that needs no answer: indications (keepalives), stray responses.
        self.ignored = 0
        # Answers suppressed because they would have been larger than allowed.
        self.oversized = 0

    @property
    def has_second_ip(self) -> bool:
        return len(self.local_addresses) == 4

    def handle(self, data: bytes, src: Address, received_on_index: int) -> StunAnswer | None:
        """The response to `data` from `src`, the index of the socket to send it from, and
        the port of src's IP to send it to when the request named one (RFC 5780
        RESPONSE-PORT: the binding-lifetime test). Returns None when nothing should be
        sent. Never raises on hostile input.
        """
        if not 0 <= received_on_index < len(self.local_addresses):
            raise InvalidValue(f"no local socket {received_on_index}")
        if not is_stun(data):
            self.malformed += 1
            return None
        try:
            request = parse_message(data)
        except StunUnknownAttributes as exc:
            if exc.message.message_class != Class.REQUEST:
                self.ignored += 1
                return None
            self.requests += 1
            return self._error(
                data, exc.message, received_on_index, 420, "Unknown Attribute", exc.attributes
            )
        except StunError:
            self.malformed += 1
            return None

        if request.message_class != Class.REQUEST:
            self.ignored += 1
            return None
        self.requests += 1
        if request.message_method != Method.BINDING:
            return self._error(data, request, received_on_index, 400, "Only Binding is served")

        flags = request.attributes.get("CHANGE-REQUEST", 0)
        send_index = received_on_index
        if flags & CHANGE_PORT:
            send_index ^= 1
        if flags & CHANGE_IP:
            if not self.has_second_ip:
                # RFC 5780 leaves this case loose; a clear 400 beats silently answering
                # from the wrong address, which a client would misread as filtering.
                return self._error(data, request, received_on_index, 400, "No alternate IP")
            send_index ^= 2

        other = self.local_addresses[received_on_index ^ 3] if self.has_second_ip else None
        response = binding_success(
            request,
            src,
            response_origin=self.local_addresses[send_index],
            other_address=other,
        )
        port = request.attributes.get("RESPONSE-PORT")
        return self._emit(data, response, send_index, port if isinstance(port, int) else None)

    def _error(
        self,
        data: bytes,
        request: Message,
        index: int,
        code: int,
        reason: str,
        unknown: list[int] | tuple[int, ...] = (),
    ) -> StunAnswer | None:
        response = binding_error(request, code, reason, unknown)
        out = self._emit(data, response, index)
        if out is not None:
            self.errors += 1
        return out

    def _emit(self, data: bytes, response: bytes, index: int,
              port: int | None = None) -> StunAnswer | None:
        if len(response) > max(len(data), AMPLIFICATION_FLOOR):
            self.oversized += 1
            return None
        self.responses += 1
        return StunAnswer(response, index, port)
