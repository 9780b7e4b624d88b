"""The `macula` command as a user runs it: separate processes on loopback."""

import json
import os
import pathlib
import socket
import stat
import subprocess
import sys
import urllib.request

import pytest

MACULA = [sys.executable, "-m", "macula.cli"]


def run(*args, timeout=60, **kwargs):
    return subprocess.run([*MACULA, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["MACULA_CONFIG_DIR"] = str(tmp_path / "conf")
    return e


def test_id_creates_key_once_and_prints_stable_id(tmp_path, env):
    first = run("id", env=env)
    second = run("id", env=env)
    assert first.returncode == 0 and len(first.stdout.strip()) == 26
    assert first.stdout == second.stdout
    key = tmp_path / "conf" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_demo_json_last_line(env):
    out = run("demo", "--json", "--messages", "1000", "--strategy", "always_relay", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["delivered"] == result["sent"] >= 2000
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    assert result["path"] == "relay"
    assert result["first_byte_ms"] > 0
    assert "every message arrived once" in out.stdout


def test_config_error_names_key_and_file(tmp_path, env):
    bad = tmp_path / "bad.toml"
    bad.write_text('connection_strategy = "sometimes"\n')
    out = run("demo", "--config", str(bad), env=env)
    assert out.returncode == 2
    assert "connection_strategy" in out.stderr and str(bad) in out.stderr


def test_env_override_error_names_variable(env):
    env["MACULA_NAT_TRAVERSAL_HOLE_PUNCH_TIMEOUT"] = "fast"
    out = run("id", env=env)
    assert out.returncode == 2
    assert "MACULA_NAT_TRAVERSAL_HOLE_PUNCH_TIMEOUT" in out.stderr


def test_gateway_and_nodes_as_processes(tmp_path, env):
    gw_port, metrics_port = free_port(), free_port(socket.SOCK_STREAM)
    gateway = subprocess.Popen(
        [*MACULA, "gateway", "--listen", f"127.0.0.1:{gw_port}", "--metrics",
         f"127.0.0.1:{metrics_port}", "--key-file", str(tmp_path / "gw.key")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    listener = None
    try:
        assert "listening on" in gateway.stdout.readline()
        listener_key = tmp_path / "listener.key"
        listener_id = run("id", "--key-file", str(listener_key), env=env).stdout.strip()
        listener = subprocess.Popen(
            [*MACULA, "node", "--gateway", f"127.0.0.1:{gw_port}", "--key-file", str(listener_key),
             "--expect", "4", "--timeout-listen", "30", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert "registered" in listener.stderr.readline()
        sent = run("node", "--gateway", f"127.0.0.1:{gw_port}", "--key-file",
                   str(tmp_path / "sender.key"), "--send", listener_id, "--message", "hello",
                   "--message", "world", "--count", "2", "--json", env=env)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout.strip().splitlines()[-1])["connection_type"] in ("relay", "direct")
        out, _ = listener.communicate(timeout=30)
        assert listener.returncode == 0
        lines = [json.loads(line) for line in out.strip().splitlines()]
        assert [m["message"] for m in lines][:4] == ["hello", "world", "hello", "world"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b"macula_gateway_relayed_packets_total" in metrics
    finally:
        for proc in (listener, gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    assert gateway.returncode == 0


def test_send_to_offline_node_is_a_clear_error(tmp_path, env):
    gw_port = free_port()
    gateway = subprocess.Popen(
        [*MACULA, "gateway", "--listen", f"127.0.0.1:{gw_port}", "--key-file",
         str(tmp_path / "gw.key")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        gateway.stdout.readline()
        ghost = run("id", "--key-file", str(tmp_path / "ghost.key"), env=env).stdout.strip()
        out = run("node", "--gateway", f"127.0.0.1:{gw_port}", "--send", ghost,
                  "--message", "x", env=env)
        assert out.returncode == 2
        assert f"node {ghost} is not online" in out.stderr
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def test_gateway_given_by_hostname(tmp_path, env):
    gw_port = free_port()
    gateway = subprocess.Popen(
        [*MACULA, "gateway", "--listen", f"127.0.0.1:{gw_port}", "--key-file",
         str(tmp_path / "gw.key")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        gateway.stdout.readline()
        out = run("node", "--gateway", f"localhost:{gw_port}", "--timeout-listen", "0.5",
                  "--key-file", str(tmp_path / "n.key"), env=env)
        assert out.returncode == 0, out.stderr
        assert "registered" in out.stdout
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def _start_gateway(port: int, key: pathlib.Path, env: dict) -> tuple[subprocess.Popen, str]:
    gateway = subprocess.Popen(
        [*MACULA, "gateway", "--listen", f"127.0.0.1:{port}", "--key-file", str(key)],
        stdout=subprocess.PIPE, text=True, env=env)
    line = gateway.stdout.readline()
    pin = line.strip().rsplit(" ", 1)[-1]  # "... nodes pin it as ID@127.0.0.1:PORT"
    assert pin.endswith(f"@127.0.0.1:{port}"), line
    return gateway, pin


def _stop(gateway: subprocess.Popen) -> None:
    gateway.terminate()
    gateway.wait(timeout=10)


def test_nodes_pin_their_gateway(tmp_path, env):
    """ID@host:port refuses any other key; without an id the first key seen is remembered
    beside the node key, a changed key is refused with the command that accepts it."""
    port = free_port()
    gateway, pin = _start_gateway(port, tmp_path / "gw.key", env)
    ghost = run("id", "--key-file", str(tmp_path / "ghost.key"), env=env).stdout.strip()
    try:
        wrong = run("id", "--key-file", str(tmp_path / "other.key"), env=env).stdout.strip()
        out = run("node", "--gateway", f"{wrong}@127.0.0.1:{port}", "--send", ghost,
                  "--message", "x", "--timeout", "5", env=env)
        assert out.returncode == 2, out.stderr
        assert f"presents key {pin.split('@')[0]}" in out.stderr and f"pins {wrong}" in out.stderr
        # The right id: gets as far as the gateway (the peer is simply offline).
        out = run("node", "--gateway", pin, "--send", ghost, "--message", "x", env=env)
        assert f"node {ghost} is not online" in out.stderr
        # No id: trust on first use, remembered beside the node key.
        out = run("node", "--gateway", f"127.0.0.1:{port}", "--send", ghost, "--message", "x",
                  env=env)
        assert f"node {ghost} is not online" in out.stderr
        known = pathlib.Path(env["MACULA_CONFIG_DIR"]) / "known_gateways"
        assert f"127.0.0.1:{port} {pin.split('@')[0]}" in known.read_text()
    finally:
        _stop(gateway)
    # Another key at the same address: refused, and told how to accept it.
    gateway, new_pin = _start_gateway(port, tmp_path / "gw2.key", env)
    try:
        out = run("node", "--gateway", f"127.0.0.1:{port}", "--send", ghost, "--message", "x",
                  "--timeout", "5", env=env)
        assert out.returncode == 2
        assert f"macula trust-gateway {new_pin}" in out.stderr and str(known) in out.stderr
        trusted = run("trust-gateway", new_pin, env=env)
        assert trusted.returncode == 0, trusted.stderr
        out = run("node", "--gateway", f"127.0.0.1:{port}", "--send", ghost, "--message", "x",
                  env=env)
        assert f"node {ghost} is not online" in out.stderr
    finally:
        _stop(gateway)
