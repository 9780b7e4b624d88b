"""Candidate pairs and the check list: RFC 8445 6.1.2 forming, pruning, ordering, freezing."""

from __future__ import annotations

from macula.ice import Candidate, CandidatePair, CheckList, PairState, pair_priority
from macula.ice.checklist import can_pair, pairing_base


def host(ip: str, port: int = 5000, local_preference: int = 65535) -> Candidate:
    return Candidate.host(ip, port, local_preference=local_preference)


def test_pair_priority_formula():
    g, d = 2130706431, 1694498815
    assert pair_priority(g, d) == 2**32 * d + 2 * g + 1
    assert pair_priority(d, g) == 2**32 * d + 2 * g
    assert pair_priority(7, 7) == 2**32 * 7 + 14


def test_both_agents_compute_the_same_pair_priority():
    a, b = host("10.0.0.1"), Candidate.from_sdp(
        "a=candidate:2 1 udp 1694498815 192.0.2.3 45664 typ srflx raddr 10.0.1.1 rport 8998")
    seen_by_controlling = CandidatePair(a, b).priority(controlling=True)
    seen_by_controlled = CandidatePair(b, a).priority(controlling=False)
    assert seen_by_controlling == seen_by_controlled == pair_priority(a.priority, b.priority)


def test_pairs_need_same_family_and_component():
    assert can_pair(host("10.0.0.1"), host("10.0.0.2"))
    assert not can_pair(host("10.0.0.1"), host("2001:db8::2"))
    other_component = Candidate.from_sdp("a=candidate:1 2 udp 1 10.0.0.9 9 typ host")
    assert not can_pair(host("10.0.0.1"), other_component)
    checklist = CheckList(controlling=True)
    assert checklist.add(host("10.0.0.1"), host("2001:db8::2"), "socket") is None
    assert checklist.pairs == []


def test_srflx_is_replaced_by_its_base():
    base = host("10.0.0.1")
    srflx = Candidate.server_reflexive("203.0.113.1", 6000, base=base.addr, server="192.0.2.9")
    assert pairing_base(srflx, [base], 1) is base
    made_up = pairing_base(srflx, [], 12345)
    assert (made_up.type, made_up.addr, made_up.priority) == ("host", base.addr, 12345)
    relay = Candidate.turn_relay("198.51.100.1", 40000, server="198.51.100.1")
    assert pairing_base(relay, [base], 1) is relay


def test_redundant_pairs_are_pruned_keeping_the_higher_priority():
    checklist = CheckList(controlling=True)
    remote = host("10.0.0.2")
    low = host("10.0.0.1", local_preference=10)
    high = host("10.0.0.1", local_preference=20)  # same base
    pair = checklist.add(low, remote, "socket")
    assert pair is not None
    assert checklist.add(low, remote, "socket") is None
    assert checklist.add(high, remote, "socket") is None
    assert len(checklist.pairs) == 1 and checklist.pairs[0].local is high


def test_pairs_sorted_by_priority_and_resorted_on_role_switch():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1", local_preference=65535)
    weak_local = Candidate.turn_relay("198.51.100.1", 40000, server="198.51.100.1")
    strong_remote = host("10.0.0.2", local_preference=65535)
    weak_remote = host("10.0.0.3", local_preference=1)
    for loc, r in [(weak_local, weak_remote), (local, strong_remote), (local, weak_remote),
                 (weak_local, strong_remote)]:
        checklist.add(loc, r, "socket" if loc is local else "turn:x")
    prios = [checklist.priority(p) for p in checklist.pairs]
    assert prios == sorted(prios, reverse=True)
    checklist.set_controlling(False)
    prios = [checklist.priority(p) for p in checklist.pairs]
    assert prios == sorted(prios, reverse=True)


def test_pair_limit_drops_the_lowest_priority_pairs():
    checklist = CheckList(controlling=True, max_pairs=100)
    local = host("10.0.0.1")
    for i in range(130):
        checklist.add(local, host(f"10.1.{i // 250}.{i % 250 + 1}", local_preference=1000 + i),
                      "socket")
    assert len(checklist.pairs) == 100
    kept = {p.remote.priority for p in checklist.pairs}
    assert min(kept) == host("10.0.0.9", local_preference=1030).priority


def test_frozen_and_waiting_per_foundation():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1")
    # Two remote hosts on one IP share a foundation; a third IP has its own.
    a = checklist.add(local, host("10.0.0.2", 1000), "socket")
    b = checklist.add(local, host("10.0.0.2", 2000), "socket")
    c = checklist.add(local, host("10.0.0.3", 1000), "socket")
    assert a and b and c
    assert a.foundation == b.foundation != c.foundation
    assert (a.state, b.state, c.state) == (PairState.WAITING, PairState.FROZEN, PairState.WAITING)
    first = checklist.next_ordinary()
    assert first in (a, c)
    first.state = PairState.IN_PROGRESS
    second = checklist.next_ordinary()
    second.state = PairState.IN_PROGRESS
    assert {first, second} == {a, c}
    # b stays frozen while a's foundation is busy ...
    assert checklist.next_ordinary() is None
    # ... and thaws when a succeeds (7.2.5.3.3).
    checklist.succeeded(a)
    assert b.state == PairState.WAITING
    assert checklist.next_ordinary() is b


def test_frozen_pair_unfreezes_when_its_foundation_is_idle():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1")
    a = checklist.add(local, host("10.0.0.2", 1000), "socket")
    b = checklist.add(local, host("10.0.0.2", 2000), "socket")
    a.state = PairState.FAILED
    assert b.state == PairState.FROZEN
    assert checklist.peek_ordinary() is b and b.state == PairState.FROZEN
    assert checklist.next_ordinary() is b and b.state == PairState.WAITING


def test_new_pair_of_a_working_foundation_starts_waiting():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1")
    a = checklist.add(local, host("10.0.0.2", 1000), "socket")
    b = checklist.add(local, host("10.0.0.2", 2000), "socket")
    a.state = PairState.IN_PROGRESS
    checklist.succeeded(a)
    c = checklist.add(local, host("10.0.0.2", 3000), "socket")
    assert b.state == c.state == PairState.WAITING


def test_triggered_queue_is_fifo_without_duplicates():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1")
    a = checklist.add(local, host("10.0.0.2"), "socket")
    b = checklist.add(local, host("10.0.0.3"), "socket")
    b.state = PairState.FAILED
    checklist.push_triggered(b)
    checklist.push_triggered(a)
    checklist.push_triggered(b)
    assert b.state == PairState.WAITING
    assert [checklist.pop_triggered(), checklist.pop_triggered(), checklist.pop_triggered()] == [
        b, a, None]


def test_settle_stops_ordinary_checks_after_selection():
    checklist = CheckList(controlling=True)
    local = host("10.0.0.1")
    best = checklist.add(local, host("10.0.0.2", local_preference=65535), "socket")
    worse = checklist.add(local, host("10.0.0.3", local_preference=10), "socket")
    checklist.add(local, host("10.0.0.4", local_preference=5), "socket")
    best.state = PairState.SUCCEEDED
    checklist.push_triggered(worse)
    checklist.settle(best)
    assert checklist.pairs == [best] and not checklist.triggered
    assert not checklist.has_work()
