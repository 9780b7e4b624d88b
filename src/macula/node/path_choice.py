"""The selection rule: which path a session packet takes (a pure decision).

Direct or TURN (the pair ICE selected) first, unless the strategy is always_relay; then
the gateway relay, unless the strategy forbids it (direct_only) or the session has been
direct and `fallback_to_relay` is off, in which case the packet is held for the direct
path (QUIC retransmits whatever the hold cannot keep).
"""

from __future__ import annotations

import enum

from ..config import Strategy


class Fallback(enum.Enum):
    RELAY = "relay"  # the gateway relay carries it
    HOLD = "hold"  # held until a direct path validates


def use_selected_pair(strategy: Strategy, has_selected: bool) -> bool:
    """Whether a packet tries the ICE-selected pair first."""
    return has_selected and strategy != "always_relay"


def fallback(strategy: Strategy, *, fallback_to_relay: bool, been_direct: bool) -> Fallback:
    """Where a packet goes when the selected pair cannot take it (or there is none)."""
    if strategy == "direct_only":
        return Fallback.HOLD
    if fallback_to_relay or not been_direct:
        return Fallback.RELAY
    return Fallback.HOLD
