"""A matrix trial in the simulator: the real gateway and node code on virtual hosts."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from macula.gateway.server import Gateway
from macula.gateway.stream_listener import StreamEndpoint
from macula.identity import Identity
from macula.nat.hard_nat import HardNatConfig
from macula.net.wslink import MessageLink
from macula.node.gateway_carrier import LinkDialer
from macula.node.node import Node
from macula.node.turn_relays import TurnServerSpec
from macula_lab.peer import failed_trial, run_peer, summarise_trial
from macula_lab.sim import (
    SERVER_IPS,
    SimEndpoint,
    SimHost,
    SimNetwork,
    build_pair_topology,
    run_simulation,
)
from macula_lab.sim.presets import ChainSpec, guessing_pair
from macula_lab.sim.streams import PROXY_ADDRESS, SimStreams
from macula_lab.turn_server import TurnServer

GATEWAY_PORT = 9443
GATEWAY_TLS_PORT = 443
TURN_PORT, TURN_USER, TURN_PASSWORD = 3478, "macula", "macula-lab"


@dataclass(frozen=True)
class TrialOptions:
    latency_ms: float = 0.0
    loss: float = 0.0
    messages: int = 200
    interval: float = 0.005
    strategy: str = "opportunistic"
    nat_traversal: bool = True
    turn: bool = False  # a TURN server beside the gateway, offered to both nodes
    hard_nat: bool = True  # nodes guess ports against hard NATs (as shipped)
    one_ip: bool = False  # the kernel lab's gateway without its second IP (as most deployments)

    @property
    def spread(self) -> float:
        """The longest a trial's stream is stretched (see spread_for)."""
        return HardNatConfig().duration if self.hard_nat else 0.0

    def spread_for(self, a: ChainSpec, b: ChainSpec) -> float:
        """With hard-NAT traversal a pair that needs guessing streams over its whole
        budget, so the final path is the one guessing found and the upgrade happens under
        load; every other named pair keeps the plain stream (and the matrix its run time)."""
        named = isinstance(a, str) and isinstance(b, str)
        return self.spread if not named or guessing_pair(a, b) else 0.0


def trial_seed(seed: int, a: str, b: str, trial: int) -> int:
    digest = hashlib.sha256(f"{seed}/{a}/{b}/{trial}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def run_sim_trial(a: str, b: str, trial: int, seed: int, options: TrialOptions) -> dict[str, Any]:
    """One trial in a fresh virtual network and loop: deterministic for (seed, a, b, trial)."""
    s = trial_seed(seed, a, b, trial)
    return run_simulation(lambda: _trial(a, b, s, options), seed=s, time_limit=600.0)


async def start_sim_gateway(server: SimHost, identity: Identity | None = None,
                            streams: SimStreams | None = None) -> Gateway:
    """The gateway on the server's two IPs, main port and STUN port each (RFC 5780), and
    with `streams` its TLS path on port 443 (the stream model)."""
    ip1, ip2 = SERVER_IPS
    endpoint: StreamEndpoint | SimEndpoint = server.open_endpoint(GATEWAY_PORT, ip1)
    if streams is not None:
        endpoint = StreamEndpoint(endpoint)
        streams.serve_gateway(server, (ip1, GATEWAY_TLS_PORT), endpoint)
    return await Gateway.start(
        identity, endpoint=endpoint,
        stun_endpoints=[server.open_endpoint(GATEWAY_PORT + 1, ip1),
                        server.open_endpoint(GATEWAY_PORT, ip2),
                        server.open_endpoint(GATEWAY_PORT + 1, ip2)])


async def _trial(a: str, b: str, seed: int, options: TrialOptions) -> dict[str, Any]:
    net = SimNetwork(seed=seed)
    topo = build_pair_topology(net, a, b, latency_ms=options.latency_ms, loss=options.loss,
                               seed=seed)
    ip1 = SERVER_IPS[0]
    server = topo.server
    streams = SimStreams(net)
    gateway = await start_sim_gateway(server, streams=streams)
    turn = None
    specs: list[TurnServerSpec] = []
    if options.turn:
        turn = await TurnServer.start(server.open_endpoint(TURN_PORT, ip1),
                                      lambda: server.open_endpoint(0, ip1),
                                      realm="macula.sim", users={TURN_USER: TURN_PASSWORD})
        specs = [TurnServerSpec((ip1, TURN_PORT), TURN_USER, TURN_PASSWORD)]
    nodes: list[Node] = []
    try:
        for host, preset in ((topo.host_a, a), (topo.host_b, b)):
            nodes.append(await Node.start(
                Identity.generate(), gateway=(ip1, GATEWAY_PORT), endpoint=host.open_endpoint(),
                strategy=options.strategy, nat_traversal=options.nat_traversal,
                turn_servers=specs, register_timeout=30.0, hard_nat=options.hard_nat,
                socket_opener=host.open_udp_endpoint,
                link_dialer=sim_link_dialer(streams, host, preset),
            ))
        na, nb = nodes
        dialer, acceptor = await asyncio.gather(
            run_peer(na, nb.node_id, dial=True, messages=options.messages,
                     interval=options.interval, spread=options.spread_for(a, b)),
            run_peer(nb, na.node_id, dial=False, messages=options.messages,
                     interval=options.interval, spread=options.spread_for(a, b)),
        )
        result = summarise_trial(dialer, acceptor)
        result["gateway_relayed_bytes"] = gateway.core.relayed_bytes
        result["nat"] = {"a": _nat_of(na), "b": _nat_of(nb)}
        return result
    except Exception as exc:  # a trial that cannot even start is a failed trial, not a crash
        return failed_trial(f"{type(exc).__name__}: {exc}")
    finally:
        for node in nodes:
            await node.close()
        await gateway.close()
        if turn is not None:
            await turn.close()


def sim_link_dialer(streams: SimStreams, host: SimHost, preset: str) -> LinkDialer:
    """Every lab node knows the gateway's TLS path; behind proxy_only, through the proxy."""
    proxy = PROXY_ADDRESS if preset == "proxy_only" else None

    async def dial() -> MessageLink:
        return await streams.dial(host, (SERVER_IPS[0], GATEWAY_TLS_PORT), proxy=proxy)

    return dial


def _nat_of(node: Node) -> str | None:
    nat = node.detect_nat_type()
    return nat.nat_type if nat is not None else None
