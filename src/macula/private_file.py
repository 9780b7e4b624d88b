"""Small state files only their owner may read (known gateways, binding lifetimes): written
whole to a temporary file beside them, then moved over them, so a crash never leaves half
a file."""

from __future__ import annotations

import os
import pathlib


def write_private(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text`, mode 0600, creating its directory. OSError as it comes."""
    file = pathlib.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, file)
