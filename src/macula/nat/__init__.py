"""NAT layer: what the network between us and the internet does to our packets."""

from __future__ import annotations

from macula.nat.aio import detect_nat_behavior, run_responder
from macula.nat.behavior import BehaviorProbe, NatBehavior
from macula.nat.hard_nat import HardNatConfig, HardNatRun, plan_role
from macula.nat.stun_responder import StunResponder

__all__ = [
    "BehaviorProbe",
    "HardNatConfig",
    "HardNatRun",
    "NatBehavior",
    "StunResponder",
    "detect_nat_behavior",
    "plan_role",
    "run_responder",
]
