"""The local admin socket of a running `macula up` or `macula gateway`.

A unix socket that only its owner can open (mode 0600, created under umask 0177). A client
sends one JSON object on one line ({"command": "status"}, {"command": "ping", ...}); the
server answers with JSON lines, the last of which carries "done": true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from .errors import MaculaError
from .logsafe import clip

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


class AdminUnavailable(MaculaError):
    """Nothing answers at the admin socket (no node or gateway running there)."""


def _answers(path: pathlib.Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


async def serve_admin(path: pathlib.Path, handler: Handler) -> asyncio.Server:
    """Listen at `path`. A stale socket file (its process gone) is replaced; a live one
    means another process owns it, and that is refused."""
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise MaculaError(f"another process is already serving {path} (a node with "
                              "this key is running: `macula status` shows it)")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            try:
                request = json.loads(line[:MAX_REQUEST]) if line.endswith(b"\n") else None
            except ValueError:
                request = None
            if not isinstance(request, dict):
                answers: AsyncIterator[dict[str, Any]] = _single(
                    {"done": True, "error": f"bad request {clip(line, 64)!r}: expected one "
                                           "JSON object on one line"})
            else:
                answers = handler(request)
            async for answer in answers:
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    old_mask = os.umask(0o177)  # the socket is born owner-only, no window before a chmod
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old_mask)
    os.chmod(path, 0o600)
    return server


@contextlib.asynccontextmanager
async def serving(path: pathlib.Path, handler: Handler) -> AsyncIterator[asyncio.Server]:
    """serve_admin for the life of a block; the socket file goes with it."""
    server = await serve_admin(path, handler)
    try:
        yield server
    finally:
        server.close()
        with contextlib.suppress(OSError):
            path.unlink()


async def _single(answer: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield answer


async def request(path: pathlib.Path, message: dict[str, Any],
                  timeout: float = 10.0) -> AsyncIterator[dict[str, Any]]:
    """The answers to `message`, up to and including the one marked done."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024), timeout)
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        raise AdminUnavailable(f"nothing is running at {path} ({reason})") from None
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise AdminUnavailable(f"{path} closed the connection before answering")
            answer = json.loads(line)
            yield answer
            if answer.get("done"):
                return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
