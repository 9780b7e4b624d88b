"""Child processes of the bench: workers speaking JSON lines, and their cleanup.

A worker prints JSON objects one per line on stdout and reads commands the same way on
stdin. Every read has a timeout, and every child is killed by its own pid when the case
ends, whatever happened: a benchmark must never leave load generators behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

_SRC = str(Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
    """A worker died, said it failed, or did not answer in time."""


def worker_env(extra_path: str | None = None) -> dict[str, str]:
    # The child must import this very checkout, also from a throwaway interpreter (qh3).
    env = dict(os.environ)
    parts = [_SRC] + ([extra_path] if extra_path else [])
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Worker:
    """One `python -m macula_lab.bench.worker SPEC` child."""

    def __init__(self, proc: asyncio.subprocess.Process, role: str, stderr: IO[bytes]) -> None:
        self.proc = proc
        self.role = role
        self.pid = proc.pid
        self._stderr = stderr

    @classmethod
    async def start(cls, spec: dict[str, Any], *, python: str | None = None) -> Worker:
        # stderr to a file, not a pipe: a chatty worker must never block on a full pipe.
        stderr = tempfile.TemporaryFile()
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable, "-m", "macula_lab.bench.worker", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=stderr, env=worker_env(),
        )
        return cls(proc, spec["role"], stderr)

    async def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON object the worker prints (other lines are skipped)."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise WorkerError(f"{self.role}: no answer within {timeout} s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                raise WorkerError(f"{self.role}: no answer within {timeout} s") from None
            if not line:
                await asyncio.sleep(0.05)  # let the exit status land
                err = self._stderr_tail()
                raise WorkerError(f"{self.role} exited ({self.proc.returncode}): {err}")
            text = line.decode(errors="replace").strip()
            if not text.startswith("{"):
                continue
            msg = json.loads(text)
            if "error" in msg:
                raise WorkerError(f"{self.role}: {msg['error']}")
            return msg

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        if self.proc.returncode is None and not self.proc.stdin.is_closing():
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())

    def close_stdin(self) -> None:
        """EOF on the worker's stdin: "we are done with you, report and leave"."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def finish(self, timeout: float) -> dict[str, Any]:
        """The worker's final result line; the worker is killed if it overstays."""
        try:
            msg = await self.read(timeout)
        finally:
            await self.stop(grace=2.0)
        return msg

    async def stop(self, grace: float = 1.0) -> None:
        if self.proc.returncode is not None:
            self._stderr.close()
            return
        try:
            self.close_stdin()
            await asyncio.wait_for(self.proc.wait(), grace)
        except (TimeoutError, ProcessLookupError, BrokenPipeError, ConnectionResetError):
            kill_pid(self.pid)
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                pass
        self._stderr.close()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            data = self._stderr.read()
        except (OSError, ValueError):
            data = b""
        lines = data.decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) or "no stderr"


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


async def stop_all(workers: list[Worker]) -> None:
    for worker in workers:
        await worker.stop()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
