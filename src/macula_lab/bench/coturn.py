"""A throwaway coturn on 127.0.0.1 for the relay comparison, started and killed by us.

coturn refuses by default to relay to loopback peers, so it runs with
--allow-loopback-peers, listening and relaying on 127.0.0.1 only, with long-term
credentials, no TLS/DTLS, no CLI, and a private relay port range below Linux's ephemeral
range. As root it runs as nobody: a benchmark never needs a privileged relay.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from macula_lab.bench.procs import kill_pid

USER, PASSWORD, REALM = "bench", "bench-secret", "macula.bench"
_NOBODY = 65534


def coturn_path() -> str | None:
    return shutil.which("turnserver") or (
        "/usr/bin/turnserver" if Path("/usr/bin/turnserver").exists() else None)


def coturn_version() -> str | None:
    path = coturn_path()
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stun_answers(port: int, timeout: float) -> bool:
    # A bare Binding request (RFC 5389 header, no attributes): coturn answers when ready.
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(request, ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
        return data[:2] == b"\x01\x01"


class Coturn:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, workdir: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.address = ("127.0.0.1", port)
        self._workdir = workdir

    @classmethod
    async def start(cls, *, relay_threads: int | None = None, ready_timeout: float = 10.0) -> Coturn:
        path = coturn_path()
        if path is None:
            raise RuntimeError("coturn (turnserver) is not installed: apt-get install coturn")
        workdir = tempfile.mkdtemp(prefix="macula-bench-coturn-")
        os.chmod(workdir, 0o777)  # nobody writes its log and pid there
        port = _free_udp_port()
        low = random.randrange(20000, 29000)
        args = [
            path, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={port}", f"--min-port={low}", f"--max-port={low + 200}",
            "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp-relay",
            "--no-rfc5780", "--no-software-attribute", "--simple-log", "--no-stdout-log",
            f"--log-file={workdir}/turn.log", f"--pidfile={workdir}/turn.pid",
            f"--userdb={workdir}/turndb",
        ]
        if relay_threads is not None:
            args.append(f"--relay-threads={relay_threads}")
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs.update(user=_NOBODY, group=_NOBODY, extra_groups=[])
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, cwd=workdir, **kwargs)
        server = cls(proc, port, workdir)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            if await asyncio.to_thread(_stun_answers, port, 0.2):
                return server
            await asyncio.sleep(0.05)
        log = server.log_tail()
        await server.stop()
        raise RuntimeError(f"coturn did not come up on 127.0.0.1:{port}: {log}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self._workdir, "turn.log").read_text(errors="replace")
        except OSError:
            return "no log"
        return " | ".join(text.strip().splitlines()[-lines:])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
                await asyncio.wait_for(self.proc.wait(), 3.0)
            except (TimeoutError, ProcessLookupError):
                kill_pid(self.pid)
                try:
                    await asyncio.wait_for(self.proc.wait(), 5.0)
                except TimeoutError:
                    pass
        shutil.rmtree(self._workdir, ignore_errors=True)
