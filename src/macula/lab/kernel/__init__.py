"""Kernel NAT lab: network namespaces + nftables NATs + a userspace delay line (natlab.md).

Needs root; `kernel_lab_available()` says why not when it cannot run.
"""

from __future__ import annotations

from .nat_rules import NAT_KINDS, PRESETS, NatOptions
from .netns import LabError, cleanup_leftovers, kernel_lab_available, popen_in, run_in
from .topology import KernelLab, LabPair, Peer

__all__ = [
    "KernelLab", "LabError", "LabPair", "NAT_KINDS", "NatOptions", "PRESETS", "Peer",
    "cleanup_leftovers", "kernel_lab_available", "popen_in", "run_in",
]
