"""Bulk stream transfer roles: a macula session, and raw aioquic (or qh3) beside it.

Both senders write the same payload in the same chunks and hold at most the same number of
unacknowledged bytes (polling every 2 ms, as `Stream.drain` does), so the only difference
left is the stack underneath. Times are `time.monotonic()`, which is one clock for every
process on the machine: throughput = bytes / (receiver's end of stream - sender's start).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from macula_lab.bench.profiling import Profiler, maybe_profile
from macula_lab.bench.worker_io import Commands, emit

HIGH_WATER = 1 << 20  # unacknowledged bytes a sender keeps in flight (Stream.drain default)
_POLL = 0.002
ALPN = "macula-bench"


def _payload(chunk: int) -> bytes:
    return bytes(range(256)) * (chunk // 256) + bytes(chunk % 256)


async def _write_all(write: Callable[[bytes], None], buffered: Callable[[], int],
                     total: int, chunk: int) -> None:
    data = _payload(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        write(data if n == chunk else data[:n])
        sent += n
        while buffered() > HIGH_WATER:
            await asyncio.sleep(_POLL)


# ---------------------------------------------------------------- macula session
def _gateway_options(spec: dict[str, Any]) -> dict[str, Any]:
    """How the node reaches the gateway: its UDP address, or with "gateway_tls" only its
    TLS link (the UDP address given to the node is a port nothing listens on, so every
    gateway-bound packet rides the link, as behind a firewall that drops UDP)."""
    if not spec.get("gateway_tls"):
        return {"gateway": tuple(spec["gateway"])}
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()
    return {"gateway": closed, "gateway_id": spec["gateway_id"],
            "gateway_tls": tuple(spec["gateway_tls"])}



async def macula_recv(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    from macula.identity import Identity
    from macula.node.node import Node

    node = await Node.start(Identity.generate(), **_gateway_options(spec),
                            listen=("127.0.0.1", 0), strategy=spec.get("strategy", "opportunistic"))
    try:
        emit({"ready": True, "node_id": node.node_id.text})
        session = await node.accept(timeout=30)
        stream = await session.accept_stream(timeout=60)
        received, first_at = 0, None
        with maybe_profile(spec.get("profile")):
            while chunk := await stream.read():
                if first_at is None:
                    first_at = time.monotonic()
                received += len(chunk)
        eof_at = time.monotonic()
        stats = session.stats()
        # The sender closes once everything is acknowledged; our ACKs must get out first.
        try:
            await asyncio.wait_for(session.closed.wait(), 15)
        except TimeoutError:
            pass
        return {"bytes": received, "first_at": first_at, "eof_at": eof_at,
                "path": stats["connection_type"], "bytes_by_path": stats["bytes_by_path"]}
    finally:
        await node.close()


async def macula_send(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    from macula.identity import Identity
    from macula.node.node import Node

    node = await Node.start(Identity.generate(), **_gateway_options(spec),
                            listen=("127.0.0.1", 0), strategy=spec.get("strategy", "opportunistic"))
    try:
        session = await node.connect(spec["peer"], timeout=15)
        waited_ms = None
        if spec.get("wait_direct"):
            # A trickle of messages lets the path switch show (it moves with traffic).
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while session.connection_type != "direct" and loop.time() - t0 < spec["wait_direct"]:
                session.send(b"p")
                await asyncio.sleep(0.002)
            waited_ms = round((loop.time() - t0) * 1000, 3)
        path_before = session.connection_type
        stream = await session.open_stream()
        total, chunk = spec["bytes"], spec["chunk"]
        with maybe_profile(spec.get("profile")):
            start_at = time.monotonic()
            await _write_all(stream.write, lambda: session._session.stream_buffered(stream.stream_id),
                             total, chunk)
            stream.write(b"", end=True)
            await stream.drain(0)
            acked_at = time.monotonic()
        stats = session.stats()
        await session.close()
        return {"bytes": total, "start_at": start_at, "acked_at": acked_at,
                "path_before": path_before, "path": stats["connection_type"],
                "waited_for_direct_ms": waited_ms, "bytes_by_path": stats["bytes_by_path"],
                "upgrade_ms": (stats.get("upgrade") or {}).get("upgrade_ms")}
    finally:
        await node.close()


# ---------------------------------------------------------------- raw QUIC engine
def _engine(name: str) -> dict[str, Any]:
    return {
        "asyncio": importlib.import_module(f"{name}.asyncio"),
        "configuration": importlib.import_module(f"{name}.quic.configuration"),
        "events": importlib.import_module(f"{name}.quic.events"),
        "protocol": importlib.import_module(f"{name}.asyncio.protocol"),
    }


def _config(engine: dict[str, Any], *, is_client: bool) -> Any:
    config = engine["configuration"].QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN])
    config.verify_mode = ssl.CERT_NONE
    # Same packet size as our sessions (1200), and no path-MTU probing (qh3 has it).
    config.max_datagram_size = 1200
    if hasattr(config, "probe_datagram_size"):
        config.probe_datagram_size = False
    # aioquic's flow-control windows, for both engines (qh3's defaults are larger).
    config.max_data = 1 << 20
    config.max_stream_data = 1 << 20
    enable_ed25519(config)
    return config


def enable_ed25519(config: Any) -> None:
    """qh3 leaves EdDSA out of a client's signature_algorithms unless asked; our
    certificates are Ed25519, so ask (aioquic offers it by default)."""
    if hasattr(config, "signature_algorithms") and config.signature_algorithms is None:
        tls = importlib.import_module(f"{type(config).__module__.split('.')[0]}.tls")
        algs = tls.SignatureAlgorithm
        config.signature_algorithms = [algs.ED25519, algs.ECDSA_SECP256R1_SHA256,
                                       algs.RSA_PSS_RSAE_SHA256]


def _write_certificate(directory: str) -> tuple[str, str]:
    """An Ed25519 self-signed certificate, as our nodes use (PEM files both engines load)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, None))
    cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _sent_unacked(conn: Any, stream_id: int) -> int:
    if hasattr(conn, "get_send_buffer_size"):  # qh3
        return conn.get_send_buffer_size(stream_id)
    stream = conn._streams.get(stream_id)  # aioquic: what Session.stream_buffered reads
    if stream is None:
        return 0
    return stream.sender._buffer_stop - stream.sender._buffer_start


async def quic_recv(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    engine = _engine(spec.get("engine", "aioquic"))
    stream_data = engine["events"].StreamDataReceived
    done = asyncio.Event()
    figures: dict[str, Any] = {"bytes": 0, "first_at": None, "eof_at": None}
    profiler = Profiler(spec.get("profile"))

    class Sink(engine["protocol"].QuicConnectionProtocol):  # type: ignore[misc, name-defined]
        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, stream_data):
                if figures["first_at"] is None:
                    figures["first_at"] = time.monotonic()
                    profiler.start()
                figures["bytes"] += len(event.data)
                if event.end_stream:
                    figures["eof_at"] = time.monotonic()
                    done.set()

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(engine, is_client=False)
        config.load_cert_chain(*_write_certificate(tmp))
        server = await engine["asyncio"].serve("127.0.0.1", 0, configuration=config,
                                               create_protocol=Sink)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        emit({"ready": True, "port": port})
        await done.wait()
        profiler.stop()
        await commands.wait_closed(15)  # stay to acknowledge until the sender is done
        return figures
    finally:
        server.close()


async def quic_send(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    engine = _engine(spec.get("engine", "aioquic"))
    config = _config(engine, is_client=True)
    async with engine["asyncio"].connect("127.0.0.1", spec["port"], configuration=config) as client:
        conn = client._quic
        stream_id = conn.get_next_available_stream_id()

        def write(data: bytes) -> None:
            conn.send_stream_data(stream_id, data)
            client.transmit()

        with maybe_profile(spec.get("profile")):
            start_at = time.monotonic()
            await _write_all(write, lambda: _sent_unacked(conn, stream_id),
                             spec["bytes"], spec["chunk"])
            conn.send_stream_data(stream_id, b"", end_stream=True)
            client.transmit()
            deadline = time.monotonic() + 30
            while _sent_unacked(conn, stream_id) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(_POLL)
            acked_at = time.monotonic()
    return {"bytes": spec["bytes"], "start_at": start_at, "acked_at": acked_at}
