"""The kernel's address, link and route changes as they happen (rtnetlink, Linux only).

A node that waits for consent checks and keepalives to fail notices a new network a second
or more after the fact; the kernel says so at once. `NetworkWatcher` subscribes to the
rtnetlink multicast groups for links, addresses and routes, and calls back (once per burst:
one change is several messages) so the node can act before anything times out. What
changed is not parsed: the node compares its addresses itself. `count_changes` is the
only parsing there is, bounded and total: a datagram it cannot read counts as no change.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

# linux/rtnetlink.h: the multicast groups (as a bind mask) and the message types we count.
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV4_ROUTE = 0x40
_RTMGRP_IPV6_IFADDR = 0x100
_RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (_RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV6_IFADDR
          | _RTMGRP_IPV6_ROUTE)
CHANGE_TYPES = frozenset({16, 17, 20, 21, 24, 25})  # RTM_{NEW,DEL}{LINK,ADDR,ROUTE}
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_MAX_MESSAGES = 1024  # per datagram: a bound, far above what one holds
_MAX_READS = 64  # datagrams drained per wake-up, so a storm cannot starve the loop
DEBOUNCE = 0.05  # seconds: one change arrives as several messages; act once


def count_changes(datagram: bytes) -> int:
    """How many link/address/route messages a netlink datagram carries."""
    changes, offset = 0, 0
    for _ in range(_MAX_MESSAGES):
        if offset + _HEADER.size > len(datagram):
            break
        length, kind, _flags, _seq, _pid = _HEADER.unpack_from(datagram, offset)
        if length < _HEADER.size:
            break  # malformed: would never advance
        if kind in CHANGE_TYPES:
            changes += 1
        offset += (length + 3) & ~3  # messages are 4-byte aligned
    return changes


class NetworkWatcher:
    """Calls `on_change()` (at most once per DEBOUNCE) after the kernel reports a change.

    `NetworkWatcher.start(on_change)` returns None where rtnetlink is not available (not
    Linux, or a sandbox without netlink): the node then learns of moves the slow way."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[], None]) -> None:
        self._sock = sock
        self._loop = loop
        self._on_change = on_change
        self._pending: asyncio.TimerHandle | None = None
        self.changes = 0  # messages counted (what tests and status can read)
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def start(cls, on_change: Callable[[], None]) -> NetworkWatcher | None:
        family = getattr(socket, "AF_NETLINK", None)
        if family is None:
            return None
        try:
            sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 getattr(socket, "NETLINK_ROUTE", 0))
            sock.bind((0, GROUPS))
        except OSError as exc:
            log.debug("no rtnetlink here (%s): network changes are noticed by timeouts", exc)
            return None
        return cls(sock, asyncio.get_running_loop(), on_change)

    def _readable(self) -> None:
        found = 0
        for _ in range(_MAX_READS):
            try:
                datagram = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ENOBUFS: we fell behind, so something surely changed
                log.debug("rtnetlink: %s", exc)
                found += 1
                break
            found += count_changes(datagram)
        if found:
            self.changes += found
            if self._pending is None:
                self._pending = self._loop.call_later(DEBOUNCE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._on_change()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()
