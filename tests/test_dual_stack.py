"""Dual-stack sockets and IPv6 host candidates (loopback and pure state machines only)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from macula.config import parse_host_port
from macula.gateway.core import _candidate_lines
from macula.gateway.registry import NodeEntry
from macula.ice import Candidate, host_preference, ranked_addresses
from macula.identity import Identity
from macula.net.udp import open_udp_endpoint
from macula.node import core as node_core
from macula.node.options import NodeOptions


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) here")


class _Client:
    """A plain socket on one loopback address, talking to the endpoint under test."""

    def __init__(self, family: int, host: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(2.0)
        self.port = self.sock.getsockname()[1]

    def recv(self) -> tuple[bytes, tuple]:
        return self.sock.recvfrom(2048)

    def close(self) -> None:
        self.sock.close()


async def _next(queue: asyncio.Queue) -> tuple[bytes, tuple]:
    return await asyncio.wait_for(queue.get(), 2.0)


@needs_v6
async def test_dual_stack_socket_speaks_plain_addresses_both_ways() -> None:
    ep = await open_udp_endpoint("::", 0)
    got: asyncio.Queue = asyncio.Queue()
    ep.set_receiver(lambda data, addr: got.put_nowait((data, addr)))
    v4, v6 = _Client(socket.AF_INET, "127.0.0.1"), _Client(socket.AF_INET6, "::1")
    try:
        port = ep.local_address[1]
        assert ep.local_address == ("::", port)
        # In: an IPv4 peer comes up as plain IPv4 text, never '::ffff:...' or a 4-tuple.
        v4.sock.sendto(b"from v4", ("127.0.0.1", port))
        assert await _next(got) == (b"from v4", ("127.0.0.1", v4.port))
        v6.sock.sendto(b"from v6", ("::1", port))
        assert await _next(got) == (b"from v6", ("::1", v6.port))
        # Out: a plain IPv4 address leaves the IPv6 socket as IPv4.
        ep.send(b"to v4", ("127.0.0.1", v4.port))
        assert v4.recv() == (b"to v4", ("127.0.0.1", port))
        ep.send(b"to v6", ("::1", v6.port))
        data, src = v6.recv()
        assert (data, src[:2]) == (b"to v6", ("::1", port))
        assert ep.send_errors == ep.receive_errors == 0
    finally:
        ep.close()
        v4.close()
        v6.close()


@needs_v6
async def test_family_mismatches_are_counted_not_raised() -> None:
    v4_only = await open_udp_endpoint("127.0.0.1", 0)
    v6_loop = await open_udp_endpoint("::1", 0)
    try:
        assert v6_loop.local_address == ("::1", v6_loop.local_address[1])
        v4_only.send(b"x", ("::1", 9))  # an IPv4 socket cannot reach IPv6
        v6_loop.send(b"x", ("127.0.0.1", 9))  # bound to ::1, it has no IPv4 source
        assert v4_only.send_errors == 1 and v6_loop.send_errors == 1
    finally:
        v4_only.close()
        v6_loop.close()


def test_ranked_addresses_and_preferences() -> None:
    interfaces = [("lo", "127.0.0.1"), ("eth0", "192.0.2.7"), ("wg0", "2001:db8:ff::7"),
                  ("eth0", "2001:db8::7"), ("eth0", "fe80::7")]
    assert ranked_addresses(interfaces) == [
        ("eth0", "2001:db8::7"), ("eth0", "192.0.2.7"), ("wg0", "2001:db8:ff::7")]
    assert [host_preference(r) for r in range(3)] == [65535, 65407, 65279]
    assert host_preference(10_000) == 0


_DUAL = [("lo", "127.0.0.1"), ("lo", "::1"), ("eth0", "192.0.2.7"), ("eth0", "fe80::7"),
         ("eth0", "2001:db8:7::2")]


def _core(monkeypatch: pytest.MonkeyPatch, local: str) -> node_core.NodeCore:
    # The interface list is injected: no monkeypatching of the machine's own.
    core = node_core.NodeCore(Identity.generate(), NodeOptions(gateway=("203.0.113.10", 9443)),
                              local_address=parse_host_port(local),
                              interfaces=lambda: list(_DUAL))
    core.observed = ("198.51.100.11", 60000)
    return core


def test_dual_stack_node_offers_ipv6_first_and_bases_reflexive_on_ipv4(
        monkeypatch: pytest.MonkeyPatch) -> None:
    core = _core(monkeypatch, "[::]:4242")
    assert core._hosts() == [("2001:db8:7::2", 4242), ("192.0.2.7", 4242)]
    candidates = [c for c, _via in core._local_candidates()]
    hosts = [c for c in candidates if c.type == "host"]
    assert [c.address for c in sorted(hosts, key=lambda c: -c.priority)] == [
        "2001:db8:7::2", "192.0.2.7"]
    (srflx,) = [c for c in candidates if c.type == "srflx"]
    # The gateway saw us over IPv4: the reflexive candidate's base is our IPv4 host.
    assert srflx.addr == ("198.51.100.11", 60000) and srflx.base == ("192.0.2.7", 4242)


def test_ipv4_wildcard_never_offers_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    core = _core(monkeypatch, "0.0.0.0:4242")
    assert core._hosts() == [("192.0.2.7", 4242)]


@needs_v6
async def test_dual_stack_node_registers_and_hello_carries_its_hosts(
        mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "::" node talks IPv4 to an IPv4 gateway (loopback); hello carries the expanded
    hosts, IPv6 bracketed, and the gateway ranks them as the node does, so both peers
    compute the same pair priorities. (Nothing is sent to the made-up interface addresses:
    no punch is asked for.)"""
    node = await mesh.node(listen=("::", 0), interfaces=lambda: list(_DUAL))
    port = node.local_address[1]
    assert node.local_address == ("::", port)
    assert node.discover_public_address() == ("127.0.0.1", port)
    entry = mesh.gateway.core.registry.get(node.node_id.raw)
    assert entry is not None and entry.address == ("127.0.0.1", port)
    assert entry.local_addresses == [f"[2001:db8:7::2]:{port}", f"192.0.2.7:{port}"]
    lines = [Candidate.from_sdp(line) for line in _candidate_lines(entry)]
    own = {c.addr: c for c, _via in node.core._local_candidates()}
    assert [c.type for c in lines] == ["host", "host", "srflx"]
    for line in lines:
        assert own[line.addr].priority == line.priority, line
    assert lines[2].base == ("192.0.2.7", port)


def test_gateway_lines_skip_wildcards_and_malformed_addresses() -> None:
    entry = NodeEntry(node_id=Identity.generate().node_id, address=("198.51.100.11", 60000),
                      token=b"t" * 16, registered_at=0.0, last_seen=0.0,
                      local_addresses=["[::]:4242", "0.0.0.0:4242", "2001:db8::1:4242",
                                       "[2001:db8::zz]:1", "[2001:db8::5]:4242"])
    lines = [Candidate.from_sdp(line) for line in _candidate_lines(entry)]
    assert [(c.type, c.address) for c in lines] == [("host", "2001:db8::5"),
                                                    ("srflx", "198.51.100.11")]
    # No IPv4 host to base the IPv4 reflexive address on: it is its own base.
    assert lines[1].base == ("198.51.100.11", 60000)
