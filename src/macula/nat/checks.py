"""Connectivity checks between two nodes: STUN Binding, shaped as ICE checks (RFC 8445 7.2).

A check carries USERNAME "<to-node>:<from-node>", MESSAGE-INTEGRITY under the punch key both
nodes got from the gateway for this attempt, and FINGERPRINT. Only a node holding the key
can make a check or an answer validate, so a stray or forged packet cannot steer a session
onto a path. The answer's XOR-MAPPED-ADDRESS tells the checker where it was seen from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aioice.stun import Class, Message, Method

from ..identity import NodeId
from ..net.endpoint import Address
from ..wire.stun import StunError, parse_message

KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class Check:
    """A check (request) or its answer, before integrity is verified."""
    message: Message
    to_node: NodeId
    from_node: NodeId
    is_request: bool


def check_request(to_node: NodeId, from_node: NodeId, key: bytes,
                  transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """(datagram, transaction id) of one check from `from_node` to `to_node`."""
    tid = transaction_id or os.urandom(12)
    message = Message(message_method=Method.BINDING, message_class=Class.REQUEST,
                      transaction_id=tid)
    message.attributes["USERNAME"] = f"{to_node.text}:{from_node.text}"
    message.add_message_integrity(key)
    message.add_fingerprint()
    return bytes(message), tid


def check_response(request: Check, seen_from: Address, key: bytes) -> bytes:
    message = Message(message_method=Method.BINDING, message_class=Class.RESPONSE,
                      transaction_id=request.message.transaction_id)
    # Answers name the pair the same way round as the request, so the checker can find it.
    message.attributes["USERNAME"] = f"{request.to_node.text}:{request.from_node.text}"
    message.attributes["XOR-MAPPED-ADDRESS"] = seen_from
    message.add_message_integrity(key)
    message.add_fingerprint()
    return bytes(message)


def parse_check(data: bytes) -> Check:
    """Parse without verifying integrity (the key depends on who sent it). Raises StunError."""
    message = parse_message(data)
    if message.message_method != Method.BINDING or message.message_class not in (
            Class.REQUEST, Class.RESPONSE):
        raise StunError("not a Binding request or success response")
    username = message.attributes.get("USERNAME")
    if not isinstance(username, str) or username.count(":") != 1:
        raise StunError("check without a node-pair USERNAME")
    to_text, from_text = username.split(":")
    try:
        to_node, from_node = NodeId.parse(to_text), NodeId.parse(from_text)
    except ValueError as exc:
        raise StunError(f"bad node id in USERNAME: {exc}") from None
    return Check(message, to_node, from_node, message.message_class == Class.REQUEST)


def verify(check: Check, key: bytes) -> bool:
    try:
        return check.message.check_message_integrity(key)
    except Exception:  # aioice recomputes over the raw bytes; anything odd is a failure
        return False
