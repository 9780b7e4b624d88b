"""`macula lab chaos` in the simulator: each fault against the real node and gateway code.

One fresh virtual network per fault (deterministic for its seed): a two-IP server running
the gateway, and per PairSpec a dialer and an acceptor behind their NAT presets (10 ms per
uplink), streaming both ways (lab.timed_stream) while the fault is injected. The scoring
and the catalogue live in lab.faults; the kernel backend in lab.kernel_chaos.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from macula.gateway.server import Gateway
from macula.identity import Identity, NodeId
from macula.node.node import Node
from macula.node.turn_relays import TurnServerSpec
from macula_lab.errorlog import ErrorLog
from macula_lab.faults import (
    CHAOS_HARD_NAT,
    FAULTS,
    LOSS_BURST,
    LOSS_RATE,
    TURN_IP,
    TURN_PORT,
    TURN_USERS,
    FaultSpec,
    Marks,
    PairSpec,
    fault_seed,
    format_row,
    quiet_marks,
    score_fault,
    score_session,
    unsupported,
)
from macula_lab.kernel_chaos import KernelChaos
from macula_lab.peer import _accept_from
from macula_lab.sim import (
    GilbertElliott,
    SimHost,
    SimNetwork,
    Site,
    build_site,
    preset_chain,
    run_simulation,
)
from macula_lab.sim.presets import SERVER_IPS
from macula_lab.sim.streams import SimStreams
from macula_lab.sim_trial import GATEWAY_PORT, GATEWAY_TLS_PORT, sim_link_dialer, start_sim_gateway
from macula_lab.timed_stream import StreamPlan, run_timed_stream
from macula_lab.turn_server import TurnServer

LATENCY_MS = 10.0  # per uplink, one way: the matrix tests' setting
CONNECT_TIMEOUT = 15.0
SIM_TIME_LIMIT = 900.0  # virtual seconds per fault: far beyond any plan
SIM_MAX_ITERATIONS = 400_000  # a normal fault needs ~10k loop turns: stop a spin fast
def seeded_identity(seed: int, name: str) -> Identity:
    """A key derived from the run's seed: node ids order ties (simultaneous open, punch
    pairs), so random ones would make two runs of one seed differ."""
    secret = hashlib.sha256(f"{seed}/identity/{name}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(secret))


def run_sim_fault(spec: FaultSpec, seed: int = 1) -> dict[str, Any]:
    """One fault in a fresh virtual network and loop; never raises for a failed run."""
    s = fault_seed(seed, spec.name)
    with ErrorLog() as errors:
        try:
            row = run_simulation(lambda: _fault(spec, s), seed=s, time_limit=SIM_TIME_LIMIT,
                                 max_iterations=SIM_MAX_ITERATIONS)
        except Exception as exc:  # a fault that wrecks the run is a finding, reported
            row = unsupported(spec, "simulator", f"run aborted: {type(exc).__name__}: {exc}")
    row["logged_errors"] = errors.count
    if errors.records:
        row["logged"] = errors.records[:5]
    return row


# ------------------------------------------------------------------------------ the world

@dataclass
class _Pair:
    spec: PairSpec
    a: Site
    b: Site
    move: Site | None
    dialer: Node | None = None
    acceptor: Node | None = None


@dataclass
class _World:
    net: SimNetwork
    server: SimHost
    identity: Identity
    gateway: Gateway | None = None
    pairs: list[_Pair] = field(default_factory=list)
    gateways_started: int = 0
    turn: TurnServer | None = None
    streams: SimStreams | None = None  # the gateway's TLS path (stream model)

    async def start_gateway(self) -> None:
        self.gateway = await start_sim_gateway(self.server, self.identity, self.streams)
        self.gateways_started += 1

    async def start_turn(self) -> TurnServerSpec:
        """The simulator's TURN server on its own internet host (coturn's stand-in)."""
        host = self.net.add_host("turn", self.net.internet, TURN_IP)
        self.turn = await TurnServer.start(host.open_endpoint(TURN_PORT),
                                           lambda: host.open_endpoint(0), users=TURN_USERS)
        user, password = next(iter(TURN_USERS.items()))
        return TurnServerSpec((TURN_IP, TURN_PORT), user, password)

    async def stop_turn(self) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            await turn.close()

    async def stop_gateway(self) -> None:
        if self.streams is not None:
            self.streams.unlisten((SERVER_IPS[0], GATEWAY_TLS_PORT))
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await gateway.close()

    def nodes(self) -> list[Node]:
        return [n for p in self.pairs for n in (p.dialer, p.acceptor) if n is not None]


def _build(spec: FaultSpec, seed: int) -> _World:
    net = SimNetwork(seed=seed)
    server = net.add_host("server", net.internet, SERVER_IPS, seed=seed)
    world = _World(net, server, seeded_identity(seed, "gateway"),
                   streams=SimStreams(net) if spec.gateway_tls else None)
    overrides: dict[str, Any] = ({"mapping_timeout": float(spec.mapping_timeout)}
                                 if spec.mapping_timeout else {})

    def site(name: str, preset: str) -> Site:
        return build_site(net, name, preset_chain(preset, **overrides), latency_ms=LATENCY_MS,
                          seed=seed)

    for i, pair in enumerate(spec.pairs):
        world.pairs.append(_Pair(pair, site(f"p{i}a", pair.a), site(f"p{i}b", pair.b),
                                 site(f"p{i}m", pair.move_to) if pair.move_to else None))
        if spec.udp_blocked_from_start:
            block_udp(world.pairs[-1].a, True)
    return world


def block_udp(site: Site, blocked: bool) -> None:
    """The site's outermost NAT drops (or passes again) every UDP packet, both ways."""
    box = site.nats[-1]
    box.nat.config = dataclasses.replace(box.nat.config, udp_blocked=blocked)


async def _start_node(host: SimHost, pair: PairSpec, identity: Identity, *,
                      moves: bool = False, turn: TurnServerSpec | None = None,
                      streams: SimStreams | None = None, preset: str = "") -> Node:
    # A node that will move binds the wildcard, as a real one does, so its socket survives
    # the change of address; the others bind their address like the matrix trials.
    endpoint = host.open_endpoint(0, "0.0.0.0" if moves else None)
    extra: dict[str, Any] = {"turn_servers": [turn]} if turn is not None else {}
    if streams is not None:
        extra["link_dialer"] = sim_link_dialer(streams, host, preset)
    # Hard-NAT guessing off (CHAOS_HARD_NAT): the faults' relayed sessions are pairs with a
    # symmetric NAT, which must stay relayed for the fault to hit the relay path.
    return await Node.start(identity, gateway=(SERVER_IPS[0], GATEWAY_PORT), endpoint=endpoint,
                            strategy=pair.strategy, register_timeout=30.0,
                            hard_nat=CHAOS_HARD_NAT, **extra)


async def stream_side(node: Node, peer: NodeId, plan: StreamPlan, *, dial: bool) -> dict[str, Any]:
    """Open (or accept) the session and run the timed stream; failures become data."""
    try:
        session = (await node.connect(peer, timeout=CONNECT_TIMEOUT) if dial
                   else await _accept_from(node, peer, CONNECT_TIMEOUT))
    except Exception as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"connected": True, **await run_timed_stream(session, plan)}


# ------------------------------------------------------------------------------ injectors

async def _gateway_restart(world: _World, spec: FaultSpec) -> Marks:
    loop = asyncio.get_running_loop()
    inject_at = loop.time()
    await world.stop_gateway()
    await asyncio.sleep(spec.window)
    await world.start_gateway()
    return Marks(inject_at, loop.time())


async def _gateway_crash(world: _World, spec: FaultSpec) -> Marks:
    loop = asyncio.get_running_loop()
    inject_at = loop.time()
    link = world.server.link
    link.up = False  # what the old gateway says on its way out never leaves the host
    await world.stop_gateway()
    await asyncio.sleep(spec.window)
    link.up = True
    await world.start_gateway()
    return Marks(inject_at, loop.time())


async def _nat_rebind(world: _World, spec: FaultSpec) -> Marks:
    now = asyncio.get_running_loop().time()
    retired = [port for p in world.pairs for box in p.a.nats for port in box.nat.renumber()]
    return Marks(now, now, [f"retired {len(retired)} NAT mappings"])


async def _loss(world: _World, spec: FaultSpec) -> Marks:
    loop = asyncio.get_running_loop()
    links = [p.a.uplinks[0] for p in world.pairs]
    saved = [link.config for link in links]
    burst = GilbertElliott.from_mean(LOSS_RATE, LOSS_BURST)
    inject_at = loop.time()
    for link in links:
        link.config = dataclasses.replace(link.config, burst=burst)
    await asyncio.sleep(spec.window)
    for link, config in zip(links, saved):
        link.config = config
    lost = sum(link.counters.dropped["loss"] for link in links)
    return Marks(inject_at, loop.time(), [f"{lost} packets dropped on the lossy uplinks"])


async def _uplink_switch(world: _World, spec: FaultSpec) -> Marks:
    now = asyncio.get_running_loop().time()
    for pair in world.pairs:
        assert pair.move is not None and pair.move.lan is not None
        world.net.move_host(pair.a.host, pair.move.lan)
    return Marks(now, now)


async def _turn_down(world: _World, spec: FaultSpec) -> Marks:
    now = asyncio.get_running_loop().time()
    allocations = world.turn.allocations if world.turn is not None else 0
    await world.stop_turn()  # no goodbye to the clients: what a crash looks like to them
    return Marks(now, now, [f"TURN server held {allocations} allocations"])


async def _direct_outage(world: _World, spec: FaultSpec) -> Marks:
    loop = asyncio.get_running_loop()
    walls = [(p.a.public_ip, p.b.public_ip) for p in world.pairs]
    inject_at = loop.time()
    for a, b in walls:
        world.net.internet.block(a, b)
    await asyncio.sleep(spec.window)
    for a, b in walls:
        world.net.internet.block(a, b, blocked=False)
    dropped = world.net.internet.counters.dropped["firewall"]
    return Marks(inject_at, loop.time(), [f"{dropped} packets dropped between the NATs"])


async def _udp_cut(world: _World, spec: FaultSpec) -> Marks:
    now = asyncio.get_running_loop().time()
    for pair in world.pairs:
        block_udp(pair.a, True)
    return Marks(now, now)


async def _udp_restore(world: _World, spec: FaultSpec) -> Marks:
    now = asyncio.get_running_loop().time()
    for pair in world.pairs:
        block_udp(pair.a, False)
    return Marks(now, now)


async def _nothing(world: _World, spec: FaultSpec) -> Marks:
    # The quiet period is the stream's own pause; its marks come from the streams.
    return Marks(float("nan"), float("nan"))


_INJECT: dict[str, Callable[[_World, FaultSpec], Any]] = {
    "gateway_restart": _gateway_restart,
    "gateway_crash": _gateway_crash,
    "nat_rebind": _nat_rebind,
    "mapping_expiry": _nothing,
    "loss_25": _loss,
    "uplink_switch": _uplink_switch,
    "turn_down": _turn_down,
    "direct_outage": _direct_outage,
    "udp_cut": _udp_cut,
    "udp_restore": _udp_restore,
}


# ------------------------------------------------------------------------------ one fault

async def _fault(spec: FaultSpec, seed: int) -> dict[str, Any]:
    world = _build(spec, seed)
    plan = spec.plan()
    await world.start_gateway()
    try:
        turn = await world.start_turn() if any(p.turn for p in spec.pairs) else None
        for i, pair in enumerate(world.pairs):
            use = turn if pair.spec.turn else None
            pair.dialer = await _start_node(pair.a.host, pair.spec, seeded_identity(seed, f"p{i}a"),
                                            moves=pair.move is not None, turn=use,
                                            streams=world.streams, preset=pair.spec.a)
            pair.acceptor = await _start_node(pair.b.host, pair.spec,
                                              seeded_identity(seed, f"p{i}b"), turn=use,
                                              streams=world.streams, preset=pair.spec.b)
        tasks = [asyncio.gather(
            stream_side(p.dialer, p.acceptor.node_id, plan, dial=True),
            stream_side(p.acceptor, p.dialer.node_id, plan, dial=False))
            for p in world.pairs if p.dialer is not None and p.acceptor is not None]
        await asyncio.sleep(spec.warmup)
        marks = await _INJECT[spec.name](world, spec)
        results = await asyncio.gather(*tasks)
        if spec.quiet:
            marks = quiet_marks([side for pair in results for side in pair])
        sessions = [score_session(p.spec, d, a, marks) for p, (d, a) in zip(world.pairs, results)]
        row = score_fault(spec, sessions, marks, backend="simulator")
        row["handler_errors"] = sum(n.handler_errors for n in world.nodes()) + (
            world.gateway.handler_errors if world.gateway is not None else 0)
        row["gateways_started"] = world.gateways_started
        return row
    finally:
        for node in world.nodes():
            await node.close()
        await world.stop_gateway()
        await world.stop_turn()


# ------------------------------------------------------------------------------ the command

def run_chaos(names: list[str], *, kernel: bool = False, seed: int = 1,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every named fault, in the simulator or the kernel lab: {"faults": [rows]}."""
    rows: list[dict[str, Any]] = []

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress is not None:
            progress(format_row(row))

    if kernel:
        with KernelChaos(seed=seed) as backend:
            for name in names:
                done(backend.run_fault(FAULTS[name]))
    else:
        for name in names:
            done(run_sim_fault(FAULTS[name], seed))
    return {"faults": rows}
