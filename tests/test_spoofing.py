"""Relay hijack and redirection with really spoofed packets, on loopback (needs root for a
raw socket; skipped with the reason otherwise). The same attacks on a fake clock, without
root, are in test_gateway_core.py."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from helpers import Mesh, wait_until

from macula.net.endpoint import Address
from macula.node.node import Node
from macula.wire import control

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw-socket spoofing needs root")


def spoof(data: bytes, src: Address, dst: Address) -> None:
    """One UDP datagram from `src` to `dst`, both on loopback, with a forged source."""
    assert src[0].startswith("127.") and dst[0].startswith("127.")
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(data), 0) + data  # checksum 0: none
    total = 20 + len(udp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (dst[0], 0))


def capture_control_packet(node: Node, gateway: Address) -> bytes:
    """One fresh control packet of the node's (a keepalive), taken instead of sent: the
    attacker sends it only with the forged source (a copy of one already delivered would
    be dropped as a duplicate)."""
    copies: list[bytes] = []
    endpoint = node._driver.endpoint
    original = endpoint.send

    def send(data: bytes, addr: Address) -> None:
        if addr == gateway and data[:1] != b"\x30":
            copies.append(data)
        else:
            original(data, addr)

    endpoint.send = send  # type: ignore[method-assign]
    node.core._send_control(control.Keepalive(777))
    node._driver.flush()
    endpoint.send = original  # type: ignore[method-assign]
    assert copies
    return copies[-1]


def seen_from(gateway: object, source: Address) -> list[bytes]:
    """Datagrams the gateway's driver receives from `source` from now on."""
    seen: list[bytes] = []
    driver = gateway._driver  # type: ignore[attr-defined]
    original = driver.on_datagram

    def on_datagram(data: bytes, addr: Address) -> bool:
        if addr == source:
            seen.append(data)
        return original(data, addr)

    driver.on_datagram = on_datagram
    return seen


@needs_root
async def test_spoofed_control_packet_does_not_hijack_the_victims_relay(mesh: Mesh) -> None:
    victim = await mesh.node(strategy="always_relay")
    peer = await mesh.node(strategy="always_relay")
    attacker = await mesh.node(strategy="always_relay")
    gw = mesh.gateway
    sv = await victim.connect(peer.node_id)
    sp = await peer.accept(timeout=5)
    packet = capture_control_packet(attacker, gw.address)
    forged = seen_from(gw, victim.local_address)
    before = len(forged)
    spoof(packet, victim.local_address, gw.address)
    await wait_until(lambda: packet in forged[before:])  # the gateway has handled it
    entry = gw.core.registry.get(victim.node_id.raw)
    assert entry is not None and entry.address == victim.local_address
    assert gw.core.registry.get(attacker.node_id.raw).address == attacker.local_address
    for i in range(20):
        sv.send(f"still here {i}".encode())
    got = [await sp.recv(timeout=5) for _ in range(20)]
    assert got == [f"still here {i}".encode() for i in range(20)]


@needs_root
async def test_spoofed_third_party_receives_nothing(mesh: Mesh) -> None:
    peer = await mesh.node(strategy="always_relay")
    attacker = await mesh.node(strategy="always_relay")
    gw = mesh.gateway
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind(("127.0.0.3", 0))
    trap.setblocking(False)
    try:
        forged = seen_from(gw, trap.getsockname())
        session = await peer.connect(attacker.node_id)
        for i in range(20):  # keep forging while the peer keeps sending
            packet = capture_control_packet(attacker, gw.address)
            spoof(packet, trap.getsockname(), gw.address)
            await wait_until(lambda packet=packet: packet in forged)
            session.send(b"for the attacker %d" % i)
            await asyncio.sleep(0.02)
        received = []
        while True:
            try:
                received.append(trap.recv(2048))
            except BlockingIOError:
                break
        assert not [d for d in received if d[:1] == b"\x31"], "relay frames reached the forged host"
        assert gw.core.registry.get(attacker.node_id.raw).address == attacker.local_address
    finally:
        trap.close()
