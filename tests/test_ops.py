"""What an operator runs into: log lines, errors that name what is wrong, metrics that obey
Prometheus' rules (checked by promtool when it is installed), the shipped alert rules and
dashboard, and the gateway's second address for RFC 5780 tests."""

import asyncio
import json
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from test_cli_up import free_port

from macula.config import ConfigError, load_config
from macula.metrics import GatewayCollector, NodeCollector, registry_for, render

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool not installed (Debian package prometheus)")


# ---------------------------------------------------------------- logs
def test_info_logs_tell_the_story_without_aioquic(procs):
    port = free_port()
    _gw, line = procs.start("gateway", "--listen", f"127.0.0.1:{port}", "--key-file",
                            str(procs.tmp / "gw.key"), "--log-level", "info",
                            ready="nodes pin it as")
    pin = line.strip().rsplit(" ", 1)[-1]
    b_key, b_id = procs.key("b")
    listener, _ = procs.start("node", "--gateway", pin, "--key-file", b_key, "--expect", "1",
                              "--timeout-listen", "30", "--log-level", "info",
                              ready="registered")
    time.sleep(2.5)  # NAT discovery at the gateway's STUN sockets takes about 1.5 s
    a_key, a_id = procs.key("a")
    sender = procs.run("node", "--gateway", pin, "--key-file", a_key, "--send", b_id,
                       "--message", "hello", "--log-level", "info")
    assert sender.returncode == 0, sender.stderr
    assert f"session with {b_id} opened" in sender.stderr
    assert re.search(rf"punch 1 with {b_id}: success \(direct\) after \d+ ms", sender.stderr)
    _out, log = listener.communicate(timeout=30)
    assert re.search(r"INFO macula\.node\.node: registered with gateway \w+@127\.0\.0\.1:\d+ over udp; "
                     r"it sees us at 127\.0\.0\.1:\d+", log)
    assert re.search(r"INFO macula\.node\.core: NAT type \w+ \(mapping", log)
    assert f"session with {a_id} accepted" in log
    assert re.search(rf"session with {a_id}: relay -> direct, \d+ ms after it opened", log)
    gateway_log = procs.stop(_gw)
    assert f"node {b_id} registered from 127.0.0.1:" in gateway_log
    assert re.search(r"punch 1 ordered between \w+ \(\w+\) and \w+ \(\w+\)", gateway_log)
    for text in (log, sender.stderr, gateway_log):
        assert " quic:" not in text and "aioquic" not in text


def test_json_log_lines_parse(procs):
    key, _ = procs.key("a")
    out = procs.run("node", "--gateway", f"127.0.0.1:{free_port()}", "--key-file", key,
                    "--send", "a" * 26, "--timeout", "0.5", "--log-format", "json",
                    "--log-level", "debug")
    lines = [line for line in out.stderr.splitlines() if line.startswith("{")]
    assert lines, out.stderr
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(entry)


# ---------------------------------------------------------------- errors
def test_stun_port_taken_names_it_and_exits_2(procs):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1] - 1  # the gateway's STUN port is listen + 1
        out = procs.run("gateway", "--listen", f"127.0.0.1:{port}", "--key-file",
                        str(procs.tmp / "gw.key"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert f"STUN alternate port socket 127.0.0.1:{port + 1}" in out.stderr
    assert "Traceback" not in out.stderr


def test_metrics_port_taken_is_named(procs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = taken.getsockname()[1]
        out = procs.run("gateway", "--listen", f"127.0.0.1:{free_port()}", "--key-file",
                        str(procs.tmp / "gw.key"), "--metrics", f"127.0.0.1:{metrics}")
    assert out.returncode == 2 and f"metrics socket 127.0.0.1:{metrics}" in out.stderr


def test_a_config_with_several_errors_lists_all(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('connection_strategy = "sometimes"\n[node]\nkeepalive_interval = -1\n'
                   '[gateway]\nsecond_ip = "not an ip"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(bad, env={})
    text = str(caught.value)
    assert str(bad) in text and "3 problems" in text
    for key in ("connection_strategy", "node.keepalive_interval", "gateway.second_ip"):
        assert key in text
    assert [p.key for p in caught.value.problems] == [
        "connection_strategy", "node.keepalive_interval", "gateway.second_ip"]


def test_errors_from_flags_name_the_flag(procs):
    out = procs.run("gateway", "--second-ip", "nope", "--key-file", str(procs.tmp / "g.key"))
    assert out.returncode == 2 and "flag --second-ip" in out.stderr


# ---------------------------------------------------------------- metrics
async def _metrics_after_a_closed_session():
    from macula import Gateway, Node

    gateway = await Gateway.start(listen=("127.0.0.1", 0))
    common = dict(gateway=gateway.address, listen=("127.0.0.1", 0))
    a, b = await Node.start(**common), await Node.start(**common)
    try:
        session = await a.connect(b.node_id)
        await b.accept(5)
        session.send(b"x" * 5000)
        await session.drain(0)
        open_text = render(registry_for(NodeCollector(a.core)))
        await session.close()
        await asyncio.sleep(0.1)
        closed_text = render(registry_for(NodeCollector(a.core)))
        gateway_text = render(registry_for(GatewayCollector(gateway.core)))
        return open_text, closed_text, gateway_text
    finally:
        await a.close()
        await b.close()
        await gateway.close()


def _samples(text: str, name: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name)}


async def test_byte_counters_survive_the_session_and_gauges_read_zero():
    open_text, closed_text, _ = await _metrics_after_a_closed_session()
    before = _samples(open_text, "macula_node_sent_bytes_total")
    after = _samples(closed_text, "macula_node_sent_bytes_total")
    assert sum(before.values()) > 5000
    assert all(after[series] >= value for series, value in before.items())
    sessions = _samples(closed_text, "macula_node_sessions{")
    assert sessions == {'macula_node_sessions{path="direct"}': 0.0,
                        'macula_node_sessions{path="relay"}': 0.0,
                        'macula_node_sessions{path="turn"}': 0.0}
    assert _samples(closed_text, "macula_node_first_byte_seconds_count")[
        "macula_node_first_byte_seconds_count"] >= 1
    assert 'macula_node_upgrade_seconds_bucket{le="+Inf"}' in closed_text


@needs_promtool
async def test_promtool_accepts_both_endpoints():
    _, node_text, gateway_text = await _metrics_after_a_closed_session()
    for text in (node_text, gateway_text):
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_rules_pass_their_unit_tests():
    rules = ROOT / "deploy" / "prometheus"
    check = subprocess.run([PROMTOOL, "check", "rules", "macula-rules.yml"], cwd=rules,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    out = subprocess.run([PROMTOOL, "test", "rules", "macula-rules.test.yml"], cwd=rules,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_and_dashboard_use_only_series_that_exist():
    """Every metric the rules and the dashboard read is one the collectors export (or a
    recording rule), so a renamed metric cannot leave a silent panel or alert."""
    exported = set(re.findall(r'"(macula_[a-z_]+)"', (ROOT / "src/macula/metrics.py").read_text()))
    exported |= {f"macula_node_{n}_seconds" for n in ("first_byte", "upgrade")}
    counters = {f"{name}_total" for name in exported}
    histograms = {f"{name}_{s}" for name in exported for s in ("bucket", "sum", "count")}
    rules_text = (ROOT / "deploy/prometheus/macula-rules.yml").read_text()
    recorded = set(re.findall(r"record: (macula:[a-z0-9_:]+)", rules_text))
    dashboard = json.loads((ROOT / "deploy/grafana/macula-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [line for line in rules_text.splitlines()
              if not re.search(r"record:|summary:|description:|^\s*#", line)]
    used = {name for expr in exprs for name in re.findall(r"\bmacula[_:][a-z0-9_:]*", expr)}
    unknown = used - exported - counters - histograms - recorded
    assert not unknown, f"unknown series {sorted(unknown)}"
    assert len(dashboard["panels"]) >= 10


def test_gateway_second_ip_is_announced_as_other_address(procs):
    port = free_port()
    procs.start("gateway", "--listen", f"127.0.0.1:{port}", "--second-ip", "127.0.0.2",
                "--alternate-port", str(free_port()), "--key-file", str(procs.tmp / "gw.key"),
                ready="nodes pin it as")
    out = subprocess.run([sys.executable, "-m", "macula.cli", "netcheck", "--gateway",
                          f"127.0.0.1:{port}", "--json", "--no-portmap"],
                         capture_output=True, text=True, timeout=60, env=procs.env)
    if "unrecognized arguments: --no-portmap" in out.stderr:
        pytest.fail("netcheck must be able to skip the router query in tests")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gateway"]["other_address"].startswith("127.0.0.2:")
    assert len(result["gateway"]["stun_sockets_answering"]) == 3


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    """The shipped units pass `systemd-analyze verify`. It insists that ExecStart's binary
    exists, so the copies checked point at this checkout's macula instead of
    /opt/macula/venv/bin/macula; nothing else is changed."""
    here = shutil.which("macula") or str(pathlib.Path(sys.executable).parent / "macula")
    units = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["macula-gateway.service", "macula-node.service"]
    for unit in units:
        text = unit.read_text()
        assert "/opt/macula/venv/bin/macula " in text and "User=macula" in text
        assert "NoNewPrivileges=yes" in text and "StateDirectory=" in text
        assert "Restart=on-failure" in text
        (tmp_path / unit.name).write_text(text.replace("/opt/macula/venv/bin/macula", here))
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", *[str(tmp_path / u.name) for u in units]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
