"""Which carrier takes a node's gateway traffic (UDP or the TLS link), on a fake clock."""

from macula.node.carrier_choice import (
    LINK_LINGER,
    PROBE_BACKOFF_MAX,
    PROBE_BACKOFF_MIN,
    PROBE_GAP,
    PROBES,
    RACE_AFTER,
    SILENCE,
    CarrierChoice,
)


def run_until(choice: CarrierChoice, end: float) -> tuple[float, int]:
    """Fire the choice's timers up to `end` as a driver would; (time, probes sent)."""
    now, probes = 0.0, 0
    for _ in range(1000):
        timer = choice.get_timer()
        if timer is None or timer > end:
            return end, probes
        now = max(now, timer)
        probes += choice.probes_due(now)
        if choice.wants_dial(now):
            return now, probes
        choice.wants_link_closed(now)
    raise AssertionError("timer never settled")


def test_udp_gets_a_head_start_then_the_link_is_dialled() -> None:
    choice = CarrierChoice(0.0)
    assert not choice.wants_dial(RACE_AFTER - 0.01)
    assert choice.get_timer() == RACE_AFTER
    assert choice.wants_dial(RACE_AFTER)


def test_registered_over_udp_in_time_never_dials() -> None:
    choice = CarrierChoice(0.0)
    choice.on_registered(0.1)
    assert choice.get_timer() is None
    assert not choice.wants_dial(10.0)


def test_link_up_before_registration_takes_the_traffic_then_udp_answers_bring_it_back() -> None:
    choice = CarrierChoice(0.0)
    choice.on_dial_started(RACE_AFTER)
    assert choice.on_link_up(0.4) is True and choice.current == "stream"
    # On the link, UDP is probed with backoff: 1 s, then 2 s, then 4 s ...
    assert choice.get_timer() == 0.4 + PROBE_BACKOFF_MIN
    assert choice.probes_due(1.4) == 1
    assert choice.get_timer() == 1.4 + 2 * PROBE_BACKOFF_MIN
    assert choice.on_udp_heard(1.45) is True and choice.current == "udp"
    assert choice.counters.to_stream == choice.counters.to_udp == 1
    # The link is kept a while for what is still in flight on it, then let go.
    assert not choice.wants_link_closed(1.45 + LINK_LINGER - 0.1)
    assert choice.wants_link_closed(1.45 + LINK_LINGER)


def test_probe_backoff_is_capped() -> None:
    choice = CarrierChoice(0.0)
    choice.on_dial_started(RACE_AFTER)
    choice.on_link_up(0.4)
    now, gaps = 0.4, []
    for _ in range(12):
        timer = choice.get_timer()
        assert timer is not None
        gaps.append(round(timer - now, 6))
        now = timer
        assert choice.probes_due(now) == 1
    assert max(gaps) == PROBE_BACKOFF_MAX and gaps[0] == PROBE_BACKOFF_MIN


def test_udp_silence_is_probed_before_it_counts_as_gone() -> None:
    choice = CarrierChoice(0.0)
    choice.on_registered(0.05)
    choice.on_udp_sent(1.0)  # a relay frame; nothing comes back
    # Probes start after SILENCE, PROBE_GAP apart; after the last one's gap: dial.
    when, probes = run_until(choice, 10.0)
    assert probes == PROBES
    assert abs(when - (1.0 + SILENCE + PROBES * PROBE_GAP)) < 1e-9
    assert choice.on_link_up(when + 0.05) is True and choice.current == "stream"


def test_an_answer_during_probing_keeps_udp() -> None:
    choice = CarrierChoice(0.0)
    choice.on_registered(0.05)
    choice.on_udp_sent(1.0)
    assert choice.probes_due(1.0 + SILENCE) == 1
    choice.on_udp_heard(1.0 + SILENCE + 0.01)
    assert not choice.wants_dial(5.0)
    assert choice.get_timer() is None  # quiet again until the next unanswered send


def test_the_link_dropping_moves_traffic_back_to_udp_and_redials_with_backoff() -> None:
    choice = CarrierChoice(0.0)
    choice.on_dial_started(RACE_AFTER)
    choice.on_link_up(0.4)
    assert choice.on_link_closed(2.0, "reset") is True and choice.current == "udp"
    assert not choice.wants_dial(2.1)  # REDIAL_MIN later
    assert choice.wants_dial(2.5)
    choice.on_dial_started(2.5)
    choice.on_link_failed(2.6, "tcp_connect: refused")
    assert choice.last_error == "tcp_connect: refused"
    assert not choice.wants_dial(3.0) and choice.wants_dial(3.6)  # doubled


def test_losing_registration_gives_udp_its_head_start_again() -> None:
    choice = CarrierChoice(0.0)
    choice.on_registered(0.05)
    choice.on_unregistered(10.0, rtt=0.1)
    assert not choice.wants_dial(10.0 + RACE_AFTER)
    assert choice.wants_dial(10.0 + RACE_AFTER + 0.1)
