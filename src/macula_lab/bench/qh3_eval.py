"""Could qh3 replace aioquic under our sessions? What our identity pinning needs, checked.

`python -m macula_lab.bench.qh3_eval` (in an interpreter that has qh3 and cryptography) prints
one JSON object. It runs an in-memory handshake (no sockets) with Ed25519 certificates on
both sides and checks, by behaviour rather than by reading docs:
  - QuicConnection is a Python class we can subclass;
  - the server can ask for the client's certificate (aioquic: tls._request_client_certificate);
  - either side can read the peer's certificate and its Ed25519 key;
  - a non-IP "virtual" peer address is accepted (our sessions give QUIC one per node);
  - which aioquic internals our code reads exist (_loss, _streams, _network_paths).
Throughput is measured by the bench itself (`macula bench --qh3-python PATH`).
"""

from __future__ import annotations

import importlib
import json
import ssl
import sys
import tempfile
from typing import Any

from macula_lab.bench.bulk import _write_certificate, enable_ed25519


def _handshake(mod: str, cert: str, key: str, *, client_cert: bool, ed25519_opt_in: bool = True,
               peer: tuple[str, int] = ("127.0.0.1", 4433)) -> tuple[Any, Any, str | None]:
    configuration = importlib.import_module(f"{mod}.quic.configuration")
    connection = importlib.import_module(f"{mod}.quic.connection")
    server_cfg = configuration.QuicConfiguration(is_client=False, alpn_protocols=["m"])
    server_cfg.load_cert_chain(cert, key)
    client_cfg = configuration.QuicConfiguration(is_client=True, alpn_protocols=["m"])
    client_cfg.verify_mode = ssl.CERT_NONE
    if ed25519_opt_in:
        enable_ed25519(client_cfg)
    if client_cert:
        client_cfg.load_cert_chain(cert, key)
    if mod == "aioquic":
        class Server(connection.QuicConnection):  # what PinnedQuicConnection does
            def _initialize(self, peer_cid: bytes) -> None:
                super()._initialize(peer_cid)
                self.tls._request_client_certificate = True
        server_cls = Server
    else:
        server_cls = connection.QuicConnection
    client = connection.QuicConnection(configuration=client_cfg)
    now = 0.0
    try:
        client.connect(peer, now)
        server = None
        for _ in range(20):
            for data, _addr in client.datagrams_to_send(now):
                if server is None:
                    # Long header: flags, version (4), DCID length, DCID (RFC 9000 17.2).
                    odcid = data[6:6 + data[5]]
                    server = server_cls(configuration=server_cfg,
                                        original_destination_connection_id=odcid)
                server.receive_datagram(data, ("127.0.0.1", 50000), now)
            if server is not None:
                for data, _addr in server.datagrams_to_send(now):
                    client.receive_datagram(data, peer, now)
            now += 0.01
        return client, server, None
    except Exception as exc:  # the failure is the finding
        return client, None, f"{type(exc).__name__}: {exc}"


def _peer_cert(conn: Any) -> Any:
    if conn is None:
        return None
    if hasattr(conn, "get_peercert"):
        return conn.get_peercert()
    tls = getattr(conn, "tls", None)
    return getattr(tls, "_peer_certificate", None) if tls is not None else None


def capabilities(mod: str = "qh3") -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding

    package = importlib.import_module(mod)
    connection = importlib.import_module(f"{mod}.quic.connection")
    out: dict[str, Any] = {"module": mod, "version": getattr(package, "__version__", None)}
    cls = connection.QuicConnection
    out["quic_connection_is_python_class"] = isinstance(cls, type) and not cls.__module__.startswith("_")
    out["ed25519_server_certificate"] = False
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = _write_certificate(tmp)
        client, server, error = _handshake(mod, cert, key, client_cert=True)
        out["handshake_error"] = error
        # The client holding the server's certificate means the Ed25519 handshake went through.
        out["ed25519_server_certificate"] = server is not None and _peer_cert(client) is not None
        plain_client, _, _ = _handshake(mod, cert, key, client_cert=False, ed25519_opt_in=False)
        out["ed25519_without_opt_in"] = _peer_cert(plain_client) is not None
        server_sees = _peer_cert(server)
        out["server_gets_client_certificate"] = server_sees is not None
        tls = getattr(server, "tls", None) if server is not None else None
        out["tls_has__request_client_certificate"] = hasattr(tls, "_request_client_certificate")
        out["tls_has__set_peer_certificate_hook"] = hasattr(tls, "_set_peer_certificate")
        client_peer = _peer_cert(client)
        out["peer_certificate_type"] = type(client_peer).__name__ if client_peer is not None else None
        # Can we get an Ed25519 key (our node id is its hash) out of what the peer sent?
        key_ok = False
        if client_peer is not None:
            try:
                # qh3's Certificate gives DER; aioquic hands over cryptography's object.
                der = (client_peer.public_bytes() if mod == "qh3"
                       else client_peer.public_bytes(Encoding.DER))
                key_ok = isinstance(x509.load_der_x509_certificate(der).public_key(), Ed25519PublicKey)
            except Exception as exc:  # reported: what failed is the finding
                out["peer_key_error"] = f"{type(exc).__name__}: {exc}"
        out["peer_ed25519_key_readable"] = key_ok
        _, _, virtual_error = _handshake(mod, cert, key, client_cert=False, peer=("macula:node", 0))
        out["virtual_peer_address_accepted"] = virtual_error is None
        out["virtual_peer_address_error"] = virtual_error
    internals = {"_loss": "RTT and PTO reset on path switch (node/core.py, session/quic.py)",
                 "_streams": "send-buffer backpressure (session/session.py)",
                 "_network_paths": "observed address (gateway/core.py)",
                 "_initialize": "client-certificate request hook (session/quic.py)"}
    out["aioquic_internals_present"] = {name: hasattr(client, name) or hasattr(cls, name)
                                        for name in internals}
    out["aioquic_internals_used_for"] = internals
    return out


def main() -> int:
    mod = sys.argv[1] if len(sys.argv) > 1 else "qh3"
    print(json.dumps(capabilities(mod)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
