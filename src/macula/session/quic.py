"""aioquic with identity pinning: both ends present their node key and check the other's.

aioquic verifies that the TLS CertificateVerify was signed by the certificate's key; we add
the two things a mesh needs and aioquic does not offer publicly: the server asks the client
for its certificate (mutual authentication), and each side refuses the handshake unless the
peer's key hashes to the node id it expects. Both use aioquic internals, hence the exact pin.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicProtocolVersion
from aioquic.quic.stream import QuicStream
from cryptography import x509

from ..errors import MaculaError
from ..identity import MEMBERSHIP_OID, Identity, IdentityError, NodeId, node_id_of_certificate

ALPN_CONTROL = "macula-gw/1"  # node <-> gateway control connection
ALPN_SESSION = "macula/1"  # node <-> node end-to-end session
ALPN_MESH = "macula-mesh/1"  # gateway <-> gateway of one cluster

# 1200 bytes keeps a relayed packet (plus our 25-byte relay header) under the 1280-byte
# IPv6 minimum MTU on every path, so switching paths under a live connection never needs
# path MTU rediscovery.
MAX_DATAGRAM = 1200

# Application error code of a session the receiving node refused (node.accept_from).
ERROR_NOT_ACCEPTED = 0x5
# The gateway closed a control connection because the same key registered again elsewhere.
ERROR_REPLACED = 0x6


def make_configuration(
    identity: Identity,
    *,
    is_client: bool,
    alpn: str,
    idle_timeout: float = 30.0,
    also_alpn: tuple[str, ...] = (),
) -> QuicConfiguration:
    """`also_alpn`: further protocols a server accepts (a gateway in a cluster takes mesh
    links on its control socket); the handshake event says which one was agreed."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[alpn, *also_alpn],
        idle_timeout=idle_timeout,
        max_datagram_size=MAX_DATAGRAM,
        # We pin keys, not chains: no CA is involved.
        verify_mode=ssl.CERT_NONE,
        # Every node and gateway speaks QUIC v1. aioquic would also accept v2, deriving a
        # second pair of Initial keys for every connection that no peer of ours uses.
        supported_versions=[QuicProtocolVersion.VERSION_1],
    )
    config.certificate = identity.certificate
    config.private_key = identity.private_key
    return config


class PeerRejected(MaculaError):
    pass


def _membership_extension(certificate: x509.Certificate) -> bytes | None:
    try:
        value = certificate.extensions.get_extension_for_oid(MEMBERSHIP_OID).value
    except (x509.ExtensionNotFound, ValueError):  # none, or extensions that do not parse
        return None
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


# Memory per connection (a gateway holds one per registered node). aioquic keeps three
# 16 KiB crypto buffers for a connection's whole life, though TLS writes nothing after
# the handshake in QUIC (no tickets are issued, KeyUpdate is forbidden); and it builds a
# dict of ~30 bound frame handlers per connection (~11 kB). Both are trimmed below, and
# so are the Initial, Handshake and 0-RTT keys and crypto streams once discarded: aioquic
# keeps them (torn down, with their callbacks) for the connection's life.
POST_HANDSHAKE_CRYPTO_BUFFER = 256
_FRAME_TABLE: dict[int, tuple[str, Any]] = {}
# What every connection's discarded epochs point to: keys never set up (so a late packet of
# that epoch is dropped as "key unavailable", as aioquic does after its own teardown) and
# an empty crypto stream (nothing reads or writes it once the epoch's keys are gone).
_DISCARDED_KEYS = CryptoPair()
_DISCARDED_STREAM = QuicStream()
# Connection ids a node takes from its gateway (RFC 9000's minimum; aioquic asks for 8). A
# node never migrates its control connection on purpose and a NAT rebinding keeps the id,
# so the gateway issuing seven spares would only cost it memory and routing entries per
# node. (The gateway keeps aioquic's default for the ids it takes: lowered to 2, sessions
# between its nodes went direct less reliably in tests/test_ca_network.py; not understood.)
CONTROL_CONNECTION_ID_LIMIT = 2
# The same for end-to-end sessions: QUIC sees one virtual address per peer and paths
# change underneath it (node/core.py), so a session never migrates and never uses a spare
# id; the seven aioquic would issue each way cost ~190 bytes of every handshake's relay.
SESSION_CONNECTION_ID_LIMIT = 2


class _FrameHandlers:
    """Stands in for aioquic's per-connection frame-handler dict: the handler is looked
    up by name on the connection when a frame of that type arrives."""

    __slots__ = ("_conn",)

    def __init__(self, conn: QuicConnection) -> None:
        self._conn = conn

    def __getitem__(self, frame_type: int) -> tuple[Callable[..., None], Any]:
        name, epochs = _FRAME_TABLE[frame_type]  # KeyError: aioquic's "unknown frame type"
        handler: Callable[..., None] = getattr(self._conn, name)
        return handler, epochs


class PinnedQuicConnection(QuicConnection):
    """A QuicConnection that only completes its handshake with the expected peer key.

    `expected_peer` None means "any node, but it must prove a key" (the gateway accepting
    nodes). The verified id is in `peer_node_id` once the handshake completes.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        expected_peer: NodeId | None = None,
        active_connection_id_limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        handlers = self._QuicConnection__frame_handlers  # type: ignore[has-type]
        if not _FRAME_TABLE:
            _FRAME_TABLE.update({frame_type: (handler.__name__, epochs)
                                 for frame_type, (handler, epochs) in handlers.items()})
        self._QuicConnection__frame_handlers = _FrameHandlers(self)
        if active_connection_id_limit is not None:
            self._local_active_connection_id_limit = active_connection_id_limit
        self.expected_peer = expected_peer
        self.presented_peer: NodeId | None = None
        self.peer_node_id: NodeId | None = None
        # The CA-network membership the peer's certificate carried (raw), if any.
        self.peer_membership: bytes | None = None
        self.rejection: str | None = None
        self._verified = False
        # Bytes the application has read from each bidirectional stream: the receive
        # window follows them (see _write_stream_limits).
        self._stream_consumed: dict[int, int] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True
        # Every node and gateway key is Ed25519, and one key exchange is enough: aioquic
        # would offer four groups, generating four key pairs per dial (~0.7 ms here) and
        # putting ~220 bytes of key shares in every ClientHello (a server then picked
        # P-256, the first offered, over the cheaper X25519).
        self.tls._supported_groups = [tls.Group.X25519]
        self.tls._signature_algorithms = [tls.SignatureAlgorithm.ED25519]
        original: Callable[..., None] = self.tls._set_peer_certificate

        def pinned(certificate: tls.Certificate) -> None:
            original(certificate)
            self._pin(self.tls._peer_certificate)

        self.tls._set_peer_certificate = pinned  # type: ignore[method-assign]

    def _pin(self, certificate: x509.Certificate | None) -> None:
        # Raising a TLS alert here aborts the handshake before any application data.
        if certificate is None:
            self.rejection = "peer sent no certificate"
            raise tls.AlertBadCertificate(self.rejection)
        try:
            peer = node_id_of_certificate(certificate)
        except IdentityError as exc:
            self.rejection = str(exc)
            raise tls.AlertBadCertificate(str(exc)) from None
        if self.expected_peer is not None and peer != self.expected_peer:
            self.presented_peer = peer  # for a message naming both ids
            self.rejection = f"peer key is {peer}, expected {self.expected_peer}"
            raise tls.AlertBadCertificate(self.rejection)
        self.peer_node_id = peer
        self.peer_membership = _membership_extension(certificate)

    def next_event(self) -> events.QuicEvent | None:
        event = super().next_event()
        if isinstance(event, events.HandshakeCompleted) and not self._verified:
            if self.peer_node_id is None:
                # The client sent an empty Certificate: TLS allows it, we do not.
                self.rejection = "peer presented no certificate"
                self.close(error_code=0x100 + 42, reason_phrase=self.rejection)
                self._events.clear()
                return events.ConnectionTerminated(
                    error_code=0x100 + 42, frame_type=None, reason_phrase=self.rejection
                )
            self._verified = True
            self._trim_crypto_buffers()
        return event

    def _trim_crypto_buffers(self) -> None:
        """The handshake is over and its messages are queued on the crypto streams (the
        buffers are empty): 48 KiB per connection go back, and so do the key-exchange keys
        and the peer's parsed certificate (OpenSSL objects), which only the handshake used."""
        for epoch, buffer in list(self._crypto_buffers.items()):
            if buffer.tell() == 0 and buffer.capacity > POST_HANDSHAKE_CRYPTO_BUFFER:
                self._crypto_buffers[epoch] = Buffer(capacity=POST_HANDSHAKE_CRYPTO_BUFFER)
        context = self.tls
        context._ec_private_keys = []
        context._x25519_private_key = None
        context._x448_private_key = None
        context._peer_certificate = None
        context._peer_certificate_chain = []

    def _write_application(self, builder: Any, network_path: Any, now: float) -> None:
        # aioquic would put 1-RTT frames in the datagram that carries an Initial packet,
        # and pad that datagram inside the 1-RTT packet's encryption. Ended here, the
        # datagram is padded with zeros after its last packet, which the gateway relay
        # need not carry (session/padding.py); the 1-RTT frames go in the next datagram.
        if builder._packet is not None:
            builder._end_packet()
        if builder._datagram_needs_padding:
            builder._flush_current_datagram()
        super()._write_application(builder, network_path, now)

    def _discard_epoch(self, epoch: tls.Epoch) -> None:
        super()._discard_epoch(epoch)
        self._cryptos[epoch] = _DISCARDED_KEYS
        self._crypto_streams[epoch] = _DISCARDED_STREAM
        if epoch == tls.Epoch.INITIAL:  # one pair per QUIC version, torn down above
            self._cryptos_initial = dict.fromkeys(self._cryptos_initial, _DISCARDED_KEYS)
        zero_rtt = self._cryptos[tls.Epoch.ZERO_RTT]
        if epoch == tls.Epoch.HANDSHAKE and not (zero_rtt.recv.is_valid()
                                                 or zero_rtt.send.is_valid()):
            self._cryptos[tls.Epoch.ZERO_RTT] = _DISCARDED_KEYS  # we never use 0-RTT

    def dismantle(self) -> None:
        """Free this connection now rather than at the next full garbage collection.

        aioquic's connection is a web of cycles (its TLS context, loss recovery and keys
        hold bound methods of it), so dropping the last reference frees nothing: a gateway
        that sees nodes come and go would hold every departed connection until the cyclic
        collector's rare full pass, and its RSS would climb between passes. Emptying the
        instance breaks every cycle through it. Only for a connection nothing will touch
        again (terminated, or evicted before its handshake finished)."""
        context = self.__dict__.get("tls")
        if context is not None:  # a cycle of its own besides those through us
            context.__dict__.clear()
        self.__dict__.clear()

    # --- receive windows paced by the reader ---
    def consume_stream(self, stream_id: int, count: int) -> bool:
        """The application took `count` bytes of a bidirectional stream. True when the
        peer should hear of a larger window now (a quarter window consumed since the last)."""
        consumed = self._stream_consumed.get(stream_id, 0) + count
        self._stream_consumed[stream_id] = consumed
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        window = self._configuration.max_stream_data
        return consumed + window - stream.max_stream_data_local >= window // 4

    def forget_stream(self, stream_id: int) -> None:
        self._stream_consumed.pop(stream_id, None)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        # aioquic doubles a stream's window whenever half of it has *arrived*, so a reader
        # that stops reading would end up buffering a whole transfer. For bidirectional
        # streams (the Stream API) the window is what the application consumed plus one
        # configured window: a slow reader holds the sender back.
        if stream.stream_id & 0x2 or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        window = self._configuration.max_stream_data
        target = self._stream_consumed.get(stream.stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = target
        arrived = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0  # hides arrivals from aioquic's doubling rule
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            stream.receiver.highest_offset = arrived

    # --- figures the stats layer reads (aioquic keeps them internal) ---
    @property
    def smoothed_rtt(self) -> float | None:
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None
