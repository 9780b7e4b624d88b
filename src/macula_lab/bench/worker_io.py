"""The worker's side of the parent-worker protocol: JSON lines out, commands in.

Shared by the worker entry point and the roles it runs (bulk, loadgen), so neither
imports the other's module.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Commands:
    """JSON lines from the parent on stdin; None once stdin is closed."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.closed = False

    async def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        if self.closed:
            return None
        line = await asyncio.wait_for(self._reader.readline(), timeout)  # TimeoutError: caller's
        if not line:
            self.closed = True
            return None
        return json.loads(line)

    async def wait_closed(self, timeout: float) -> None:
        """Until the parent closes stdin (it is done with us), at most `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed and loop.time() < deadline:
            try:
                await self.next(max(0.0, deadline - loop.time()))
            except TimeoutError:
                return
