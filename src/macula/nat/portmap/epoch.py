"""Epoch checks: has the gateway restarted (and so forgotten our mapping)?

Both protocols stamp every response with the server's seconds since its state began. A
client compares how far that clock moved with how far its own clock moved; when the server
clock fell behind, the server lost its mappings and the client must re-create them at once.
NAT-PMP (RFC 6886 section 3.6) and PCP (RFC 6887 section 8.5) word the test differently,
so each keeps its own rule.
"""

from __future__ import annotations

from typing import Literal


class EpochTracker:
    """Feed it each response's epoch; `observe` returns False when the server lost state."""

    def __init__(self, rule: Literal["natpmp", "pcp"]) -> None:
        self.rule = rule
        self._prev: tuple[int, float] | None = None  # (server epoch, our clock)

    def reset(self) -> None:
        self._prev = None

    def observe(self, server_epoch: int, now: float) -> bool:
        prev, self._prev = self._prev, (server_epoch, now)
        if prev is None:
            return True
        prev_server, prev_client = prev
        client_delta = max(0.0, now - prev_client)
        if self.rule == "natpmp":
            # The gateway's clock may run up to 1/8 slow; 2 s absorbs rounding.
            return server_epoch >= prev_server + client_delta * 7 / 8 - 2
        if server_epoch < prev_server - 1:
            return False  # time went backwards
        server_delta = server_epoch - prev_server
        return not (client_delta + 2 < server_delta - server_delta / 16
                    or server_delta + 2 < client_delta - client_delta / 16)
