"""The fuzzing oracles (fuzz/oracles.py) as fast hypothesis properties, part of `make test`.

`make fuzz` runs the same oracles coverage-guided under atheris for 100k inputs each; here
each gets a few hundred structured inputs (seeds mutated, random bytes, chosen chunkings
and sources) so a regression shows up in the ordinary test run. Findings from writing it
(huge integers, NaN, deep nesting) are fixed and kept below as regression tests.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "fuzz"))

import oracles  # noqa: E402  (lives in fuzz/, shared with the atheris runner)

from macula.config import ConfigError, load_config  # noqa: E402
from macula.identity import Identity  # noqa: E402
from macula.wire import control, relay  # noqa: E402

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mutated(seeds: list[bytes], max_size: int) -> st.SearchStrategy[bytes]:
    """Random bytes, or a seed with some bytes overwritten, inserted, cut or extended."""

    @st.composite
    def edit(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 5))):
            op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
            i = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "set" and data:
                data[i] = draw(st.integers(0, 255))
            elif op == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[i:i + draw(st.integers(1, 16))]
            else:
                del data[i:]
        return bytes(data + draw(st.binary(max_size=32)))

    return st.one_of(st.binary(max_size=max_size), edit())


def _oracle_case(name: str):
    reason = oracles.unavailable(name)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_oracle_case(n) for n in oracles.ORACLES])
@FAST
@given(data=st.data())
def test_oracle_holds_on_mutated_and_random_input(name: str, data: st.DataObject) -> None:
    oracles.ORACLES[name](data.draw(mutated(seeds(name), oracles.MAX_LEN[name])))


@functools.cache
def seeds(name: str) -> list[bytes]:
    return oracles.seeds(name)


# ---------------------------------------------------------------- chosen structure
A, B = Identity.generate().node_id, Identity.generate().node_id
_FRAMES = [control.encode(oracles._example(kind, A, B)) for kind in control.SCHEMAS]
_JUNK_FRAMES = [b"\x00\x00\x00\x02{}", b"\x00\x00\x00\x05nope!",
                b"\x00\x00\x00\x11" + b'{"type":"hello"}x', b"\x00\x00\x00\x00"]


@FAST
@given(frames=st.lists(st.sampled_from(_FRAMES + _JUNK_FRAMES), max_size=12),
       cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_control_decoder_is_indifferent_to_chunking(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:])]
    whole = oracles._feed([stream])
    assert oracles._feed(chunks) == whole
    valid = [f for f in frames if f in _FRAMES]
    assert len(whole[0]) == len(valid) and whole[1] == len(frames) - len(valid)


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)


@FAST
@given(records=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=1500)),
                        max_size=12))
def test_gateway_core_counts_every_datagram_and_answers_no_junk(
        records: list[tuple[int, bytes]]) -> None:
    oracles.gateway_datagrams(b"".join(oracles._record(f, d) for f, d in records))


@FAST
@given(datagrams=st.lists(st.tuples(st.binary(max_size=1500), addresses), max_size=20))
def test_gateway_core_survives_any_bytes_from_any_address(
        datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
    from macula.gateway.core import GatewayCore

    core = GatewayCore(oracles._GW_IDENTITY)
    for data, addr in datagrams:
        before = sum(core.dropped.values()) + sum(core.malformed.values())
        core.receive_datagram(data, addr, 1.0)
        assert sum(core.dropped.values()) + sum(core.malformed.values()) == before + 1
    assert core.datagrams_to_send(1.0) == [] and len(core._controls) == 0


@FAST
@given(token=st.binary(min_size=8, max_size=8), dst=st.binary(min_size=16, max_size=16),
       payload=st.binary(min_size=1, max_size=relay.MAX_PAYLOAD))
def test_relay_frames_round_trip(token: bytes, dst: bytes, payload: bytes) -> None:
    oracles.relay_frames(relay.encode_to_gateway(token, dst, payload))


# ---------------------------------------------------------------- regressions
# Found by this suite's authors beyond what the fuzzer reached; fixed, kept as regressions.
@pytest.mark.parametrize("body", [b'{"type":"keepalive","seq":' + b"1" * 5000 + b"}",
                                  b'{"type":"keepalive","seq":NaN}'], ids=["huge", "nan"])
def test_control_message_with_a_bad_number_is_a_control_error(body: bytes) -> None:
    with pytest.raises(control.ControlError):
        control.decode_body(body)


@pytest.mark.parametrize("text", ["a = " + "[" * 2000 + "]" * 2000, "a = " + "1" * 5000],
                         ids=["deep_nesting", "huge_integer"])
def test_config_file_that_breaks_tomllib_is_a_config_error(tmp_path: pathlib.Path,
                                                            text: str) -> None:
    path = tmp_path / "macula.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_seeds_pass_their_own_oracles() -> None:
    for name, oracle in oracles.ORACLES.items():
        assert seeds(name), name
        for seed in seeds(name):
            assert len(seed) <= oracles.MAX_LEN[name], name
            oracle(seed)
