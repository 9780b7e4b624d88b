"""`macula up`, `status`, `ping` and `forward` as a user runs them: processes on loopback,
real TCP through the forward (an HTTP server and client), over the relay and direct."""

import contextlib
import hashlib
import http.server
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

MACULA = [sys.executable, "-m", "macula.cli"]


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Background `macula` processes, each stopped by its own pid at the end."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, MACULA_CONFIG_DIR=str(tmp / "conf"))
        self.procs: list[subprocess.Popen] = []

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*MACULA, *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def start(self, *args: str, ready: str, on_stderr: bool = False) -> tuple[subprocess.Popen, str]:
        """Start and read stdout (or stderr) up to the line containing `ready` (bounded)."""
        proc = subprocess.Popen([*MACULA, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = (proc.stderr if on_stderr else proc.stdout).readline()
            if ready in line:
                return proc, line
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise AssertionError(f"{args[0]} did not start: {proc.communicate()}")

    def key(self, name: str) -> tuple[str, str]:
        path = str(self.tmp / f"{name}.key")
        return path, self.run("id", "--key-file", path).stdout.strip()

    def stop(self, proc: subprocess.Popen) -> str:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        return err

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                self.stop(proc)


@pytest.fixture
def gateway(procs):
    port = free_port()
    proc, line = procs.start("gateway", "--listen", f"127.0.0.1:{port}", "--key-file",
                             str(procs.tmp / "gw.key"), ready="nodes pin it as")
    return line.strip().rsplit(" ", 1)[-1]  # NODE_ID@127.0.0.1:port


@pytest.fixture
def web(tmp_path):
    """An HTTP server on loopback serving a 50 MB file; yields (port, sha256)."""
    root = tmp_path / "www"
    root.mkdir()
    blob = hashlib.sha256(b"macula").digest() * (50 * 1024 * 1024 // 32)
    blob = bytes(b ^ (i & 0xFF) for i, b in enumerate(blob[:4096])) + blob[4096:]
    (root / "big.bin").write_bytes(blob)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hashlib.sha256(blob).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


def fetch_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_ping_shows_the_path_move_from_relay_to_direct(procs, gateway):
    b_key, b_id = procs.key("b")
    procs.start("up", "--gateway", gateway, "--key-file", b_key, ready="macula up:")
    a_key, _ = procs.key("a")
    out = procs.run("ping", b_id, "--gateway", gateway, "--key-file", a_key, "-c", "6",
                    "-i", "0.25", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The session opens on the relay; the move to direct shows on the first probe that
    # went direct (on loopback that can be the first: the direct path may win during the
    # handshake).
    assert result["opened_via"] == "relay" and result["final_path"] == "direct"
    assert all(p["rtt_ms"] > 0 for p in result["probes"])
    moved = next(p for p in result["probes"] if p.get("changed_from") == "relay")
    assert moved["path"] == "direct" and moved["upgrade_ms"] > 0
    assert result["upgrade_ms"] == moved["upgrade_ms"]
    assert "via direct" in out.stderr and "(moved from relay, upgraded after" in out.stderr


def test_ping_of_an_offline_node_fails(procs, gateway):
    a_key, _ = procs.key("a")
    _, ghost = procs.key("ghost")
    out = procs.run("ping", ghost, "--gateway", gateway, "--key-file", a_key, "-c", "1",
                    "--timeout", "3")
    assert out.returncode != 0
    assert "offline" in out.stderr or "not online" in out.stderr, out.stderr


@pytest.mark.parametrize("strategy", ["always_relay", "opportunistic"])
def test_forward_carries_an_http_download_byte_exact(procs, gateway, web, strategy):
    web_port, sha = web
    b_key, b_id = procs.key("b")
    a_key, a_id = procs.key("a")
    procs.start("up", "--gateway", gateway, "--key-file", b_key, "--strategy", strategy,
                "--expose", str(web_port), "--allow", a_id, ready="macula up:")
    local = free_port(socket.SOCK_STREAM)
    procs.start("forward", f"{b_id}:{web_port}", "--listen", f"127.0.0.1:{local}",
                "--gateway", gateway, "--key-file", a_key, "--strategy", strategy,
                ready="macula forward:")
    assert fetch_sha256(f"http://127.0.0.1:{local}/big.bin") == sha
    status = procs.run("status", "--key-file", b_key, "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    [session] = state["sessions"]
    assert session["peer"] == a_id and session["latency_ms"] > 0
    assert session["path"] == ("relay" if strategy == "always_relay" else "direct")
    assert session["bytes_sent"] > 50 * 1024 * 1024
    text = procs.run("status", "--key-file", b_key).stdout
    assert a_id in text and session["path"] in text and " ms" in text


def test_forward_to_a_closed_port_or_by_a_stranger_is_refused_not_hung(procs, gateway):
    b_key, b_id = procs.key("b")
    a_key, a_id = procs.key("a")
    dead = free_port(socket.SOCK_STREAM)  # nothing listens here
    up, _ = procs.start("up", "--gateway", gateway, "--key-file", b_key, "--expose", str(dead),
                        "--allow", a_id, ready="macula up:")
    local = free_port(socket.SOCK_STREAM)
    fwd, _ = procs.start("forward", f"{b_id}:{dead}", "--listen", f"127.0.0.1:{local}",
                         "--gateway", gateway, "--key-file", a_key, ready="macula forward:")
    started = time.monotonic()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
        urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=20)
    assert time.monotonic() - started < 10
    assert "nothing answers" in procs.stop(fwd)
    # A node that is not allowed gets no session at all, and the refusal is logged.
    c_key, c_id = procs.key("c")
    local_c = free_port(socket.SOCK_STREAM)
    fwd_c, _ = procs.start("forward", f"{b_id}:{dead}", "--listen", f"127.0.0.1:{local_c}",
                           "--gateway", gateway, "--key-file", c_key, "--timeout", "5",
                           ready="macula forward:")
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
        urllib.request.urlopen(f"http://127.0.0.1:{local_c}/", timeout=20)
    assert "not accepted" in procs.stop(fwd_c)
    up_log = procs.stop(up)
    assert f"forward from {a_id} refused: nothing answers" in up_log
    assert f"session from {c_id} refused: not in node.accept_from" in up_log


def test_expose_without_allow_is_refused(procs, gateway):
    b_key, _ = procs.key("b")
    out = procs.run("up", "--gateway", gateway, "--key-file", b_key, "--expose", "22")
    assert out.returncode == 2 and "--allow" in out.stderr


def test_status_without_a_running_node_says_so(procs):
    out = procs.run("status", "--key-file", str(procs.tmp / "nobody.key"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "no node is running" in out.stderr


def test_gateway_status_lists_its_nodes_on_the_socket_and_over_http(procs):
    port, metrics = free_port(), free_port(socket.SOCK_STREAM)
    _gw, line = procs.start("gateway", "--listen", f"127.0.0.1:{port}", "--key-file",
                            str(procs.tmp / "gw.key"), "--metrics", f"127.0.0.1:{metrics}",
                            ready="nodes pin it as")
    pin = line.strip().rsplit(" ", 1)[-1]
    b_key, b_id = procs.key("b")
    node_metrics = free_port(socket.SOCK_STREAM)
    procs.start("up", "--gateway", pin, "--key-file", b_key, "--metrics",
                f"127.0.0.1:{node_metrics}", ready="macula up:")
    out = procs.run("status", "--gateway", "--key-file", str(procs.tmp / "gw.key"), "--json")
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert [n["node_id"] for n in state["nodes"]] == [b_id]
    assert state["pin"] == pin
    over_http = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{metrics}/status",
                                                  timeout=5).read())
    assert [n["node_id"] for n in over_http["nodes"]] == [b_id]
    node_http = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node_metrics}/status",
                                                  timeout=5).read())
    assert node_http["node_id"] == b_id and node_http["registered"] is True
    metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics",
                                          timeout=5).read().decode()
    assert "macula_gateway_nodes_online 1.0" in metrics_text


def test_a_second_process_with_a_live_key_is_reported_to_both_and_the_gateway(procs):
    port = free_port()
    gw, line = procs.start("gateway", "--listen", f"127.0.0.1:{port}", "--key-file",
                           str(procs.tmp / "gw.key"), ready="nodes pin it as")
    pin = line.strip().rsplit(" ", 1)[-1]
    b_key, b_id = procs.key("b")
    first, _ = procs.start("up", "--gateway", pin, "--key-file", b_key, ready="macula up:")
    # A second `up` with the key stops at the admin socket, before touching the gateway.
    again = procs.run("up", "--gateway", pin, "--key-file", b_key, "--timeout", "5")
    assert again.returncode == 2 and "already serving" in again.stderr
    # Another kind of process with the key registers and takes the place: all three say so.
    second = procs.run("node", "--gateway", pin, "--key-file", b_key, "--timeout-listen", "1")
    assert "another process with this key" in second.stderr
    assert first.wait(timeout=10) == 2
    assert "another process uses this key" in procs.stop(first)
    assert "while a connection with its key" in procs.stop(gw) and b_id in procs.stop(gw)


def test_timeout_bounds_registration_and_lines_are_messages(procs, gateway):
    a_key, _ = procs.key("a")
    started = time.monotonic()
    out = procs.run("node", "--gateway", f"127.0.0.1:{free_port()}", "--key-file", a_key,
                    "--send", "a" * 26, "--message", "x", "--timeout", "2")
    assert out.returncode == 2 and "within 2" in out.stderr
    assert time.monotonic() - started < 6
    b_key, b_id = procs.key("b")
    listener, _ = procs.start("node", "--gateway", gateway, "--key-file", b_key, "--json",
                              "--expect", "3", "--timeout-listen", "30", ready="registered",
                              on_stderr=True)
    sender = subprocess.run([*MACULA, "node", "--gateway", gateway, "--key-file", a_key,
                             "--send", b_id, "--lines"], input="one\ntwo\nthree\n",
                            capture_output=True, text=True, timeout=60, env=procs.env)
    assert sender.returncode == 0, sender.stderr
    assert "sent 3 message(s)" in sender.stdout
    out, _ = listener.communicate(timeout=30)
    assert [json.loads(line)["message"] for line in out.splitlines()] == ["one", "two", "three"]
