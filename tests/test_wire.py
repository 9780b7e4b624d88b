"""Codecs: relay frames, control messages, RFC 7983 demux. Property tests for every parser."""

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.wire import control, relay
from macula.wire.demux import Kind, classify

ids = st.binary(min_size=16, max_size=16)
tokens = st.binary(min_size=8, max_size=8)
payloads = st.binary(min_size=1, max_size=relay.MAX_PAYLOAD)


@given(tokens, ids, payloads)
def test_relay_to_gateway_round_trip(token, dst, payload):
    frame = relay.encode_to_gateway(token, dst, payload)
    assert classify(frame) is Kind.RELAY
    decoded = relay.decode_to_gateway(frame)
    assert (decoded.token, decoded.destination, decoded.payload) == (token, dst, payload)


@given(ids, payloads, ids)
def test_gateway_rewrite_gives_decodable_from_frame(dst, payload, src):
    frame = relay.encode_to_gateway(b"t" * 8, dst, payload)
    out = relay.rewrite_for_destination(frame, src)
    decoded = relay.decode_from_gateway(out)
    assert decoded.source == src and decoded.payload == payload


@given(st.binary(max_size=64))
def test_relay_decoders_raise_only_relay_frame_error(data):
    for decode in (relay.decode_to_gateway, relay.decode_from_gateway):
        try:
            decode(data)
        except relay.RelayFrameError:
            pass


def test_relay_payload_limit_named():
    with pytest.raises(relay.RelayFrameError, match=str(relay.MAX_PAYLOAD)):
        relay.encode_to_gateway(b"t" * 8, b"d" * 16, b"x" * (relay.MAX_PAYLOAD + 1))


@pytest.mark.parametrize("first,kind", [
    (0, Kind.STUN), (3, Kind.STUN), (0x30, Kind.RELAY), (0x31, Kind.RELAY),
    (64, Kind.QUIC), (127, Kind.QUIC), (192, Kind.QUIC), (255, Kind.QUIC),
    (4, Kind.UNKNOWN), (20, Kind.UNKNOWN), (128, Kind.UNKNOWN), (191, Kind.UNKNOWN),
])
def test_rfc7983_demux(first, kind):
    assert classify(bytes([first]) + b"rest") is kind


def test_channel_data_only_from_turn_server():
    assert classify(b"\x40\x00\x00\x04abcd") is Kind.QUIC
    assert classify(b"\x40\x00\x00\x04abcd", from_turn_server=True) is Kind.CHANNEL_DATA
    assert classify(b"") is Kind.UNKNOWN


valid_messages = st.one_of(
    st.builds(lambda s: {"type": "keepalive", "seq": s}, st.integers(0, 2**40)),
    st.builds(lambda r, n: {"type": "lookup", "req": r, "node_id": n},
              st.integers(0, 2**31), st.text(max_size=40)),
    st.builds(lambda c, m: {"type": "error", "code": c, "message": m, "req": None},
              st.text(max_size=20), st.text(max_size=200)),
    st.builds(lambda v, n, t: {"type": "hello", "version": v, "node_id": n, "nat_traversal": t},
              st.integers(0, 9), st.text(max_size=30), st.booleans()),
)


@given(st.lists(valid_messages, max_size=8), st.integers(1, 50))
def test_control_stream_reassembles_any_chunking(messages, chunk):
    stream = b"".join(control.encode(m) for m in messages)
    decoder = control.ControlDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i:i + chunk]))
    assert out == messages
    assert decoder.malformed == 0


@given(st.binary(max_size=300))
def test_control_decoder_never_crashes(data):
    decoder = control.ControlDecoder()
    try:
        list(decoder.feed(data))
    except control.ControlStreamError:
        pass


@pytest.mark.parametrize("body", [
    b"not json", b"[1,2]", b'{"type": "nope"}', b'{"type": "keepalive"}',
    b'{"type": "keepalive", "seq": true}', b'{"type": "lookup", "req": 1, "node_id": 5}',
    b"\xff\xfe", b"[" * 5000,
])
def test_bad_control_messages_are_counted_and_skipped(body):
    good = control.encode({"type": "keepalive", "seq": 7})
    decoder = control.ControlDecoder()
    out = list(decoder.feed(struct.pack("!I", len(body)) + body + good))
    assert out == [{"type": "keepalive", "seq": 7}]
    assert decoder.malformed == 1


def test_oversize_control_frame_breaks_the_stream():
    decoder = control.ControlDecoder()
    with pytest.raises(control.ControlStreamError, match=str(control.MAX_MESSAGE)):
        list(decoder.feed(struct.pack("!I", control.MAX_MESSAGE + 1)))


def test_unknown_fields_are_ignored_for_forward_compatibility():
    body = json.dumps({"type": "keepalive", "seq": 1, "future": [1, 2]}).encode()
    assert control.decode_body(body)["seq"] == 1
