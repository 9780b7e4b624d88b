"""Real asyncio programs, written for real sockets, run unmodified on the simulator."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from macula.net.endpoint import Address, DatagramEndpoint
from macula_lab.sim import SimNetwork, build_pair_topology, simulate

SERVER = ("203.0.113.10", 4433)


# -- an ordinary asyncio client/server, unaware of the simulator ---------------------------


async def pong_server(ep: DatagramEndpoint) -> None:
    ep.set_receiver(lambda data, src: ep.send(b"pong" + data[4:], src))


async def ping_client(ep: DatagramEndpoint, server: Address, count: int) -> tuple[list[float], int]:
    """Ping `count` times with a 300 ms timeout and up to 10 tries each; RTTs and retries."""
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    ep.set_receiver(lambda data, src: replies.put_nowait(data))
    rtts: list[float] = []
    retries = 0
    for seq in range(count):
        tag = seq.to_bytes(4, "big")
        for _ in range(10):
            sent_at = loop.time()
            ep.send(b"ping" + tag, server)
            try:
                while await asyncio.wait_for(replies.get(), timeout=0.3) != b"pong" + tag:
                    pass  # a late reply to an earlier try
            except TimeoutError:
                retries += 1
                continue
            rtts.append(loop.time() - sent_at)
            break
    return rtts, retries


def test_queue_ping_pong_with_wait_for_timeouts_over_a_lossy_nat() -> None:
    async def main(net: SimNetwork) -> tuple[list[float], int, float]:
        topo = build_pair_topology(net, "symmetric", "open", latency_ms=40, loss=0.1)
        await pong_server(topo.server.open_endpoint(SERVER[1], SERVER[0]))
        start = asyncio.get_running_loop().time()
        rtts, retries = await ping_client(topo.host_a.open_endpoint(), SERVER, 100)
        return rtts, retries, asyncio.get_running_loop().time() - start

    wall = time.perf_counter()
    rtts, retries, elapsed = simulate(main, seed=9)
    assert time.perf_counter() - wall < 2.0
    assert len(rtts) == 100
    assert all(abs(rtt - 0.08) < 1e-9 for rtt in rtts)  # 40 ms each way, no jitter
    assert 5 <= retries <= 40  # ~19% of round trips lose a packet at 10% loss per direction
    assert elapsed >= 100 * 0.08 + retries * 0.3 - 1e-6


# -- aioquic's own asyncio protocols over a DatagramEndpoint -------------------------------


class EndpointTransport(asyncio.DatagramTransport):
    """Presents a DatagramEndpoint as the asyncio transport aioquic's protocols expect."""

    def __init__(self, ep: DatagramEndpoint, protocol: asyncio.DatagramProtocol) -> None:
        super().__init__()
        self._ep = ep
        self._closing = False
        ep.set_receiver(protocol.datagram_received)
        protocol.connection_made(self)

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._ep.send(data, addr)

    def close(self) -> None:
        self._closing = True
        self._ep.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._ep.local_address if name == "sockname" else default


def _self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.test")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_aioquic_handshake_and_stream_over_cgnat_with_loss() -> None:
    payload = bytes(range(256)) * 400  # 100 KiB: many packets, so loss recovery runs

    async def main(net: SimNetwork) -> tuple[bytes, float, int]:
        loop = asyncio.get_running_loop()
        topo = build_pair_topology(net, "cgnat", "open", latency_ms=30, loss=0.05)

        cert, key = _self_signed()
        server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["echo"])
        server_cfg.certificate, server_cfg.private_key = cert, key

        def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def echo() -> None:
                writer.write(await reader.read())
                writer.write_eof()

            loop.create_task(echo())

        server = QuicServer(configuration=server_cfg, stream_handler=on_stream)
        EndpointTransport(topo.server.open_endpoint(SERVER[1], SERVER[0]), server)

        client_cfg = QuicConfiguration(
            is_client=True, alpn_protocols=["echo"], verify_mode=ssl.CERT_NONE, server_name="gateway.test"
        )
        client = QuicConnectionProtocol(QuicConnection(configuration=client_cfg))
        EndpointTransport(topo.host_a.open_endpoint(), client)
        start = loop.time()
        client.connect(SERVER)
        await asyncio.wait_for(client.wait_connected(), timeout=10)
        reader, writer = await client.create_stream()
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), timeout=60)
        elapsed = loop.time() - start
        client.close()
        await asyncio.wait_for(client.wait_closed(), timeout=5)
        server.close()
        lost = sum(link.counters.dropped["loss"] for link in topo.a.uplinks)
        return echoed, elapsed, lost

    wall = time.perf_counter()
    echoed, elapsed, lost = simulate(main, seed=3)
    assert echoed == payload
    assert lost > 0  # the transfer really crossed a lossy path and recovered
    assert elapsed > 0.12  # at least the handshake and one data round trip at 60 ms RTT
    assert time.perf_counter() - wall < 10.0
