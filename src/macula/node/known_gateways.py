"""Trust on first use for gateways, like SSH's known_hosts.

One line per gateway address: `host:port NODE_ID`. The first key a gateway proves at an
address is written here; afterwards the node pins it, and a gateway presenting another
key is refused until the user says the change was intended (`macula trust-gateway`).
"""

from __future__ import annotations

import os
import pathlib

from ..config import ConfigError, format_host_port, parse_host_port
from ..identity import NodeId
from ..net.endpoint import Address
from ..private_file import write_private


def load(path: str | os.PathLike[str]) -> dict[Address, NodeId]:
    """The pinned ids; a missing file is empty, a bad line names the file and line."""
    file = pathlib.Path(path)
    if not file.exists():
        return {}
    pinned: dict[Address, NodeId] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            address, ident = text.split()
            pinned[parse_host_port(address)] = NodeId.parse(ident)
        except ValueError as exc:
            raise ConfigError(f"{file}:{number}", f"expected 'host:port NODE_ID': {exc}") from None
    return pinned


def remember(path: str | os.PathLike[str], gateway: Address, node_id: NodeId) -> None:
    """Pin `node_id` for `gateway`, replacing what was pinned there (owner-only file)."""
    pinned = load(path)
    pinned[gateway] = node_id
    body = "".join(f"{format_host_port(*a)} {n.text}\n" for a, n in sorted(pinned.items()))
    write_private(path, "# gateways this node trusts (host:port NODE_ID), first seen or set "
                        "by `macula trust-gateway`\n" + body)
