"""A real HTTP CONNECT proxy for tests and the lab: Debian's tinyproxy, bounded.

`Tinyproxy` writes a config into a temp dir (listen address, CONNECT only to the ports
given, basic auth), starts `tinyproxy -d -c CONF` in the foreground under our own pid
(through `popen`, e.g. a kernel-lab namespace's), waits until its port accepts, and
kills it on stop(), on context exit and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["TINYPROXY_BINARY", "Tinyproxy", "ProxyError", "tinyproxy_available"]

TINYPROXY_BINARY = "/usr/bin/tinyproxy"
START_TIMEOUT = 10.0
_running: set[Tinyproxy] = set()


class ProxyError(RuntimeError):
    """tinyproxy did not start (the message carries the tail of its log)."""


def tinyproxy_available(binary: str = TINYPROXY_BINARY) -> tuple[bool, str]:
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return False, f"{binary} not found (apt-get install tinyproxy)"
    return True, "tinyproxy"


def _port_open(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect((ip, port))
        except OSError:
            return False
    return True


class Tinyproxy:
    def __init__(self, *, listen_ip: str = "127.0.0.1", port: int = 0,
                 connect_ports: Sequence[int] = (443,), user: str = "", password: str = "",
                 popen: Callable[..., subprocess.Popen[Any]] | None = None,
                 ready_probe: Callable[[str, int], bool] | None = None) -> None:
        self.listen_ip = listen_ip
        self.port = port or _free_port(listen_ip)
        self.connect_ports = tuple(connect_ports)
        self.user, self.password = user, password
        self._popen = popen or subprocess.Popen
        self._ready = ready_probe or _port_open
        self._dir: str | None = None
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{auth}{self.listen_ip}:{self.port}"

    def _config(self, folder: str) -> str:
        lines = [f"Port {self.port}", f"Listen {self.listen_ip}", "Timeout 60",
                 "MaxClients 256", "LogLevel Warning", f"LogFile \"{folder}/tinyproxy.log\"",
                 f"PidFile \"{folder}/tinyproxy.pid\"", "DisableViaHeader Yes"]
        lines += [f"ConnectPort {p}" for p in self.connect_ports]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        return "\n".join(lines) + "\n"

    def start(self) -> Tinyproxy:
        self._dir = tempfile.mkdtemp(prefix="macula-tinyproxy-")
        os.chmod(self._dir, 0o755)  # tinyproxy drops to nobody: it must reach its log
        conf = os.path.join(self._dir, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write(self._config(self._dir))
        log = os.path.join(self._dir, "tinyproxy.log")
        open(log, "w").close()
        os.chmod(log, 0o666)
        self.proc = self._popen([TINYPROXY_BINARY, "-d", "-c", conf], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready(self.listen_ip, self.port):
                return self
            time.sleep(0.05)
        tail = self._log_tail()
        self.stop()
        raise ProxyError(f"tinyproxy did not start on {self.listen_ip}:{self.port}: {tail}")

    def _log_tail(self) -> str:
        text = ""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            with contextlib.suppress(OSError, ValueError):
                text = self.proc.stderr.read().decode(errors="replace")
        if self._dir is not None:
            with contextlib.suppress(OSError):
                with open(os.path.join(self._dir, "tinyproxy.log")) as f:
                    text += f.read()
        return text.strip()[-400:]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
            if proc.stderr is not None:
                proc.stderr.close()
        _running.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(ip: str) -> int:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


@atexit.register
def _stop_all() -> None:
    for proxy in list(_running):
        proxy.stop()
