"""What every parser must do with bytes from strangers: one oracle per parser.

An oracle takes raw bytes and returns quietly, or raises: `Finding` when a property fails,
anything else when the code under test let an exception escape. The atheris runner
(fuzz/run.py) and the hypothesis tests (tests/test_fuzz_properties.py) drive these same
functions, so an input found by either engine replays in the other:

    python -c "import sys; sys.path.insert(0, 'fuzz'); import oracles; \\
               oracles.ORACLES['control_stream'](open('crash-...', 'rb').read())"

`SEEDS` gives each oracle a few well-formed inputs to start from, so the fuzzer spends its
time past the first length check.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import os
import pathlib
import random
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable

from macula import config as cfg
from macula.gateway.core import GatewayCore
from macula.gateway.limits import GatewayLimits
from macula.gateway.options import GatewayOptions
from macula.gateway.registry import NodeEntry
from macula.identity import Identity, NodeId
from macula.nat.stun_responder import AMPLIFICATION_FLOOR, StunResponder
from macula.wire import control, demux, relay, stun

try:  # ICE is being written alongside: fuzz it where it exists, skip it where not.
    from macula.ice.agent import IceAgent
    from macula.ice.candidate import Candidate, CandidateError
except ImportError as exc:  # pragma: no cover - depends on the tree's state
    Candidate = IceAgent = None  # type: ignore[assignment,misc]
    _ICE_MISSING: str | None = f"macula.ice is not importable: {exc}"
else:
    _ICE_MISSING = None


class Finding(AssertionError):
    """A property failed; the input that got here is the reproducer."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what)


KEY = b"fuzz-integrity-key"
CLIENT = ("203.0.113.7", 40000)
_MESSAGE_INTEGRITY = 0x0008
_USERNAME = 0x0006


# ---------------------------------------------------------------- STUN
_RESPONDER = StunResponder([("192.0.2.10", 3478), ("192.0.2.10", 3479),
                            ("198.51.100.10", 3478), ("198.51.100.10", 3479)])


def _stun_or_none(data: bytes, key: bytes | None) -> stun.Message | None:
    try:
        return stun.parse_message(data, integrity_key=key)
    except stun.StunError:
        return None


def sign(data: bytes, key: bytes, *, username: str | None = None) -> bytes | None:
    """`data` as a STUN message with a valid MESSAGE-INTEGRITY appended (and USERNAME put
    first when given: the first of duplicates counts), so keyed parsing gets past the HMAC
    a fuzzer cannot forge; None if there is no header to keep."""
    if len(data) < stun.HEADER_LENGTH:
        return None
    body = data[stun.HEADER_LENGTH:]
    body += b"\x00" * (-len(body) % 4)
    if username is not None:
        name = username.encode()
        body = (struct.pack("!HH", _USERNAME, len(name)) + name + b"\x00" * (-len(name) % 4)
                + body)
    header = (bytes([data[0] & 0x3F, data[1]]) + struct.pack("!H", len(body) + 24)
              + struct.pack("!I", stun.MAGIC_COOKIE) + data[8:20])
    mac = hmac.new(key, header + body, hashlib.sha1).digest()
    return header + body + struct.pack("!HH", _MESSAGE_INTEGRITY, 20) + mac


def stun_message(data: bytes) -> None:
    """parse_message raises only StunError, with or without a key; a message that passes
    the keyed checks passes the plain ones; the responder never raises, answers no more
    than max(request, AMPLIFICATION_FLOOR) bytes, never to another IP, and its answers
    parse."""
    for candidate in (data, sign(data, KEY)):
        if candidate is None:
            continue
        keyed = _stun_or_none(candidate, KEY)
        plain = _stun_or_none(candidate, None)
        _expect(keyed is None or plain is not None, "passes with the key but not without")
    for index in range(4):
        answer = _RESPONDER.handle(data, CLIENT, index)
        if answer is None:
            continue
        response, out_index = answer.data, answer.socket
        _expect(0 <= out_index < 4, f"answer from socket {out_index}")
        _expect(answer.destination(CLIENT)[0] == CLIENT[0], "answer to another address")
        _expect(len(response) <= max(len(data), AMPLIFICATION_FLOOR),
                f"{len(response)}-byte answer to a {len(data)}-byte request")
        try:
            parsed = stun.parse_message(response)
        except stun.StunError as exc:
            raise Finding(f"the responder's own answer does not parse: {exc}") from None
        _expect(parsed.transaction_id == data[8:20], "answer to another transaction")


# ---------------------------------------------------------------- connectivity checks
UFRAG, PWD = "fuzzUFRG", "fuzzfuzzfuzzfuzzfuzzfuzz"


def connectivity_check(data: bytes) -> None:
    """IceAgent.receive (the parser of RFC 8445 checks and answers) never raises on any
    datagram and returns a bool; whatever it sends back goes to the check's source and
    parses as STUN authenticated under our password. Each input is offered twice: as is,
    and re-signed as a check addressed to us, so the fuzzer gets past the HMAC."""
    if IceAgent is None:
        return
    agent = IceAgent(UFRAG, PWD, controlling=bool(data[:1] and data[0] & 1),
                     tie_breaker=0x1234_5678_9ABC, now=0.0)
    agent.add_local_candidate(Candidate.host("192.0.2.10", 4000))
    for candidate in (data, sign(data, PWD.encode(), username=f"{UFRAG}:peer")):
        if candidate is None:
            continue
        _expect(agent.receive(candidate, CLIENT, 0.0) in (True, False), "receive not a bool")
        for out, to, _via in agent.datagrams_to_send():
            _expect(to == CLIENT, f"answered a check from {CLIENT} towards {to}")
            try:
                answer = stun.parse_message(out)
            except stun.StunError as exc:
                raise Finding(f"the agent sent a datagram that does not parse: {exc}") from None
            if answer.message_class != stun.Class.REQUEST:
                _expect(answer.check_message_integrity(PWD.encode()),
                        "an answer not authenticated under our password")


# ---------------------------------------------------------------- control protocol
def _feed(chunks: list[bytes]) -> tuple[list[str], int, bool]:
    """(messages as canonical JSON, malformed count, framing broken) after feeding."""
    decoder = control.ControlDecoder()
    messages: list[str] = []
    broken = False
    try:
        for chunk in chunks:
            for message in decoder.feed(chunk):
                as_sent = control.to_dict(message)
                control.validate(as_sent)
                messages.append(json.dumps(as_sent, sort_keys=True))
    except control.ControlStreamError:
        broken = True
    _expect(len(decoder._buffer) <= 4 + control.MAX_MESSAGE + max(map(len, chunks), default=0),
            "the decoder buffers more than one frame")
    return messages, decoder.malformed, broken


def control_stream(data: bytes) -> None:
    """ControlDecoder.feed raises only ControlStreamError, whatever the chunking; how the
    stream is cut never changes what comes out; every message it yields is valid and
    survives encode -> decode unchanged."""
    if not data:
        return
    rng = random.Random(data[0])  # the first byte picks the chunking
    body = data[1:]
    chunks, pos = [], 0
    while pos < len(body):
        step = rng.choice((1, 2, 3, 4, 5, 7, 13, 64, 1000))
        chunks.append(body[pos:pos + step])
        pos += step
    whole = _feed([body])
    _expect(_feed(chunks) == whole, "chunking changed the decoded stream")
    for text in whole[0]:
        message = json.loads(text)
        try:
            frame = control.encode(message)
        except control.ControlError:
            continue  # re-escaped non-ASCII can outgrow MAX_MESSAGE: refused, not mangled
        again = control.to_dict(control.decode_body(frame[4:]))
        _expect(json.dumps(again, sort_keys=True) == text, "encode/decode changed a message")


# ---------------------------------------------------------------- relay frames
_SOURCE = bytes(range(16))


def relay_frames(data: bytes) -> None:
    """decode_* raise only RelayFrameError; what they accept re-encodes to the same bytes,
    and the gateway's hot-path rewrite equals decode + encode_from_gateway."""
    demux.classify(data)
    demux.classify(data, from_turn_server=True)
    try:
        to_gw = relay.decode_to_gateway(data)
    except relay.RelayFrameError:
        pass
    else:
        _expect(relay.encode_to_gateway(to_gw.token, to_gw.destination, to_gw.payload) == data,
                "to-gateway frame does not round-trip")
        rewritten = relay.rewrite_for_destination(data, _SOURCE)
        _expect(rewritten == relay.encode_from_gateway(_SOURCE, to_gw.payload),
                "hot-path rewrite differs from decode + encode")
        back = relay.decode_from_gateway(rewritten)
        _expect((back.source, back.payload) == (_SOURCE, to_gw.payload), "rewrite lost data")
    try:
        from_gw = relay.decode_from_gateway(data)
    except relay.RelayFrameError:
        pass
    else:
        _expect(relay.encode_from_gateway(from_gw.source, from_gw.payload) == data,
                "from-gateway frame does not round-trip")


# ---------------------------------------------------------------- config files
_config_dir: pathlib.Path | None = None
SCRATCH_ENV = "MACULA_FUZZ_SCRATCH"


def scratch_dir() -> pathlib.Path:
    """A new directory for per-input files: on tmpfs where there is one, since a file is
    written per input and opening one there costs microseconds, not a millisecond."""
    shm = pathlib.Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return pathlib.Path(tempfile.mkdtemp(prefix="macula-fuzz-", dir=where))


def _config_path() -> pathlib.Path:
    global _config_dir
    if _config_dir is None:
        given = os.environ.get(SCRATCH_ENV)
        if given:  # the runner's, removed by the runner: libFuzzer exits without atexit
            _config_dir = pathlib.Path(given)
        else:
            _config_dir = scratch_dir()
            atexit.register(shutil.rmtree, _config_dir, True)
    return _config_dir / "macula.toml"


def config_file(data: bytes) -> None:
    """load_config on any file raises only ConfigError; what it accepts, dump_toml writes
    back as a file that loads to an equal Config."""
    path = _config_path()
    path.write_bytes(data)
    try:
        config = cfg.load_config(path, env={})
    except cfg.ConfigError:
        return
    path.write_text(cfg.dump_toml(config), encoding="utf-8")
    try:
        again = cfg.load_config(path, env={})
    except cfg.ConfigError as exc:
        raise Finding(f"load_config refuses what dump_toml wrote: {exc}") from None
    _expect(again == config, "dump_toml -> load_config changed the config")


# ---------------------------------------------------------------- ICE candidate lines
def candidate_line(data: bytes) -> None:
    """Candidate.from_sdp raises only CandidateError; what it accepts, to_sdp writes as a
    line that parses back to an equal candidate and the same text."""
    if Candidate is None:
        return
    line = data.decode("utf-8", "surrogateescape")
    try:
        candidate = Candidate.from_sdp(line)
    except CandidateError:
        return
    text = candidate.to_sdp()
    try:
        again = Candidate.from_sdp(text)
    except CandidateError as exc:
        raise Finding(f"from_sdp refuses what to_sdp wrote: {exc}") from None
    _expect(again == candidate and again.to_sdp() == text, "to_sdp/from_sdp round trip differs")


# ---------------------------------------------------------------- the gateway core
_GW_IDENTITY = Identity.generate()
_A = (NodeId(b"A" * 16), ("10.0.0.1", 1000), b"tokenAAA")
_B = (NodeId(b"B" * 16), ("10.0.0.2", 2000), b"tokenBBB")
# Small limits, so the refusal paths are as reachable as the happy one.
GATEWAY_LIMITS = GatewayLimits(relay_rate_bytes=3000, relay_burst_bytes=relay.MAX_PAYLOAD,
                               max_relay_peers=1, relay_session_max_bytes=6000,
                               relay_session_max_duration=1.0)


def _accounted(core: GatewayCore) -> int:
    return sum(core.dropped.values()) + sum(core.malformed.values()) + core.relayed_packets


def gateway_datagrams(data: bytes) -> None:
    """GatewayCore.receive_datagram never raises on any bytes from any address, counts
    every datagram (dropped, malformed or relayed), answers junk with nothing, relays only
    for a registered node's address and token, and never beyond its rate.

    The input is a run of records: flags (1 byte), length (2), datagram. Flags: bits 0-1
    pick the source (node A, node B, a spoofed IPv4 or IPv6 address), bit 2 writes the
    source's relay token into the frame, bit 3 the other node's id as destination, bits
    4-7 advance the clock by quarter seconds.
    """
    core = GatewayCore(_GW_IDENTITY, GatewayOptions(limits=GATEWAY_LIMITS))
    nodes = [NodeEntry(node_id, addr, token, 0.0, 0.0) for node_id, addr, token in (_A, _B)]
    for entry in nodes:
        core.registry.register(entry)
    relayed: Counter[bytes] = Counter()
    now, pos = 0.0, 0
    while pos + 3 <= len(data):
        flags = data[pos]
        size = int.from_bytes(data[pos + 1:pos + 3], "big") % 2048
        datagram = bytearray(data[pos + 3:pos + 3 + size])
        pos += 3 + size
        now += (flags >> 4) * 0.25
        source = flags & 3
        sender = nodes[source] if source < 2 else None
        addr = (sender.address if sender is not None
                else (f"192.0.2.{len(datagram) % 256}", 1024 + size) if source == 2
                else ("2001:db8::7", 9))
        if flags & 4 and sender is not None and len(datagram) >= 9:
            datagram[0:9] = bytes([demux.RELAY_TO_GATEWAY]) + sender.token
        if flags & 8 and len(datagram) >= 25:
            other = nodes[1] if sender is nodes[0] else nodes[0]
            datagram[9:25] = other.node_id.raw
        before, connections = _accounted(core), len(core._controls)
        core.receive_datagram(bytes(datagram), addr, now)
        _expect(_accounted(core) - before == 1 or len(core._controls) > connections,
                f"datagram {datagram[:8].hex()}... from {addr} not counted exactly once")
        for out, to in core.datagrams_to_send(now):
            if core._controls:
                continue  # a real handshake began (the fuzzer made a valid Initial)
            _expect(sender is not None and to in (nodes[0].address, nodes[1].address),
                    f"the gateway answered junk from {addr} with {len(out)} bytes to {to}")
            _expect(out[:1] == b"\x31" and out[1:17] == sender.node_id.raw
                    and bytes(datagram[1:9]) == sender.token and addr == sender.address,
                    "relayed a frame that was not the registered node's")
            relayed[sender.node_id.raw] += len(out) - 17
    for total in relayed.values():
        limit = GATEWAY_LIMITS.relay_burst_bytes + GATEWAY_LIMITS.relay_rate_bytes * now
        _expect(total <= limit, f"relayed {total} bytes, more than the bucket allows ({limit})")
    _expect(core.limits.tracked_nodes <= 2 and len(core._offline_notice) <= 10_001,
            "per-node tables outgrew the registry")


# ---------------------------------------------------------------- the table
ORACLES: dict[str, Callable[[bytes], None]] = {
    "stun_message": stun_message,
    "connectivity_check": connectivity_check,
    "control_stream": control_stream,
    "relay_frames": relay_frames,
    "config_file": config_file,
    "candidate_line": candidate_line,
    "gateway_datagrams": gateway_datagrams,
}

# Longest input the fuzzer tries, per oracle: above every real message of its kind.
MAX_LEN: dict[str, int] = {
    "stun_message": 2048,
    "connectivity_check": 2048,
    "control_stream": 8192,
    "relay_frames": 2048,
    "config_file": 12288,  # the dumped default config with its comments must fit
    "candidate_line": 1200,
    "gateway_datagrams": 8192,
}


def unavailable(name: str) -> str | None:
    """Why an oracle cannot run in this tree, or None."""
    return _ICE_MISSING if name in ("candidate_line", "connectivity_check") else None


def _record(flags: int, datagram: bytes) -> bytes:
    return bytes([flags]) + len(datagram).to_bytes(2, "big") + datagram


def seeds(name: str) -> list[bytes]:
    """Well-formed starting inputs for one oracle."""
    a, b = Identity.generate().node_id, Identity.generate().node_id
    request = stun.binding_request(b"\x01" * 12)
    check = _ice_check()
    if name == "stun_message":
        parsed = stun.parse_message(request)
        return [request, stun.binding_request(change_ip=True, change_port=True), check,
                stun.binding_success(parsed, CLIENT, response_origin=("192.0.2.10", 3478),
                                     other_address=("198.51.100.10", 3479)),
                stun.binding_error(parsed, 420, "Unknown Attribute", [0x7001, 0x7002])]
    if name == "connectivity_check":
        return [check, stun.binding_success(stun.parse_message(request), CLIENT)]
    if name == "control_stream":
        frames = [control.encode(_example(kind, a, b)) for kind in control.SCHEMAS]
        return [bytes([i]) + b"".join(frames[i % len(frames):]) for i in range(4)]
    if name == "relay_frames":
        return [relay.encode_to_gateway(b"t" * 8, a.raw, b"\xc0payload"),
                relay.encode_from_gateway(b.raw, b"\x40" * 40)]
    if name == "config_file":
        docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
        examples = re.findall(r"```toml\n(.*?)```", docs.read_text(encoding="utf-8"), re.S)
        return [cfg.dump_toml(cfg.Config()).encode(), *(e.encode() for e in examples)]
    if name == "candidate_line":
        return [b"a=candidate:1 1 udp 2130706431 192.0.2.1 4242 typ host",
                b"candidate:2 1 UDP 1694498815 203.0.113.7 40000 typ srflx raddr 10.0.0.2 "
                b"rport 4242",
                b"a=candidate:3 1 udp 16777215 2001:db8::1 9443 typ relay macula-relay gateway\r\n"]
    if name == "gateway_datagrams":
        frame = relay.encode_to_gateway(b"\x00" * 8, b"\x00" * 16, b"\xc0" + b"p" * 99)
        return [_record(0x04 | 0x08 | 0x10, frame) * 3 + _record(0x01, request)
                + _record(0x02, b"\xc0" + b"\x00" * 1250) + _record(0x03, b"\x31" + b"x" * 30)]
    raise KeyError(name)


def _example(kind: str, a: NodeId, b: NodeId) -> dict[str, object]:
    """A valid message of `kind`, every field filled, built from the schema itself so the
    seeds follow the protocol as it changes."""
    samples: dict[type, object] = {str: b.text, int: 1, bool: True, float: 12.5,
                                   list: ["192.0.2.1:4242"], type(None): None}
    message: dict[str, object] = {"type": kind}
    for field_name, (types, _required) in control.SCHEMAS[kind].items():
        message[field_name] = samples[types[0]]
    if "node_id" in message and kind == "hello":
        message["node_id"] = a.text
    return message


def _ice_check() -> bytes:
    """A connectivity check addressed to the oracle's agent (a plain request without ICE)."""
    if _ICE_MISSING is not None:
        return stun.binding_request(b"\x02" * 12)
    from macula.ice.messages import build_request
    return build_request(transaction_id=b"\x02" * 12, username=f"{UFRAG}:peer",
                         key=PWD.encode(), priority=1694498815, controlling=True,
                         tie_breaker=7, use_candidate=True)


def describe(name: str) -> str:
    return (ORACLES[name].__doc__ or "").strip().splitlines()[0]


__all__ = ["GATEWAY_LIMITS", "KEY", "MAX_LEN", "ORACLES", "Finding", "describe", "seeds",
           "sign", "unavailable"]

