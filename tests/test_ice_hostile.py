"""Hostile datagrams at an IceAgent: dropped (receive() -> False), never an exception, never
an answer, never a learned candidate."""

from __future__ import annotations

import struct

import pytest
from aioice import stun
from aioice.stun import Class, Message, Method
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.ice import Candidate, IceAgent, PairState, PairSucceeded, SelectedPair
from macula.wire.stun import parse_message

PWD_A, PWD_B = "A" * 22 + "pa", "B" * 22 + "pb"
A_ADDR, B_ADDR = ("10.0.0.1", 1000), ("10.0.0.2", 2000)


def make_agent(**kwargs) -> IceAgent:
    agent = IceAgent("ufA1", PWD_A, controlling=True, tie_breaker=5, now=0.0, **kwargs)
    agent.add_local_candidate(Candidate.host(*A_ADDR))
    agent.set_remote_credentials("ufB1", PWD_B)
    agent.add_remote_candidate(Candidate.host(*B_ADDR))
    return agent


_DEFAULT = object()


def request(*, username: object = "ufA1:ufB1", key: bytes | None = PWD_A.encode(),
            priority: object = 1862270975, role: object = _DEFAULT, use: bool = False,
            method: Method = Method.BINDING, cls: Class = Class.REQUEST) -> bytes:
    attributes: dict = {}
    if username is not None:
        attributes["USERNAME"] = username
    if priority is not None:
        attributes["PRIORITY"] = priority
    if role is _DEFAULT:
        attributes["ICE-CONTROLLED"] = 9
    elif role is not None:
        attributes.update(role)  # type: ignore[arg-type]
    if use:
        attributes["USE-CANDIDATE"] = None
    message = Message(method, cls, attributes=attributes)
    if key is not None:
        message.add_message_integrity(key)
    else:
        message.add_fingerprint()
    return bytes(message)


def assert_dropped(agent: IceAgent, data: bytes, src=B_ADDR) -> None:
    before = agent.remote_candidates
    assert agent.receive(data, src, 0.001) is False
    assert agent.datagrams_to_send() == []
    assert agent.next_event() is None
    assert agent.remote_candidates == before


def test_valid_request_is_answered():
    agent = make_agent()
    assert agent.receive(request(), B_ADDR, 0.0)
    (answer, dest, via), *checks = agent.datagrams_to_send()
    response = parse_message(answer, integrity_key=PWD_A.encode())
    assert response.message_class == Class.RESPONSE and dest == B_ADDR and via == "socket"
    assert response.attributes["XOR-MAPPED-ADDRESS"] == B_ADDR
    assert len(checks) == 1  # and the triggered check back


HOSTILE = [
    request(key=b"not the password"),
    request(key=None),  # no MESSAGE-INTEGRITY at all
    request(key=PWD_B.encode()),  # signed with the wrong side's password
    request(username="ufZZ:ufB1"),  # not our ufrag
    request(username="ufA1:ufZZ"),  # not the peer we know
    request(username="ufA1"),
    request(username=":"),
    request(username="ufA1:"),
    request(username=None),
    request(priority=None),
    request(priority=0),
    request(priority=2**31),
    request(role=None),
    request(role={"ICE-CONTROLLED": 1, "ICE-CONTROLLING": 2}),
    request(cls=Class.INDICATION),
    request(method=Method.ALLOCATE),
    request()[:-4],  # truncated
    request()[:-1] + bytes([request()[-1] ^ 1]),  # bad FINGERPRINT
    b"", b"\x00", b"\x01\x01\x00\x00", b"\x40" * 40, b"\xc0" + bytes(60),
]


@pytest.mark.parametrize("data", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_requests_are_dropped(data):
    assert_dropped(make_agent(), data)


def test_unknown_tid_and_forged_responses_are_dropped():
    agent = make_agent()
    agent.handle_timer(0.0)
    (check, dest, _), = agent.datagrams_to_send()
    tid = parse_message(check).transaction_id
    stranger = Message(Method.BINDING, Class.RESPONSE, attributes={"XOR-MAPPED-ADDRESS": A_ADDR})
    stranger.add_message_integrity(PWD_B.encode())
    assert_dropped(agent, bytes(stranger))
    for key, attrs in [(b"wrong key", {"XOR-MAPPED-ADDRESS": A_ADDR}),
                       (PWD_B.encode(), {})]:  # right key, no mapped address
        forged = Message(Method.BINDING, Class.RESPONSE, tid, dict(attrs))
        forged.add_message_integrity(key)
        assert_dropped(agent, bytes(forged), src=dest)
    # The transaction survived all that: the genuine answer still completes it.
    genuine = Message(Method.BINDING, Class.RESPONSE, tid, {"XOR-MAPPED-ADDRESS": A_ADDR})
    genuine.add_message_integrity(PWD_B.encode())
    assert agent.receive(bytes(genuine), dest, 0.02)
    assert isinstance(agent.next_event(), PairSucceeded)
    assert isinstance(agent.next_event(), SelectedPair)


def test_asymmetric_or_error_answers_fail_the_pair():
    for src, cls, attrs in [(("10.0.0.99", 2000), Class.RESPONSE, {"XOR-MAPPED-ADDRESS": A_ADDR}),
                            (B_ADDR, Class.ERROR, {"ERROR-CODE": (500, "Server Error")})]:
        agent = make_agent()
        agent.handle_timer(0.0)
        (check, _, _), = agent.datagrams_to_send()
        answer = Message(Method.BINDING, cls, parse_message(check).transaction_id, attrs)
        answer.add_message_integrity(PWD_B.encode())
        assert agent.receive(bytes(answer), src, 0.02)
        assert agent.checklist.pairs[0].state == PairState.FAILED
        assert agent.next_event() is None


def _with_unknown_attribute(key: bytes) -> bytes:
    message = Message(Method.BINDING, Class.REQUEST, attributes={
        "USERNAME": "ufA1:ufB1", "PRIORITY": 1, "ICE-CONTROLLED": 9})
    body = bytes(message)[20:] + struct.pack("!HH", 0x0033, 4) + b"abcd"

    def header(length: int) -> bytes:
        return struct.pack("!HHI12s", Method.BINDING | Class.REQUEST, length, stun.COOKIE,
                           message.transaction_id)

    data = header(len(body)) + body
    data += struct.pack("!HH", 0x0008, 20) + stun.message_integrity(data, key)
    data = header(len(data) - 20) + data[20:]
    data += struct.pack("!HHI", 0x8028, 4, stun.message_fingerprint(data))
    return header(len(data) - 20) + data[20:]


def test_unknown_comprehension_required_attribute_gets_420():
    agent = make_agent()
    assert_dropped(agent, _with_unknown_attribute(b"wrong"))
    assert agent.receive(_with_unknown_attribute(PWD_A.encode()), B_ADDR, 0.0)
    (answer, dest, _), = agent.datagrams_to_send()
    error = parse_message(answer, integrity_key=PWD_A.encode())
    assert error.error_code == 420 and error.attributes["UNKNOWN-ATTRIBUTES"] == (0x0033,)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    agent = make_agent()
    assert agent.receive(data, B_ADDR, 0.0) is False
    # The same bytes behind a plausible Binding request header get past the demux test.
    framed = (struct.pack("!HHI", 0x0001, len(data) & ~3, stun.COOKIE) + bytes(12)
              + data[: len(data) & ~3])
    assert agent.receive(framed, B_ADDR, 0.0) is False
    assert agent.datagrams_to_send() == []


_VALID = request(use=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255),
                          st.sampled_from(["set", "insert", "delete"])), min_size=1, max_size=4))
def test_mutated_checks_never_raise(edits):
    data = bytearray(_VALID)
    for pos, value, op in edits:
        pos = min(pos, len(data) - 1)
        if op == "set":
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        elif len(data) > 1:
            del data[pos]
    agent = make_agent()
    accepted = agent.receive(bytes(data), B_ADDR, 0.0)
    if accepted:  # only if integrity still held: then it must be a proper answer
        answer = parse_message(agent.datagrams_to_send()[0][0], integrity_key=PWD_A.encode())
        assert answer.message_class in (Class.RESPONSE, Class.ERROR)
