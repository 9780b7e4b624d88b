"""`python -m macula_lab.bench.worker SPEC`: one side of a bench case, in its own process.

SPEC is a JSON object with a "role" and that role's options. The worker prints JSON lines
(a "ready" line, then its result) and takes commands as JSON lines on stdin; EOF on stdin
or the spec's "deadline" (seconds) ends it, so no worker outlives its case.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from macula_lab.bench import bulk, loadgen
from macula_lab.bench.worker_io import Commands, emit

Role = Callable[[dict[str, Any], Commands], Awaitable[dict[str, Any]]]


def _role(name: str) -> Role:
    if name.endswith("_bulk_send") or name.endswith("_bulk_recv"):
        roles = {"macula_bulk_send": bulk.macula_send, "macula_bulk_recv": bulk.macula_recv,
                 "quic_bulk_send": bulk.quic_send, "quic_bulk_recv": bulk.quic_recv}
    else:
        roles = {"gateway": loadgen.gateway, "relay_send": loadgen.relay_send,
                 "relay_recv": loadgen.relay_recv, "turn_send": loadgen.turn_send,
                 "turn_recv": loadgen.turn_recv}
    if name not in roles:
        raise SystemExit(f"unknown worker role {name!r}")
    return roles[name]


async def _main(spec: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    commands = Commands(reader)
    role = _role(spec["role"])
    try:
        result = await asyncio.wait_for(role(spec, commands), spec.get("deadline", 120.0))
    except TimeoutError:
        emit({"error": f"{spec['role']} did not finish within {spec.get('deadline', 120.0)} s"})
        return 1
    except Exception as exc:  # reported to the parent, which names the failed case
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"result": result, "finished_at": time.monotonic()})
    return 0


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m macula_lab.bench.worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(sys.argv[1])
    return asyncio.run(_main(spec))


if __name__ == "__main__":
    sys.exit(main())
