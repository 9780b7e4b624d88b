"""Prometheus metrics, read from the cores' plain counters at scrape time.

The hot paths only bump integers; this collector turns them into metric families when
Prometheus asks, so metrics cost nothing per packet. Each gateway or node gets its own
CollectorRegistry, so several can live in one process (tests, the demo).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest

from .errors import BindError
from .gateway.cluster_sync import ClusterSync
from .gateway.core import GatewayCore
from .gateway.stream_listener import StreamListener
from .node.core import NodeCore

PATHS = ("relay", "direct", "turn")
MetricFamily = (CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
                | SummaryMetricFamily)


def _labelled(name: str, doc: str, label: str, values: Counter[str], *,
              counter: bool = True) -> CounterMetricFamily | GaugeMetricFamily:
    family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class GatewayCollector:
    def __init__(self, core: GatewayCore, streams: StreamListener | None = None,
                 cluster: ClusterSync | None = None) -> None:
        self._core = core
        self._streams = streams
        self._cluster = cluster

    def collect(self) -> Iterator[MetricFamily]:
        core = self._core
        yield GaugeMetricFamily("macula_gateway_nodes_online", "Registered nodes", value=core.nodes_online)
        yield GaugeMetricFamily("macula_gateway_max_nodes", "Registration limit (gateway.max_nodes)",
                                value=core.max_nodes)
        yield CounterMetricFamily("macula_gateway_relayed_packets", "Datagrams relayed between nodes",
                                  value=core.relayed_packets)
        yield CounterMetricFamily("macula_gateway_relayed_bytes", "Payload bytes relayed between nodes",
                                  value=core.relayed_bytes)
        yield CounterMetricFamily("macula_gateway_registrations", "Successful registrations",
                                  value=core.registrations)
        yield _labelled("macula_gateway_nodes", "Registered nodes, by the transport of their "
                        "link (udp, or tls: the WebSocket path)", "transport",
                        core.nodes_by_transport(), counter=False)
        by_transport: Counter[str] = Counter(udp=0, tls=0)
        by_transport.update(core.relayed_bytes_by_transport)
        yield _labelled("macula_gateway_relayed_transport_bytes", "Payload bytes relayed, by "
                        "the transport they arrived on", "transport", by_transport)
        streams = self._streams
        yield GaugeMetricFamily("macula_gateway_tls_links", "Open TLS (WebSocket) links",
                                value=streams.links_open if streams else 0)
        yield _labelled("macula_gateway_tls_refused", "TLS link attempts refused, by the step "
                        "that failed (tls, upgrade, timeout, busy)", "step",
                        streams.refused if streams else Counter())
        yield _labelled("macula_gateway_malformed_packets", "Malformed packets dropped, by kind",
                        "kind", core.malformed)
        yield _labelled("macula_gateway_dropped_packets", "Packets dropped, by reason",
                        "reason", core.dropped)
        yield CounterMetricFamily("macula_gateway_retries",
                                  "QUIC Retry packets sent (address validation under load)",
                                  value=core.retries_sent)
        yield CounterMetricFamily("macula_gateway_punches_coordinated",
                                  "Hole punches (ICE starts) coordinated",
                                  value=core.punches_coordinated)
        yield _labelled("macula_gateway_punch_refusals", "Punch requests refused, by reason",
                        "reason", core.punch_refusals)
        yield from self._cluster_metrics()
        outcomes = CounterMetricFamily(
            "macula_gateway_punch_outcomes", "Punch outcomes the nodes reported, by NAT pair",
            labels=["nat_a", "nat_b", "outcome"])
        for (nat_a, nat_b, outcome), value in sorted(core.punch_outcomes.items()):
            outcomes.add_metric([nat_a, nat_b, outcome], value)
        yield outcomes


    def _cluster_metrics(self) -> Iterator[MetricFamily]:
        """A cluster member's view: every family reads 0 on a gateway running alone."""
        core, sync = self._core, self._cluster
        view, mesh = core.cluster, core.mesh
        yield GaugeMetricFamily("macula_gateway_cluster_members",
                                "Other gateways of the cluster in the directory",
                                value=len(view.members) if view else 0)
        yield GaugeMetricFamily("macula_gateway_mesh_links", "Mesh links up to other members",
                                value=mesh.links_up if mesh else 0)
        yield GaugeMetricFamily("macula_gateway_directory_up", "1 while the cluster directory "
                                "(gateway.cluster.redis) answers; 0 alone or while it is "
                                "unreachable", value=1 if view and view.directory_ok else 0)
        yield CounterMetricFamily("macula_gateway_directory_outages",
                                  "Times the cluster directory became unreachable",
                                  value=sync.outages if sync else 0)
        yield CounterMetricFamily("macula_gateway_directory_failures",
                                  "Failed exchanges with the cluster directory",
                                  value=sync.failures if sync else 0)
        yield CounterMetricFamily("macula_gateway_directory_bad_records",
                                  "Directory records that did not parse (skipped)",
                                  value=view.bad_records if view else 0)
        yield GaugeMetricFamily("macula_gateway_remote_nodes",
                                "Nodes homed at other members, as this gateway knows them",
                                value=len(view.remote) if view else 0)
        yield CounterMetricFamily("macula_gateway_mesh_sent_bytes",
                                  "Relayed payload bytes sent one hop to other members",
                                  value=mesh.relayed_bytes if mesh else 0)
        yield GaugeMetricFamily("macula_gateway_draining", "1 while draining",
                                value=1 if core.draining else 0)


class NodeCollector:
    def __init__(self, core: NodeCore) -> None:
        self._core = core

    def collect(self) -> Iterator[MetricFamily]:
        core = self._core
        yield GaugeMetricFamily("macula_node_registered", "1 when registered with the gateway",
                                value=1 if core.registered else 0)
        # Every path reads 0 rather than vanishing; bytes include closed sessions, so the
        # counters only ever grow (Prometheus rate() relies on it).
        by_path: Counter[str] = Counter({path: 0 for path in PATHS})
        sent: Counter[str] = Counter({path: 0 for path in PATHS})
        sent.update(core.closed_bytes_sent)
        received: Counter[str] = Counter({path: 0 for path in PATHS})
        received.update(core.closed_bytes_received)
        for session in core.sessions.values():
            if session.established and not session.closed:
                by_path[session.path] += 1
            for path, figures in session.stats.bytes_by_path.items():
                sent[path] += figures["sent"]
                received[path] += figures["received"]
        yield _labelled("macula_node_sessions", "Open sessions, by path", "path", by_path, counter=False)
        yield _labelled("macula_node_sent_bytes", "Bytes sent by sessions, by path", "path", sent)
        yield _labelled("macula_node_received_bytes", "Bytes received by sessions, by path",
                        "path", received)
        yield _labelled("macula_node_malformed_packets", "Malformed packets dropped, by kind",
                        "kind", core.malformed)
        yield _labelled("macula_node_dropped_packets", "Packets dropped, by reason", "reason", core.dropped)
        yield CounterMetricFamily("macula_node_gateway_reconnects", "Control reconnections",
                                  value=core.gateway_reconnects)
        yield _labelled("macula_node_punch_outcomes", "Punch attempts, by outcome or refusal",
                        "outcome", core.punch_outcomes)
        yield _labelled("macula_node_hard_nat", "Hard-NAT traversal: runs by role, guesses "
                        "sent, guesses answered, runs that ended direct", "what",
                        core.hard_nat_counts)
        yield GaugeMetricFamily("macula_node_extra_sockets",
                                "Sockets open beside the node's own one (port guessing)",
                                value=core.extra_sockets)
        for name, what in (("first_byte", "Session start to established (first byte can flow)"),
                           ("upgrade", "Punch start to the first session packet on a direct "
                                       "or TURN path"),
                           ("ice", "Punch start to the nominated ICE pair")):
            histogram = core.timings[name]
            yield HistogramMetricFamily(
                "macula_node_ice_negotiation_seconds" if name == "ice"
                else f"macula_node_{name}_seconds", what,
                buckets=histogram.buckets(), sum_value=histogram.total)
        relays = core.turn.stats()
        states: Counter[str] = Counter({"allocated": 0})
        states.update(r["state"] for r in relays)
        yield _labelled("macula_node_turn_allocations", "TURN allocations, by state", "state",
                        states, counter=False)
        turn_bytes = Counter({"to_relay": sum(r["bytes_to_relay"] for r in relays),
                              "from_relay": sum(r["bytes_from_relay"] for r in relays)})
        yield _labelled("macula_node_turn_bytes", "Payload bytes through TURN", "direction",
                        turn_bytes)
        stun_rate = GaugeMetricFamily("macula_node_stun_success_ratio",
                                      "Share of STUN queries answered, per configured server",
                                      labels=["server"])
        for server in core.stun_servers:
            rate = core.stun.server_stats(server).success_rate
            if rate is not None:
                stun_rate.add_metric([f"{server[0]}:{server[1]}"], rate)
        yield stun_rate
        yield GaugeMetricFamily("macula_node_stun_servers_unreachable",
                                "Configured STUN servers whose last query got no answer",
                                value=len(core.stun.unreachable_servers()))
        yield GaugeMetricFamily("macula_node_turn_servers_unreachable",
                                "Configured TURN servers without a working allocation",
                                value=sum(1 for r in relays if r["state"] != "allocated"))


def registry_for(collector: GatewayCollector | NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def serve(registry: CollectorRegistry, host: str, port: int,
          status: Callable[[], dict[str, Any]] | None = None) -> WSGIServer:
    """Serve /metrics (and /status, JSON, when `status` is given) in a background thread;
    returns the server (call .shutdown()). `status` runs on the caller's event loop, where
    the core lives, never on the server's thread."""
    metrics_app = make_wsgi_app(registry)
    loop = asyncio.get_running_loop() if status is not None else None

    async def snapshot() -> dict[str, Any]:
        assert status is not None
        return status()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if status is None or environ.get("PATH_INFO") != "/status":
            return cast(Iterable[bytes], metrics_app(environ, start_response))
        assert loop is not None
        try:
            body = json.dumps(asyncio.run_coroutine_threadsafe(snapshot(), loop).result(5))
            start_response("200 OK", [("Content-Type", "application/json")])
        except Exception as exc:  # the loop is gone or busy: say so, do not hang
            body = json.dumps({"error": f"status unavailable: {type(exc).__name__}"})
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
        return [body.encode()]

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise BindError("metrics", host, port, exc) from None
    thread = threading.Thread(target=server.serve_forever, name="macula-metrics", daemon=True)
    thread.start()
    return server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # one line per scrape on stderr is noise
