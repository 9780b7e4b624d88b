"""The root of every error the package raises, so a caller can catch them all at once.

Errors that are also a built-in kind keep it (`InvalidValue` is a ValueError too), so
code written against the built-in keeps working.
"""

from __future__ import annotations


class MaculaError(Exception):
    """Anything that went wrong inside macula."""


class InvalidValue(MaculaError, ValueError):
    """An argument, address or field that cannot be used: the message says which and why."""


class BindError(MaculaError, OSError):
    """A socket could not be bound; the message names the address and what it was for."""

    def __init__(self, role: str, host: str, port: int, reason: OSError) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot bind the {role} socket {where}: "
                         f"{reason.strerror or reason}")
        self.role = role
        self.address = (host, port)
