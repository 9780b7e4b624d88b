"""A real Redis for tests and the lab: Debian's redis-server, bounded.

`RedisServer` starts `redis-server` in the foreground under our own pid (through `popen`,
e.g. a kernel-lab namespace's) on a TCP port or a unix socket, with no persistence (an
outage in the lab is a restart with nothing kept, the harder case for the cluster), waits
until it answers, and kills it on stop(), on context exit and at interpreter exit. It can
be stopped and started again on the same address (the lab's redis-down fault).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from macula_lab.proxy import _free_port, _port_open

__all__ = ["REDIS_BINARY", "RedisServer", "RedisServerError", "redis_available"]

REDIS_BINARY = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
_running: set[RedisServer] = set()


class RedisServerError(RuntimeError):
    """redis-server did not start (the message carries the tail of its output)."""


def redis_available(binary: str = REDIS_BINARY) -> tuple[bool, str]:
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return False, f"{binary} not found (apt-get install redis-server)"
    return True, "redis-server"


def _socket_ready(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(path)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class RedisServer:
    def __init__(self, *, listen_ip: str = "127.0.0.1", port: int | None = None,
                 unix_socket: bool = False,
                 popen: Callable[..., subprocess.Popen[Any]] | None = None,
                 ready_probe: Callable[[str, int], bool] | None = None) -> None:
        """TCP on `listen_ip`:`port` (a free one by default), or with `unix_socket` a
        socket in a private temp dir and no TCP at all."""
        self.listen_ip = listen_ip
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or _free_port(listen_ip))
        self._popen = popen or subprocess.Popen
        self._ready = ready_probe or _port_open
        self._dir = tempfile.mkdtemp(prefix="macula-redis-")
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self._dir, "redis.sock")

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://{self.listen_ip}:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_BINARY, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", self._dir, "--loglevel", "warning",
                # No password in the lab: without this Redis refuses every client that is
                # not on loopback (the kernel lab's gateways are on the server's address).
                "--protected-mode", "no"]
        args += (["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
                 if self.unix_socket else ["--bind", self.listen_ip])
        self.proc = self._popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if (_socket_ready(self.socket_path) if self.unix_socket
                    else self._ready(self.listen_ip, self.port)):
                return self
            time.sleep(0.05)
        tail = self._output_tail()
        self.stop()
        raise RedisServerError(f"redis-server did not start at {self.url}: {tail}")

    def _output_tail(self) -> str:
        proc = self.proc
        if proc is None or proc.stdout is None or proc.poll() is None:
            return ""
        try:
            return proc.stdout.read().decode(errors="replace").strip()[-400:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        """Kill it (the lab's outage): what it held is gone, as after a crash."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        _running.discard(self)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.close()
