"""ICE connectivity-check messages (RFC 8445 7.1, 7.3): STUN Binding built with aioice.stun,
read through the hardened parser in macula.wire.stun.

Requests carry USERNAME "<remote ufrag>:<local ufrag>", PRIORITY, ICE-CONTROLLING or
ICE-CONTROLLED with the tie-breaker, optionally USE-CANDIDATE, then MESSAGE-INTEGRITY
under the *remote* password and FINGERPRINT. Answers carry XOR-MAPPED-ADDRESS (or
ERROR-CODE) and MESSAGE-INTEGRITY under the answerer's own password.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aioice.stun import Class, Message, Method

from macula.net.endpoint import Address

from .candidate import MAX_PRIORITY

__all__ = ["CheckRequest", "ROLE_CONFLICT", "build_error", "build_request", "build_success",
           "read_request"]

ROLE_CONFLICT = 487
UNKNOWN_ATTRIBUTE = 420
_MAX_TIE_BREAKER = 2**64 - 1


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """The ICE fields of an authenticated Binding request."""
    username: str
    priority: int
    controlling: bool
    tie_breaker: int
    use_candidate: bool


def build_request(*, transaction_id: bytes, username: str, key: bytes, priority: int,
                  controlling: bool, tie_breaker: int, use_candidate: bool) -> bytes:
    attributes: dict[str, Any] = {"USERNAME": username, "PRIORITY": priority}
    attributes["ICE-CONTROLLING" if controlling else "ICE-CONTROLLED"] = tie_breaker
    if use_candidate:
        attributes["USE-CANDIDATE"] = None
    message = Message(Method.BINDING, Class.REQUEST, transaction_id, attributes)
    message.add_message_integrity(key)  # also appends FINGERPRINT
    return bytes(message)


def build_success(transaction_id: bytes, mapped: Address, key: bytes) -> bytes:
    message = Message(Method.BINDING, Class.RESPONSE, transaction_id,
                      {"XOR-MAPPED-ADDRESS": (mapped[0], mapped[1])})
    message.add_message_integrity(key)
    return bytes(message)


def build_error(transaction_id: bytes, code: int, reason: str, key: bytes,
                unknown: Iterable[int] = ()) -> bytes:
    attributes: dict[str, Any] = {"ERROR-CODE": (code, reason)}
    unknown = tuple(unknown)
    if unknown:
        attributes["UNKNOWN-ATTRIBUTES"] = unknown  # registered by macula.wire.stun
    message = Message(Method.BINDING, Class.ERROR, transaction_id, attributes)
    message.add_message_integrity(key)
    return bytes(message)


def read_request(message: Message) -> CheckRequest | None:
    """The ICE fields, or None when a required one is missing or out of range.

    RFC 8445 7.1 makes PRIORITY and exactly one role attribute mandatory; a request
    without them cannot be answered meaningfully (no prflx priority, no conflict check).
    """
    attrs = message.attributes
    username = attrs.get("USERNAME")
    priority = attrs.get("PRIORITY")
    controlling = attrs.get("ICE-CONTROLLING")
    controlled = attrs.get("ICE-CONTROLLED")
    if not isinstance(username, str):
        return None
    if not isinstance(priority, int) or not 1 <= priority <= MAX_PRIORITY:
        return None
    if (controlling is None) == (controlled is None):
        return None
    tie_breaker = controlling if controlling is not None else controlled
    if not isinstance(tie_breaker, int) or not 0 <= tie_breaker <= _MAX_TIE_BREAKER:
        return None
    return CheckRequest(username, priority, controlling is not None, tie_breaker,
                        "USE-CANDIDATE" in attrs)
