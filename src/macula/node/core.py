"""A node as a sans-IO state machine: its gateway control connection and its sessions.

All of it rides one socket. QUIC packets for end-to-end sessions leave through a *path*
(the gateway relay, a hole-punched direct pair, or a TURN allocation); QUIC itself only
ever sees one stable virtual address per remote node, so changing the path underneath
never disturbs a live session. The one exception to the single socket is hard-NAT
guessing (nat/hard_nat.py): it asks the I/O layer for extra sockets (SocketsWanted), speaks
through them by `via` name, and hands back all but the one a path was found through.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.packet import PACKET_TYPE_INITIAL, QuicHeader

from ..config import parse_host_port as parse_address
from ..errors import InvalidValue
from ..ice import (
    SOCKET,
    Candidate,
)
from ..identity import Identity, NodeId
from ..logsafe import Throttle, clip
from ..membership import Membership, MembershipError, NetworkTrust
from ..nat.behavior import NatBehavior
from ..nat.binding_lifetime import BindingLifetime
from ..nat.hard_nat import EASY, HARD, PREDICT, HardNatConfig, HardNatRun, plan_role
from ..nat.stun_client import StunClient
from ..net.endpoint import Address, format_address, same_family
from ..session import events as ev
from ..session.errors import (
    NoDirectPath,
    NotAllowed,
    PeerKeyMismatch,
    PeerOffline,
    SessionClosedError,
)
from ..session.mux import QuicHeaderError, QuicMux, parse_header
from ..session.padding import restore_padding, strip_padding
from ..session.quic import (
    ALPN_SESSION,
    ERROR_NOT_ACCEPTED,
    SESSION_CONNECTION_ID_LIMIT,
    PinnedQuicConnection,
    make_configuration,
)
from ..session.session import Session
from ..timings import Histogram
from ..wire import control
from ..wire.demux import Kind, classify
from ..wire.relay import FROM_GATEWAY_HEADER, encode_to_gateway
from ..wire.stun import STUN_DEFAULT_PORT
from .demux import Route, route
from .extra_sockets import ExtraSockets
from .gateway_link import (
    GatewayLink,
    LinkAddressMoved,
    LinkEvent,
    LinkKeepaliveAnswered,
    LinkLost,
    LinkMessage,
    LinkRegistered,
    LinkUp,
)
from .home_choice import HomeChoice
from .local_candidates import LocalCandidates
from .nat_probing import LifetimeFound, NatFound, NatProbing, ProbingEvent
from .options import NodeOptions
from .path_choice import Fallback, fallback, use_selected_pair
from .paths import PathEvent, PeerPaths
from .turn_relays import RelayCandidate, RelayData, RelayEvent, TurnRelays, TurnServerSpec

log = logging.getLogger(__name__)

_MIN_INITIAL = 1200
_RETRY_DELAYS = (0.5, 1.0)  # before attempts 2 and 3; then _RETRY_LATER
# A punch request neither ordered nor refused within this long is sent again, up to
# _ORDER_ASKS times in all (in a cluster it may have met a mesh link re-forming).
_ORDER_WAIT = 2.0
_ORDER_ASKS = 3
_RETRY_LATER = 30.0
# A session whose direct path died keeps trying this often while its data flows over the
# relay (within _RELAYING_FOR), so it is direct again within seconds of the path's return;
# idle, it waits _RETRY_LATER like any other.
_RETRY_WHILE_RELAYING = 2.0
_RELAYING_FOR = 5.0
# Re-punch at once: the request is also the control packet that shows the gateway our
# new address after a move, and the gateway merges both sides asking together.
_REPUNCH_AFTER_FALLBACK = 0.0
_PATH_PING_UID = 0  # PeerSession's own pings count from 1: this one's answer is ignored
_HELD_MAX = 256  # datagrams held for a direct path that is being punched (direct_only)
# _on_selected_path's answer when the packet already went to an extra socket's queue.
_ON_AUX = (b"", ("", 0))


@functools.lru_cache(maxsize=8192)  # on every session datagram: no base32 each time
def virtual_address(peer: NodeId) -> Address:
    """What aioquic sees as the peer's address: stable whatever path carries the packets."""
    return (f"macula:{peer.text}", 0)


class NodeCore:
    """A node as a state machine: bytes and time in, bytes, timers and events out.

    `options` is the node's one settings object; `local_address` is where its socket is
    bound (None when the core runs without one). Everything that would be I/O is injected:
    `interfaces` lists the machine's interface addresses for a wildcard-bound socket (the
    asyncio Node passes the real list; by default there are none), `rng` draws ICE
    tie-breakers and hard-NAT guesses, and `wall_clock` stamps path changes for people.
    The simulator and tests pass their own, so runs repeat exactly.

    Its parts, one job each: the gateway link (node/gateway_link.py), NAT probing
    (nat_probing.py), our own candidates (local_candidates.py), per-peer path state
    (paths.py), TURN allocations (turn_relays.py) and hard-NAT extra sockets
    (extra_sockets.py). The core itself demultiplexes the socket, runs the sessions and
    chooses the path each session packet leaves on."""

    def __init__(
        self,
        identity: Identity,
        options: NodeOptions,
        *,
        local_address: Address | None = None,
        interfaces: Callable[[], list[tuple[str, str]]] = lambda: [],
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        trust: NetworkTrust | None = None,
        lifetimes: dict[str, BindingLifetime] | None = None,
    ) -> None:
        """`trust`: a CA network's CA key, ACL and revocation list; sessions with peers
        whose handshake shows no valid membership are refused, and sessions offered by
        members the ACL keeps from us are not accepted. `lifetimes`: binding lifetimes
        earlier runs measured, by network (BindingLifetimeFound)."""
        self.trust = trust
        self.membership = (Membership.decode(identity.membership)
                           if identity.membership is not None else None)
        self._revoked_peers: set[str] = set()  # announced by the gateway (MembersRevoked)
        self.identity = identity
        self.node_id = identity.node_id
        self.options = options
        self.gateway = options.gateway
        self._local = local_address
        self.candidates = LocalCandidates(local_address, interfaces,
                                          candidate_types=options.ice.candidate_types,
                                          gateway_ip=options.gateway[0])
        self._interfaces = interfaces
        self._addresses_seen: frozenset[str] = frozenset()
        self.network_changes = 0  # times our addresses changed under us (network_changed)
        self.carrier_changes = 0  # gateway traffic moved between UDP and the TLS link
        # Drawn from the global generator by default, which the simulator seeds.
        self._rng = rng if rng is not None else random.Random(random.getrandbits(64))
        self._wall_clock = wall_clock
        # What this node really does: always_relay, or nat_traversal off, punches nothing.
        self.nat_traversal = options.punches
        self.nat_discovery = options.nat_discovery and self.nat_traversal
        self.candidate_types = options.ice.candidate_types
        self.turn = TurnRelays(options.turn_servers if self.nat_traversal else (),
                               candidate_types=self.candidate_types)
        # Configured STUN servers: more server-reflexive candidates, and their health.
        self.stun_servers = options.stun_servers if self.nat_traversal else ()
        self.hard_nat = options.hard_nat if self.nat_traversal else HardNatConfig()
        # Extra sockets for hard-NAT traversal, opened by the I/O layer on request:
        # via name -> (the peer they guess towards, their local address).
        self._aux = ExtraSockets()
        # runs_hard / runs_easy / runs_predict, guesses sent, answered, runs that ended direct
        self.hard_nat_counts: Counter[str] = Counter()
        self.probing = NatProbing(discovery=self.nat_discovery, stun_servers=self.stun_servers,
                                  local_address=local_address, lifetimes=lifetimes,
                                  lifetime_schedule=options.lifetime_schedule)
        self._client_config = make_configuration(
            identity, is_client=True, alpn=ALPN_SESSION, idle_timeout=options.session_idle_timeout
        )
        self._server_config = make_configuration(
            identity, is_client=False, alpn=ALPN_SESSION, idle_timeout=options.session_idle_timeout
        )
        self._mux = QuicMux()
        self._events: deque[object] = deque()
        self._out: list[tuple[bytes, Address]] = []
        self._copies: list[tuple[bytes, Address]] = []  # early copies, sent with the batch
        self._lookups: dict[int, NodeId] = {}
        self._next_req = 1
        # sessions, one per remote node
        self.sessions: dict[NodeId, Session] = {}
        self._by_conn: dict[PinnedQuicConnection, Session] = {}
        # Phase 2: paths per peer, NAT discovery
        self.paths: dict[NodeId, PeerPaths] = {}
        self.punch_outcomes: Counter[str] = Counter()
        # figures
        self.malformed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        # Bytes of sessions that have closed, by path (open ones are summed at read time).
        self.turn_credentials_received = 0
        self._turn_renew_at: float | None = None
        self.closed_bytes_sent: Counter[str] = Counter()
        self.closed_bytes_received: Counter[str] = Counter()
        self.timings = {name: Histogram() for name in ("first_byte", "upgrade", "ice")}
        self._log_throttle = Throttle()  # what a gateway says must not flood our log
        self.link = GatewayLink(identity, options, self._mux,
                                malformed=self.malformed, dropped=self.dropped)
        # Several gateways of a cluster (node.gateways): which one is home.
        self.homes = HomeChoice(options.gateways) if len(options.gateways) > 1 else None

    # ================================================================ lifecycle
    def start(self, now: float) -> None:
        self._addresses_seen = self._addresses()
        if self.homes is not None:
            self._out.extend(self.homes.probes(now))  # home on the first to answer
        else:
            self.link.connect(now)

    def _addresses(self) -> frozenset[str]:
        """This machine's addresses a path could use (loopback and link-local ones come and
        go with every container or VPN interface and carry no path of ours)."""
        usable = set()
        for _name, ip in self._interfaces():
            try:
                address = ipaddress.ip_address(ip.split("%")[0])
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local):
                usable.add(ip)
        return frozenset(usable)

    def network_changed(self, now: float) -> bool:
        """The kernel reported a link, address or route change (node.Node's rtnetlink
        watcher). When this machine's addresses are no longer what they were, our direct
        paths may be gone and the gateway no longer sees us where it did: move sessions to
        the relay at once, tell the gateway where we are now (a keepalive, whose answer
        also says whether our public address moved) and punch again, instead of waiting a
        second or more for consent checks and keepalives to fail. Returns whether it acted
        (an address added, or a route of some other interface, changes no path)."""
        addresses = self._addresses()
        gone = self._addresses_seen - addresses
        self._addresses_seen = addresses
        if not gone:  # nothing we stood on went away (a new interface changes no path)
            return False
        self.network_changes += 1
        log.info("this machine's addresses changed: re-checking every path")
        self.probing.forget()
        self.link.keepalive_now(now)
        for peer, paths in list(self.paths.items()):
            if paths.direct is not None:
                paths.lose_path()
                self._on_direct_dead(peer, paths, now)
        return True

    def carrier_changed(self, udp_works: bool, now: float) -> None:
        """Gateway traffic moved between UDP and the TLS link (node.gateway_carrier). The
        gateway must see us on the new carrier at once: a keepalive, or a fresh handshake
        when not registered yet. When UDP is gone so are direct paths over it: sessions move
        to the relay now, not after consent checks fail; when UDP is back, sessions
        relaying punch again soon."""
        self.carrier_changes += 1
        if self.link.registered:
            self.link.keepalive_now(now)
        else:
            self.link.restart_handshake(now)
        for peer, paths in list(self.paths.items()):
            session = self.sessions.get(peer)
            if session is None or session.closed:
                continue
            if not udp_works and paths.direct is not None \
                    and not self.turn.is_stream_via(paths.direct.via):
                paths.lose_path()
                self._on_direct_dead(peer, paths, now)
            elif udp_works and paths.direct is None and session.dialled \
                    and self.nat_traversal and self.options.strategy != "always_relay":
                paths.retry_at = now + _REPUNCH_AFTER_FALLBACK
                paths.we_requested = True
            if session.path == "relay":
                self._kick(session)

    def turn_stream_lost(self, server: Address, now: float) -> None:
        """The TCP or TLS connection to a TURN server ended (node.turn_streams)."""
        self._after_turn(self.turn.stream_lost(server, now), now)

    # What registration gave us; the link holds it.
    @property
    def registered(self) -> bool:
        return self.link.registered

    @property
    def relay_token(self) -> bytes | None:
        return self.link.relay_token

    @property
    def observed(self) -> Address | None:
        return self.link.observed

    @observed.setter
    def observed(self, address: Address | None) -> None:
        self.link.observed = address

    @property
    def gateway_reconnects(self) -> int:
        return self.link.reconnects

    def close(self, now: float) -> None:
        self.turn.close(now)
        self._release_aux(None)
        for session in list(self.sessions.values()):
            session.close("node shutting down")
            self._mux.mark(session.conn)
        self.link.close()

    # ================================================================ sessions (API)
    def connect(self, peer: NodeId, now: float) -> Session:
        """Open (or return) the end-to-end session with `peer`; it starts on the relay."""
        if peer == self.node_id:
            raise InvalidValue("a node cannot open a session with itself")
        existing = self.sessions.get(peer)
        if existing is not None and not existing.closed:
            return existing
        conn = PinnedQuicConnection(configuration=self._client_config, expected_peer=peer,
                                    active_connection_id_limit=SESSION_CONNECTION_ID_LIMIT)
        conn.connect(virtual_address(peer), now)
        session = Session(conn, peer, initiator=True,
                          max_message_size=self.options.max_message_size, now=now,
                          wall_clock=self._wall_clock)
        self._add_session(session)
        if self.nat_traversal and (self.options.prefer_direct or self.options.strategy == "direct_only"):
            # In parallel with the handshake over the relay: the first byte never waits.
            self._request_punch(peer, 1, now)
        return session

    def lookup(self, peer: NodeId) -> int:
        """Ask the gateway whether `peer` is online; the answer comes as an event."""
        req = self._next_req
        self._next_req += 1
        self._lookups[req] = peer
        self._send_control(control.Lookup(req, peer.text))
        return req

    def touch(self, session: Session) -> None:
        """The application wrote to `session`: flush it on the next pass."""
        self._mux.mark(session.conn)

    def _add_session(self, session: Session, *initial_cids: bytes) -> None:
        session.paths = self._paths_for(session.peer)
        self.sessions[session.peer] = session
        self._by_conn[session.conn] = session
        self._mux.add(session.conn, *initial_cids)

    def _remove_session(self, session: Session) -> None:
        self._by_conn.pop(session.conn, None)
        self._mux.remove(session.conn)
        if self.sessions.get(session.peer) is session:
            self._retire(session)
            self._forget_peer(session.peer)

    def _retire(self, session: Session) -> None:
        """The session leaves `sessions`: its bytes join the closed sessions' totals, so
        the node's byte counters never go down."""
        del self.sessions[session.peer]
        for path, figures in session.stats.bytes_by_path.items():
            self.closed_bytes_sent[path] += figures["sent"]
            self.closed_bytes_received[path] += figures["received"]

    def _observe(self, name: str, seconds: float) -> None:
        self.timings[name].observe(seconds)

    def _forget_peer(self, peer: NodeId) -> None:
        """The session is gone: its ICE agent, punch state and held packets go too, or a
        long-lived node's memory would grow with every peer it ever met."""
        self.paths.pop(peer, None)
        self._release_aux(peer)

    # ================================================================ datagrams in
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if self.homes is not None and data and data[0] < 4 and self.homes.owns(data, addr):
            if self.homes.on_answer(data, addr, now):
                self._go_home(now)
            return
        # Most packets come from the gateway (relay frames): no server lookups for those.
        other = addr != self.gateway
        where, kind = route(data, addr, gateway=self.gateway,
                            stun_server_answer=other and self.probing.owns_server_answer(data, addr),
                            turn_server=other and self.turn.owns(addr))
        if where is Route.RELAYED:
            self._receive_relayed(data, now)
        elif where is Route.CONTROL:
            if self.link.receive(data, addr, now):
                self._on_link(now)
        elif where is Route.STUN:
            self._receive_stun(data, addr, now)
        elif where is Route.STUN_SERVER:
            self._after_probing(self.probing.receive_server_answer(data, addr, now), now)
        elif where is Route.TURN:
            self._after_turn(self.turn.receive(data, addr, now), now)
        elif where is Route.DIRECT:
            self._receive_direct(data, addr, now)
        else:
            self.malformed[kind.value] += 1

    def _after_turn(self, events: list[RelayEvent], now: float) -> None:
        for event in events:
            if isinstance(event, RelayData):
                payload, peer_addr = event.payload, event.peer
                if payload and payload[0] <= 3:
                    self._receive_ice(payload, peer_addr, now, event.via)
                elif classify(payload) is Kind.QUIC:
                    self._receive_direct(payload, peer_addr, now, path="turn")
                else:
                    self.malformed["turn_payload"] += 1
            elif isinstance(event, RelayCandidate):
                for peer, paths in self.paths.items():
                    if paths.agent is not None:
                        paths.add_local_candidate(event.candidate, event.via)
                        self._trickle(peer, paths, [event.candidate], now)
            else:
                for peer, paths in self.paths.items():
                    if paths.direct is not None and paths.direct.via == event.via:
                        paths.lose_path()
                        self._on_direct_dead(peer, paths, now)

    def _trickle(self, peer: NodeId, paths: PeerPaths, candidates: list[Candidate],
                 now: float) -> None:
        """Tell the peer (through the gateway) about candidates it could not know yet: as
        they come, or (ice.enable_trickling off) all together once gathering ends."""
        agent = paths.agent
        if agent is None:
            return
        # A guess may still turn into a path: no "every check failed" before it ends.
        # TURN allocations still pending are waited for until ice.gather_timeout.
        done = not paths.hard_nat_running and (
            not self.turn.pending or paths.gathering_expired(now))
        if done:
            agent.end_of_local_candidates()
        elif not self.options.ice.trickle:
            paths.untrickled += candidates
            return
        batch, paths.untrickled = paths.untrickled + candidates, []
        self._send_control(control.Candidates(peer.text, agent.local_ufrag,
                                              [c.to_sdp(prefix=False) for c in batch], done))

    def _receive_direct(self, data: bytes, addr: Address, now: float,
                        path: ev.PathKind = "direct") -> None:
        """A QUIC packet straight from a peer (or unwrapped from our TURN allocation):
        QUIC itself authenticates it."""
        try:
            header = parse_header(data)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return
        conn = self._mux.lookup(header.destination_cid)
        session = self._by_conn.get(conn) if conn is not None else None
        if session is None:
            # A handshake may start on the direct path (direct_only holds it back until the
            # punch validates): accept it if the address is a validated path of a known
            # peer. The handshake then pins that peer's key.
            peer = next((p for p, paths in self.paths.items()
                         if paths.direct is not None and paths.direct.addr == addr), None)
            if peer is None or conn is not None:
                self.dropped["unknown_connection"] += 1
                return
            session = self._accept(peer.raw, header, len(data), now)
            if session is None:
                return
        paths = self.paths.get(session.peer)
        if paths is not None:
            paths.on_direct_rx(addr, now)
        self._deliver(session, data, path, now)

    def _deliver(self, session: Session, packet: bytes, path: ev.PathKind, now: float,
                 wire_size: int | None = None) -> None:
        """Hand a session's QUIC packet to its connection, whatever path brought it
        (`wire_size`: what it took on that path, if not its length)."""
        session.stats.count(path, received=len(packet) if wire_size is None else wire_size)
        session.conn.receive_datagram(packet, virtual_address(session.peer), now)
        self._mux.mark(session.conn)
        self._process(session.conn, now)

    def _receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        if addr in self.link.stun_sockets:
            found = self.probing.receive_gateway_answer(data, addr, now)
            if found is None:
                self.dropped["late_stun_answer"] += 1  # a retransmission's second answer
            else:
                self._after_probing(found, now)
            return
        self._receive_ice(data, addr, now, SOCKET)

    def _receive_ice(self, data: bytes, addr: Address, now: float, via: str) -> None:
        """An ICE check or answer: the agent whose credentials it carries takes it."""
        for peer, paths in self.paths.items():
            if paths.receive(data, addr, now, via):
                self._after_paths_event(peer, paths, paths.drain_events(now), now)
                return
        # Not authenticated by any agent: a stray, a forgery, or (harmlessly) the peer's
        # first checks arriving before our punch order did.
        self.dropped["stun_unclaimed"] += 1

    def _receive_relayed(self, data: bytes, now: float) -> None:
        if len(data) <= FROM_GATEWAY_HEADER:
            self.malformed["relay"] += 1
            return
        src = data[1:FROM_GATEWAY_HEADER]
        relayed = data[FROM_GATEWAY_HEADER:]
        payload = restore_padding(relayed)  # what the peer's QUIC stack built
        try:
            header = parse_header(payload)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return
        conn = self._mux.lookup(header.destination_cid)
        session = self._by_conn.get(conn) if conn is not None else None
        if conn is not None and (session is None or session.peer.raw != src):
            self.dropped["wrong_source"] += 1
            return
        if session is None:
            session = self._accept(src, header, len(payload), now)
            if session is None:
                return
        self.link.note_relay_activity(now)
        self._deliver(session, payload, "relay", now, wire_size=len(relayed))

    def _accept(self, src: bytes, header: QuicHeader, size: int, now: float) -> Session | None:
        if header.packet_type != PACKET_TYPE_INITIAL or size < _MIN_INITIAL:
            self.dropped["unknown_connection"] += 1
            return None
        if header.version not in self._server_config.supported_versions:
            self.dropped["unsupported_version"] += 1
            return None
        peer = NodeId(src)
        conn = PinnedQuicConnection(
            configuration=self._server_config,
            expected_peer=peer,
            original_destination_connection_id=header.destination_cid,
            active_connection_id_limit=SESSION_CONNECTION_ID_LIMIT,
        )
        existing = self.sessions.get(peer)
        if existing is not None and not existing.closed and not existing.established:
            if existing.initiator and self.node_id.raw < peer.raw:
                # Both dialled at once: the lower id's dial wins; the peer will take ours.
                self.dropped["simultaneous_open_lost"] += 1
                return None
            # Our own dial (or an older half-open attempt) yields: keep the Session (and
            # anything the application already queued on it), swap the connection.
            self._by_conn.pop(existing.conn, None)
            self._mux.remove(existing.conn)
            existing.replace_connection(conn, initiator=False)
            self._by_conn[conn] = existing
            self._mux.add(conn, header.destination_cid)
            return existing
        if existing is not None and not existing.closed:
            # The peer lost its state (restart) and dials afresh: the old session is dead.
            existing.close("peer restarted")
            self._remove_session(existing)
            self._events.append(ev.SessionClosed(peer, "peer restarted"))
        session = Session(conn, peer, initiator=False,
                          max_message_size=self.options.max_message_size, now=now,
                          wall_clock=self._wall_clock)
        self._add_session(session, header.destination_cid)
        return session

    # ================================================================ QUIC events
    def _process(self, conn: PinnedQuicConnection, now: float) -> None:
        if conn is self.link.conn:
            self._on_link(now)
            return
        session = self._by_conn.get(conn)
        while (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if session is None:
                continue
            if isinstance(event, qe.HandshakeCompleted) and (
                    refusal := self._refusal(session, conn)) is not None:
                # Closed before the application sees it and before any of the peer's data
                # is acknowledged (a closing connection sends nothing but the close).
                conn.close(error_code=ERROR_NOT_ACCEPTED, reason_phrase=refusal)
                continue
            happened = session.handle_quic_event(event, now)
            if isinstance(event, qe.HandshakeCompleted) and session.established_at is not None:
                self._observe("first_byte", session.established_at - session.started_at)
                self._announce_path(session, now)
            self._events.extend(happened)
            if isinstance(event, qe.ConnectionTerminated):
                self._session_terminated(session, conn, event)
                return

    def _refusal(self, session: Session, conn: PinnedQuicConnection) -> str | None:
        """Why a just-completed session must not go on (None: it may): a peer outside
        node.accept_from, or in a CA network one without a valid membership or that the
        ACL keeps from us."""
        allowed = self.options.accept_from
        if not session.dialled and allowed is not None and session.peer not in allowed:
            self.dropped["not_accepted"] += 1
            self._log_throttle.log(log, logging.WARNING, f"not_accepted:{session.peer}",
                                   "session from %s refused: not in node.accept_from",
                                   session.peer)
            return f"not accepted: {self.node_id} does not accept sessions from {session.peer}"
        if self.trust is None:
            return None
        try:
            if session.peer.text in self._revoked_peers:
                raise MembershipError("revoked", "its membership was revoked")
            theirs = self.trust.check(conn.peer_membership, session.peer, self._wall_clock())
        except MembershipError as exc:
            self.dropped[f"membership_{exc.reason}"] += 1
            self._log_throttle.log(log, logging.WARNING, f"membership:{session.peer}",
                                   "session with %s refused: %s", session.peer, clip(exc, 120))
            return f"not accepted: {session.peer} has no valid membership: {clip(exc, 120)}"
        if not session.dialled and self.membership is not None \
                and not self.trust.acl.allows(theirs, self.membership):
            self.dropped["acl_denied"] += 1
            self._log_throttle.log(log, logging.WARNING, f"acl:{session.peer}",
                                   "session from %s refused by the ACL", session.peer)
            return (f"not accepted: the network's ACL does not let {session.peer} open "
                    f"sessions to {self.node_id}")
        return None

    def _session_terminated(self, session: Session, conn: PinnedQuicConnection,
                            event: qe.ConnectionTerminated) -> None:
        self._by_conn.pop(conn, None)
        self._mux.remove(conn)
        if session.conn is not conn:
            return  # an abandoned half of a simultaneous open
        if self.sessions.get(session.peer) is session:
            self._retire(session)
            self._forget_peer(session.peer)
        reason = event.reason_phrase or f"error {event.error_code}"
        if session.established:
            self._events.append(ev.SessionClosed(session.peer, reason))
        elif conn.rejection:
            self._events.append(ev.SessionFailed(session.peer, PeerKeyMismatch(
                f"session with {session.peer} refused: {conn.rejection}")))
        else:
            self._events.append(ev.SessionFailed(session.peer, SessionClosedError(
                f"session with {session.peer} failed: {reason}")))

    def _on_link(self, now: float) -> None:
        for event in self.link.process(now):
            self._on_link_event(event, now)

    def _on_link_event(self, event: LinkEvent, now: float) -> None:
        if isinstance(event, LinkMessage):
            try:
                self._on_control_message(event.message, now)
            except ValueError:
                self.malformed["control"] += 1
        elif isinstance(event, LinkUp):
            self._send_control(control.Hello(
                version=control.PROTOCOL_VERSION, node_id=self.node_id.text,
                nat_traversal=self.nat_traversal, hard_nat=self.hard_nat.enabled,
                # A wildcard bind means nothing to a peer: send what it expands to.
                local_addresses=[format_address(h) for h in self._hosts()],
            ))
        elif isinstance(event, LinkRegistered):
            self._events.append(ev.Registered(event.observed))
            self._send_nat_info()  # a (re)started gateway learns what we already know
            self.probing.maybe_probe(self.link.stun_sockets, now, self.link.rtt)
            self.probing.query_servers(now)
            self.turn.start(now)
        elif isinstance(event, LinkAddressMoved):
            self.probing.forget()  # our mapping moved: what we knew may be stale
            self.probing.query_servers(now)
            self.probing.maybe_probe(self.link.stun_sockets, now, self.link.rtt)
        elif isinstance(event, LinkKeepaliveAnswered):
            self.probing.maybe_probe(self.link.stun_sockets, now, self.link.rtt)
        elif isinstance(event, LinkLost):
            if event.presented is not None and self.link.pinned_id is not None:
                self._events.append(ev.GatewayRefused(self.link.pinned_id, event.presented))
            if event.replaced:
                self._events.append(ev.GatewayError("replaced", event.reason))
            elif event.was_registered and not self.link.closing:
                self._events.append(ev.GatewayLost(event.reason))
            if self.homes is not None and not self.link.closing:
                self._move_home(event.reason, now)

    def _on_control_message(self, msg: control.ControlMessage, now: float) -> None:
        """A control message the link does not handle itself."""
        if isinstance(msg, control.Punch):
            self._on_punch_order(msg, now)
        elif isinstance(msg, control.PunchRefused):
            self._on_punch_refused(msg, now)
        elif isinstance(msg, control.Candidates):
            self._on_trickled(msg)
        elif isinstance(msg, control.TurnCredentials):
            self._on_turn_credentials(msg, now)
        elif isinstance(msg, control.PeerDenied):
            peer = NodeId.parse(msg.node_id)
            session = self.sessions.get(peer)
            if session is not None and not session.established:
                session.closed = True
                session.close_reason = clip(msg.message, 200)
                self._remove_session(session)
                self._events.append(ev.SessionFailed(peer, NotAllowed(clip(msg.message, 200))))
        elif isinstance(msg, control.MembersRevoked):
            for member in map(NodeId.parse, msg.node_ids[:256]):
                if len(self._revoked_peers) > 10_000:  # names come from the gateway: bounded
                    self._revoked_peers.clear()
                self._revoked_peers.add(member.text)
                if (session := self.sessions.get(member)) is not None:
                    log.info("session with %s closed: its membership no longer counts", member)
                    session.close("peer's membership was revoked")
                    self._mux.mark(session.conn)
        elif isinstance(msg, control.PeerOffline):
            peer = NodeId.parse(msg.node_id)
            session = self.sessions.get(peer)
            if session is not None and not session.established:
                session.closed = True
                session.close_reason = "peer offline"
                self._remove_session(session)
                self._events.append(ev.SessionFailed(peer, PeerOffline(peer.text)))
        elif isinstance(msg, control.LookupResult):
            asked = self._lookups.pop(msg.req, None)
            if asked is not None:
                observed = parse_address(msg.observed) if msg.observed else None
                self._events.append(ev.LookupResult(asked, msg.online, observed))
        elif isinstance(msg, control.Draining):
            if self.homes is not None:
                self._move_home(f"it is draining ({clip(msg.reason, 80)})", now)
            else:
                log.info("gateway draining (%s); no other gateway configured",
                         clip(msg.reason, 80))
        elif isinstance(msg, control.Error):
            if msg.req is not None and (asked := self._lookups.pop(msg.req, None)) is not None:
                # The lookup waiting for this answer fails with it (and it is logged below).
                self._events.append(ev.LookupResult(asked, False, None,
                                                    f"{msg.code}: {clip(msg.message)}"))
            self._log_throttle.log(log, logging.WARNING, "gateway_error:" + clip(msg.code, 32),
                                   "gateway error %s: %s", clip(msg.code, 32), clip(msg.message))
            self._events.append(ev.GatewayError(msg.code, msg.message))
        else:  # a message only a node sends
            self.malformed["control"] += 1

    def _send_control(self, message: control.ControlMessage) -> None:
        self.link.send(message)

    # ================================================================ home gateway
    def _go_home(self, now: float) -> None:
        """The first choice among several gateways is made: register there."""
        assert self.homes is not None
        home = self.homes.home
        log.info("homing on gateway %s (%s)", format_address(home.address),
                 f"answered first in {home.rtt * 1000:.1f} ms" if home.rtt is not None
                 else "none answered in time: the first listed")
        self.gateway = home.address
        self._out.extend((data, self.gateway) for data in
                         self.link.retarget(home.address, home.pinned, now))

    def _move_home(self, why: str, now: float) -> None:
        """The home failed or drains: register at the next gateway of the cluster now.
        Sessions keep their end-to-end QUIC connections: direct and TURN paths do not
        notice; relayed packets lost meanwhile are retransmitted through the new home."""
        assert self.homes is not None
        old = self.gateway
        home = self.homes.next_home(now)
        log.warning("gateway %s: %s; moving to %s", format_address(old), clip(why, 120),
                    format_address(home.address))
        self.gateway = home.address
        self._out.extend((data, old) for data in
                         self.link.retarget(home.address, home.pinned, now))

    # ================================================================ output, timers
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        for conn in self._mux.take_dirty():
            datagrams = conn.datagrams_to_send(now)
            if conn is self.link.conn:
                out.extend(datagrams)
            else:
                session = self._by_conn.get(conn)
                if session is not None:
                    for data, _vaddr in datagrams:
                        frame = self._via_path(session, data, now)
                        if frame is not None:
                            out.append(frame)
            self._process(conn, now)
            self._mux.reschedule(conn)
        for paths in self.paths.values():
            for data, addr, via in paths.datagrams_to_send():
                if via == SOCKET:
                    out.append((data, addr))
                elif via in self._aux:
                    self._aux.send(data, addr, via)
                elif (wrapped := self.turn.send(via, addr, data, now)) is not None:
                    out.append(wrapped)
                else:
                    self.dropped["no_turn_allocation"] += 1
        out.extend(self.turn.datagrams_to_send(now))
        out.extend(self.probing.datagrams_to_send(now))
        if self._copies:
            out.extend(self._copies)
            self._copies = []
        return out

    def _via_path(self, session: Session, data: bytes, now: float) -> tuple[bytes, Address] | None:
        paths = self.paths.get(session.peer)
        direct = paths.direct if paths is not None else None
        if paths is not None and direct is not None \
                and use_selected_pair(self.options.strategy, has_selected=True):
            if now - paths.last_activity > 1.0:
                paths.note_activity(now)  # get_timer() sees the shorter consent interval
            wire = self._on_selected_path(paths, data, now)
            if wire is not None:
                self._set_path(session, direct.kind, now)
                session.stats.count(direct.kind, sent=len(data))
                return wire if wire is not _ON_AUX else None
        if not self._relay_allowed(session):
            held = self._paths_for(session.peer).held
            if len(held) < _HELD_MAX:
                held.append(data)  # sent the moment a direct path validates
            else:
                self.dropped["held_overflow"] += 1
            return None
        if not self.registered or self.relay_token is None:
            self.dropped["no_path"] += 1  # QUIC retransmits once the relay is back
            return None
        self._set_path(session, "relay", now)
        relayed = strip_padding(data)  # the peer's node puts it back (session/padding.py)
        session.stats.count("relay", sent=len(relayed))
        self.link.note_relay_activity(now)
        if paths is not None and (early := paths.early_copy_to(now)) is not None:
            self._send_copy(data, *early)
        if paths is not None and paths.fallbacks:
            self._relaying_after_fallback(paths, now)
        return encode_to_gateway(self.relay_token, session.peer.raw, relayed), self.gateway

    @staticmethod
    def _relaying_after_fallback(paths: PeerPaths, now: float) -> None:
        """Data for a peer whose direct path died goes over the relay: the next attempt
        comes within _RETRY_WHILE_RELAYING (not after a refusal: the gateway said why)."""
        paths.relayed_at = now
        if (paths.retry_at is not None and paths.retry_at > now + _RETRY_WHILE_RELAYING
                and paths.outcomes and paths.outcomes[-1]["outcome"] == "timeout"):
            paths.retry_at = now + _RETRY_WHILE_RELAYING

    def _send_copy(self, data: bytes, addr: Address, via: str) -> None:
        """A copy of a relayed session packet onto the pair the peer's check came on (see
        paths._EARLY_COPY_FOR). Not counted in the session's bytes by path: it duplicates
        what the relay carries, and only one of the two reaches QUIC."""
        if via == SOCKET:
            self._copies.append((data, addr))
        elif via in self._aux:
            self._aux.send(data, addr, via)

    def _on_selected_path(self, paths: PeerPaths, data: bytes,
                          now: float) -> tuple[bytes, Address] | None:
        """`data` as it leaves on the selected pair: from our socket, or wrapped for the
        TURN allocation the pair runs through."""
        direct = paths.direct
        if direct is None:
            return None
        paths.on_direct_tx(now)
        if direct.via == SOCKET:
            return data, direct.addr
        if direct.via in self._aux:
            self._aux.send(data, direct.addr, direct.via)
            return _ON_AUX
        return self.turn.send(direct.via, direct.addr, data, now)

    def _relay_allowed(self, session: Session) -> bool:
        paths = self.paths.get(session.peer)
        been_direct = paths is not None and paths.upgrades > 0
        return fallback(self.options.strategy, fallback_to_relay=self.options.fallback_to_relay,
                        been_direct=been_direct) is Fallback.RELAY

    def _set_path(self, session: Session, path: ev.PathKind, now: float) -> None:
        if session.set_path(path, now):
            self._events.append(ev.PathChanged(session.peer, path))

    def _on_turn_credentials(self, msg: control.TurnCredentials, now: float) -> None:
        """TURN servers and time-limited credentials from the gateway: allocate (or carry
        on with fresh credentials), and ask again at half their lifetime."""
        if not self.nat_traversal or msg.ttl_ms <= 0:
            return
        servers = [parse_address(text, default_port=STUN_DEFAULT_PORT) for text in msg.servers[:8]]
        self.turn.set_servers([TurnServerSpec(server, msg.username, msg.credential)
                               for server in servers], now)
        self.turn_credentials_received += 1
        self._turn_renew_at = now + msg.ttl_ms / 2000
        log.info("TURN credentials from the gateway for %s, valid %d s",
                 ", ".join(msg.servers[:8]), msg.ttl_ms // 1000)

    def get_timer(self) -> float | None:
        times = [t for t in (self._mux.get_timer(), self.link.get_timer(),
                             self._turn_renew_at) if t is not None]
        if self.homes is not None and self.homes.decide_at is not None:
            times.append(self.homes.decide_at)
        times += [t for t in (p.get_timer() for p in self.paths.values()) if t is not None]
        if (t := self.probing.get_timer()) is not None:
            times.append(t)
        if (t := self.turn.get_timer()) is not None:
            times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.homes is not None and self.homes.decide_at is not None \
                and now >= self.homes.decide_at:
            self.homes.decide_now()
            self._go_home(now)
        for conn in self._mux.fire_timers(now):
            self._process(conn, now)
        if self._turn_renew_at is not None and now >= self._turn_renew_at:
            self._turn_renew_at = None  # the answer schedules the next renewal
            self._send_control(control.TurnCredentialsRequest())
        found = self.probing.handle_timer(now)
        # In the order they always ran: the NAT probe, TURN, then the STUN servers.
        self._after_probing([e for e in found if isinstance(e, NatFound)], now)
        self._after_turn(self.turn.handle_timer(now), now)
        self._after_probing([e for e in found if not isinstance(e, NatFound)], now)
        for peer, paths in list(self.paths.items()):
            self._after_paths_event(peer, paths, paths.handle_timer(now), now)
            if paths.retry_at is not None and now >= paths.retry_at:
                paths.retry_at = None
                self._request_punch(peer, paths.attempts_made + 1, now)
            if paths.order_due is not None and now >= paths.order_due:
                paths.order_due = None  # unanswered: ask again, once per wait
                self._request_punch(peer, paths.requested_attempt, now)
        for event in self.link.handle_timer(now):
            self._on_link_event(event, now)

    # ================================================================ NAT discovery
    def _after_probing(self, found: list[ProbingEvent], now: float) -> None:
        for event in found:
            if isinstance(event, NatFound):
                nat = self.probing.nat
                if nat is not None:
                    log.info("NAT type %s (mapping %s, filtering %s, ports %s)", nat.nat_type,
                             nat.mapping, nat.filtering, nat.port_allocation)
                self._send_nat_info()
                self._follow_lifetime()
            elif isinstance(event, LifetimeFound):
                lifetime = event.lifetime
                log.info("NAT state for an idle remote on %s: lives %s s, gone by %s s%s",
                         event.network, lifetime.alive_s, lifetime.expired_s,
                         "" if lifetime.measurable else " (not measurable)")
                self._events.append(ev.BindingLifetimeFound(event.network, lifetime))
                self._follow_lifetime()
            else:
                fresh = [c for c in self._own_reflexive() if c.addr == event.address]
                for peer, paths in self.paths.items():
                    if paths.agent is not None and fresh:
                        paths.add_local_candidate(fresh[0], SOCKET)
                        self._trickle(peer, paths, fresh, now)

    def _follow_lifetime(self) -> None:
        """Keepalives to the gateway come at least as often as this network's NAT needs
        (half the idle time its state was seen to survive); direct paths' idle consent
        checks (every 2.5 s) are below any lifetime the test can report."""
        found = self.probing.lifetime
        self.link.follow_lifetime(found.keepalive_s if found is not None else None)

    # What probing found; it holds it.
    @property
    def nat(self) -> NatBehavior | None:
        return self.probing.nat

    @property
    def stun(self) -> StunClient:
        return self.probing.stun

    @property
    def stun_reflexive(self) -> tuple[Address, str] | None:
        return self.probing.reflexive

    def _send_nat_info(self) -> None:
        if self.nat is not None:
            self._send_control(control.NatInfo(
                nat_type=self.nat.nat_type, mapping=self.nat.mapping,
                filtering=self.nat.filtering, port_allocation=self.nat.port_allocation,
                public=format_address(self.nat.public_address)
                if self.nat.public_address else None,
            ))

    def detect_nat_type(self) -> NatBehavior | None:
        """The cached result of NAT behaviour discovery (None until it finishes)."""
        return self.nat

    # ================================================================ hole punching
    def _paths_for(self, peer: NodeId) -> PeerPaths:
        paths = self.paths.get(peer)
        if paths is None:
            paths = self.paths[peer] = PeerPaths(self.node_id, peer, self.options, self._rng,
                                                 observe=self._observe)
        return paths

    def _request_punch(self, peer: NodeId, attempt: int, now: float) -> None:
        paths = self._paths_for(peer)
        paths.requested_at = now
        paths.we_requested = True
        if not self.registered:
            paths.retry_at = now + _RETRY_DELAYS[0]
            return
        paths.order_asks = paths.order_asks + 1 if attempt == paths.requested_attempt else 1
        paths.requested_attempt = attempt
        paths.order_due = now + _ORDER_WAIT if paths.order_asks < _ORDER_ASKS else None
        self._send_control(control.PunchRequest(peer.text, attempt))

    def _on_punch_order(self, msg: control.Punch, now: float) -> None:
        """The gateway says: start ICE with this peer, with these credentials, now-ish."""
        if not self.nat_traversal:
            return
        peer = NodeId.parse(msg.peer)
        remote = self._parse_candidates(msg.candidates)
        paths = self._paths_for(peer)
        paths.order_due = None
        # An order always means an attempt is needed: the peer lost its path, or one of us
        # moved. Even if our own consent checks have not noticed yet, that path is suspect:
        # start the new ICE generation now (the gateway merges duplicate requests).
        began = (paths.requested_at if msg.requester and paths.requested_at is not None
                 else now)
        start_in = max(0.0, min(float(msg.start_in_ms) / 1000, 1.0))
        self._release_aux(peer)  # the last attempt's guessing sockets, path and all
        run = self._plan_hard_nat(msg, remote, now + start_in)
        timeout = self.options.attempt_check_timeout
        if run is not None:
            timeout = max(timeout, run.duration + 1.0)
        paths.begin(msg.attempt, local_ufrag=msg.ufrag, local_pwd=msg.pwd,
                    remote_ufrag=msg.remote_ufrag, remote_pwd=msg.remote_pwd,
                    controlling=msg.requester, local_candidates=self._local_candidates(),
                    remote_candidates=remote, began_at=began, start_at=now + start_in,
                    timeout=timeout, hard_nat=run)
        if run is not None and run.sockets_wanted:
            self._events.append(ev.SocketsWanted(peer, run.sockets_wanted))
        # The gateway only knows our host and observed addresses: add the rest ourselves.
        self._trickle(peer, paths, self._candidates_gateway_lacks(), now)

    def _plan_hard_nat(self, msg: control.Punch, remote: list[Candidate],
                       start_at: float) -> HardNatRun | None:
        """Port guessing for this attempt, when both ends do it and the NAT pair needs it.
        Its target is the peer's address as the gateway saw it (its srflx candidate)."""
        if not (self.hard_nat.enabled and msg.peer_hard_nat):
            return None
        role = plan_role(self.nat, msg.peer_nat, msg.peer_allocation)
        seen = next((c for c in remote if c.type == "srflx"), None)
        if role is None or seen is None:
            return None
        target: Address | None = seen.addr
        if role == PREDICT:
            if not self.options.ice.trickle or self.observed is None:
                return None  # the peer must hear of our port while the run lasts
            if msg.peer_nat == "symmetric":
                target = None  # the peer's predicted candidate, trickled (_on_trickled)
        assert self.nat is not None  # plan_role gives no role without it
        allocation = (self.nat.port_allocation if role in (HARD, PREDICT)
                      else msg.peer_allocation or "unknown")
        self.hard_nat_counts["runs_" + role] += 1
        return HardNatRun(role, self.hard_nat, target=target, allocation=allocation,
                          now=start_at, rng=random.Random(self._rng.getrandbits(64)))

    # ---------------------------------------------------------------- extra sockets
    def sockets_opened(self, peer: NodeId, sockets: list[tuple[str, Address]],
                       now: float) -> None:
        """The I/O layer opened the sockets a SocketsWanted asked for (via, local address)."""
        paths = self.paths.get(peer)
        run = paths.hard_nat if paths is not None else None
        room = run.sockets_wanted - run.sockets_given if run is not None else 0
        if run is None or run.done or run.role == EASY or room <= 0:
            self._events.append(ev.SocketsReleased(tuple(via for via, _ in sockets)))
            return
        assert paths is not None
        if len(sockets) > room:  # an earlier attempt's sockets, arriving late
            self._events.append(ev.SocketsReleased(tuple(via for via, _ in sockets[room:])))
            sockets = sockets[:room]
        self._aux.adopt(peer, sockets)
        run.add_sockets([via for via, _ in sockets])
        if run.role == PREDICT and self.observed is not None:
            # Nothing has left this socket: its first mapping will keep its port.
            local = sockets[0][1]
            ip = self._socket_ip(local, self.observed, fallback=self.observed)
            predicted = Candidate.predicted_reflexive(self.observed[0], local[1],
                                                      base=(ip, local[1]),
                                                      order=self.candidate_types)
            self._trickle(peer, paths, [predicted], now)

    def receive_on(self, via: str, data: bytes, addr: Address, now: float) -> None:
        """A datagram on one of the extra sockets: an ICE check or answer (the peer's
        guess hit), or session QUIC once the pair through it was selected."""
        owner = self._aux.owner(via)
        if owner is None:
            self.dropped["closed_socket"] += 1
            return
        peer, local = owner
        kind = classify(data)
        if kind is Kind.QUIC:
            self._receive_direct(data, addr, now)
            return
        if kind is not Kind.STUN:
            self.malformed[kind.value] += 1
            return
        paths = self.paths.get(peer)
        if paths is None or paths.agent is None:
            self.dropped["stun_unclaimed"] += 1
            return
        if self._aux.first_use(via):
            # Only now a host base: 256 idle ones would swamp the check list.
            ip = self._socket_ip(local, addr, fallback=local)
            try:
                paths.add_local_candidate(Candidate.host(ip, local[1],
                                                         order=self.candidate_types), via)
            except ValueError:
                pass
        if paths.receive(data, addr, now, via):
            self._after_paths_event(peer, paths, paths.drain_events(now), now)
        else:
            self.dropped["stun_unclaimed"] += 1

    def _socket_ip(self, local: Address, remote: Address, *, fallback: Address) -> str:
        """A socket's own IP or, bound to the wildcard, our host address of `remote`'s
        family (`fallback`'s IP if we have none)."""
        if local[0] not in ("0.0.0.0", "::"):
            return local[0]
        return (same_family(remote, self._hosts()) or fallback)[0]

    @property
    def extra_sockets(self) -> int:
        return len(self._aux)

    def take_socket_datagrams(self) -> list[tuple[bytes, Address, str]]:
        """What leaves through the extra sockets: (data, destination, via)."""
        return self._aux.take()

    def _release_aux(self, peer: NodeId | None, keep: frozenset[str] = frozenset()) -> None:
        """Close a peer's extra sockets (every peer's with None), except `keep`."""
        vias = self._aux.release(peer, keep)
        if vias:
            self._events.append(ev.SocketsReleased(vias))

    def _on_hard_nat_done(self, peer: NodeId, paths: PeerPaths, now: float) -> None:
        keep = set()
        if paths.direct is not None:
            keep.add(paths.direct.via)
        run = paths.hard_nat
        if run is not None:
            self.hard_nat_counts["guesses"] += run.sent
            if run.hit is not None:
                keep.add(run.hit[1])
                self.hard_nat_counts["answered"] += 1
        self._release_aux(peer, frozenset(keep))
        if paths.untrickled:  # held back (no trickling) while guessing went on
            self._trickle(peer, paths, [], now)
        elif paths.agent is not None and (not self.turn.pending or paths.gathering_expired(now)):
            paths.agent.end_of_local_candidates()

    def _on_trickled(self, msg: control.Candidates) -> None:
        peer = NodeId.parse(msg.peer)
        paths = self.paths.get(peer)
        if paths is not None:
            candidates = self._parse_candidates(msg.lines)
            paths.add_remote_candidates(candidates, msg.end)
            run = paths.hard_nat
            predicted = next((c for c in candidates if c.predicted), None)
            if run is not None and predicted is not None:
                run.aim(predicted.addr)

    def _parse_candidates(self, lines: list[Any]) -> list[Candidate]:
        out = []
        for line in lines[:16]:
            try:
                out.append(Candidate.from_sdp(line if isinstance(line, str) else ""))
            except ValueError:
                self.malformed["candidate"] += 1
        return out

    def _hosts(self) -> list[Address]:
        return self.candidates.hosts()

    def _local_candidates(self) -> list[tuple[Candidate, str]]:
        """Every candidate we offer: our socket's (hosts, reflexive) and TURN relays."""
        own = self.candidates.socket_candidates(self.observed, self.stun_reflexive)
        return [(c, SOCKET) for c in own] + self.turn.candidates()

    def _candidates_gateway_lacks(self) -> list[Candidate]:
        """The gateway only knows our host and observed addresses: the rest we trickle."""
        return self._own_reflexive() + [c for c, _v in self.turn.candidates()]

    def _own_reflexive(self) -> list[Candidate]:
        return self.candidates.own_reflexive(self.observed, self.stun_reflexive)

    @property
    def mapped_address(self) -> Address | None:
        return self.candidates.mapped_address

    def set_mapped_address(self, mapped: Address | None, router: str | None, now: float) -> None:
        """The port mapper got (or lost) a mapping: offer it to every running ICE agent."""
        self.candidates.mapped_address, self.candidates.mapped_router = mapped, router
        candidate = self.candidates.mapped_candidate()
        if candidate is None:
            return
        for peer, paths in self.paths.items():
            if paths.agent is not None:
                paths.add_local_candidate(candidate, SOCKET)
                self._trickle(peer, paths, [candidate], now)

    def _on_punch_refused(self, msg: control.PunchRefused, now: float) -> None:
        peer = NodeId.parse(msg.peer)
        reason = msg.reason
        paths = self._paths_for(peer)
        paths.order_due = None
        paths.outcomes.append({"attempt": msg.attempt, "outcome": "refused", "reason": reason})
        self.punch_outcomes[reason] += 1
        if reason in ("incompatible_nat", "peer_offline") and paths.direct is None:
            paths.retry_at = now + _RETRY_LATER * 2
        self._fail_direct_only(peer, f"the gateway refused to coordinate a punch: {reason}")

    def _after_paths_event(self, peer: NodeId, paths: PeerPaths, happened: list[PathEvent],
                           now: float) -> None:
        for what in happened:
            if what is PathEvent.SELECTED:
                self._on_validated(peer, paths, now)
            elif what is PathEvent.ATTEMPT_TIMEOUT:
                self._on_attempt_timeout(peer, paths, now)
            elif what is PathEvent.DIRECT_DEAD:
                self._on_direct_dead(peer, paths, now)
            elif what is PathEvent.HARD_NAT_DONE:
                self._on_hard_nat_done(peer, paths, now)
            elif what is PathEvent.GATHER_TIMEOUT:
                self._trickle(peer, paths, [], now)

    def _on_validated(self, peer: NodeId, paths: PeerPaths, now: float) -> None:
        self.punch_outcomes["success"] += 1
        run = paths.hard_nat
        if run is not None and not run.ended_direct and paths.direct is not None \
                and paths.direct.kind == "direct":
            run.ended_direct = True
            self.hard_nat_counts["direct"] += 1
        if paths.direct is not None and paths.direct.via != SOCKET:
            self.turn.bind(paths.direct.via, paths.direct.addr, now)
        self._report_outcome(peer, paths.outcomes[-1], paths)
        held, paths.held = paths.held, []
        for data in held:
            wire = self._on_selected_path(paths, data, now)
            if wire is not None and wire is not _ON_AUX:
                self._out.append(wire)
        session = self.sessions.get(peer)
        if session is not None:
            self._announce_path(session, now)
            self._kick(session)

    def _on_attempt_timeout(self, peer: NodeId, paths: PeerPaths, now: float) -> None:
        record = paths.outcomes[-1]
        self.punch_outcomes["timeout"] += 1
        self._report_outcome(peer, record, paths)
        if paths.we_requested and self.options.strategy != "direct_only":
            n = record["attempt"]
            if n - 1 < len(_RETRY_DELAYS):
                delay = _RETRY_DELAYS[n - 1]
            elif paths.fallbacks and now - paths.relayed_at < _RELAYING_FOR:
                delay = _RETRY_WHILE_RELAYING
            else:
                delay = _RETRY_LATER
            paths.retry_at = now + delay
        self._fail_direct_only(peer, f"no direct path within hole_punch_timeout "
                                     f"({int(self.options.attempt_check_timeout * 1000)} ms)")

    def _on_direct_dead(self, peer: NodeId, paths: PeerPaths, now: float) -> None:
        # A path that dies has often died because our address moved (a NAT rebinding):
        # the gateway learns where we are now from this keepalive, before relay frames
        # from the new address would be refused as unknown.
        self.link.keepalive_now(now)
        session = self.sessions.get(peer)
        if session is not None and not session.closed:
            if self._relay_allowed(session):
                self._set_path(session, "relay", now)
            self._kick(session)
            if self.nat_traversal and self.options.strategy != "always_relay":
                paths.retry_at = now + _REPUNCH_AFTER_FALLBACK
                paths.we_requested = True

    def _announce_path(self, session: Session, now: float) -> None:
        """The session is on its selected pair from now (said here, not at its next
        datagram: a side with nothing more to send, such as a receiver whose peer hangs
        up, would otherwise never report the move), and one packet (a QUIC PING) goes
        there at once, so the peer need not wait for our next message to see the path
        work. Runs when the pair is selected and, as the punch races the session's
        handshake, again when the handshake completes."""
        paths = self.paths.get(session.peer)
        if (session.established and paths is not None and paths.direct is not None
                and use_selected_pair(self.options.strategy, has_selected=True)):
            self._set_path(session, paths.direct.kind, now)
            session.conn.send_ping(_PATH_PING_UID)
            self._mux.mark(session.conn)

    def _kick(self, session: Session) -> None:
        """The path changed: what QUIC lost on the old one goes again at once, without
        the backed-off probe timeout it built up while nothing got through."""
        session.conn._loss._pto_count = 0
        self._mux.mark(session.conn)

    def _report_outcome(self, peer: NodeId, record: dict[str, Any], paths: PeerPaths) -> None:
        upgrade = paths.upgrade["upgrade_ms"] if paths.upgrade else None
        self._send_control(control.PunchResult(peer.text, record["attempt"], record["outcome"],
                                               record["reason"], upgrade))

    def _fail_direct_only(self, peer: NodeId, why: str) -> None:
        if self.options.strategy != "direct_only":
            return
        session = self.sessions.get(peer)
        if session is None or session.established:
            return
        session.closed = True
        session.close_reason = why
        self._remove_session(session)  # its held packets go with its paths
        self._events.append(ev.SessionFailed(peer, NoDirectPath(
            f"connection_strategy direct_only: {why}")))

    def next_event(self) -> object | None:
        return self._events.popleft() if self._events else None

