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


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
valid_messages = st.one_of(
    st.builds(control.Keepalive, st.integers(0, 2**40)),
    st.builds(control.Lookup, st.integers(0, 2**31), st.text(max_size=40)),
    st.builds(control.Error, st.text(max_size=20), st.text(max_size=200), st.none()),
    st.builds(control.Hello, st.integers(0, 9), st.text(max_size=30), st.booleans(),
              st.lists(st.text(max_size=30), max_size=4), st.booleans()),
    st.builds(control.Punch, st.text(max_size=30), st.integers(0, 9), st.text(max_size=8),
              st.text(max_size=8), st.text(max_size=8), st.text(max_size=8),
              st.lists(st.text(max_size=60), max_size=4), finite, st.booleans(),
              st.none() | st.text(max_size=10), st.none() | st.text(max_size=10), st.booleans()),
    st.builds(control.PunchResult, st.text(max_size=30), st.integers(0, 9),
              st.text(max_size=10), st.text(max_size=10), st.none() | finite),
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
    good = control.encode(control.Keepalive(7))
    decoder = control.ControlDecoder()
    out = list(decoder.feed(struct.pack("!I", len(body)) + body + good))
    assert out == [control.Keepalive(7)]
    assert decoder.malformed == 1


def test_oversize_control_frame_breaks_the_stream():
    decoder = control.ControlDecoder()
    with pytest.raises(control.ControlStreamError, match=str(control.MAX_MESSAGE)):
        list(decoder.feed(struct.pack("!I", control.MAX_MESSAGE + 1)))


def test_unknown_fields_are_refused_once_at_the_edge():
    body = json.dumps({"type": "keepalive", "seq": 1, "future": [1, 2]}).encode()
    with pytest.raises(control.ControlError, match="unknown field 'future'"):
        control.decode_body(body)


def test_list_fields_hold_strings_only():
    body = json.dumps({"type": "candidates", "peer": "x", "ufrag": "u", "lines": [1],
                       "end": True}).encode()
    with pytest.raises(control.ControlError, match="list of strings"):
        control.decode_body(body)


def test_decoded_messages_are_typed_and_frozen():
    message = control.decode_body(b'{"type":"lookup_result","req":3,"node_id":"n","online":true}')
    assert message == control.LookupResult(req=3, node_id="n", online=True, observed=None)
    with pytest.raises(AttributeError):
        message.req = 4  # type: ignore[misc]


def test_the_schema_is_read_off_the_dataclasses():
    assert set(control.SCHEMAS) == set(control.MESSAGES)
    assert control.SCHEMAS["punch"]["start_in_ms"] == ((int, float), True)
    assert control.SCHEMAS["hello"]["hard_nat"] == ((bool,), False)
