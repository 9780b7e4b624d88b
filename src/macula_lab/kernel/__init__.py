"""Kernel NAT lab: network namespaces + nftables NATs + a userspace delay line (natlab.md).

Needs root; `kernel_lab_available()` says why not when it cannot run.
"""

from __future__ import annotations

from macula_lab.kernel.nat_rules import NAT_KINDS, PRESETS, NatOptions
from macula_lab.kernel.netns import (
    LabError,
    cleanup_leftovers,
    kernel_lab_available,
    popen_in,
    run_in,
)
from macula_lab.kernel.topology import KernelLab, LabPair, Peer

__all__ = [
    "KernelLab", "LabError", "LabPair", "NAT_KINDS", "NatOptions", "PRESETS", "Peer",
    "cleanup_leftovers", "kernel_lab_available", "popen_in", "run_in",
]
