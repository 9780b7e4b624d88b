"""The hardened STUN codec: published vectors, structural checks, builders, fuzzing."""

from __future__ import annotations

import ipaddress
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from macula.wire.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    StunError,
    StunIntegrityError,
    StunUnknownAttributes,
    binding_error,
    binding_request,
    binding_success,
    is_stun,
    mapped_address,
    parse_message,
)

# RFC 5769 section 2: sample request (short-term credential) and the IPv4 / IPv6 responses.
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36"
    "000600096576746a3a6836765920202000080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f722000200008"
    "0001a147e112a643000800142b91f599fd9e90c3"
    "8c7489f92af9ba53f06be7d780280004c07d4c96"
)
RFC5769_RESPONSE_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f722000200014"
    "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275"
    "bfe3ed4180280004c8fb0b4c"
)

TID = bytes(range(12))


def raw(
    msg_type: int,
    attrs: list[tuple[int, bytes]],
    *,
    tid: bytes = TID,
    fingerprint: bool = True,
) -> bytes:
    """Encode a message by hand, so tests can build what the builders refuse to."""
    body = b""
    for attr_type, value in attrs:
        body += struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    if fingerprint:
        header = struct.pack("!HHI12s", msg_type, len(body) + 8, 0x2112A442, tid)
        crc = zlib.crc32(header + body) ^ 0x5354554E
        body += struct.pack("!HHI", 0x8028, 4, crc)
    return struct.pack("!HHI12s", msg_type, len(body), 0x2112A442, tid) + body


def xor_v4(ip: str, port: int) -> bytes:
    x = struct.pack("!H", port ^ 0x2112) + bytes(
        a ^ b for a, b in zip(ipaddress.IPv4Address(ip).packed, b"\x21\x12\xa4\x42")
    )
    return b"\x00\x01" + x


# -- published vectors ---------------------------------------------------------------------


def test_rfc5769_request() -> None:
    msg = parse_message(RFC5769_REQUEST, integrity_key=RFC5769_PASSWORD)
    assert (msg.message_method, msg.message_class) == (Method.BINDING, Class.REQUEST)
    assert msg.transaction_id == RFC5769_TID
    assert msg.attributes["SOFTWARE"] == "STUN test client"
    assert msg.attributes["USERNAME"] == "evtj:h6vY"
    assert msg.attributes["PRIORITY"] == 0x6E0001FF
    assert msg.attributes["ICE-CONTROLLED"] == 0x932FF9B151263B36
    with pytest.raises(StunIntegrityError):
        parse_message(RFC5769_REQUEST, integrity_key=b"wrong password")


def test_rfc5769_ipv4_response() -> None:
    msg = parse_message(RFC5769_RESPONSE_V4, integrity_key=RFC5769_PASSWORD)
    assert msg.message_class == Class.RESPONSE
    assert msg.attributes["SOFTWARE"] == "test vector"
    assert mapped_address(msg) == ("192.0.2.1", 32853)


def test_rfc5769_ipv6_response() -> None:
    msg = parse_message(RFC5769_RESPONSE_V6, integrity_key=RFC5769_PASSWORD)
    assert mapped_address(msg) == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_RESPONSE_V4, RFC5769_RESPONSE_V6])
def test_rfc5769_every_single_bit_flip_is_caught(vector: bytes) -> None:
    # FINGERPRINT and MESSAGE-INTEGRITY cover every byte, so any flip is rejected, except
    # in the FINGERPRINT attribute's type: that turns it into an unknown attribute after
    # MESSAGE-INTEGRITY, which RFC 8489 says to ignore, leaving the authenticated content.
    original = parse_message(vector, integrity_key=RFC5769_PASSWORD).attributes
    fingerprint_type = range(len(vector) - 8, len(vector) - 6)
    for i in range(len(vector) * 8):
        mutated = bytearray(vector)
        mutated[i // 8] ^= 0x80 >> (i % 8)
        if i // 8 in fingerprint_type:
            attrs = parse_message(bytes(mutated), integrity_key=RFC5769_PASSWORD).attributes
            assert attrs == {k: v for k, v in original.items() if k != "FINGERPRINT"}
            continue
        with pytest.raises(StunError):
            parse_message(bytes(mutated), integrity_key=RFC5769_PASSWORD)


# -- structural checks ---------------------------------------------------------------------


def test_is_stun() -> None:
    assert is_stun(RFC5769_REQUEST)
    assert is_stun(binding_request())
    assert not is_stun(b"")
    assert not is_stun(RFC5769_REQUEST[:19])
    assert not is_stun(b"\x40" + RFC5769_REQUEST[1:])  # QUIC short header range
    assert not is_stun(RFC5769_REQUEST[:4] + b"\x00\x00\x00\x00" + RFC5769_REQUEST[8:])


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "empty"),
        (RFC5769_REQUEST[:19], "short header"),
        (b"\x40" + RFC5769_REQUEST[1:], "first bits"),
        (b"\x80" + RFC5769_REQUEST[1:], "first bits"),
        (RFC5769_REQUEST[:4] + b"\x21\x12\xa4\x43" + RFC5769_REQUEST[8:], "cookie"),
        (RFC5769_REQUEST[:-1], "length mismatch"),
        (RFC5769_REQUEST + b"\x00\x00\x00\x00", "length mismatch"),
        (struct.pack("!HHI12s", 1, 2, 0x2112A442, TID) + b"\x00\x00", "length not multiple of 4"),
        (RFC5769_REQUEST[:-1] + b"\x00", "fingerprint"),
    ],
)
def test_structurally_bad(data: bytes, why: str) -> None:
    with pytest.raises(StunError):
        parse_message(data)


def test_attribute_checks() -> None:
    # An attribute whose length runs past the end of the message.
    overrun = raw(0x0001, [], fingerprint=False) + struct.pack("!HH", 0x8022, 8) + b"abcd"
    overrun = overrun[:2] + struct.pack("!H", 8) + overrun[4:]
    with pytest.raises(StunError, match="overruns"):
        parse_message(overrun)
    # FINGERPRINT must be last.
    fp_first = raw(0x0001, [(0x8028, b"\x00\x00\x00\x00"), (0x8022, b"abcd")], fingerprint=False)
    with pytest.raises(StunError):
        parse_message(fp_first)
    # Values aioice's decoders choke on: bad UTF-8, short integers, bad address family.
    for attrs in (
        [(0x8022, b"\xff\xfe")],
        [(0x0024, b"\x01\x02")],
        [(0x0020, b"\x00\x07\x00\x00\x00\x00\x00\x00")],
        [(0x0020, b"\x00\x01\x00")],
        [(0x0009, b"\x00\x00\x04\xff")],  # error number 255: not a valid code
        [(0x0009, b"\x00\x00\x07\x00")],  # class 7
        [(0x0008, b"\x00" * 19)],  # MESSAGE-INTEGRITY of the wrong size
        [(0x000A, b"\x00\x01\x00")],  # UNKNOWN-ATTRIBUTES of odd length
    ):
        with pytest.raises(StunError):
            parse_message(raw(0x0001, attrs))
    # Unknown method.
    with pytest.raises(StunError):
        parse_message(raw(0x000B, []))


def test_unknown_comprehension_required_attributes() -> None:
    data = raw(0x0001, [(0x7F00, b"\x12\x34\x00\x00"), (0x8055, b"ok"), (0x0026, b"\x00" * 8)])
    with pytest.raises(StunUnknownAttributes) as info:
        parse_message(data)
    assert info.value.attributes == [0x7F00, 0x0026]  # the optional 0x8055 is not listed
    assert info.value.message.transaction_id == TID
    assert isinstance(info.value, StunError)
    # Comprehension-optional unknowns alone are simply ignored.
    assert parse_message(raw(0x0001, [(0x8055, b"ok")])).message_class == Class.REQUEST


def test_attributes_after_message_integrity_are_ignored() -> None:
    msg = Message(Method.BINDING, Class.REQUEST, TID, {"USERNAME": "a:b"})
    msg.add_message_integrity(b"key")
    data = bytes(msg)
    # Splice an unknown comprehension-required attribute between MI and FINGERPRINT.
    body = data[20:-8] + struct.pack("!HH", 0x0027, 4) + b"\x00" * 4
    header = struct.pack("!HHI12s", 0x0001, len(body) + 8, 0x2112A442, TID)
    crc = zlib.crc32(header + body) ^ 0x5354554E
    spliced = header + body + struct.pack("!HHI", 0x8028, 4, crc)
    assert parse_message(spliced, integrity_key=b"key").attributes["USERNAME"] == "a:b"


def test_first_duplicate_wins() -> None:
    data = raw(0x0101, [(0x0020, xor_v4("192.0.2.1", 1000)), (0x0020, xor_v4("192.0.2.99", 9999))])
    assert mapped_address(parse_message(data)) == ("192.0.2.1", 1000)


def test_integrity_key_requires_message_integrity() -> None:
    with pytest.raises(StunIntegrityError):
        parse_message(binding_request(), integrity_key=b"key")


# -- builders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change_ip, change_port, flags",
    [(False, False, None), (True, False, CHANGE_IP), (False, True, CHANGE_PORT), (True, True, 6)],
)
def test_binding_request(change_ip: bool, change_port: bool, flags: int | None) -> None:
    data = binding_request(TID, change_ip=change_ip, change_port=change_port)
    msg = parse_message(data)
    assert (msg.message_method, msg.message_class, msg.transaction_id) == (
        Method.BINDING,
        Class.REQUEST,
        TID,
    )
    assert msg.attributes.get("CHANGE-REQUEST") == flags
    assert "FINGERPRINT" in msg.attributes
    assert msg.attributes["SOFTWARE"].startswith("macula")
    # The CHANGE-REQUEST wire format is RFC 5780's: type 0x0003, 4 bytes of flags.
    if flags is not None:
        assert struct.pack("!HHI", 0x0003, 4, flags) in data


def test_binding_request_defaults() -> None:
    a, b = parse_message(binding_request()), parse_message(binding_request(software=None))
    assert a.transaction_id != b.transaction_id
    assert "SOFTWARE" not in b.attributes
    with pytest.raises(ValueError):
        binding_request(b"short")


def test_binding_success_attributes() -> None:
    request = parse_message(binding_request(TID))
    data = binding_success(
        request,
        ("198.51.100.7", 40000),
        response_origin=("203.0.113.10", 3478),
        other_address=("203.0.113.20", 3479),
    )
    msg = parse_message(data)
    assert msg.message_class == Class.RESPONSE and msg.transaction_id == TID
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == ("198.51.100.7", 40000)
    assert msg.attributes["RESPONSE-ORIGIN"] == ("203.0.113.10", 3478)
    assert msg.attributes["OTHER-ADDRESS"] == ("203.0.113.20", 3479)
    assert "FINGERPRINT" in msg.attributes
    minimal = parse_message(binding_success(request, ("198.51.100.7", 1)))
    assert set(minimal.attributes) == {"XOR-MAPPED-ADDRESS", "FINGERPRINT"}
    with pytest.raises(ValueError):
        binding_success(request, ("not an ip", 1))


def test_binding_error_with_unknown_attributes() -> None:
    request = parse_message(binding_request(TID))
    msg = parse_message(binding_error(request, 420, "Unknown Attribute", [0x0027, 0x0026, 0x7777]))
    assert msg.message_class == Class.ERROR and msg.transaction_id == TID
    assert msg.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert msg.attributes["UNKNOWN-ATTRIBUTES"] == (0x0027, 0x0026, 0x7777)
    plain = parse_message(binding_error(request, 400, "Bad Request"))
    assert plain.error_code == 400 and "UNKNOWN-ATTRIBUTES" not in plain.attributes
    with pytest.raises(ValueError):
        binding_error(request, 200, "OK")


# -- properties ----------------------------------------------------------------------------

addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(0, 65535),
)
tids = st.binary(min_size=12, max_size=12)


@settings(max_examples=200, deadline=None)
@given(mapped=addresses, origin=addresses, other=addresses, tid=tids)
def test_success_round_trip(mapped, origin, other, tid) -> None:  # type: ignore[no-untyped-def]
    request = parse_message(binding_request(tid))
    assert request.transaction_id == tid
    data = binding_success(request, mapped, response_origin=origin, other_address=other)
    msg = parse_message(data)
    assert msg.transaction_id == tid
    assert mapped_address(msg) == mapped
    assert msg.attributes["RESPONSE-ORIGIN"] == origin
    assert msg.attributes["OTHER-ADDRESS"] == other


@settings(max_examples=100, deadline=None)
@given(tid=tids, code=st.integers(300, 699), reason=st.text(max_size=60), unknown=st.lists(st.integers(0, 0x7FFF), max_size=9))
def test_error_round_trip(tid, code, reason, unknown) -> None:  # type: ignore[no-untyped-def]
    request = parse_message(binding_request(tid))
    msg = parse_message(binding_error(request, code, reason, unknown))
    assert msg.transaction_id == tid
    assert msg.attributes["ERROR-CODE"] == (code, reason)
    assert msg.attributes.get("UNKNOWN-ATTRIBUTES", ()) == tuple(unknown)


def parse_or_stun_error(data: bytes) -> None:
    """The fuzz property: StunError or a message that aioice can serialise again."""
    try:
        msg = parse_message(data)
    except StunError:
        return
    bytes(msg)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    parse_or_stun_error(data)


# Attribute types aioice decodes, plus a few it does not, with arbitrary values.
ATTR_TYPES = [
    0x0001, 0x0003, 0x0004, 0x0005, 0x0006, 0x0008, 0x0009, 0x000A, 0x000C, 0x000D, 0x0012,
    0x0013, 0x0014, 0x0015, 0x0016, 0x0019, 0x0020, 0x0024, 0x0025, 0x0026, 0x0027, 0x8022,
    0x8028, 0x8029, 0x802A, 0x802B, 0x802C, 0x8055,
]  # fmt: skip
attrs = st.lists(
    st.tuples(st.sampled_from(ATTR_TYPES), st.binary(max_size=24)), max_size=6
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg_type=st.one_of(st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x0003, 0x0113]), st.integers(0, 0x3FFF)),
    attributes=attrs,
    fingerprint=st.booleans(),
    tid=tids,
)
def test_fuzz_well_framed_attributes(msg_type, attributes, fingerprint, tid) -> None:  # type: ignore[no-untyped-def]
    # Correct framing gets the bytes past the header checks and into aioice's decoders.
    parse_or_stun_error(raw(msg_type, attributes, tid=tid, fingerprint=fingerprint))


VALID = [
    RFC5769_REQUEST,
    RFC5769_RESPONSE_V4,
    RFC5769_RESPONSE_V6,
    binding_request(TID, change_ip=True, change_port=True),
    binding_success(
        parse_message(binding_request(TID)),
        ("2001:db8::1", 5),
        response_origin=("192.0.2.1", 3478),
        other_address=("192.0.2.2", 3479),
    ),
    binding_error(parse_message(binding_request(TID)), 420, "Unknown", [0x27]),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i : i + draw(st.integers(1, 8))]
    if draw(st.booleans()) and len(data) >= 4:
        # Repair the length field so the mutation reaches the attribute walk.
        data[2:4] = struct.pack("!H", max(len(data) - 20, 0) & 0xFFFF)
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_fuzz_mutated_valid_messages(data: bytes) -> None:
    parse_or_stun_error(data)
