"""Who may register at a gateway: anyone (`open`, the default) or the node ids of an
allowlist file (`allowlist`: a private deployment keeps strangers off its gateway).

The file is one node id per line (`#` starts a comment; anything after the id on a line
is a note). It is read by the I/O layer at start (an error there stops the gateway with
the file and line named), and again on SIGHUP or when it changes: a bad reload keeps the
previous list. Nodes that a new list leaves out are disconnected.
"""

from __future__ import annotations

import os
import pathlib
from typing import Literal

from ..config import ConfigError
from ..identity import NodeId

# "ca": members of a CA network (macula.membership), checked in the handshake itself.
AdmissionMode = Literal["open", "allowlist", "ca"]


def read_allowlist(path: str | os.PathLike[str]) -> frozenset[NodeId]:
    file = pathlib.Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read the allowlist: {exc.strerror or exc}") from None
    ids = set()
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            ids.add(NodeId.parse(words[0]))
        except ValueError as exc:
            raise ConfigError(f"{file}:{number}", str(exc)) from None
    return frozenset(ids)


class Admission:
    """The gateway core's admission decision (sans-IO: the list is handed in)."""

    def __init__(self, mode: AdmissionMode, allowed: frozenset[NodeId] = frozenset()) -> None:
        self.mode = mode
        self.allowed = allowed

    def admits(self, node_id: NodeId) -> bool:
        return self.mode != "allowlist" or node_id in self.allowed
