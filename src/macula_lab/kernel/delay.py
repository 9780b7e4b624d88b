"""Userspace delay line: copies Ethernet frames between two interfaces after a fixed delay.

The lab's kernel has no netem, so a namespace sits between a NAT's wan and the internet
bridge and runs this program: one AF_PACKET socket per side, every frame held for
`--delay-ms` from its arrival (the kernel's receive stamp, as netem counts from enqueue)
and then sent out of the other side, optionally dropped with probability
`--loss` (a seeded RNG per direction, so runs repeat). With `--control FILE`, SIGUSR1 makes
it apply the loss model written in FILE, a mean loss and a mean burst length (bursty loss is
Gilbert-Elliott): how a fault impairs a link for a while.

    python -m macula_lab.kernel.delay --in IF --out IF --delay-ms X --loss P --seed S

veth offloads hand us UDP/TCP packets whose checksum is only the pseudo-header part
(CHECKSUM_PARTIAL) and TCP super-frames far above the MTU (TSO). Written back raw, the
first are dropped as corrupt and the second do not fit. With PACKET_VNET_HDR each frame
comes with its virtio_net_hdr (checksum start/offset, GSO size) and we give it back on
send, so the kernel completes checksums and segments; where that option is missing the
copier recomputes checksums itself (and TSO frames are counted as dropped). Loss applies
per frame as seen here, so a TSO super-frame is lost as a whole.

The program exits on SIGTERM/SIGINT, when its parent dies, or after `--max-seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from array import array
from collections import deque
from typing import Any

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15
VNET_HDR_LEN = 10  # struct virtio_net_hdr
PACKET_OUTGOING = 4
MAX_FRAME = 65536
BATCH = 256  # frames drained per wake-up per side, so one busy side cannot starve the other
MAX_QUEUE = 20000  # frames held per direction; beyond that we drop like a full router queue
SO_TIMESTAMPNS = 35  # SCM_TIMESTAMPNS: the frame's arrival as a CLOCK_REALTIME timespec
PR_SET_TIMERSLACK = 29
ANCILLARY = socket.CMSG_SPACE(16)
IDLE_WAKE = 0.2  # seconds; how often the loop checks its parent and deadline


def inet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit big-endian words, complemented."""
    if len(data) % 2:
        data += b"\0"
    words = array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fix_l4_checksum(frame: bytes) -> bytes:
    """Return the Ethernet frame with its UDP/TCP checksum recomputed (else unchanged):
    IPv4, or IPv6 without extension headers."""
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd" and frame[14] >> 4 == 6:
        proto = frame[20]
        start, end = 54, 54 + int.from_bytes(frame[18:20], "big")
        addresses = frame[22:54]
    elif len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[14] >> 4 == 4:
        ihl = (frame[14] & 0x0F) * 4
        if ihl < 20 or int.from_bytes(frame[20:22], "big") & 0x3FFF:
            return frame  # fragments carry no complete L4 segment
        proto = frame[23]
        start, end = 14 + ihl, 14 + int.from_bytes(frame[16:18], "big")
        addresses = frame[26:34]
    else:
        return frame
    offset = {17: 6, 6: 16}.get(proto)
    if offset is None or end > len(frame) or end - start < offset + 2:
        return frame
    segment = bytearray(frame[start:end])
    segment[offset:offset + 2] = b"\0\0"
    if len(addresses) == 32:  # RFC 8200 8.1: 32-bit length, 24 zero bits, next header
        pseudo = addresses + len(segment).to_bytes(4, "big") + bytes((0, 0, 0, proto))
    else:
        pseudo = addresses + bytes((0, proto)) + len(segment).to_bytes(2, "big")
    csum = inet_checksum(pseudo + bytes(segment))
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # UDP reserves 0 for "no checksum"
    segment[offset:offset + 2] = csum.to_bytes(2, "big")
    return frame[:start] + bytes(segment) + frame[end:]


def arrival_time(ancillary: list[tuple[int, int, bytes]], now: float,
                 realtime_ahead: float) -> float:
    """When a frame reached the interface, on the monotonic clock: its kernel stamp
    (CLOCK_REALTIME, `realtime_ahead` seconds ahead of monotonic), or `now` when there is
    no stamp or it cannot be right (later than now, or a second old: the clock was set)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            stamped: float = seconds + nanoseconds / 1e9 - realtime_ahead
            if now - 1.0 < stamped <= now:
                return stamped
    return now


def tighten_timer_slack() -> None:
    """Wake at the deadline asked for: Linux lets a sleep overrun by the timer slack
    (50 us by default) to batch wake-ups; a delay line wants its frames out on time."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the default slack stays


def open_side(ifname: str, vnet: bool) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if vnet:
        # Frames carry a virtio_net_hdr with their GSO and partial-checksum state; handing it
        # back on send lets the kernel finish checksums and segment TSO super-frames.
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        # Our own transmissions must not come back to us as input.
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernels: the pkttype check in the loop covers it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # The kernel stamps each frame as it arrives: its delay counts from then, not from
    # when this process got the CPU to read it (late on a busy machine).
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


class DelayLine:
    """Two sides, two FIFO queues (a constant delay keeps release times in order)."""

    def __init__(self, in_if: str, out_if: str, delay_s: float, loss: float, seed: int,
                 vnet: bool = True) -> None:
        self.vnet = False
        self.socks: tuple[socket.socket, ...] = ()
        if vnet:
            try:
                self.socks = (open_side(in_if, True), open_side(out_if, True))
                self.vnet = True
            except OSError:
                pass  # kernel without PACKET_VNET_HDR: fall back below
        if not self.vnet:
            # Plain frames: we fix checksums ourselves; TSO super-frames cannot pass then.
            self.socks = (open_side(in_if, False), open_side(out_if, False))
        self.delay_s = delay_s
        self.loss = loss
        self.burst = 1.0  # mean loss burst in frames; above 1 the loss is Gilbert-Elliott
        self.bad = [False, False]  # per direction: in the Bad (losing) state
        # One RNG per direction: the loss pattern of one side does not depend on the other's.
        self.rngs = (random.Random(seed * 2), random.Random(seed * 2 + 1))
        self.queues: tuple[deque[tuple[float, bytes]], deque[tuple[float, bytes]]] = (
            deque(), deque())
        # Counters per direction, indexed by the side a frame came in on (0 = --in side).
        self.counts = [{"forwarded": 0, "lost": 0, "dropped": 0} for _ in range(2)]

    def _drain(self, side: int, now: float) -> None:
        sock, out = self.socks[side], self.queues[1 - side]
        realtime_ahead = time.time() - now
        for _ in range(BATCH):
            try:
                frame, ancillary, _flags, addr = sock.recvmsg(MAX_FRAME, ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            arrived = arrival_time(ancillary, now, realtime_ahead)
            if self.loss and self._lose(side):
                self.counts[side]["lost"] += 1
                continue
            if len(out) >= MAX_QUEUE:
                self.counts[side]["dropped"] += 1
                continue
            out.append((arrived + self.delay_s, frame if self.vnet else fix_l4_checksum(frame)))

    def set_loss(self, loss: float, burst: float = 1.0) -> None:
        """Change the loss model live: `loss` on average, in bursts of `burst` frames."""
        if not 0.0 <= loss < 1.0 or burst < 1.0:
            raise ValueError("need 0 <= loss < 1 and burst >= 1")
        self.loss, self.burst = loss, burst
        self.bad = [False, False]

    def _lose(self, side: int) -> bool:
        rng = self.rngs[side]
        if self.burst <= 1.0:
            return rng.random() < self.loss
        # Gilbert-Elliott with a lossless Good and an all-losing Bad state, whose stationary
        # share is `loss` and whose mean sojourn is `burst` frames (sim.GilbertElliott.from_mean).
        leave_bad = 1.0 / self.burst
        if self.bad[side]:
            if rng.random() < leave_bad:
                self.bad[side] = False
        elif rng.random() < self.loss * leave_bad / (1.0 - self.loss):
            self.bad[side] = True
        return self.bad[side]

    def load_control(self, path: str) -> None:
        """Apply {"loss": p, "burst": n} from the control file (SIGUSR1 asks for it)."""
        try:
            with open(path, encoding="utf8") as fh:
                wanted = json.load(fh)
            self.set_loss(float(wanted.get("loss", 0.0)), float(wanted.get("burst", 1.0)))
        except (OSError, ValueError, AttributeError) as exc:
            print(json.dumps({"control_error": str(exc)}), file=sys.stderr, flush=True)

    def _flush(self, now: float) -> None:
        for side in (0, 1):
            queue, sock = self.queues[side], self.socks[side]
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                try:
                    sock.send(frame)
                    self.counts[1 - side]["forwarded"] += 1
                except OSError:
                    self.counts[1 - side]["dropped"] += 1  # e.g. an oversized GSO frame

    @property
    def stats(self) -> dict[str, Any]:
        return {"in_to_out": dict(self.counts[0]), "out_to_in": dict(self.counts[1]),
                "vnet": int(self.vnet)}

    def run(self, deadline: float, parent_pid: int | None, stop: list[bool]) -> None:
        # select(), not epoll: epoll's timeout is whole milliseconds rounded up, so every
        # frame left 0-1 ms late (0.5 on average: a "10 ms" uplink was 10.5); select waits
        # to the microsecond (measured 0.07-0.15 ms late against epoll's 0.3-0.8).
        side_of = {sock: side for side, sock in enumerate(self.socks)}
        try:
            while not stop[0]:
                now = time.monotonic()
                if now >= deadline or (parent_pid and os.getppid() != parent_pid):
                    break
                timeout = IDLE_WAKE
                for queue in self.queues:
                    if queue:
                        timeout = min(timeout, queue[0][0] - now)
                readable, _, _ = select.select(self.socks, [], [], max(timeout, 0.0))
                now = time.monotonic()
                for sock in readable:
                    self._drain(side_of[sock], now)
                self._flush(time.monotonic())
        finally:
            for sock in self.socks:
                sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.kernel.delay",
                                     description="userspace delay line between two interfaces")
    parser.add_argument("--in", dest="in_if", required=True, help="interface toward the NAT")
    parser.add_argument("--out", dest="out_if", required=True, help="interface toward the internet")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability per direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="hard lifetime cap")
    parser.add_argument("--no-vnet", action="store_true",
                        help="copy plain frames and fix checksums in Python (no TSO)")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this parent is gone")
    parser.add_argument("--control", metavar="FILE",
                        help='on SIGUSR1, apply {"loss": P, "burst": N} from FILE (live loss)')
    args = parser.parse_args(argv)
    if not 0.0 <= args.loss < 1.0 or args.delay_ms < 0:
        parser.error("need 0 <= loss < 1 and delay-ms >= 0")

    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    line = DelayLine(args.in_if, args.out_if, args.delay_ms / 1000.0, args.loss, args.seed,
                     vnet=not args.no_vnet)
    if args.control:
        signal.signal(signal.SIGUSR1, lambda signum, frame: line.load_control(args.control))
    tighten_timer_slack()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    line.run(time.monotonic() + args.max_seconds, args.parent_pid or None, stop)
    try:
        print(json.dumps({"stats": line.stats}), flush=True)
    except BrokenPipeError:
        pass  # nobody is listening for the counters any more
    return 0


if __name__ == "__main__":
    sys.exit(main())
