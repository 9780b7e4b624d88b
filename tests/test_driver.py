"""The asyncio Driver over an endpoint that reads in batches (as real UDP does)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from macula.driver import Driver
from macula.gateway.core import costly_datagram as gateway_costly
from macula.node.demux import costly_datagram as node_costly

PEER = ("192.0.2.1", 4000)


class BatchedEndpoint:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._receiver: Callable[[bytes, tuple[str, int]], object] | None = None
        self._batch_end: Callable[[], None] | None = None

    def set_receiver(self, receiver: Callable[[bytes, tuple[str, int]], object]) -> None:
        self._receiver = receiver

    def set_batch_end(self, callback: Callable[[], None]) -> None:
        self._batch_end = callback

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass

    def deliver(self, batch: list[bytes]) -> None:
        assert self._receiver is not None and self._batch_end is not None
        for data in batch:
            self._receiver(data, PEER)
        self._batch_end()


class EchoCore:
    """Answers every datagram; notes what had left the socket when it started on each."""

    def __init__(self, endpoint: BatchedEndpoint) -> None:
        self.endpoint = endpoint
        self.out: list[tuple[bytes, tuple[str, int]]] = []
        self.sent_before: dict[bytes, list[bytes]] = {}

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.sent_before[data] = list(self.endpoint.sent)
        self.out.append((b"re:" + data, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def _run(costly: Callable[[bytes], bool] | None) -> EchoCore:
    async def main() -> EchoCore:
        endpoint = BatchedEndpoint()
        core = EchoCore(endpoint)
        driver = Driver(core, endpoint, costly=costly)
        endpoint.deliver([b"relay-1", b"hs-flight", b"relay-2"])
        driver.close()
        assert endpoint.sent == [b"re:relay-1", b"re:hs-flight", b"re:relay-2"]
        return core

    return asyncio.run(main())


def test_a_costly_datagram_neither_waits_for_nor_holds_back_the_cheap_ones_of_its_batch() -> None:
    core = _run(lambda data: data.startswith(b"hs"))
    # The relayed frame before the TLS flight left before the core started on the flight,
    # and the flight's answer left before the core went on with the batch.
    assert core.sent_before[b"hs-flight"] == [b"re:relay-1"]
    assert core.sent_before[b"relay-2"] == [b"re:relay-1", b"re:hs-flight"]


def test_without_costly_datagrams_a_batch_is_flushed_once_at_its_end() -> None:
    core = _run(None)
    assert core.sent_before[b"hs-flight"] == core.sent_before[b"relay-2"] == []


def test_what_counts_as_costly() -> None:
    initial = bytes([0xC3]) + bytes(40)  # a QUIC long header (Initial)
    short = bytes([0x43]) + bytes(40)  # a 1-RTT packet
    relayed = bytes([0x31]) + bytes(16)
    assert node_costly(initial) and node_costly(relayed + initial)
    assert not node_costly(short) and not node_costly(relayed + short)
    assert not node_costly(b"\x00\x01" + bytes(18))  # a STUN message (an ICE check)
    # The gateway: its own QUIC (control connections, mesh links) but never a relay frame.
    assert gateway_costly(initial) and gateway_costly(short)
    assert not gateway_costly(bytes([0x30]) + bytes(40)) and not gateway_costly(b"\x00\x01")
    assert not gateway_costly(b"") and not node_costly(b"")


def test_a_lone_costly_datagram_costs_one_flush_and_the_batch_end_none() -> None:
    """Nothing queued before it, nothing after: the answer leaves at once, and the end of
    the batch has nothing left to flush (each flush also runs the activity hook)."""
    async def main() -> tuple[list[bytes], int]:
        endpoint = BatchedEndpoint()
        core = EchoCore(endpoint)
        flushes = [0]

        def count() -> None:
            flushes[0] += 1

        driver = Driver(core, endpoint, costly=lambda data: data.startswith(b"hs"),
                        after_activity=count)
        endpoint.deliver([b"hs-initial"])
        driver.close()
        return endpoint.sent, flushes[0]

    sent, flushes = asyncio.run(main())
    assert sent == [b"re:hs-initial"] and flushes == 1
