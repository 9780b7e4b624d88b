"""Binding lifetimes measured on each network, kept between runs (the test takes minutes).

One JSON object: network key (binding_lifetime.network_key: our local IP and the public
one) -> what the test found. The CLI keeps it beside the node key, next to
known_gateways; nodes and `macula netcheck --binding-lifetime` both write it. A cache is only a shortcut: a file that cannot be read is logged and
treated as empty, never a reason not to start.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from ..errors import InvalidValue
from ..private_file import write_private
from .binding_lifetime import BindingLifetime

log = logging.getLogger(__name__)
FILE_NAME = "binding_lifetimes.json"
MAX_NETWORKS = 64  # the newest ones are kept


def beside(path: str | os.PathLike[str]) -> pathlib.Path:
    """The cache file in the same directory as `path` (known_gateways)."""
    return pathlib.Path(path).with_name(FILE_NAME)


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6:
        return float(value)
    raise InvalidValue(f"not a number of seconds: {value!r}")


def load(path: str | os.PathLike[str]) -> dict[str, BindingLifetime]:
    file = pathlib.Path(path)
    if not file.exists():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise InvalidValue("not a JSON object")
        return {str(network): BindingLifetime(_seconds(entry.get("alive_s")),
                                              _seconds(entry.get("expired_s")),
                                              bool(entry.get("measurable", True)))
                for network, entry in raw.items() if isinstance(entry, dict)}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: not used (%s); binding lifetimes will be measured again", file, exc)
        return {}


def remember(path: str | os.PathLike[str], network: str, found: BindingLifetime) -> None:
    """Add (or replace) `network`'s lifetime; owner-only file, written whole."""
    file = pathlib.Path(path)
    known = load(file)
    known.pop(network, None)
    known[network] = found
    kept = list(known.items())[-MAX_NETWORKS:]
    text = json.dumps({network: {"alive_s": f.alive_s, "expired_s": f.expired_s,
                                 "measurable": f.measurable} for network, f in kept}, indent=1)
    try:
        write_private(file, text + "\n")
    except OSError as exc:
        log.warning("%s: could not remember the binding lifetime (%s)", file, exc)
