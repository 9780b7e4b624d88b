"""The gateway as a sans-IO state machine: datagrams and time in, datagrams and timers out.

It hosts every node's QUIC control connection (registration, keepalives, lookups) and
forwards relay frames between registered nodes. The relay payload is an end-to-end
encrypted QUIC packet between the two nodes: the gateway never holds the keys to read it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.packet import PACKET_TYPE_INITIAL, QuicHeader, encode_quic_retry
from aioquic.quic.retry import QuicRetryTokenHandler

from ..config import parse_host_port
from ..ice.candidate import Candidate, generate_pwd, generate_ufrag
from ..ice.gather import host_preference
from ..identity import Identity, NodeId
from ..logsafe import Throttle, clip
from ..membership import Membership, MembershipError, NetworkTrust
from ..nat.hard_nat import pair_needs_traversal
from ..net.endpoint import Address, format_address, is_stream_address, same_family
from ..session.mux import CID_LENGTH, QuicHeaderError, QuicMux, parse_header
from ..session.quic import (
    ALPN_CONTROL,
    ALPN_MESH,
    ERROR_REPLACED,
    PinnedQuicConnection,
    make_configuration,
)
from ..wire import control
from ..wire.control import PROTOCOL_VERSION
from ..wire.demux import RELAY_TO_GATEWAY, Kind, classify
from ..wire.mesh import RELAY_MESH, MeshDeliver
from ..wire.relay import MAX_PAYLOAD, TO_GATEWAY_HEADER, TOKEN_BYTES
from .admission import Admission
from .cluster import ClusterView, RemoteHome, remote_entry
from .directory import NodeRecord, RecordError
from .limits import Limiter, PerSourceLimiter, RegistrationLimiter
from .mesh import Mesh
from .options import GatewayOptions, derived_max_nodes
from .registry import MemoryRegistry, NodeEntry, Registry

log = logging.getLogger(__name__)
_throttle = Throttle()

# QUIC clients pad Initial packets to 1200 bytes (RFC 9000 14.1); smaller ones are junk
# and must not make us allocate a connection (amplification / state exhaustion).
_MIN_INITIAL = 1200
_OFFLINE_NOTICE_INTERVAL = 1.0
_PUNCH_DEDUP = 0.5  # a second request for the same pair this soon joins the first
_RECOORDINATE_WITHIN = 3.0  # seconds: a punch this recent is redone after an address change
_PUNCH_MARGIN = 0.002  # seconds added so both punch orders have surely arrived
# Plain UDP punching fails between these (natlab.md); a retry of them is refused.
_INCOMPATIBLE = {frozenset({"symmetric"}), frozenset({"symmetric", "port_restricted"})}
_REORDER_BLIND_WITHIN = 30.0  # seconds: older blind punches have run their course
# Control messages a member may hand us for one of our nodes (a punch request is the
# member's node asking us to coordinate with ours).
_MAX_QUERIES = 1024  # node ids asked of the store at once; past it, unknown is offline
_ASK_TIMES = 3  # a node id not in the store is asked for again this often, 50 ms apart
_MOVED_GRACE = 1.0  # seconds: a registration this fresh outranks another member's record
_DELIVERABLE = (control.Punch, control.Candidates, control.PunchRefused, control.PunchRequest)
# Every pair table is read only within these windows: past the longest, an entry is
# forgotten, so pairs of nodes that came and went cost nothing after it.
_PAIR_MEMORY = max(_PUNCH_DEDUP, _RECOORDINATE_WITHIN, _REORDER_BLIND_WITHIN,
                   _OFFLINE_NOTICE_INTERVAL)


@dataclass
class _Control:
    """Per control connection: who it is once proven, and its stream."""
    conn: PinnedQuicConnection
    decoder: control.ControlDecoder = field(default_factory=control.ControlDecoder)
    stream_id: int | None = None
    node_id: NodeId | None = None
    entry: NodeEntry | None = None
    keepalive_seq: int = 0  # the last one answered
    # CA networks: the membership its handshake certificate carried, or why it did not count.
    membership: Membership | None = None
    membership_error: MembershipError | None = None


@dataclass
class _Waiting:
    """Who waits for the store's answer about a node id we do not know."""

    lookups: list[tuple[_Control, int]] = field(default_factory=list)  # (asker, req)
    senders: set[bytes] = field(default_factory=set)  # of relay frames to it
    punches: list[tuple[_Control, control.PunchRequest]] = field(default_factory=list)
    asked: int = 1


class GatewayCore:
    def __init__(
        self,
        identity: Identity,
        options: GatewayOptions | None = None,
        *,
        registry: Registry | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock` dates the TURN credentials handed out (coturn checks them against
        its own clock; the core's `now` is monotonic)."""
        options = options or GatewayOptions()
        self._wall_clock = wall_clock
        self.identity = identity
        self.options = options
        self.registry: Registry = registry if registry is not None else MemoryRegistry()
        self.node_timeout = options.node_timeout
        self.keepalive_interval = options.keepalive_interval
        self.max_nodes = options.max_nodes or derived_max_nodes()
        self._config = make_configuration(
            identity, is_client=False, alpn=ALPN_CONTROL, idle_timeout=options.node_timeout
        )
        self._retry = QuicRetryTokenHandler()  # a fresh key per process
        self.connections_dropped = 0  # what the I/O layer watches to give memory back
        self.retries_sent = 0
        self._mux = QuicMux()
        self._controls: dict[PinnedQuicConnection, _Control] = {}
        self._out: list[tuple[bytes, Address]] = []
        self._offline_notice: dict[tuple[bytes, bytes], float] = {}
        # Plain integers on the hot path; metrics read them at scrape time.
        self.relayed_packets = 0
        self.relayed_bytes = 0
        # Relayed payload bytes by the transport they arrived on ("udp", "tls").
        self.relayed_bytes_by_transport: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.admission = Admission(options.admission)
        # Answers to unproven sources (STUN, Retry) per source IP: a spoofed source makes
        # us answer its victim, so the victim's address is what is limited.
        self.answers = PerSourceLimiter(options.limits.answer_rate, self.dropped, "answer_rate")
        self.registration_limit = RegistrationLimiter(options.limits.registration_rate,
                                                      self.dropped)
        self.malformed: Counter[str] = Counter()
        self.limits = Limiter(options.limits, self.dropped)
        self.registrations = 0
        self.turn_credentials_issued = 0
        # A CA network's CA key, ACL and revocation list (set_trust); None: not one.
        self.trust: NetworkTrust | None = None
        # The gateway host's STUN sockets, primary first, told to nodes in "welcome".
        self.stun_addresses: list[Address] = []
        self._punches: dict[tuple[bytes, bytes], float] = {}
        # Punches ordered between two port-guessing nodes before both knew their NAT:
        # the orders could not say whether to guess, so they are ordered again once known.
        self._blind: set[tuple[bytes, bytes]] = set()
        self._next_sweep = 0.0
        self.punches_coordinated = 0
        self.punches_recoordinated = 0
        self.candidates_forwarded = 0
        self.punch_refusals: Counter[str] = Counter()
        # (nat pair, outcome) -> count, from the nodes' punch_result reports.
        self.punch_outcomes: Counter[tuple[str, str, str]] = Counter()
        # A cluster member (enable_cluster): the directory view and the mesh; None alone.
        self.cluster: ClusterView | None = None
        self.mesh: Mesh | None = None
        self.draining = False
        # Nodes asked for and not known here: who waits for the store's answer (lookups,
        # and senders of relay frames to hear "offline" if the node is nowhere).
        self._waiting: dict[bytes, _Waiting] = {}

    def enable_cluster(self) -> None:
        """Join a cluster: mesh links are accepted on the control socket from now on, and
        nodes homed at other members are reached through them."""
        self.cluster = ClusterView(self.identity.node_id)
        self.mesh = Mesh(self.identity, self._mux, self._queue, self.dropped, self.malformed)
        self._config = make_configuration(
            self.identity, is_client=False, alpn=ALPN_CONTROL,
            idle_timeout=self.options.node_timeout, also_alpn=(ALPN_MESH,))

    def _queue(self, data: bytes, addr: Address) -> None:
        self._out.append((data, addr))

    def _find(self, raw: bytes) -> NodeEntry | None:
        """A node, ours or (in a cluster) homed at another member."""
        entry = self.registry.get(raw)
        if entry is None and self.cluster is not None:
            return self.cluster.remote.get(raw)
        return entry

    # ---------------------------------------------------------------- datagrams in
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if data and data[0] == RELAY_TO_GATEWAY:  # hot path first
            self._relay(data, addr, now)
            return
        if data and data[0] == RELAY_MESH:
            self._relay_from_member(data)
            return
        kind = classify(data)
        if kind is Kind.QUIC:
            self._receive_quic(data, addr, now)
        elif kind is Kind.RELAY:
            self.malformed["relay"] += 1  # a from-gateway frame sent to us
        else:
            self.malformed[kind.value] += 1

    def _relay(self, data: bytes, addr: Address, now: float) -> None:
        if len(data) <= TO_GATEWAY_HEADER or len(data) - TO_GATEWAY_HEADER > MAX_PAYLOAD:
            self.malformed["relay"] += 1
            return
        sender = self.registry.by_address(addr)
        if sender is None or data[1:1 + TOKEN_BYTES] != sender.token:
            self.dropped["unauthorized"] += 1
            return
        dst_raw = data[1 + TOKEN_BYTES:TO_GATEWAY_HEADER]
        dest = self.registry.get(dst_raw)
        if dest is None and self.cluster is not None:
            dest = self.cluster.remote.get(dst_raw)
        if dest is None:
            if self._ask_directory(dst_raw, relay_sender=sender.node_id.raw):
                self.dropped["destination_unknown"] += 1  # QUIC sends it again
                return
            self.dropped["destination_offline"] += 1
            self._notify_offline(sender, dst_raw, now)
            return
        size = len(data) - TO_GATEWAY_HEADER
        if self.trust is not None and not (self._acl_allows(sender, dest)
                                           or self._acl_allows(dest, sender)):
            self.dropped["acl_denied"] += 1
            self._notify_denied(sender, dest, now)
            return
        if (replies := self.limits.on_relay(sender.node_id.raw, dst_raw, size, now)) is not None:
            self._deliver(self._control_of(sender), replies)
            return
        if isinstance(dest.session, RemoteHome):  # homed at another member: one hop on
            assert self.mesh is not None
            if not self.mesh.relay(dest.session.gateway, sender.node_id.raw, dst_raw,
                                   data[TO_GATEWAY_HEADER:]):
                return
        else:
            self._out.append((b"\x31" + sender.node_id.raw + data[TO_GATEWAY_HEADER:],
                              dest.address))
        self.relayed_packets += 1
        self.relayed_bytes += size
        self.relayed_bytes_by_transport["tls" if is_stream_address(addr) else "udp"] += size

    def _relay_from_member(self, data: bytes) -> None:
        """A relay frame another member forwarded for one of our nodes."""
        frame = self.mesh.receive_relay(data) if self.mesh is not None else None
        if frame is None:
            if self.mesh is None:
                self.malformed["relay"] += 1
            return
        dest = self.registry.get(frame.destination)
        if dest is None:
            self.dropped["destination_offline"] += 1
            return
        self._out.append((b"\x31" + frame.source + frame.payload, dest.address))
        self.relayed_packets += 1
        self.relayed_bytes += len(frame.payload)
        self.relayed_bytes_by_transport["mesh"] += len(frame.payload)

    def _acl_allows(self, source: NodeEntry, destination: NodeEntry) -> bool:
        """May `source` open sessions to `destination`? Always outside a CA network."""
        if self.trust is None:
            return True
        if source.membership is None or destination.membership is None:
            return False
        return self.trust.acl.allows(source.membership, destination.membership)

    def set_trust(self, trust: NetworkTrust) -> int:
        """A CA network's CA key, ACL and revocation list (at start, and again when the
        files change). Registered nodes whose membership no longer counts (revoked,
        expired) are disconnected; returns how many."""
        self.trust = trust
        return self.recheck_memberships()

    def recheck_memberships(self) -> int:
        """Expiry and revocation are checked at registration and here, which the server
        runs every few seconds: a revoked or expired node is gone within a minute."""
        if self.trust is None:
            return 0
        now, gone = self._wall_clock(), []
        for entry in list(self.registry):
            try:
                if entry.membership is None:
                    raise MembershipError("missing", "no membership")
                # The signature was verified at registration; time and the list move.
                entry.membership.check_validity(now, self.trust.revoked)
            except MembershipError as exc:
                gone.append(entry.node_id.text)
                self.dropped[f"membership_{exc.reason}"] += 1
                log.info("node %s disconnected: %s", entry.node_id, clip(exc, 120))
                self._disconnect(entry, f"node {entry.node_id} is no longer admitted: "
                                        f"{clip(exc, 120)}")
        if gone:  # their direct and TURN sessions end too: every member hears of it
            for entry in self.registry:
                if (ctl := self._control_of(entry)) is not None:
                    for start in range(0, len(gone), 64):
                        self._send(ctl, control.MembersRevoked(gone[start:start + 64]))
        return len(gone)

    def _disconnect(self, entry: NodeEntry, message: str) -> None:
        """Admission withdrawn: no relay from now on, the node told why, its control
        connection closed (its end then drops it as usual)."""
        ctl = self._control_of(entry)
        if self.registry.unregister(entry.node_id, session=ctl) is not None \
                and self.cluster is not None:
            self.cluster.local_gone(entry.node_id.raw)
        if ctl is not None:
            ctl.entry = None
            self._error(ctl, "not_admitted", message)
            ctl.conn.close(error_code=0x4, reason_phrase="no longer admitted")
            self._mux.mark(ctl.conn)

    def _notice_due(self, key: tuple[bytes, bytes], now: float) -> bool:
        """At most one notice a second per (sender, what) pair; bounded memory."""
        if now - self._offline_notice.get(key, -1e9) < _OFFLINE_NOTICE_INTERVAL:
            return False
        if len(self._offline_notice) > 10_000:
            self._offline_notice.clear()
        self._offline_notice[key] = now
        return True

    def _notify_denied(self, sender: NodeEntry, dest: NodeEntry, now: float) -> None:
        """Tell the dialer at once why its packets go nowhere, so its connect fails with
        the reason instead of timing out."""
        if (self._notice_due((sender.node_id.raw, dest.node_id.raw + b"acl"), now)
                and (ctl := self._control_of(sender)) is not None):
            self._send(ctl, control.PeerDenied(dest.node_id.text, (
                f"the network's ACL does not let {sender.node_id} open sessions to "
                f"{dest.node_id}")))

    def _notify_offline(self, sender: NodeEntry, dst_raw: bytes, now: float) -> None:
        if (self._notice_due((sender.node_id.raw, dst_raw), now)
                and (ctl := self._control_of(sender)) is not None):
            self._send(ctl, control.PeerOffline(NodeId(dst_raw).text))

    def _receive_quic(self, data: bytes, addr: Address, now: float) -> None:
        try:
            header = parse_header(data)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return
        conn = self._mux.lookup(header.destination_cid)
        if conn is None:
            if header.packet_type != PACKET_TYPE_INITIAL or len(data) < _MIN_INITIAL:
                self.dropped["unknown_connection"] += 1
                return
            if header.version not in self._config.supported_versions:
                self.dropped["unsupported_version"] += 1
                return
            if not self.limits.admit_initial(data):  # junk never costs a connection
                return
            original_dcid, retry_scid = header.destination_cid, None
            if header.token:
                try:
                    original_dcid = self._retry.validate_token(
                        address=addr, destination_cid=header.destination_cid,
                        token=header.token, now=now)
                except ValueError:
                    self.dropped["retry_token_invalid"] += 1
                    return
                retry_scid = header.destination_cid
            elif self.limits.pending >= self.limits.settings.retry_above:
                self._send_retry(header, addr, now)
                return
            # Room for max_nodes registered plus the half-open ones, so the node over
            # max_nodes gets to hello and hears a clear "max_nodes" error.
            if len(self._controls) >= self.max_nodes + self.limits.settings.max_handshakes:
                self.dropped["gateway_full"] += 1
                return
            conn = PinnedQuicConnection(
                configuration=self._config,
                original_destination_connection_id=original_dcid,
                retry_source_connection_id=retry_scid,
            )
            self._controls[conn] = _Control(conn)
            self._mux.add(conn, header.destination_cid)
            for stale in self.limits.on_connection(conn):  # bounds half-open connections
                self._drop_control(self._controls[stale])
        conn.receive_datagram(data, addr, now)
        self._mux.mark(conn)
        self._follow_migration(conn, now)
        self._process_events(conn, now)

    def _send_retry(self, header: QuicHeader, addr: Address, now: float) -> None:
        """Ask the sender to prove its address before it costs a handshake: a Retry with
        a token bound to the address (aioquic's token handler; clients answer at once)."""
        if not self.answers.allow(addr[0], now):
            return
        source_cid = os.urandom(CID_LENGTH)
        token = self._retry.create_token(
            address=addr, original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=source_cid, now=now)
        assert header.version is not None  # a long-header Initial always has one
        self._out.append((encode_quic_retry(
            version=header.version, source_cid=source_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid, retry_token=token), addr))
        self.retries_sent += 1

    # ---------------------------------------------------------------- control logic
    def _process_events(self, conn: PinnedQuicConnection, now: float) -> None:
        if self.mesh is not None and self.mesh.owns(conn):
            for member, delivery in self.mesh.process(conn, now):
                self._on_delivery(member, delivery, now)
            return
        ctl = self._controls.get(conn)
        while (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if ctl is None:
                continue
            if isinstance(event, qe.HandshakeCompleted) and event.alpn_protocol == ALPN_MESH:
                self._adopt_member(ctl, now)
                return
            if isinstance(event, qe.HandshakeCompleted):
                ctl.node_id = conn.peer_node_id
                if self.trust is not None and ctl.node_id is not None:
                    try:
                        ctl.membership = self.trust.check(
                            conn.peer_membership, ctl.node_id, self._wall_clock())
                    except MembershipError as exc:
                        ctl.membership_error = exc
            elif isinstance(event, qe.StreamDataReceived):
                self._on_stream(ctl, event, now)
            elif isinstance(event, qe.ConnectionTerminated):
                if ctl.entry is not None:
                    log.info("node %s left: %s", ctl.entry.node_id,
                             clip(event.reason_phrase or f"error {event.error_code}", 80))
                self._drop_control(ctl)
                return
        if ctl is not None and ctl.entry is not None:
            ctl.entry.last_seen = now

    def _adopt_member(self, ctl: _Control, now: float) -> None:
        """A handshake that agreed on the mesh protocol: another member's link, or (its key
        not a member's) refused. Only a cluster member offers that protocol at all."""
        conn = ctl.conn
        self._controls.pop(conn, None)
        self.limits.forget(conn, None)
        if self.mesh is not None and self.mesh.adopt(conn, now):
            self._process_events(conn, now)  # what came with the handshake
            return
        log.warning("refused a mesh link from %s: its key is not a cluster member's",
                    conn.peer_node_id)
        if self.cluster is not None:  # or a member newer than our list: read it again
            self.cluster.members_wanted = True
        conn.close(error_code=0x1, reason_phrase="not a member of this cluster")
        self._mux.mark(conn)

    def _follow_migration(self, conn: PinnedQuicConnection, now: float) -> None:
        """QUIC connection migration (NAT rebinding, a move): follow the node to its new
        address once QUIC has validated it (RFC 9000 section 9.3: PATH_CHALLENGE answered
        from there), never before. A packet with a forged source moves nothing: the
        challenge goes to the forged address, which cannot answer it, and aioquic falls
        back to the validated path. Punches ordered meanwhile are ordered again once the
        address moves (_recoordinate)."""
        ctl = self._controls.get(conn)
        if ctl is None or ctl.entry is None or not conn._network_paths:
            return
        path = conn._network_paths[0]
        if path.addr == ctl.entry.address:
            return
        if not path.is_validated:
            self.dropped["migration_unvalidated"] += 1
            return
        holder = self.registry.by_address(path.addr)
        if holder is not None and holder is not ctl.entry:
            # Another registered node's slot: it moves off (or expires) first.
            self.dropped["address_taken"] += 1
            return
        self.registry.update_address(ctl.entry.node_id, path.addr)
        if self.cluster is not None:
            self.cluster.local_changed(ctl.entry.node_id.raw)
        # The answer to the packet that moved it named the old address: tell it now.
        self._send(ctl, control.KeepaliveAck(ctl.keepalive_seq, format_address(path.addr)))
        self._recoordinate(ctl.entry, now)

    def _on_stream(self, ctl: _Control, event: qe.StreamDataReceived, now: float) -> None:
        if ctl.stream_id is None:
            ctl.stream_id = event.stream_id
        if event.stream_id != ctl.stream_id or ctl.node_id is None:
            self.malformed["control"] += 1
            return
        try:
            messages = list(ctl.decoder.feed(event.data))
        except control.ControlStreamError:
            self.malformed["control"] += 1
            ctl.conn.close(error_code=0x1, reason_phrase="control framing error")
            return
        finally:
            self.malformed["control"] += ctl.decoder.malformed
            ctl.decoder.malformed = 0
        for message in messages:
            self._on_message(ctl, message, now)

    def _on_message(self, ctl: _Control, msg: control.ControlMessage, now: float) -> None:
        assert ctl.node_id is not None  # _on_stream only passes messages once proven
        if (replies := self.limits.on_control(ctl.conn, ctl.node_id.raw, msg, now)) is not None:
            self._deliver(ctl, replies)
            return
        if isinstance(msg, control.Hello):
            self._on_hello(ctl, msg, now)
        elif ctl.entry is None:
            self._error(ctl, "not_registered", "send hello first",
                        msg.req if isinstance(msg, control.Lookup) else None)
        elif isinstance(msg, control.Keepalive):
            ctl.keepalive_seq = msg.seq
            self._send(ctl, control.KeepaliveAck(msg.seq, format_address(ctl.entry.address)))
        elif isinstance(msg, control.Lookup):
            self._on_lookup(ctl, msg)
        elif isinstance(msg, control.NatInfo):
            ctl.entry.nat_type = msg.nat_type[:32]
            ctl.entry.port_allocation = msg.port_allocation[:32]
            if self.cluster is not None:
                self.cluster.local_changed(ctl.entry.node_id.raw)
            self._reorder_blind(ctl.entry, now)
        elif isinstance(msg, control.PunchRequest):
            self._on_punch_request(ctl, msg, now)
        elif isinstance(msg, control.PunchResult):
            self._on_punch_result(ctl, msg)
        elif isinstance(msg, control.Candidates):
            self._forward_candidates(ctl, msg)
        elif isinstance(msg, control.TurnCredentialsRequest):
            self._send_turn_credentials(ctl)
        else:  # a message only a gateway sends
            self.malformed["control"] += 1

    def _on_hello(self, ctl: _Control, msg: control.Hello, now: float) -> None:
        assert ctl.node_id is not None
        if msg.node_id != ctl.node_id.text:
            # The TLS handshake proved one key; the node claims another id.
            self.dropped["id_mismatch"] += 1
            # No close: aioquic would drop the queued error for the CONNECTION_CLOSE. The
            # connection stays unregistered (it can do nothing) and idles out.
            self._error(ctl, "id_mismatch",
                        f"hello claims {msg.node_id} but the connection's key is {ctl.node_id}")
            return
        if msg.version != PROTOCOL_VERSION:
            self._error(ctl, "unsupported_version", f"gateway speaks version {PROTOCOL_VERSION}")
            return
        if (self.registry.get(ctl.node_id.raw) is None
                and not self.registration_limit.allow(ctl.conn._network_paths[0].addr[0], now)):
            self._error(ctl, "registration_rate",
                        "too many registrations from your address: gateway.registration_rate "
                        f"= {self.options.limits.registration_rate:g} per second; try again "
                        "in a few seconds")
            return
        if not self.admission.admits(ctl.node_id):
            self.dropped["not_admitted"] += 1
            self._error(ctl, "not_admitted", f"node {ctl.node_id} is not admitted at this "
                                             f"gateway ({self.admission.mode})")
            return
        if self.admission.mode == "ca" and ctl.membership is None:
            error = ctl.membership_error or MembershipError("missing", "no membership")
            self.dropped[f"membership_{error.reason}"] += 1
            self._error(ctl, "not_admitted", f"node {ctl.node_id} is not admitted at this "
                                             f"gateway: {clip(error, 160)}")
            return
        refusal = self.limits.on_hello(ctl.conn, ctl.node_id.raw, self.registry, self.max_nodes)
        if refusal is not None:
            # No close: aioquic would drop the queued error for the CONNECTION_CLOSE. The
            # unregistered connection stays half-open (bounded) until it idles out.
            self._deliver(ctl, refusal)
            return
        address = ctl.conn._network_paths[0].addr
        entry = NodeEntry(
            node_id=ctl.node_id,
            address=address,
            token=os.urandom(TOKEN_BYTES),
            registered_at=now,
            last_seen=now,
            nat_traversal=msg.nat_traversal,
            hard_nat=msg.hard_nat,
            local_addresses=msg.local_addresses[:16],
            session=ctl,
            membership=ctl.membership,
        )
        old = self.registry.register(entry)
        replaced = ""
        if old is not None and isinstance(old.session, _Control) and old.session is not ctl:
            old.session.entry = None
            if old.address != address:  # a second process with this key, not a reconnect
                replaced = format_address(old.address)
                self.dropped["replaced"] += 1
                _throttle.log(log, logging.WARNING, f"replaced:{ctl.node_id}",
                              "node %s registered from %s while a connection with its key "
                              "from %s was open (another process with this key, or this "
                              "node before a restart): the older one is closed", ctl.node_id,
                              format_address(address), replaced)
            old.session.conn.close(error_code=ERROR_REPLACED, reason_phrase=(
                f"replaced: this node's key registered again from {format_address(address)}"))
        ctl.entry = entry
        self.registrations += 1
        if self.cluster is not None:
            self.cluster.local_changed(entry.node_id.raw)
        log.info("node %s registered from %s (%d online)", ctl.node_id, format_address(address),
                 self.nodes_online)
        self._send(ctl, control.Welcome(
            node_id=ctl.node_id.text,
            observed=format_address(address),
            relay_token=entry.token.hex(),
            keepalive_ms=int(self.keepalive_interval * 1000),
            node_timeout_ms=int(self.node_timeout * 1000),
            stun=[format_address(a) for a in self.stun_addresses],
            replaced=replaced,
        ))
        self._send_turn_credentials(ctl)

    def _send_turn_credentials(self, ctl: _Control) -> None:
        """Time-limited TURN credentials (the TURN REST API scheme of coturn's
        use-auth-secret): username "<expiry>:<node id>", password base64(HMAC-SHA1(secret,
        username)). Any TURN server sharing the secret accepts them until the expiry."""
        secret, servers = self.options.turn_secret, self.options.turn_servers
        if not secret or not servers or ctl.node_id is None:
            return
        ttl = self.options.turn_credential_ttl
        username = f"{int(self._wall_clock() + ttl)}:{ctl.node_id.text}"
        digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
        self.turn_credentials_issued += 1
        self._send(ctl, control.TurnCredentials(
            servers=[format_address(server) for server in servers], username=username,
            credential=base64.b64encode(digest).decode(), ttl_ms=int(ttl * 1000)))

    def _on_lookup(self, ctl: _Control, msg: control.Lookup) -> None:
        try:
            target = NodeId.parse(msg.node_id)
        except ValueError:
            self._error(ctl, "bad_node_id", f"not a node id: {msg.node_id[:64]!r}", msg.req)
            return
        entry = self._find(target.raw)
        if entry is None and self._ask_directory(target.raw, lookup=(ctl, msg.req)):
            return  # answered when the store has been asked
        if entry is None and self.cluster is not None and not self.cluster.directory_ok:
            self._error(ctl, "directory_unavailable", f"{target} is not at this gateway and "
                        "the cluster directory cannot be reached: try again shortly", msg.req)
            return
        if entry is not None and ctl.entry is not None and not self._acl_allows(ctl.entry, entry):
            self.dropped["acl_denied"] += 1
            self._error(ctl, "acl_denied", f"the network's ACL does not let {ctl.entry.node_id} "
                                           f"open sessions to {target}", msg.req)
            return
        self._send(ctl, control.LookupResult(
            req=msg.req, node_id=target.text, online=entry is not None,
            observed=format_address(entry.address) if entry is not None else None,
        ))

    def _error(self, ctl: _Control, code: str, message: str, req: int | None = None) -> None:
        self._send(ctl, control.Error(code, message, req))

    def _deliver(self, ctl: _Control | None, messages: list[control.ControlMessage]) -> None:
        if ctl is None:
            return
        for message in messages:
            self._send(ctl, message)

    def _send(self, ctl: _Control, message: control.ControlMessage) -> None:
        if ctl.stream_id is None:
            return
        ctl.conn.send_stream_data(ctl.stream_id, control.encode(message))
        self._mux.mark(ctl.conn)

    def _control_of(self, entry: NodeEntry) -> _Control | None:
        return entry.session if isinstance(entry.session, _Control) else None

    def _drop_control(self, ctl: _Control) -> None:
        self.connections_dropped += 1
        self.limits.forget(ctl.conn, ctl.node_id)
        if ctl.entry is not None:
            if self.registry.unregister(ctl.entry.node_id, session=ctl) is not None \
                    and self.cluster is not None:
                self.cluster.local_gone(ctl.entry.node_id.raw)
            ctl.entry = None
        self._controls.pop(ctl.conn, None)
        self._mux.remove(ctl.conn)
        ctl.conn.dismantle()

    def set_allowlist(self, allowed: frozenset[NodeId]) -> int:
        """A new allowlist: registered nodes it leaves out are disconnected. Returns how
        many were."""
        self.admission.allowed = allowed
        gone = [e for e in self.registry if not self.admission.admits(e.node_id)]
        for entry in gone:
            self._disconnect(entry, f"node {entry.node_id} is no longer admitted")
        return len(gone)

    # ---------------------------------------------------------------- hole punching
    def _peer_of(self, msg: control.PunchRequest | control.Candidates
                 | control.PunchResult) -> NodeId | None:
        """The node id in a message's "peer" field; a bad one is counted as malformed."""
        try:
            return NodeId.parse(msg.peer)
        except ValueError:
            self.malformed["control"] += 1
            return None

    def _on_punch_request(self, ctl: _Control, msg: control.PunchRequest, now: float) -> None:
        assert ctl.entry is not None
        if (peer := self._peer_of(msg)) is None:
            return
        if self._find(peer.raw) is None and self._ask_directory(peer.raw, punch=(ctl, msg)):
            return  # coordinated when the store has been asked (it may be newer than us)
        reason = self.coordinate_hole_punch(ctl.entry.node_id, peer, msg.attempt, now)
        if reason == "acl_denied" and (peer_entry := self._find(peer.raw)) is not None:
            self._notify_denied(ctl.entry, peer_entry, now)
        if reason is not None:
            self.punch_refusals[reason] += 1
            self._send(ctl, control.PunchRefused(peer.text, msg.attempt, reason))

    def _recoordinate(self, moved: NodeEntry, now: float) -> None:
        """A node's address just changed (rebinding, or it moved network). Punches ordered
        for it in the last moments carried its old address and cannot succeed: order them
        again with what we know now. (A node only learns it moved when its path dies; its
        peer often asks first, before QUIC has validated the node's new address.)"""
        raw = moved.node_id.raw
        for (x, y), when in list(self._punches.items()):
            if raw in (x, y) and now - when < _RECOORDINATE_WITHIN:
                other = y if x == raw else x
                del self._punches[(x, y)]
                self.coordinate_hole_punch(moved.node_id, NodeId(other), 1, now)
                self.punches_recoordinated += 1

    def _reorder_blind(self, entry: NodeEntry, now: float) -> None:
        """`entry` just reported its NAT: a recent punch ordered without it, between a
        symmetric and a port-restricted NAT, is ordered again so both sides guess ports."""
        raw = entry.node_id.raw
        for pair in [p for p in self._blind if raw in p]:
            other = self._find(pair[1] if pair[0] == raw else pair[0])
            if other is None or other.nat_type == "unknown" or entry.nat_type == "unknown":
                continue  # still blind: the other side's report will trigger it
            self._blind.discard(pair)
            if (_traversable(entry, other)
                    and now - self._punches.get(pair, -1e9) < _REORDER_BLIND_WITHIN):
                del self._punches[pair]
                self.coordinate_hole_punch(entry.node_id, other.node_id, 1, now)
                self.punches_recoordinated += 1

    def coordinate_hole_punch(self, a: NodeId, b: NodeId, attempt: int, now: float) -> str | None:
        """Tell both nodes to punch towards each other, timed so their first checks cross.

        Each node gets fresh ICE credentials and the other's candidates; the order to
        the nearer node is delayed by half the difference of their round trips (the
        gateway measures both on the control connections), so both start together.
        Returns None, or why it refused (peer_offline, local_disabled, peer_disabled,
        incompatible_nat).
        """
        ea, eb = self._find(a.raw), self._find(b.raw)
        if ea is None or eb is None:
            if self.cluster is not None and not self.cluster.directory_ok:
                return "directory_unavailable"
            return "peer_offline"
        if not (self._acl_allows(ea, eb) or self._acl_allows(eb, ea)):
            return "acl_denied"
        if not ea.nat_traversal:
            return "local_disabled"
        if not eb.nat_traversal:
            return "peer_disabled"
        # The probe reports a CGNAT chain by its behaviour, i.e. as port_restricted.
        if (attempt > 1 and frozenset({ea.nat_type, eb.nat_type}) in _INCOMPATIBLE
                and not (ea.hard_nat and eb.hard_nat and _traversable(ea, eb))):
            # (Both run hard-NAT traversal: guessing or predicting ports may still work.)
            return "incompatible_nat"
        pair = (min(a.raw, b.raw), max(a.raw, b.raw))
        first = ea if pair[0] == a.raw else eb
        if isinstance(first.session, RemoteHome):
            # Across members, the home of the lower id coordinates (one set of orders even
            # when both nodes ask at once): pass the request on to it.
            assert self.mesh is not None
            ours = eb if first is ea else ea  # asks, as if it had asked there itself
            records = self.cluster_records({ours.node_id.raw})
            if not self.mesh.deliver(first.session.gateway, MeshDeliver(
                    ours.node_id.text, control.to_dict(control.PunchRequest(
                        first.node_id.text, attempt)),
                    record=records[0].encode().decode() if records else None)):
                return "peer_unreachable"
            return None
        if now - self._punches.get(pair, -1e9) < _PUNCH_DEDUP:
            return None  # both sides asked at once: the orders already sent serve both
        if len(self._punches) > 10_000:
            self._punches.clear()
            self._blind.clear()
        self._punches[pair] = now
        if ea.hard_nat and eb.hard_nat and "unknown" in (ea.nat_type, eb.nat_type):
            self._blind.add(pair)
        else:
            self._blind.discard(pair)
        if not all(isinstance(e.session, RemoteHome) or self._control_of(e) is not None
                   for e in (ea, eb)):
            return "peer_offline"
        # When each order arrives: half the node's RTT, plus half the mesh RTT for a node
        # homed at another member; both start when the later one has arrived.
        reach = {e.node_id.raw: self._one_way(e) for e in (ea, eb)}
        together = max(reach.values()) + _PUNCH_MARGIN
        # Fresh ICE credentials for both agents, like a signaling server would relay them.
        creds = {a.raw: (generate_ufrag(), generate_pwd()), b.raw: (generate_ufrag(), generate_pwd())}
        for me, other, requester in ((ea, eb, True), (eb, ea, False)):
            ufrag, pwd = creds[me.node_id.raw]
            remote_ufrag, remote_pwd = creds[other.node_id.raw]
            order = control.Punch(
                peer=other.node_id.text, attempt=attempt,
                ufrag=ufrag, pwd=pwd, remote_ufrag=remote_ufrag,
                remote_pwd=remote_pwd, candidates=_candidate_lines(other),
                requester=requester,
                start_in_ms=round((together - reach[me.node_id.raw]) * 1000, 3),
                peer_nat=other.nat_type, peer_allocation=other.port_allocation,
                peer_hard_nat=other.hard_nat,
            )
            if isinstance(me.session, RemoteHome):
                # The member takes its own RTT to the node off: the order's start is then
                # counted from the order's arrival at the member.
                assert self.mesh is not None
                mesh_half = self.mesh.rtt(me.session.gateway) / 2
                self.mesh.deliver(me.session.gateway, MeshDeliver(
                    me.node_id.text, control.to_dict(order),
                    start_at_ms=round((together - mesh_half) * 1000, 3)))
            elif (ctl := self._control_of(me)) is not None:
                self._send(ctl, order)
        self.punches_coordinated += 1
        log.info("punch %d ordered between %s (%s) and %s (%s)", attempt, ea.node_id,
                 ea.nat_type, eb.node_id, eb.nat_type)
        return None

    def _one_way(self, entry: NodeEntry) -> float:
        """How long a control message from us takes to reach `entry`'s node."""
        if isinstance(entry.session, RemoteHome):
            assert self.mesh is not None
            return (self.mesh.rtt(entry.session.gateway) + entry.session.rtt) / 2
        ctl = self._control_of(entry)
        return (ctl.conn.smoothed_rtt if ctl is not None and ctl.conn.smoothed_rtt
                else 0.05) / 2

    def _forward_candidates(self, ctl: _Control, msg: control.Candidates) -> None:
        """Trickle ICE: pass a node's late candidates (TURN, STUN) on to its peer."""
        assert ctl.entry is not None
        if (peer_id := self._peer_of(msg)) is None:
            return
        peer = self._find(peer_id.raw)
        if peer is None:
            return
        if not (self._acl_allows(ctl.entry, peer) or self._acl_allows(peer, ctl.entry)):
            self.dropped["acl_denied"] += 1
            return
        forwarded = control.Candidates(ctl.entry.node_id.text, msg.ufrag[:64],
                                       _forwardable(msg.lines), msg.end)
        if isinstance(peer.session, RemoteHome):
            assert self.mesh is not None
            if not self.mesh.deliver(peer.session.gateway, MeshDeliver(
                    peer.node_id.text, control.to_dict(forwarded))):
                return
        elif (target := self._control_of(peer)) is not None:
            self._send(target, forwarded)
        else:
            return
        self.candidates_forwarded += 1

    # ---------------------------------------------------------------- the cluster
    def _on_delivery(self, member: NodeId, delivery: MeshDeliver, now: float) -> None:
        """A member hands us a control message for one of our nodes (a punch order, late
        candidates, a refusal), or its node asks us to coordinate a punch with ours."""
        try:
            node = NodeId.parse(delivery.node)
            message = control.parse(delivery.message)
        except ValueError:  # ControlError is one: a bad node id or message
            self.malformed["mesh"] += 1
            return
        if not isinstance(message, _DELIVERABLE):
            self.malformed["mesh"] += 1
            return
        if isinstance(message, control.PunchRequest):
            if delivery.record is not None and self.cluster is not None:
                self._take_record(member, node, delivery.record)
            self._on_member_punch_request(member, node, message, now)
            return
        entry = self.registry.get(node.raw)
        ctl = self._control_of(entry) if entry is not None else None
        if ctl is None:
            self.dropped["mesh_destination_offline"] += 1
            return
        if isinstance(message, control.Punch) and delivery.start_at_ms is not None:
            own_half = (ctl.conn.smoothed_rtt or 0.05) / 2 * 1000
            message = dataclasses.replace(message, start_in_ms=round(
                max(0.0, min(delivery.start_at_ms, 1000.0) - own_half), 3))
        self._send(ctl, message)

    def _take_record(self, member: NodeId, node: NodeId, text: str) -> None:
        """A member's fresh record of its own node, sent with that node's request."""
        assert self.cluster is not None
        try:
            record = NodeRecord.decode(text.encode())
        except RecordError:
            record = None
        if record is None or record.home != member or record.node_id != node:
            self.malformed["mesh"] += 1  # and a member speaks for its own nodes only
            return
        self.cluster.remote[node.raw] = remote_entry(record)

    def _on_member_punch_request(self, member: NodeId, requester: NodeId,
                                 msg: control.PunchRequest, now: float) -> None:
        """A node homed at `member` asks for a punch with one of ours: we coordinate (our
        node has the lower id), and a refusal goes back the way the request came."""
        held = self._find(requester.raw)
        if held is None or not isinstance(held.session, RemoteHome) \
                or held.session.gateway != member:
            self.dropped["mesh_unknown_requester"] += 1
            return
        if (peer := self._peer_of(msg)) is None or self.registry.get(peer.raw) is None:
            reason: str | None = "peer_offline"
        else:
            reason = self.coordinate_hole_punch(requester, peer, msg.attempt, now)
        if reason is not None and self.mesh is not None:
            self.punch_refusals[reason] += 1
            self.mesh.deliver(member, MeshDeliver(requester.text, control.to_dict(
                control.PunchRefused(msg.peer[:64], msg.attempt, reason))))

    def _ask_directory(self, raw: bytes, *, relay_sender: bytes | None = None,
                       lookup: tuple[_Control, int] | None = None,
                       punch: tuple[_Control, control.PunchRequest] | None = None) -> bool:
        """A node we do not know may have registered at another member a moment ago (the
        change feed is not instant): ask the store before calling it offline. False when
        there is nobody to ask (alone, the store unreachable, too many questions)."""
        if self.cluster is None or not self.cluster.directory_ok:
            return False
        waiting = self._waiting.get(raw)
        if waiting is None:
            if len(self._waiting) >= _MAX_QUERIES:
                return False
            waiting = self._waiting[raw] = _Waiting()
            self.cluster.queries.add(raw)
        if lookup is not None and len(waiting.lookups) < 16:
            waiting.lookups.append(lookup)
        if punch is not None and len(waiting.punches) < 16:
            waiting.punches.append(punch)
        if relay_sender is not None:
            waiting.senders.add(relay_sender)
        return True

    def directory_answers(self, answers: dict[bytes, bytes | None], now: float) -> None:
        """What the store said about nodes we asked for: waiting lookups are answered,
        and senders to a node that is nowhere hear it is offline."""
        assert self.cluster is not None
        for raw, data in answers.items():
            entry = self.cluster.apply_answer(data) if data is not None else None
            entry = entry or self.registry.get(raw)
            waiting = self._waiting.get(raw)
            if waiting is None:
                continue
            if entry is None and waiting.asked < _ASK_TIMES:
                # Its home may not have written it yet (it writes every 50 ms): again.
                waiting.asked += 1
                self.cluster.queries.add(raw)
                continue
            del self._waiting[raw]
            lookups, senders = waiting.lookups, waiting.senders
            for ctl, req in lookups:
                if ctl.entry is not None:
                    self._send(ctl, control.LookupResult(
                        req=req, node_id=NodeId(raw).text, online=entry is not None,
                        observed=format_address(entry.address) if entry is not None else None))
            if entry is None:
                for sender_raw in senders:
                    if (sender := self.registry.get(sender_raw)) is not None:
                        self._notify_offline(sender, raw, now)
            for ctl, request in waiting.punches:  # coordinated now, or refused as offline
                if ctl.entry is not None:
                    if entry is None:
                        self.punch_refusals["peer_offline"] += 1
                        self._send(ctl, control.PunchRefused(request.peer[:64], request.attempt,
                                                             "peer_offline"))
                    else:
                        self._on_punch_request(ctl, request, now)

    def cluster_records(self, raws: set[bytes]) -> list[NodeRecord]:
        """Directory records for those of `raws` still registered here."""
        records = []
        for raw in raws:
            entry = self.registry.get(raw)
            if entry is None:
                continue
            ctl = self._control_of(entry)
            rtt = ctl.conn.smoothed_rtt if ctl is not None and ctl.conn.smoothed_rtt else 0.05
            records.append(NodeRecord(
                entry.node_id, self.identity.node_id, entry.address, entry.nat_type,
                entry.port_allocation, entry.hard_nat, entry.nat_traversal,
                tuple(entry.local_addresses), rtt))
        return records

    def follow_members(self, now: float) -> None:
        """The member list was read from the store: the mesh follows it."""
        assert self.cluster is not None and self.mesh is not None
        self.mesh.set_members(self.cluster.mesh_addresses(), now)

    def let_go_of_moved(self, now: float) -> None:
        """The change feed says nodes of ours registered at another member since: they
        moved, and their old control connections here are closed."""
        assert self.cluster is not None
        moved, self.cluster.moved_away = self.cluster.moved_away, set()
        for raw in moved:
            entry = self.registry.get(raw)
            # A node that registered here a moment ago came back: the other record is the
            # stale one (the feed can deliver it after the node's new hello reached us).
            if entry is not None and now - entry.registered_at >= _MOVED_GRACE:
                log.info("node %s moved to another gateway", entry.node_id)
                ctl = self._control_of(entry)
                self.registry.unregister(entry.node_id, session=ctl)
                if ctl is not None:
                    ctl.entry = None
                    ctl.conn.close(error_code=0, reason_phrase="moved to another gateway")
                    self._mux.mark(ctl.conn)

    def drain(self) -> int:
        """Ask every node to move to another member (they re-register there and their
        sessions follow through the mesh); returns how many were asked."""
        self.draining = True
        asked = 0
        for ctl in self._controls.values():
            if ctl.entry is not None:
                self._send(ctl, control.Draining("this gateway is shutting down"))
                asked += 1
        return asked

    def _on_punch_result(self, ctl: _Control, msg: control.PunchResult) -> None:
        assert ctl.entry is not None
        if (peer_id := self._peer_of(msg)) is None:
            return
        peer = self._find(peer_id.raw)
        peer_type = peer.nat_type if peer is not None else "unknown"
        pair = sorted([ctl.entry.nat_type, peer_type])
        if len(self.punch_outcomes) < 10_000:
            self.punch_outcomes[(pair[0], pair[1], msg.outcome[:32])] += 1

    # ---------------------------------------------------------------- lookups (API)
    def get_peer_public_address(self, node_id: NodeId) -> Address | None:
        entry = self._find(node_id.raw)
        return entry.address if entry is not None else None

    # ---------------------------------------------------------------- output, timers
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        for conn in self._mux.take_dirty():
            out.extend(conn.datagrams_to_send(now))
            self._process_events(conn, now)
            self._mux.reschedule(conn)
        return out

    def get_timer(self) -> float | None:
        timer = self._mux.get_timer()
        mesh = self.mesh.get_timer() if self.mesh is not None else None
        return timer if mesh is None else mesh if timer is None else min(timer, mesh)

    def handle_timer(self, now: float) -> None:
        for conn in self._mux.fire_timers(now):
            self._process_events(conn, now)
        if self.mesh is not None:
            self.mesh.handle_timer(now)
        if now >= self._next_sweep:
            self._forget_old_pairs(now)

    def _forget_old_pairs(self, now: float) -> None:
        """Drop punch and notice entries past every window that reads them (keepalive
        timers bring us here often enough; the tables' size caps stay as a backstop)."""
        self._next_sweep = now + _PAIR_MEMORY
        self._punches = {p: t for p, t in self._punches.items() if now - t < _PAIR_MEMORY}
        self._blind &= self._punches.keys()
        self._offline_notice = {k: t for k, t in self._offline_notice.items()
                                if now - t < _OFFLINE_NOTICE_INTERVAL}

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
        for ctl in list(self._controls.values()):
            ctl.conn.close(error_code=0, reason_phrase="gateway shutting down")
            self._mux.mark(ctl.conn)

    @property
    def nodes_online(self) -> int:
        return len(self.registry)

    def nodes_by_transport(self) -> Counter[str]:
        """Registered nodes by the transport their control connection runs on."""
        counts: Counter[str] = Counter(udp=0, tls=0)
        for ctl in self._controls.values():
            if ctl.entry is not None:
                counts["tls" if is_stream_address(ctl.entry.address) else "udp"] += 1
        return counts


def _candidate_lines(entry: NodeEntry) -> list[str]:
    """RFC 8839 lines for what the gateway knows of a node: its own addresses (host, best
    first, ranked as the node ranks them) and the address we observe (server-reflexive,
    based on its first own address of the same family)."""
    hosts: list[Address] = []
    for text in entry.local_addresses:
        try:
            host, port = parse_host_port(text)  # IPv6 in brackets
        except ValueError:
            continue
        if host in ("0.0.0.0", "::") or not port:
            continue
        hosts.append((host, port))
    lines = []
    for rank, (host, port) in enumerate(hosts[:7]):
        try:
            lines.append(Candidate.host(host, port, local_preference=host_preference(rank))
                         .to_sdp(prefix=False))
        except ValueError:
            continue
    # A node on the TCP path has no UDP address for peers to try (its stand-in is not one).
    if entry.address not in hosts and not is_stream_address(entry.address):
        base = same_family(entry.address, hosts) or entry.address
        lines.append(Candidate.server_reflexive(
            entry.address[0], entry.address[1], base=base).to_sdp(prefix=False))
    return lines


def costly_datagram(data: bytes) -> bool:
    """QUIC to the gateway itself (a node's control connection, a mesh link): handshakes
    and control messages, slow next to relaying a frame (Driver's `costly`)."""
    return bool(data) and data[0] not in (RELAY_TO_GATEWAY, RELAY_MESH) \
        and classify(data) is Kind.QUIC


def _traversable(a: NodeEntry, b: NodeEntry) -> bool:
    """A NAT pair plain ICE cannot open but guessing or predicting ports can."""
    return pair_needs_traversal((a.nat_type, a.port_allocation), (b.nat_type, b.port_allocation))


def _forwardable(lines: list[Any]) -> list[str]:
    """Trickled candidate lines pass through only if they parse (and at most 16)."""
    out = []
    for line in lines[:16]:
        if isinstance(line, str) and len(line) < 512:
            try:
                Candidate.from_sdp(line)
            except ValueError:
                continue
            out.append(line)
    return out
