"""The punch/path state machine on a fake clock: no sockets, no asyncio."""

from macula.identity import Identity
from macula.nat.checks import check_response, parse_check
from macula.node.paths import PeerPaths

A, B = Identity.generate().node_id, Identity.generate().node_id
KEY = b"k" * 16
PEER_ADDR = ("198.51.100.20", 40000)


def answer(paths_out, key=KEY, seen=("198.51.100.10", 5000)):
    """What the peer would answer to each check we sent."""
    return [(check_response(parse_check(data), seen, key), addr) for data, addr in paths_out]


def started(now=0.0, candidates=(PEER_ADDR,), timeout=5.0):
    paths = PeerPaths(A, B)
    paths.begin(1, KEY, list(candidates), began_at=now, start_at=now + 0.01, timeout=timeout)
    return paths


def test_checks_start_at_the_synchronised_moment_then_pace_fast_then_slow():
    paths = started()
    assert paths.next_timer() == 0.01
    assert paths.handle_timer(0.005) == [] and paths.datagrams_to_send() == []
    sends = []
    t = 0.01
    while t < 1.0:
        paths.handle_timer(t)
        if paths.datagrams_to_send():
            sends.append(round(t, 3))
        t = paths.next_timer()
    gaps = [round(b - a, 3) for a, b in zip(sends, sends[1:])]
    assert gaps[0] == 0.02 and gaps[-1] == 0.1  # fast while mappings are fresh, then slower


def test_answered_check_validates_the_direct_path_with_rtt():
    paths = started()
    paths.handle_timer(0.01)
    out = paths.datagrams_to_send()
    (response, _), = answer(out)
    check = parse_check(response)
    assert paths.on_check(check, PEER_ADDR, 0.05) == "validated"
    assert paths.direct.addr == PEER_ADDR
    assert abs(paths.direct.rtt - 0.04) < 1e-9
    assert paths.attempt is None and paths.outcomes[-1]["outcome"] == "success"


def test_answer_under_another_key_or_from_elsewhere_is_ignored():
    paths = started()
    paths.handle_timer(0.01)
    out = paths.datagrams_to_send()
    (forged, _), = answer(out, key=b"x" * 16)
    assert paths.on_check(parse_check(forged), PEER_ADDR, 0.05) is None
    (genuine, _), = answer(out)
    assert paths.on_check(parse_check(genuine), ("203.0.113.99", 1), 0.05) is None
    assert paths.direct is None


def test_peer_reflexive_request_is_answered_and_checked_back():
    from macula.nat.checks import check_request
    paths = started()
    new_addr = ("198.51.100.20", 50123)  # the peer's symmetric NAT picked a new port
    data, _ = check_request(A, B, KEY)
    assert paths.on_check(parse_check(data), new_addr, 0.02) == "answered"
    out = paths.datagrams_to_send()
    kinds = sorted((parse_check(d).is_request, a) for d, a in out)
    assert kinds == [(False, new_addr), (True, new_addr)]  # our answer + a triggered check
    assert new_addr in paths.attempt.candidates


def test_attempt_times_out_at_hole_punch_timeout():
    paths = started(timeout=5.0)
    t, happened = 0.01, []
    while not happened and t is not None:
        happened = paths.handle_timer(t)
        paths.datagrams_to_send()
        t = paths.next_timer()
    assert happened == ["attempt_timeout"]
    assert paths.attempt.deadline == 5.0


def validated():
    paths = started()
    paths.handle_timer(0.01)
    (resp, _), = answer(paths.datagrams_to_send())
    paths.on_check(parse_check(resp), PEER_ADDR, 0.05)
    return paths


def run_until(paths, end):
    """Drive timers to `end`; returns [(time, what happened, checks sent)]."""
    log = []
    t = paths.next_timer()
    while t is not None and t <= end:
        happened = paths.handle_timer(t)
        log.append((round(t, 3), happened, len(paths.datagrams_to_send())))
        t = paths.next_timer()
    return log


def test_active_direct_path_with_no_answers_is_dead_within_2s():
    paths = validated()
    paths.note_activity(0.05)
    log = run_until(paths, 3.0)
    dead_at = next(t for t, happened, _ in log if happened == ["direct_dead"])
    assert dead_at <= 0.05 + 2.0
    assert paths.direct is None and paths.fallbacks == 1


def test_idle_direct_path_is_checked_less_often_and_answers_keep_it():
    paths = validated()
    log = run_until(paths, 2.0)
    assert [n for _, _, n in log] == []  # idle: nothing before 2.5 s
    sent_at = []
    t = paths.next_timer()
    while t <= 20.0:
        assert paths.handle_timer(t) == []
        for check, addr in paths.datagrams_to_send():
            sent_at.append(round(t, 3))
            response = check_response(parse_check(check), ("198.51.100.10", 5000), KEY)
            assert paths.on_check(parse_check(response), addr, t + 0.04) == "answered"
        t = paths.next_timer()
    assert sent_at[:3] == [2.55, 5.05, 7.55]  # every 2.5 s while idle
    assert paths.direct is not None


def test_upgrade_time_runs_from_attempt_start_to_first_direct_packet():
    paths = started(now=1.0)
    paths.handle_timer(1.01)
    (resp, _), = answer(paths.datagrams_to_send())
    paths.on_check(parse_check(resp), PEER_ADDR, 1.05)
    paths.on_direct_rx(("203.0.113.1", 1), 1.06)  # not the direct path: does not count
    assert paths.upgrade["upgrade_ms"] is None
    paths.on_direct_rx(PEER_ADDR, 1.07)
    assert paths.upgrade["upgrade_ms"] == 70.0
