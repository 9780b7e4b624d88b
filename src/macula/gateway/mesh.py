"""The gateway mesh (sans-IO): one authenticated link to every other member of the cluster.

A link is a QUIC connection on the gateway's own socket (ALPN "macula-mesh/1", the peer's
key pinned to the id the directory lists for it), dialled by the member with the lower id
and redialled with backoff while the member is listed. Over it the two gateways exchange
`mesh_hello` (each hands the other the key to sign relay frames with) and `mesh_deliver`
(a control message for a node homed at the receiver); relay frames go beside it as signed
datagrams (wire/mesh.py). A member that stops answering for MESH_IDLE seconds is down:
frames for its nodes are dropped (counted) until they re-home elsewhere.

The gateway core owns the socket and the QUIC multiplexer; this module owns the links and
tells the core what arrived.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aioquic.quic import events as qe

from ..identity import Identity, NodeId
from ..logsafe import clip
from ..net.endpoint import Address, format_address
from ..session.mux import QuicMux
from ..session.quic import ALPN_MESH, PinnedQuicConnection, make_configuration
from ..wire.control import ControlStreamError
from ..wire.mesh import (
    MESH_KEY_BYTES,
    MESH_VERSION,
    MeshDecoder,
    MeshDeliver,
    MeshFrameError,
    MeshHello,
    MeshMessage,
    MeshRelayFrame,
    decode_mesh_relay,
    encode_mesh,
    encode_mesh_relay,
    mesh_sender,
)

log = logging.getLogger(__name__)

MESH_IDLE = 3.0  # seconds without a packet from a member: its link is down
PING_EVERY = 0.5  # keeps a quiet link's RTT fresh and shows a dead member within MESH_IDLE
REDIAL_MIN, REDIAL_MAX = 0.25, 5.0


@dataclass
class MeshLink:
    """Per member: the connection, and the keys its relay frames are signed with."""

    peer: NodeId
    address: Address
    conn: PinnedQuicConnection | None = None
    stream_id: int | None = None
    decoder: MeshDecoder = field(default_factory=MeshDecoder)
    recv_key: bytes = field(default_factory=lambda: os.urandom(MESH_KEY_BYTES))
    send_key: bytes | None = None  # from its hello: the link is up once we have it
    dial_at: float | None = None
    redial_delay: float = REDIAL_MIN
    next_ping: float = 0.0

    @property
    def up(self) -> bool:
        return self.conn is not None and self.send_key is not None


class Mesh:
    def __init__(self, identity: Identity, mux: QuicMux, send: Callable[[bytes, Address], None],
                 dropped: Counter[str], malformed: Counter[str]) -> None:
        self.identity = identity
        self._me = identity.node_id.raw
        self._mux = mux
        self._send_datagram = send  # queues on the core's outgoing datagrams
        self._client_config = make_configuration(identity, is_client=True, alpn=ALPN_MESH,
                                                 idle_timeout=MESH_IDLE)
        self.links: dict[bytes, MeshLink] = {}  # member raw id -> link
        self._by_conn: dict[PinnedQuicConnection, MeshLink] = {}
        self._closing: set[PinnedQuicConnection] = set()
        self.dropped = dropped
        self.malformed = malformed
        self.relayed_bytes = 0  # payload sent to other members

    # ------------------------------------------------------------------ membership
    def set_members(self, members: dict[bytes, Address], now: float) -> None:
        """The directory's member list (without us): links to members that left go, new
        members with a higher id are dialled (they dial those with a lower one)."""
        for raw in [r for r in self.links if r not in members]:
            self._drop(self.links.pop(raw), "left the cluster")
        for raw, address in members.items():
            link = self.links.get(raw)
            if link is None:
                link = self.links[raw] = MeshLink(NodeId(raw), address)
                if self._me < raw:
                    link.dial_at = now
            elif link.address != address and self._me < raw:  # it moved: dial it there
                self._drop(link, "moved")
                link.address, link.dial_at = address, now

    def is_member(self, node_id: NodeId | None) -> bool:
        return node_id is not None and node_id.raw in self.links

    # ------------------------------------------------------------------ connections
    def _dial(self, link: MeshLink, now: float) -> None:
        conn = PinnedQuicConnection(configuration=self._client_config, expected_peer=link.peer)
        conn.connect(link.address, now)
        self._attach(link, conn, now)
        self._mux.add(conn)

    def _attach(self, link: MeshLink, conn: PinnedQuicConnection, now: float) -> None:
        if link.conn is not None and link.conn is not conn:
            self._drop(link, "replaced by a new connection")
        link.conn, link.stream_id, link.send_key = conn, None, None
        link.decoder = MeshDecoder()
        link.dial_at, link.next_ping = None, now + PING_EVERY
        self._by_conn[conn] = link

    def adopt(self, conn: PinnedQuicConnection, now: float) -> bool:
        """A connection to us that negotiated the mesh ALPN: kept if its key is a member's
        (the handshake proved the key), refused otherwise."""
        peer = conn.peer_node_id
        link = self.links.get(peer.raw) if peer is not None else None
        if link is None:
            self.dropped["mesh_not_member"] += 1
            return False
        self._attach(link, conn, now)
        link.address = conn._network_paths[0].addr
        return True

    def owns(self, conn: PinnedQuicConnection) -> bool:
        return conn in self._by_conn or conn in self._closing

    def _drop(self, link: MeshLink, why: str) -> None:
        conn, link.conn, link.send_key = link.conn, None, None
        if conn is None:
            return
        if link.stream_id is not None or why != "left the cluster":
            log.info("mesh link to %s down: %s", link.peer, why)
        self._by_conn.pop(conn, None)
        # It says goodbye (CONNECTION_CLOSE) and is forgotten once QUIC has ended it.
        self._closing.add(conn)
        conn.close(error_code=0, reason_phrase=why[:64])
        self._mux.mark(conn)

    def process(self, conn: PinnedQuicConnection, now: float) -> Iterator[tuple[NodeId, MeshDeliver]]:
        """A mesh connection's QUIC events; yields (member, delivery) for the core."""
        if conn in self._closing:
            while (event := conn.next_event()) is not None:
                self._mux.track_cid_event(conn, event)
                if isinstance(event, qe.ConnectionTerminated):
                    self._closing.discard(conn)
                    self._mux.remove(conn)
                    conn.dismantle()
                    return
            return
        link = self._by_conn.get(conn)
        while link is not None and (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if isinstance(event, qe.HandshakeCompleted) and conn._is_client:
                link.stream_id = conn.get_next_available_stream_id()
                self._send(link, MeshHello(MESH_VERSION, self.identity.node_id.text,
                                           link.recv_key.hex()))
            elif isinstance(event, qe.StreamDataReceived):
                if link.stream_id is None:  # the dialler's stream: answer on it
                    link.stream_id = event.stream_id
                    self._send(link, MeshHello(MESH_VERSION, self.identity.node_id.text,
                                               link.recv_key.hex()))
                if event.stream_id != link.stream_id:
                    self.malformed["mesh"] += 1
                    continue
                try:
                    messages = list(link.decoder.feed(event.data))
                except ControlStreamError:
                    self.malformed["mesh"] += 1
                    self._lost(link, "framing error", now)
                    return
                self.malformed["mesh"] += link.decoder.malformed
                link.decoder.malformed = 0
                for message in messages:
                    delivery = self._on_message(link, message)
                    if delivery is not None:
                        yield link.peer, delivery
            elif isinstance(event, qe.ConnectionTerminated):
                reason = conn.rejection or event.reason_phrase or f"error {event.error_code}"
                self._lost(link, reason, now)
                return

    def _on_message(self, link: MeshLink, message: MeshMessage) -> MeshDeliver | None:
        if isinstance(message, MeshHello):
            if message.version != MESH_VERSION or message.gateway_id != link.peer.text:
                self.malformed["mesh"] += 1
                return None
            try:
                key = bytes.fromhex(message.relay_key)
            except ValueError:
                key = b""
            if len(key) != MESH_KEY_BYTES:
                self.malformed["mesh"] += 1
                return None
            if link.send_key is None:
                log.info("mesh link to %s up (%s)", link.peer, format_address(link.address))
            link.send_key = key
            link.redial_delay = REDIAL_MIN
            return None
        if link.send_key is None:  # deliveries before the hello
            self.malformed["mesh"] += 1
            return None
        return message

    def _lost(self, link: MeshLink, reason: str, now: float) -> None:
        if link.conn is not None:
            self._by_conn.pop(link.conn, None)
            self._mux.remove(link.conn)
            link.conn.dismantle()
        was_up = link.send_key is not None
        link.conn, link.send_key, link.stream_id = None, None, None
        if was_up:
            log.warning("mesh link to %s lost: %s", link.peer, clip(reason, 80))
        if self._me < link.peer.raw and link.peer.raw in self.links:
            link.dial_at = now + link.redial_delay
            link.redial_delay = min(link.redial_delay * 2, REDIAL_MAX)

    # ------------------------------------------------------------------ sending
    def _send(self, link: MeshLink, message: MeshMessage) -> None:
        if link.conn is None or link.stream_id is None:
            return
        link.conn.send_stream_data(link.stream_id, encode_mesh(message))
        self._mux.mark(link.conn)

    def deliver(self, member: NodeId, delivery: MeshDeliver) -> bool:
        """A control message for a node homed at `member`; False if its link is down."""
        link = self.links.get(member.raw)
        if link is None or not link.up:
            self.dropped["mesh_unreachable"] += 1
            return False
        self._send(link, delivery)
        return True

    def relay(self, member: NodeId, source: bytes, destination: bytes, payload: bytes) -> bool:
        """Hot path: a relay frame for a node homed at `member`, one hop."""
        link = self.links.get(member.raw)
        if link is None or link.send_key is None:
            self.dropped["mesh_unreachable"] += 1
            return False
        self._send_datagram(encode_mesh_relay(link.send_key, self._me, source, destination,
                                              payload), link.address)
        self.relayed_bytes += len(payload)
        return True

    def receive_relay(self, data: bytes) -> MeshRelayFrame | None:
        """A relay frame from a member, if it is one and its tag checks out."""
        try:
            link = self.links.get(mesh_sender(data))
            if link is None or link.conn is None:
                self.dropped["mesh_not_member"] += 1
                return None
            frame = decode_mesh_relay(link.recv_key, data)
        except MeshFrameError:
            self.dropped["mesh_forged"] += 1
            return None
        return frame

    def rtt(self, member: NodeId) -> float:
        link = self.links.get(member.raw)
        rtt = link.conn.smoothed_rtt if link is not None and link.conn is not None else None
        return rtt if rtt is not None else 0.05

    @property
    def links_up(self) -> int:
        return sum(1 for link in self.links.values() if link.up)

    def live_members(self) -> set[bytes]:
        """Members whose link is up: alive whatever the store says (it may have restarted)."""
        return {raw for raw, link in self.links.items() if link.up}

    # ------------------------------------------------------------------ time
    def get_timer(self) -> float | None:
        times = [t for link in self.links.values()
                 for t in ((link.dial_at,) if link.conn is None else (link.next_ping,))
                 if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for link in list(self.links.values()):
            if link.conn is None:
                if link.dial_at is not None and now >= link.dial_at:
                    self._dial(link, now)
            elif now >= link.next_ping:
                link.next_ping = now + PING_EVERY
                if link.up:
                    link.conn.send_ping(0)
                    self._mux.mark(link.conn)

    def close(self) -> None:
        for link in self.links.values():
            if link.conn is not None:
                link.conn.close(error_code=0, reason_phrase="gateway shutting down")
                self._mux.mark(link.conn)
