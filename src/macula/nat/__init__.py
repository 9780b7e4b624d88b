"""NAT layer: what the network between us and the internet does to our packets."""

from __future__ import annotations

from macula.nat.behavior import BehaviorProbe, NatBehavior, detect_nat_behavior
from macula.nat.stun_responder import StunResponder, run_responder

__all__ = [
    "BehaviorProbe",
    "NatBehavior",
    "StunResponder",
    "detect_nat_behavior",
    "run_responder",
]
