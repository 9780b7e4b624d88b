"""Count the unexpected: ERROR records from macula's loggers and asyncio's.

The node and gateway drivers log every exception a handler raises (and carry on), and
asyncio logs exceptions nobody retrieved; a chaos or soak run must see both. Use as a
context manager around the run; `records` keeps the first few messages for the report.
"""

from __future__ import annotations

import logging
from types import TracebackType

_WATCHED = ("macula", "asyncio")
_KEPT = 20


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.records) < _KEPT:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f" ({type(exc).__name__}: {exc})"
            self.records.append(text)

    def __enter__(self) -> ErrorLog:
        for name in _WATCHED:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for name in _WATCHED:
            logging.getLogger(name).removeHandler(self)
