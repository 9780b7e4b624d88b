"""The simulator reproduces what the kernel NAT lab measured (/work/shared/natlab.md)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from macula.net.endpoint import Address
from macula_lab.sim import (
    PRESETS,
    SERVER_IPS,
    SimEndpoint,
    SimNetwork,
    build_pair_topology,
    simulate,
)

P1, P2 = 3478, 3479
IP1, IP2 = SERVER_IPS

# natlab.md "What the probes saw": mapping seen from IP1:P1 / IP1:P2 / IP2:P1, and whether
# unsolicited inbound from IP1:P1, IP1:P2, IP2:P1, IP2:P2 reaches the host after it sent to
# IP1:P1. "open" has no NAT: nothing is translated and nothing is filtered.
KERNEL_TABLE: dict[str, tuple[str, tuple[bool, bool, bool, bool]]] = {
    "open": ("same", (True, True, True, True)),
    "full_cone": ("same", (True, True, True, True)),
    "restricted_cone": ("same", (True, True, False, False)),
    "port_restricted": ("same", (True, False, False, False)),
    "symmetric": ("new", (True, False, False, False)),
    "cgnat": ("same", (True, False, False, False)),
}

# natlab.md: every cone/CGNAT pair punches; symmetric works against a cone side that answers
# the source it hears from (full or restricted cone, and open); it fails against
# port-restricted (including CGNAT) and against another symmetric NAT.
HARD = {"port_restricted", "symmetric", "cgnat"}


def _punch_expected(a: str, b: str) -> bool:
    return not ((a == "symmetric" and b in HARD) or (b == "symmetric" and a in HARD))


def _address_echo(ep: SimEndpoint) -> None:
    """A tiny "what's my address" responder: replies with the source it saw, as ip:port."""
    ep.set_receiver(lambda data, src: ep.send(f"{src[0]}:{src[1]}".encode(), src))


def _parse(data: bytes) -> Address:
    ip, port = data.decode().rsplit(":", 1)
    return (ip, int(port))


class _Inbox:
    def __init__(self, ep: SimEndpoint) -> None:
        self.items: list[tuple[bytes, Address]] = []
        ep.set_receiver(lambda data, src: self.items.append((data, src)))


async def _ask(ep: SimEndpoint, inbox: _Inbox, server: Address) -> Address:
    inbox.items.clear()
    ep.send(b"?", server)
    await asyncio.sleep(0.2)
    replies = [data for data, src in inbox.items if src == server]
    assert len(replies) == 1, f"no answer from {server}"
    return _parse(replies[0])


def _probe(preset: str) -> tuple[str, tuple[bool, ...]]:
    async def main(net: SimNetwork) -> tuple[str, tuple[bool, ...]]:
        topo = build_pair_topology(net, preset, "open", latency_ms=5)
        servers = {(ip, port): topo.server.open_endpoint(port, ip) for ip in (IP1, IP2) for port in (P1, P2)}
        for ep in servers.values():
            _address_echo(ep)

        # Mapping: one socket asks IP1:P1, IP1:P2 and IP2:P1 what it looks like.
        ep = topo.host_a.open_endpoint()
        inbox = _Inbox(ep)
        seen = [await _ask(ep, inbox, server) for server in [(IP1, P1), (IP1, P2), (IP2, P1)]]
        assert {ip for ip, _ in seen} == {topo.a.public_ip}
        ports = [port for _, port in seen]
        if len(set(ports)) == 1:
            mapping = "same"
        elif len(set(ports)) == len(ports):
            mapping = "new"
        else:
            mapping = "mixed"

        # Filtering: a fresh socket talks to IP1:P1 only; then every server socket tries it.
        ep = topo.host_a.open_endpoint()
        inbox = _Inbox(ep)
        mapped = await _ask(ep, inbox, (IP1, P1))
        for origin in [(IP1, P1), (IP1, P2), (IP2, P1), (IP2, P2)]:
            servers[origin].send(b"unsolicited", mapped)
        await asyncio.sleep(0.2)
        heard = {src for data, src in inbox.items if data == b"unsolicited"}
        admitted = tuple(origin in heard for origin in [(IP1, P1), (IP1, P2), (IP2, P1), (IP2, P2)])
        return mapping, admitted

    return simulate(main, seed=4787)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_the_kernel_probe_table(preset: str) -> None:
    assert _probe(preset) == KERNEL_TABLE[preset]


def _punch(preset_a: str, preset_b: str, seed: int) -> tuple[bool, int]:
    async def main(net: SimNetwork) -> tuple[bool, int]:
        topo = build_pair_topology(net, preset_a, preset_b, latency_ms=20, jitter_ms=2)
        _address_echo(topo.server.open_endpoint(P1, IP1))
        peers = [topo.host_a.open_endpoint(), topo.host_b.open_endpoint()]
        inboxes = [_Inbox(ep) for ep in peers]
        observed = [await _ask(ep, inbox, (IP1, P1)) for ep, inbox in zip(peers, inboxes)]
        heard_from_peer = [False, False]

        def answering(me: int) -> None:
            # Each side answers the source it actually hears from, which is what lets a
            # cone side reach a symmetric peer whose probe came from a fresh mapping.
            def on_datagram(data: bytes, src: Address) -> None:
                if data in (b"punch", b"ack"):
                    heard_from_peer[me] = True
                if data == b"punch":
                    peers[me].send(b"ack", src)

            peers[me].set_receiver(on_datagram)

        answering(0)
        answering(1)
        # Simultaneous sends, a few rounds, as a gateway's "punch now" would trigger.
        for _ in range(5):
            peers[0].send(b"punch", observed[1])
            peers[1].send(b"punch", observed[0])
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        filtered = net.counters.dropped["nat_filtered"]
        return all(heard_from_peer), filtered

    return simulate(main, seed=seed)


PAIRS = list(itertools.combinations_with_replacement(PRESETS, 2))


def test_there_are_21_unordered_pairs() -> None:
    assert len(PAIRS) == 21


@pytest.mark.parametrize("preset_a, preset_b", PAIRS)
def test_plain_udp_hole_punching_matrix(preset_a: str, preset_b: str) -> None:
    expected = _punch_expected(preset_a, preset_b)
    for seed in (1, 2):
        punched, filtered = _punch(preset_a, preset_b, seed)
        assert punched is expected, f"{preset_a} <-> {preset_b} (seed {seed})"
        if not expected:
            assert filtered > 0  # failed because a NAT filtered, not because of loss
