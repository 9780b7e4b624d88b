"""The cluster's sans-IO parts on their own: a node's choice of home, a member's view of
the directory, and the mesh's frames (hypothesis for the codecs)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.gateway.cluster import ClusterView, RemoteHome
from macula.gateway.directory import MemberRecord, NodeRecord, Snapshot
from macula.identity import Identity, NodeId
from macula.node.home_choice import AVOID_FOR, CHOOSE_WITHIN, HomeChoice
from macula.wire.control import ControlError
from macula.wire.mesh import (
    MeshDecoder,
    MeshDeliver,
    MeshFrameError,
    MeshHello,
    decode_mesh,
    decode_mesh_relay,
    encode_mesh,
    encode_mesh_relay,
)
from macula.wire.stun import binding_success, parse_message

G1, G2, G3 = (("203.0.113.101", 9443), ("203.0.113.102", 9443), ("203.0.113.103", 9443))


def answer(choice: HomeChoice, probes: list[tuple[bytes, tuple[str, int]]], index: int) -> bytes:
    request = parse_message(probes[index][0])
    return binding_success(request, ("198.51.100.9", 4000))


# ------------------------------------------------------------------ home choice
def test_the_node_homes_on_the_gateway_with_the_lowest_rtt():
    choice = HomeChoice(((G1, None), (G2, None), (G3, None)))
    probes = choice.probes(now=10.0)
    assert [addr for _, addr in probes] == [G1, G2, G3]
    reply = answer(choice, probes, 2)
    assert choice.owns(reply, G3) and not choice.owns(reply, G1)
    # G3 answers first; those listed before it may still tie, for 1.2 ms.
    assert choice.on_answer(reply, G3, now=10.012) is False
    assert choice.decide_at == pytest.approx(10.0132)
    choice.decide_now()  # nobody else in time
    assert choice.home.address == G3 and abs(choice.home.rtt - 0.012) < 1e-9
    # A later answer only records its RTT.
    assert choice.on_answer(answer(choice, probes, 0), G1, now=10.030) is False
    assert choice.home.address == G3 and choice.candidates[0].rtt == pytest.approx(0.030)


def test_among_equal_rtts_the_operators_order_decides():
    choice = HomeChoice(((G1, None), (G2, None), (G3, None)))
    probes = choice.probes(now=0.0)
    assert choice.on_answer(answer(choice, probes, 1), G2, now=0.0100) is False
    assert choice.on_answer(answer(choice, probes, 0), G1, now=0.0105) is True  # a tie
    assert choice.home.address == G1


def test_the_first_listed_answering_first_is_home_at_once():
    choice = HomeChoice(((G1, None), (G2, None)))
    probes = choice.probes(now=0.0)
    assert choice.on_answer(answer(choice, probes, 0), G1, now=0.02) is True
    assert choice.home.address == G1 and choice.decide_at is None


def test_without_any_answer_the_first_listed_is_home_after_the_wait():
    choice = HomeChoice(((G1, None), (G2, None)))
    choice.probes(now=5.0)
    assert choice.decide_at == 5.0 + CHOOSE_WITHIN and not choice.chosen
    choice.decide_now()
    assert choice.chosen and choice.home.address == G1 and choice.decide_at is None


def test_a_failed_home_moves_to_the_fastest_other_and_is_tried_last_for_a_while():
    choice = HomeChoice(((G1, None), (G2, None), (G3, None)))
    probes = choice.probes(now=0.0)
    choice.on_answer(answer(choice, probes, 0), G1, now=0.010)
    choice.on_answer(answer(choice, probes, 2), G3, now=0.020)
    choice.on_answer(answer(choice, probes, 1), G2, now=0.040)
    assert choice.next_home(now=1.0).address == G3  # 20 ms beats 40 ms
    assert choice.next_home(now=2.0).address == G2  # G1 failed a second ago
    assert choice.next_home(now=2.0 + AVOID_FOR + 1).address == G1  # forgiven
    assert choice.moves == 3


def test_a_stray_stun_message_is_not_an_answer():
    choice = HomeChoice(((G1, None), (G2, None)))
    choice.probes(now=0.0)
    assert not choice.owns(os.urandom(40), G1)
    assert not choice.on_answer(b"\x01\x01\x00\x00" + os.urandom(16), G1, now=0.1)
    assert not choice.chosen


# ------------------------------------------------------------------ the view
ME, OTHER, THIRD = (Identity.generate().node_id for _ in range(3))


def record(home: NodeId, node: NodeId | None = None) -> NodeRecord:
    return NodeRecord(node or Identity.generate().node_id, home, ("198.51.100.20", 5000))


def test_the_feed_adds_nodes_of_other_members_and_ignores_our_own():
    view = ClusterView(ME)
    theirs, ours = record(OTHER), record(ME)
    view.apply_change(b"+" + theirs.encode())
    view.apply_change(b"+" + ours.encode())
    assert set(view.remote) == {theirs.node_id.raw}
    entry = view.remote[theirs.node_id.raw]
    assert entry.session == RemoteHome(OTHER, theirs.rtt) and entry.address == theirs.address


def test_a_withdrawal_by_a_gateway_the_node_has_left_changes_nothing():
    view = ClusterView(ME)
    node = Identity.generate().node_id
    view.apply_change(b"+" + record(THIRD, node).encode())  # it moved to THIRD
    view.apply_change(b"-" + f"{OTHER.text} {node.text}".encode())  # OTHER cleans up late
    assert view.remote[node.raw].session.gateway == THIRD
    view.apply_change(b"-" + f"{THIRD.text} {node.text}".encode())
    assert node.raw not in view.remote


@pytest.mark.parametrize("message", [b"", b"?", b"+{}", b"+not json", b"-only-one-word",
                                     b"-\xff\xfe x", b'+{"v": 2}', b"-a b"])
def test_bad_change_messages_are_counted_and_skipped(message):
    view = ClusterView(ME)
    view.apply_change(message)
    assert view.bad_records == 1 and not view.remote


def test_a_snapshot_replaces_the_view_but_keeps_members_whose_link_is_alive():
    view = ClusterView(ME)
    alive_node, dead_node = record(OTHER), record(THIRD)
    view.apply_snapshot(Snapshot([alive_node.encode(), dead_node.encode()], [
        MemberRecord(OTHER, G2).encode(), MemberRecord(THIRD, G3).encode(),
        MemberRecord(ME, G1).encode()]))
    assert set(view.members) == {OTHER.raw, THIRD.raw}
    # The store restarted empty: OTHER still answers on the mesh, THIRD does not.
    view.apply_snapshot(Snapshot([], []), alive={OTHER.raw})
    assert set(view.members) == {OTHER.raw}
    assert set(view.remote) == {alive_node.node_id.raw}


def test_a_failed_write_is_retried_with_the_next_and_newer_news_wins():
    view = ClusterView(ME)
    view.local_changed(b"a")
    view.local_gone(b"b")
    changed, gone = view.take_changes()
    view.local_gone(b"a")  # it left while the write was failing
    view.put_back(changed, gone)
    assert view.take_changes() == (set(), {b"a", b"b"})


# ------------------------------------------------------------------ mesh frames
ids = st.binary(min_size=16, max_size=16)


@given(st.binary(min_size=32, max_size=32), ids, ids, ids,
       st.binary(min_size=1, max_size=1452))
def test_mesh_relay_frames_round_trip(key, gateway, source, destination, payload):
    frame = decode_mesh_relay(key, encode_mesh_relay(key, gateway, source, destination,
                                                     payload))
    assert (frame.gateway, frame.source, frame.destination, frame.payload) == (
        gateway, source, destination, payload)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=1, max_size=200),
       st.integers(min_value=0, max_value=10_000))
def test_any_change_to_a_signed_frame_is_refused(key, payload, where):
    frame = bytearray(encode_mesh_relay(key, b"g" * 16, b"s" * 16, b"d" * 16, payload))
    frame[where % len(frame)] ^= 0x01
    with pytest.raises(MeshFrameError):
        decode_mesh_relay(key, bytes(frame))


@given(st.binary(max_size=2000))
def test_garbage_mesh_frames_raise_mesh_frame_error_only(data):
    with pytest.raises(MeshFrameError):
        decode_mesh_relay(os.urandom(32), b"\x32" + data)


@given(st.binary(max_size=300))
def test_garbage_mesh_messages_raise_control_error_only(body):
    try:
        decode_mesh(body)
    except ControlError:
        pass


def test_mesh_messages_round_trip_through_the_stream_framing():
    decoder = MeshDecoder()
    hello = MeshHello(1, "g" * 26, "ab" * 32)
    deliver = MeshDeliver("n" * 26, {"type": "peer_offline", "node_id": "x"}, 12.5)
    data = encode_mesh(hello) + encode_mesh(deliver)
    assert list(decoder.feed(data[:7])) == []
    assert list(decoder.feed(data[7:])) == [hello, deliver]
    for bad in (b'{"type":"mesh_hello","version":true,"gateway_id":"g","relay_key":""}',
                b'{"type":"mesh_deliver","node":"n","message":[]}',
                b'{"type":"mesh_deliver","node":"n","message":{},"extra":1}',
                b'{"type":"nope"}', b"[]"):
        with pytest.raises(ControlError):
            decode_mesh(bad)


# ------------------------------------------------------------------ a member's word
def test_a_member_speaks_for_its_own_nodes_only():
    """A forwarded punch request may carry the requester's record; one naming another
    home (or another node) is refused and counted, and the view keeps what it had."""
    from macula.gateway.core import GatewayCore
    from macula.wire import control

    core = GatewayCore(Identity.generate())
    core.enable_cluster()
    member, other = Identity.generate().node_id, Identity.generate().node_id
    requester, ours = Identity.generate().node_id, Identity.generate().node_id
    request = control.to_dict(control.PunchRequest(ours.text, 1))
    for forged in (record(other, requester), record(member, Identity.generate().node_id)):
        core._on_delivery(member, MeshDeliver(requester.text, request,
                                              record=forged.encode().decode()), now=1.0)
    assert core.malformed["mesh"] == 2 and requester.raw not in core.cluster.remote
    core._on_delivery(member, MeshDeliver(requester.text, request,
                                          record=record(member, requester).encode().decode()),
                      now=1.0)
    assert core.cluster.remote[requester.raw].session.gateway == member
    # Ours is not registered here: the request is refused back to the member, not crashed.
    assert core.punch_refusals["peer_offline"] == 1
