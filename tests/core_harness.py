"""A gateway core and node cores on a fake clock, wired by a tiny in-memory network.

No event loop and no sockets: datagrams go into a heap with a fixed one-way latency and
time jumps straight to the next delivery or timer, the way aioquic's tests drive
QuicConnection. Addresses are documentation ranges; nothing leaves the process.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol

from macula.gateway.core import GatewayCore
from macula.identity import Identity
from macula.net.endpoint import Address
from macula.node.core import NodeCore
from macula.node.options import NodeOptions
from macula.wire import control

GATEWAY: Address = ("203.0.113.10", 9443)


class Core(Protocol):
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


class FakeNet:
    def __init__(self, latency: float = 0.005) -> None:
        self.now = 0.0
        self.latency = latency
        self.cores: dict[Address, Core] = {}
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = itertools.count()
        # (src, dst) -> True to drop: a firewall the test controls
        self.drop: Callable[[Address, Address], bool] = lambda src, dst: False
        self.delivered = 0

    def add(self, addr: Address, core: Core) -> None:
        self.cores[addr] = core

    def _collect(self) -> None:
        for src, core in list(self.cores.items()):
            for data, dst in core.datagrams_to_send(self.now):
                if not self.drop(src, dst):
                    heapq.heappush(self._queue, (self.now + self.latency, next(self._seq),
                                                 src, dst, data))

    def run(self, seconds: float, max_steps: int = 200_000) -> None:
        """Advance `seconds` of fake time, delivering and firing timers in order."""
        until = self.now + seconds
        self._collect()
        for _ in range(max_steps):
            timers = [(t, a) for a, c in self.cores.items() if (t := c.get_timer()) is not None]
            get_timer = min(timers, default=(None, None))
            next_packet = self._queue[0][0] if self._queue else None
            candidates = [t for t in (get_timer[0], next_packet) if t is not None]
            if not candidates or min(candidates) > until:
                self.now = until
                return
            when = min(candidates)
            self.now = max(self.now, when)
            if next_packet is not None and next_packet == when:
                _, _, src, dst, data = heapq.heappop(self._queue)
                core = self.cores.get(dst)
                if core is not None:
                    self.delivered += 1
                    core.receive_datagram(data, src, self.now)
            else:
                for t, addr in timers:
                    if t <= self.now:
                        self.cores[addr].handle_timer(self.now)
            self._collect()
        raise AssertionError("fake network did not settle within max_steps")


def gateway_and_nodes(count: int = 2, latency: float = 0.005,
                      **changes: Any) -> tuple[FakeNet, GatewayCore, list[NodeCore]]:
    net = FakeNet(latency)
    gateway = GatewayCore(Identity.generate())
    net.add(GATEWAY, gateway)
    nodes = []
    for i in range(count):
        addr = (f"198.51.100.{i + 1}", 4000 + i)
        options = NodeOptions(gateway=GATEWAY).with_changes(**changes)
        node = NodeCore(Identity.generate(), options, local_address=addr,
                        interfaces=lambda: [])
        net.add(addr, node)
        node.start(net.now)
        nodes.append(node)
    return net, gateway, nodes


def events(core: NodeCore) -> list[object]:
    out = []
    while (event := core.next_event()) is not None:
        out.append(event)
    return out


def record_control(core: NodeCore) -> list[dict[str, Any]]:
    """Every control message the node sends to its gateway, as the JSON object that goes on
    the wire (a spy: the messages still go out)."""
    sent: list[dict[str, Any]] = []
    original = core._send_control

    def spy(message: control.ControlMessage) -> None:
        sent.append(control.to_dict(message))
        original(message)

    core._send_control = spy  # type: ignore[method-assign]
    return sent
