"""Input cannot blow up the log: clipped echoes, one line per interval for a flood."""

from __future__ import annotations

import logging

import pytest
from core_harness import gateway_and_nodes

from macula.logsafe import Throttle, clip
from macula.wire import control


def test_clip_keeps_short_text_and_says_how_much_was_cut() -> None:
    assert clip("short") == "short"
    assert clip("x" * 1000, 10) == "xxxxxxxxxx...(990 more)"


def test_throttle_on_a_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = Throttle(interval=10.0, clock=lambda: now[0])
    log = logging.getLogger("test.throttle")
    caplog.set_level(logging.WARNING, logger="test.throttle")
    results = [throttle.log(log, logging.WARNING, "k", "flood %d", i) for i in range(100)]
    assert results.count(True) == 1
    now[0] = 10.5
    assert throttle.log(log, logging.WARNING, "k", "flood again")
    assert throttle.log(log, logging.WARNING, "other", "another key gets through")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["flood 0", "flood again (and 99 more like it in the last 10 s)",
                     "another key gets through"]


def test_a_gateway_spamming_errors_costs_the_node_one_short_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="macula.node.core")
    net, gateway, (node, _other) = gateway_and_nodes()
    net.run(0.5)
    ctl = next(c for c in gateway._controls.values() if c.node_id == node.node_id)
    for _ in range(500):
        gateway._send(ctl, control.Error("x" * 5000, "y" * 50_000))
    net.run(0.5)
    lines = [r.getMessage() for r in caplog.records if "gateway error" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 400
