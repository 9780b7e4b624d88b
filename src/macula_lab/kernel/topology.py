"""KernelLab: the natlab.md topology built from network namespaces, veth pairs and nftables.

    internet ns  br0: 203.0.113.1/24 + 198.51.100.1/24, forwarding on
    server ns    eth0: 203.0.113.10/24 + 203.0.113.20/24 (two IPs for RFC 5780 tests)
    peer i       [delay ns] - NAT ns(s) for the preset - host ns 192.168.i.2/24

IPv6 exists only once an ipv6_firewall peer joins: br0 2001:db8::1/64, server
2001:db8::10/64, that peer's router wan 2001:db8::(10+i)/64 and lan 2001:db8:i::1/64, its
host 2001:db8:i::2/64; the internet ns routes each such lan to its router. No NAT66: the
router's stateful firewall (nat_rules.firewall6_ruleset) only lets replies in. Addresses
are added without DAD, so they are usable at once.

Every peer gets fresh namespaces and subnets (conntrack outlives sockets, so reusing a NAT
between cases would leak state). Links on the internet segment use fixed MACs and
permanent ARP entries, so no ARP exchange ever crosses a delay line.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

from macula_lab.kernel import miniupnpd, netns
from macula_lab.kernel.nat_rules import (
    IPV6_PRESETS,
    LAB_PROXY,
    PORTMAP_PRESETS,
    TCP_PRESETS,
    NatOptions,
    conntrack_sysctls,
    firewall6_ruleset,
    nat_chain,
    ruleset,
    udp_block_ruleset,
)
from macula_lab.kernel.netns import LabError

SERVER_IPS = ("203.0.113.10", "203.0.113.20")
SERVER_GW = "203.0.113.1"
PUBLIC_GW = "198.51.100.1"
MAX_PEERS = 200  # 198.51.100.(10+i) and 192.168.i.0/24 must stay valid
DELAY_READY_TIMEOUT = 15.0
REBIND_PORT_BASE = 20000  # external ports rebind_nat hands out, one new port per rebind
# Fixed MACs on the internet segment (tag 1 = lab infrastructure, tag 2 = peer uplinks).
BR_MAC = netns.mac_for(1, 1)
SERVER_MAC = netns.mac_for(1, 2)
# IPv6 (documentation prefix 2001:db8::/32 only): the internet segment is 2001:db8::/64.
INET_IP6 = "2001:db8::1"
SERVER_IP6 = "2001:db8::10"


def wan_ip6(i: int) -> str:
    return f"2001:db8::{10 + i}"


def lan_net6(i: int) -> str:
    return f"2001:db8:{i}::"


def v6_sysctls(*, router: bool) -> dict[str, int]:
    """IPv6 on, for a namespace of an IPv6 preset: no DAD (addresses usable at once), no
    router advertisements or solicitations (routes are static); routers forward."""
    values = {}
    for scope in ("all", "default"):
        values.update({f"net.ipv6.conf.{scope}.disable_ipv6": 0,
                       f"net.ipv6.conf.{scope}.accept_dad": 0,
                       f"net.ipv6.conf.{scope}.accept_ra": 0,
                       f"net.ipv6.conf.{scope}.router_solicitations": 0})
    values["net.ipv6.conf.all.forwarding"] = 1 if router else 0
    return values


def _if_v6_sysctls(ifname: str, *, router: bool) -> dict[str, int]:
    # Per interface, in this order: DAD off before IPv6 comes up on it.
    return {f"net.ipv6.conf.{ifname}.accept_dad": 0,
            f"net.ipv6.conf.{ifname}.accept_ra": 0,
            f"net.ipv6.conf.{ifname}.router_solicitations": 0,
            f"net.ipv6.conf.{ifname}.disable_ipv6": 0,
            **({"net.ipv6.conf.all.forwarding": 1} if router else {})}


@dataclass
class Peer:
    """One side of a pair: a host behind zero, one or two NATs."""

    index: int
    preset: str
    host_ns: str
    host_ip: str
    public_ip: str  # the outermost address on the internet segment (the NAT's wan)
    nat_ns: tuple[str, ...]  # outermost first; empty for "open"
    host_ip6: str | None = None  # IPv6 presets: the host's global address
    delay_ns: str | None = None
    owned_ns: list[str] = field(default_factory=list)  # created for this peer, torn down with it
    delay_proc: subprocess.Popen[str] | None = None
    igd: miniupnpd.IgdDaemon | None = None  # the router's miniupnpd (symmetric_upnp)


@dataclass
class LabPair:
    """Two peers plus the lab's server, as returned by KernelLab.build_pair."""

    a: Peer
    b: Peer
    server_ns: str
    server_ips: tuple[str, str] = SERVER_IPS

    @property
    def host_a_ns(self) -> str:
        return self.a.host_ns

    @property
    def host_b_ns(self) -> str:
        return self.b.host_ns

    @property
    def host_a_ip(self) -> str:
        return self.a.host_ip

    @property
    def host_b_ip(self) -> str:
        return self.b.host_ip

    @property
    def preset_a(self) -> str:
        return self.a.preset

    @property
    def preset_b(self) -> str:
        return self.b.preset


@dataclass
class _Uplink:
    ns: str
    ifname: str
    ip: str
    mac: str


class KernelLab:
    """Context manager owning every namespace and process of one lab.

    `with KernelLab() as lab: pair = lab.build_pair("symmetric", "cgnat", latency_ms=10)`.
    Several pairs may live in one lab; `remove_pair` frees one early.
    """

    def __init__(self, prefix: str | None = None, *, max_seconds: float = 3600.0,
                 delay_vnet: bool = True) -> None:
        self.prefix = prefix or netns.default_prefix()
        if not self.prefix.startswith("mlab"):
            raise ValueError("lab prefixes start with 'mlab' so leftovers can be found")
        self.max_seconds = max_seconds  # hard lifetime cap handed to background processes
        # False makes delay lines fix checksums in Python instead of using vnet headers.
        self.delay_vnet = delay_vnet
        self.inet_ns = self.prefix + "inet"
        self.server_ns = self.prefix + "srv"
        self.server_ips = SERVER_IPS
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._peers: dict[int, Peer] = {}
        self._uplinks: dict[int, _Uplink] = {}
        self._next_index = 1
        self._lan_ports: dict[str, int] = {}
        self._stun_proc: subprocess.Popen[str] | None = None  # for miniupnpd's STUN test
        # For faults: each NAT namespace's ruleset inputs, each delay line's control file,
        # each host's current uplink interface.
        self._nat_rules: dict[str, tuple[str, str, str, NatOptions]] = {}
        self._control_dir: str | None = None
        self._loss_control: dict[int, str] = {}
        self._host_if: dict[int, str] = {}
        self._v6_core = False  # IPv6 on the internet segment, set up with the first v6 peer
        self._next_external_port = REBIND_PORT_BASE
        self._moves = 0
        self._started = False
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> KernelLab:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        if self._started:
            return
        ok, reason = netns.kernel_lab_available()
        if not ok:
            raise LabError(reason)
        netns.cleanup_leftovers("mlab")
        netns.claim_prefix(self.prefix)
        _register(self)
        self._started = True
        try:
            self._build_core()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every process this lab started and delete all its namespaces (idempotent)."""
        with self._lock:
            procs, self._procs = self._procs, []
            for peer in self._peers.values():
                if peer.delay_proc is not None:
                    procs.append(peer.delay_proc)
                    peer.delay_proc = None
                if peer.igd is not None:
                    peer.igd.stop()
                    peer.igd = None
            self._stun_proc = None  # in self._procs, stopped with them
            _stop_procs(procs)
            namespaces, self._namespaces = self._namespaces, []
            for name in reversed(namespaces):
                netns.del_ns(name)
            self._peers.clear()
            self._uplinks.clear()
            self._nat_rules.clear()
            self._v6_core = False
            if self._control_dir is not None:
                shutil.rmtree(self._control_dir, ignore_errors=True)
                self._control_dir = None
            if self._started:
                self._started = False
                netns.release_prefix(self.prefix)
                _unregister(self)

    # --- building ---------------------------------------------------------------------------

    def _new_ns(self, suffix: str, *, router: bool, extra: dict[str, int] | None = None) -> str:
        name = self.prefix + suffix
        netns.add_ns(name)
        self._namespaces.append(name)
        values = netns.base_sysctls(router=router)
        values.update(extra or {})
        netns.set_sysctls(name, values)
        return name

    def _build_core(self) -> None:
        inet = self._new_ns("inet", router=True)
        srv = self._new_ns("srv", router=False)
        netns.add_bridge(inet, "br0", mac=BR_MAC)
        netns.add_veth(srv, "eth0", inet, "srv", mac_a=SERVER_MAC, mac_b=netns.mac_for(1, 3))
        netns.ip_batch(inet, [
            "addr add 203.0.113.1/24 dev br0",
            "addr add 198.51.100.1/24 dev br0",
            "link set srv master br0 up",
            *(f"neigh replace {ip} lladdr {SERVER_MAC} dev br0 nud permanent"
              for ip in SERVER_IPS),
        ])
        netns.ip_batch(srv, [
            "link set eth0 up",
            *(f"addr add {ip}/24 dev eth0" for ip in SERVER_IPS),
            f"neigh replace {SERVER_GW} lladdr {BR_MAC} dev eth0 nud permanent",
            f"route replace default via {SERVER_GW} dev eth0",
        ])

    def build_pair(self, preset_a: str, preset_b: str, *,
                   latency_ms: float | tuple[float, float] = 0.0,
                   loss: float | tuple[float, float] = 0.0, seed: int = 0,
                   hairpin: bool = False, mapping_timeout: int | None = None,
                   shared_nat: bool = False) -> LabPair:
        """Two peers with fresh namespaces; latency/loss apply per uplink (each direction).

        `shared_nat` puts b behind a's outermost NAT (a second host on the same lan, or for
        cgnat a second home NAT on the same carrier) - the case hairpinning is about.
        """
        self._require_started()
        lat = _per_side(latency_ms)
        los = _per_side(loss)
        options = NatOptions(hairpin=hairpin, mapping_timeout=mapping_timeout)
        if shared_nat and (preset_a != preset_b or preset_a == "open"):
            raise ValueError("shared_nat needs the same NAT preset (not open) on both sides")
        a = self._add_peer(preset_a, lat[0], los[0], seed * 2, options)
        b: Peer | None = None
        try:
            if shared_nat:
                b = self._add_behind(a, options)
            else:
                b = self._add_peer(preset_b, lat[1], los[1], seed * 2 + 1, options)
            self._await_delay_lines([a, b])
        except BaseException:
            if b is not None:
                self.remove_peer(b)
            self.remove_peer(a)
            raise
        return LabPair(a=a, b=b, server_ns=self.server_ns, server_ips=self.server_ips)

    def add_peer(self, preset: str, *, latency_ms: float = 0.0, loss: float = 0.0,
                 seed: int = 0, hairpin: bool = False,
                 mapping_timeout: int | None = None) -> Peer:
        """One peer on its own (for labs that need more than pairs)."""
        self._require_started()
        peer = self._add_peer(preset, latency_ms, loss, seed,
                              NatOptions(hairpin=hairpin, mapping_timeout=mapping_timeout))
        try:
            self._await_delay_lines([peer])
        except BaseException:
            self.remove_peer(peer)
            raise
        return peer

    def remove_pair(self, pair: LabPair) -> None:
        self.remove_peer(pair.b)
        self.remove_peer(pair.a)

    def remove_peer(self, peer: Peer) -> None:
        """Tear down one peer's processes and namespaces now (the rest of the lab stays)."""
        with self._lock:
            if peer.delay_proc is not None:
                _stop_procs([peer.delay_proc])
                peer.delay_proc = None
            if peer.igd is not None:
                peer.igd.stop()
                peer.igd = None
            for name in reversed(peer.owned_ns):
                netns.del_ns(name)
                if name in self._namespaces:
                    self._namespaces.remove(name)
                self._lan_ports.pop(name, None)
                self._nat_rules.pop(name, None)
            peer.owned_ns.clear()
            self._host_if.pop(peer.index, None)
            if peer.host_ip6 is not None and peer.preset in IPV6_PRESETS and self._v6_core:
                netns.run(["ip", "-n", self.inet_ns, "-6", "route", "del",
                           f"{lan_net6(peer.index)}/64"], check=False)
            control = self._loss_control.pop(peer.index, None)
            if control is not None and os.path.exists(control):
                os.remove(control)
            self._peers.pop(peer.index, None)
            self._uplinks.pop(peer.index, None)

    def _require_started(self) -> None:
        if not self._started:
            raise LabError("KernelLab is not started: use it as a context manager")

    def _take_index(self) -> int:
        if self._next_index > MAX_PEERS:
            raise LabError(f"lab {self.prefix} ran out of peer subnets ({MAX_PEERS} peers)")
        index = self._next_index
        self._next_index += 1
        return index

    def _add_peer(self, preset: str, latency_ms: float, loss: float, seed: int,
                  options: NatOptions) -> Peer:
        kinds = nat_chain(preset)  # validates the preset name
        if latency_ms < 0 or not 0.0 <= loss < 1.0:
            raise ValueError(f"need latency_ms >= 0 and 0 <= loss < 1 (got {latency_ms}, {loss})")
        i = self._take_index()
        peer = Peer(index=i, preset=preset, host_ns=self.prefix + f"h{i}", host_ip="",
                    public_ip=f"198.51.100.{10 + i}", nat_ns=())
        self._peers[i] = peer
        try:
            self._build_peer(peer, kinds, latency_ms, loss, seed, options)
        except BaseException:
            self.remove_peer(peer)
            raise
        return peer

    def _build_peer(self, peer: Peer, kinds: Sequence[str], latency_ms: float, loss: float,
                    seed: int, options: NatOptions) -> None:
        i = peer.index
        # "c" = carrier (outer NAT of cgnat), "n" = the NAT next to the host.
        nat_names = {0: [], 1: [f"n{i}"], 2: [f"c{i}", f"n{i}"]}[len(kinds)]
        ct = conntrack_sysctls(options)
        v6 = peer.preset in IPV6_PRESETS
        nats = [self._own(peer, self._new_ns(n, router=True,
                                             extra=v6_sysctls(router=True) if v6 else None))
                for n in nat_names]
        host = self._own(peer, self._new_ns(f"h{i}", router=False,
                                            extra=v6_sysctls(router=False) if v6 else None))
        peer.nat_ns = tuple(nats)

        outer = nats[0] if nats else host
        outer_if = "wan" if nats else "eth0"
        self._attach_internet(peer, outer, outer_if, latency_ms, loss, seed)

        # Inner levels: each NAT's lan bridge carries the next NAT's wan, the last one the host.
        for level, (ns, kind) in enumerate(zip(nats, kinds)):
            inner_is_nat = level + 1 < len(nats)
            lan_net = f"100.64.{i}" if inner_is_nat else f"192.168.{i}"
            wan_ip = peer.public_ip if level == 0 else f"100.64.{i}.2"
            _make_lan(ns, lan_net)
            netns.nft_apply(ns, ruleset(kind, wan_ip=wan_ip, lan_net=f"{lan_net}.0/24",
                                        options=options))
            self._nat_rules[ns] = (kind, wan_ip, f"{lan_net}.0/24", options)
            if ct:
                netns.set_sysctls(ns, ct)
            child, child_if = (nats[level + 1], "wan") if inner_is_nat else (host, "eth0")
            self._attach_lan(ns, child, child_if, f"{lan_net}.2", f"{lan_net}.1")
        peer.host_ip = f"192.168.{i}.2" if nats else peer.public_ip
        if v6:
            self._route_v6(peer, nats[0], host)
        if peer.preset in PORTMAP_PRESETS:
            peer.igd = self._start_igd(nats[0], peer.public_ip, f"192.168.{i}.0/24")
        if peer.preset in TCP_PRESETS:
            netns.nft_apply(nats[0], udp_block_ruleset(
                LAB_PROXY if peer.preset == "proxy_only" else None))

    def _ensure_v6_core(self) -> None:
        """IPv6 on the internet bridge and the server, once (labs without IPv6 peers never
        see an IPv6 packet)."""
        if self._v6_core:
            return
        netns.set_sysctls(self.inet_ns, _if_v6_sysctls("br0", router=True))
        netns.set_sysctls(self.server_ns, _if_v6_sysctls("eth0", router=False))
        netns.ip_batch(self.inet_ns, [
            f"addr add {INET_IP6}/64 dev br0 nodad",
            f"neigh replace {SERVER_IP6} lladdr {SERVER_MAC} dev br0 nud permanent",
        ])
        netns.ip_batch(self.server_ns, [
            f"addr add {SERVER_IP6}/64 dev eth0 nodad",
            f"neigh replace {INET_IP6} lladdr {BR_MAC} dev eth0 nud permanent",
            f"route replace default via {INET_IP6} dev eth0",
        ])
        self._v6_core = True

    def _route_v6(self, peer: Peer, router: str, host: str) -> None:
        """An IPv6 preset's routed half: wan and lan addresses, routes both ways through the
        internet ns (inside the lab only), and the reply-only firewall."""
        self._ensure_v6_core()
        i = peer.index
        lan, wan = lan_net6(i), wan_ip6(i)
        # Pinned neighbours on the internet segment, as for IPv4: no discovery crosses a
        # delay line.
        netns.ip_batch(router, [
            f"addr add {wan}/64 dev wan nodad",
            f"neigh replace {INET_IP6} lladdr {BR_MAC} dev wan nud permanent",
            f"neigh replace {SERVER_IP6} lladdr {SERVER_MAC} dev wan nud permanent",
            f"route replace default via {INET_IP6} dev wan",
            f"addr add {lan}1/64 dev lan nodad",
        ])
        netns.nft_apply(router, firewall6_ruleset())
        netns.ip_batch(self.inet_ns, [
            f"neigh replace {wan} lladdr {self._uplinks[i].mac} dev br0 nud permanent",
            f"route replace {lan}/64 via {wan} dev br0",
        ])
        self._host_v6(peer, host, lan, 2)

    def _host_v6(self, peer: Peer, host: str, lan: str, n: int) -> None:
        netns.ip_batch(host, [f"addr add {lan}{n}/64 dev eth0 nodad",
                              f"route replace default via {lan}1 dev eth0"])
        peer.host_ip6 = f"{lan}{n}"

    @property
    def server_ip6(self) -> str:
        return SERVER_IP6

    def _start_igd(self, ns: str, wan_ip: str, lan_net: str) -> miniupnpd.IgdDaemon:
        """miniupnpd on the NAT's lan; its STUN test needs the lab's responder running."""
        ok, reason = miniupnpd.miniupnpd_available()
        if not ok:
            raise LabError(reason)
        binds = miniupnpd.stun_binds(self.server_ips)
        if self._stun_proc is None or self._stun_proc.poll() is not None:
            proc = self.popen_python(
                self.server_ns, "macula_lab.kernel.miniupnpd",
                *miniupnpd.stun_argv(binds, self.max_seconds, os.getpid()),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            ready = ""
            if proc.stdout is not None and select.select([proc.stdout], [], [], 15.0)[0]:
                ready = proc.stdout.readline()
            if not ready.startswith('{"ready"'):
                _stop_procs([proc])
                raise LabError(f"STUN responder for miniupnpd did not start: {ready!r}")
            self._stun_proc = proc
        netns.nft_apply(ns, miniupnpd.router_rules(wan_ip=wan_ip, stun_ips=self.server_ips))
        return miniupnpd.start_daemon(netns.popen_in, ns, lan_net=lan_net, stun=binds[0])

    def _add_behind(self, a: Peer, options: NatOptions) -> Peer:
        """A second peer sharing a's outermost NAT (its lan gets a .3 address)."""
        j = self._take_index()
        outer = a.nat_ns[0]
        peer = Peer(index=j, preset=a.preset, host_ns=self.prefix + f"h{j}", host_ip="",
                    public_ip=a.public_ip, nat_ns=())
        self._peers[j] = peer
        v6 = a.preset in IPV6_PRESETS
        try:
            host = self._own(peer, self._new_ns(f"h{j}", router=False,
                                                extra=v6_sysctls(router=False) if v6 else None))
            lan = f"100.64.{a.index}" if a.preset == "cgnat" else f"192.168.{a.index}"
            if a.preset == "cgnat":
                # Own home NAT with its own lan, wan on the shared carrier's lan.
                home = self._own(peer, self._new_ns(f"n{j}", router=True,
                                                    extra=conntrack_sysctls(options)))
                wan_ip = f"{lan}.3"
                self._attach_lan(outer, home, "wan", wan_ip, f"{lan}.1")
                _make_lan(home, f"192.168.{j}")
                netns.nft_apply(home, ruleset("port_restricted", wan_ip=wan_ip,
                                              lan_net=f"192.168.{j}.0/24", options=options))
                self._attach_lan(home, host, "eth0", f"192.168.{j}.2", f"192.168.{j}.1")
                peer.nat_ns = (outer, home)
                peer.host_ip = f"192.168.{j}.2"
            else:
                self._attach_lan(outer, host, "eth0", f"{lan}.3", f"{lan}.1")
                peer.nat_ns = (outer,)
                peer.host_ip = f"{lan}.3"
                if v6:
                    self._host_v6(peer, host, lan_net6(a.index), 3)
        except BaseException:
            self.remove_peer(peer)
            raise
        return peer

    def _own(self, peer: Peer, name: str) -> str:
        peer.owned_ns.append(name)
        return name

    def _attach_lan(self, router: str, child: str, child_if: str, ip: str, gw: str) -> None:
        port = self._lan_ports.get(router, 0)
        self._lan_ports[router] = port + 1
        name = f"lp{port}"
        netns.add_veth(router, name, child, child_if)
        netns.ip_batch(router, [f"link set {name} master lan up"])
        netns.ip_batch(child, [
            f"link set {child_if} up",
            f"addr add {ip}/24 dev {child_if}",
            f"route replace default via {gw} dev {child_if}",
        ])

    def _attach_internet(self, peer: Peer, ns: str, ifname: str, latency_ms: float,
                         loss: float, seed: int) -> None:
        i = peer.index
        mac = netns.mac_for(2, i)
        port = f"p{i}"
        if latency_ms > 0 or loss > 0:
            delay = self._own(peer, self._new_ns(f"d{i}", router=False))
            peer.delay_ns = delay
            netns.add_veth(ns, ifname, delay, "nat", mac_a=mac)
            netns.add_veth(delay, "inet", self.inet_ns, port)
            netns.ip_batch(delay, ["link set nat up promisc on", "link set inet up promisc on"])
            peer.delay_proc = self._start_delay_line(delay, latency_ms, loss, seed,
                                                     control=self._control_file(i))
        else:
            netns.add_veth(ns, ifname, self.inet_ns, port, mac_a=mac)
        netns.ip_batch(self.inet_ns, [
            f"link set {port} master br0 up",
            f"neigh replace {peer.public_ip} lladdr {mac} dev br0 nud permanent",
        ])
        others = list(self._uplinks.values())
        netns.ip_batch(ns, [
            f"link set {ifname} up",
            f"addr add {peer.public_ip}/24 dev {ifname}",
            f"neigh replace {PUBLIC_GW} lladdr {BR_MAC} dev {ifname} nud permanent",
            *(f"neigh replace {o.ip} lladdr {o.mac} dev {ifname} nud permanent" for o in others),
            f"route replace default via {PUBLIC_GW} dev {ifname}",
        ])
        # Peers on the same /24 talk directly over the bridge: teach them each other too.
        for other in others:
            netns.ip_batch(other.ns, [
                f"neigh replace {peer.public_ip} lladdr {mac} dev {other.ifname} nud permanent"])
        self._uplinks[i] = _Uplink(ns=ns, ifname=ifname, ip=peer.public_ip, mac=mac)

    def _control_file(self, index: int) -> str:
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix=f"{self.prefix}ctl-")
        path = os.path.join(self._control_dir, f"d{index}.json")
        self._loss_control[index] = path
        return path

    def _start_delay_line(self, ns: str, latency_ms: float, loss: float,
                          seed: int, control: str | None = None) -> subprocess.Popen[str]:
        argv = netns.python_argv(
            "macula_lab.kernel.delay", "--in", "nat", "--out", "inet",
            "--delay-ms", str(latency_ms), "--loss", str(loss), "--seed", str(seed),
            "--max-seconds", str(self.max_seconds), "--parent-pid", str(os.getpid()),
            *([] if self.delay_vnet else ["--no-vnet"]),
            *(["--control", control] if control else []))
        # Own session: a terminal's Ctrl-C reaches us, and our teardown stops it in order.
        return netns.popen_in(ns, argv, env=netns.python_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)

    def _await_delay_lines(self, peers: Sequence[Peer]) -> None:
        deadline = time.monotonic() + DELAY_READY_TIMEOUT
        for peer in peers:
            proc = peer.delay_proc
            if proc is None or proc.stdout is None:
                continue
            line = ""
            left = deadline - time.monotonic()
            if left > 0 and select.select([proc.stdout], [], [], left)[0]:
                line = proc.stdout.readline()
            if not line.startswith('{"ready"'):
                _stop_procs([proc])
                err = proc.stderr.read() if proc.stderr else ""
                raise LabError(f"delay line in {peer.delay_ns} did not start: {line!r} {err}")

    # --- faults -----------------------------------------------------------------------------

    def set_loss(self, peer: Peer, loss: float, burst: float = 1.0) -> None:
        """Change a peer's uplink loss live (both directions): `loss` on average, in bursts
        of `burst` frames (Gilbert-Elliott when > 1). The peer needs a delay line: build it
        with latency_ms > 0 or loss > 0."""
        proc, path = peer.delay_proc, self._loss_control.get(peer.index)
        if proc is None or path is None or proc.poll() is not None:
            raise LabError(f"peer {peer.index} has no running delay line to impair")
        if not 0.0 <= loss < 1.0 or burst < 1.0:
            raise ValueError("need 0 <= loss < 1 and burst >= 1")
        with open(path, "w", encoding="utf8") as fh:
            json.dump({"loss": loss, "burst": burst}, fh)
        proc.send_signal(signal.SIGUSR1)

    def rebind_nat(self, peer: Peer) -> int | None:
        """The peer's public NAT forgets every mapping and hands out new ports: conntrack
        flushed and, for cone NATs (which would preserve the same port again), every flow
        of the NAT's one host mapped to a fresh external port. Returns that port (None for
        symmetric NATs, whose new ports are random anyway). Made for a host with one
        socket, as a node has: a second socket talking to the same destination cannot
        share that port while the first one's conntrack entry lives, and is dropped."""
        if not peer.nat_ns:
            raise LabError(f"peer {peer.index} ({peer.preset}) has no NAT to rebind")
        ns = peer.nat_ns[0]
        kind, wan_ip, lan_net, options = self._nat_rules[ns]
        port: int | None = None
        if kind != "symmetric":
            port = self._next_external_port
            self._next_external_port += 1
            options = dataclasses.replace(options, external_port=port)
            netns.nft_apply(ns, ruleset(kind, wan_ip=wan_ip, lan_net=lan_net, options=options))
            self._nat_rules[ns] = (kind, wan_ip, lan_net, options)
        self.flush_conntrack(ns)
        return port

    def block_between(self, peer: Peer, other_ip: str, blocked: bool = True) -> None:
        """A firewall at `peer`'s edge (its outermost NAT, or the host when open) that drops
        everything to and from `other_ip` while `blocked`; the rest of the internet, the
        gateway included, stays reachable."""
        ns = peer.nat_ns[0] if peer.nat_ns else peer.host_ns
        if not blocked:
            netns.run_in(ns, ["nft", "delete", "table", "inet", "macula_outage"], check=False)
            return
        netns.nft_apply(ns, f"""table inet macula_outage {{
    chain forward {{ type filter hook forward priority -10; policy accept;
        ip daddr {other_ip} drop; ip saddr {other_ip} drop; }}
    chain input {{ type filter hook input priority -10; policy accept; ip saddr {other_ip} drop; }}
    chain output {{ type filter hook output priority -10; policy accept; ip daddr {other_ip} drop; }}
}}
""")

    def block_udp(self, peer: Peer, blocked: bool = True, *, proxy_only: bool = False) -> None:
        """`peer`'s outermost NAT drops every UDP packet it would forward (and with
        `proxy_only` everything but TCP to the lab's proxy), until unblocked."""
        ns = peer.nat_ns[0] if peer.nat_ns else peer.host_ns
        netns.run_in(ns, ["nft", "delete", "table", "inet", "macula_udp"], check=False)
        if blocked:  # the rule comes before conntrack's verdicts: tracked flows stop too
            netns.nft_apply(ns, udp_block_ruleset(LAB_PROXY if proxy_only else None))

    def flush_conntrack(self, ns: str) -> None:
        """`conntrack -F` inside one lab namespace (over ctnetlink: no conntrack tool)."""
        proc = self.run_python(ns, "macula_lab.kernel.conntrack", "flush", timeout=15.0,
                               check=False)
        if proc.returncode != 0:
            raise LabError(f"conntrack flush in {ns} failed: {proc.stdout.strip()} "
                           f"{proc.stderr.strip()}")

    def move_host(self, peer: Peer, to: Peer) -> str:
        """Unplug `peer`'s host from its LAN and plug it into `to`'s innermost LAN (another
        network, behind `to`'s NATs), keeping its sockets: a laptop changing networks.
        Returns the host's new address."""
        if not to.nat_ns:
            raise LabError("move_host needs a destination behind a NAT")
        self._check_ns(peer.host_ns)
        self._moves += 1
        old_if = self._host_if.get(peer.index, "eth0")
        new_if = f"eth{self._moves}"
        lan = f"192.168.{to.index}"
        ip = f"{lan}.{100 + self._moves}"
        self._attach_lan(to.nat_ns[-1], peer.host_ns, new_if, ip, f"{lan}.1")
        netns.run(["ip", "-n", peer.host_ns, "link", "del", old_if])
        self._host_if[peer.index] = new_if
        peer.host_ip = ip
        return ip

    # --- running things inside the lab ---------------------------------------------------

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside one of this lab's namespaces; it is killed on teardown."""
        self._check_ns(ns)
        self._procs = [p for p in self._procs if p.poll() is None]
        proc = netns.popen_in(ns, argv, **kwargs)
        self._procs.append(proc)
        return proc

    def tcp_open(self, ns: str, ip: str, port: int, timeout: float = 0.5) -> bool:
        """Whether a TCP connect to ip:port succeeds from inside `ns`."""
        self._check_ns(ns)
        code = ("import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                "float(sys.argv[3])).close()")
        proc = netns.run_in(ns, [sys.executable, "-c", code, ip, str(port), str(timeout)],
                            check=False, timeout=timeout + 5.0)
        return proc.returncode == 0

    def popen_python(self, ns: str, module: str, *args: str,
                     **kwargs: Any) -> subprocess.Popen[Any]:
        """`python -m module args` inside `ns`, importing this macula tree."""
        kwargs.setdefault("env", netns.python_env())
        return self.popen(ns, netns.python_argv(module, *args), **kwargs)

    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command to completion inside one of this lab's namespaces."""
        self._check_ns(ns)
        return netns.run_in(ns, argv, **kwargs)

    def run_python(self, ns: str, module: str, *args: str, timeout: float = 60.0,
                   **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("env", netns.python_env())
        return self.run(ns, netns.python_argv(module, *args), timeout=timeout, **kwargs)

    def delay_stats(self, peer: Peer) -> dict[str, Any] | None:
        """Stop a peer's delay line and return its counters (forwarded/lost/dropped)."""
        proc = peer.delay_proc
        if proc is None:
            return None
        peer.delay_proc = None
        _stop_procs([proc])
        out = proc.stdout.read() if proc.stdout else ""
        for line in out.splitlines():
            if line.startswith('{"stats"'):
                stats: dict[str, Any] = json.loads(line)["stats"]
                return stats
        return None

    def _check_ns(self, ns: str) -> None:
        if ns not in self._namespaces:
            raise LabError(f"{ns!r} is not a namespace of lab {self.prefix}")

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)


def _make_lan(ns: str, net: str) -> None:
    """The NAT's inside: a bridge named "lan" holding NET.1/24 (more hosts can join it)."""
    netns.ip_batch(ns, [
        "link add lan type bridge stp_state 0 forward_delay 0",
        "link set lan up",
        f"addr add {net}.1/24 dev lan",
    ])


def _per_side(value: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _stop_procs(procs: Sequence[subprocess.Popen[Any]], grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace` s in total, then SIGKILL; always reaps."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- process-wide teardown: atexit and SIGTERM/SIGHUP ----------------------------------------

_LIVE: list[KernelLab] = []
_PREV_HANDLERS: dict[int, Any] = {}
_ATEXIT_DONE = False


def close_all() -> None:
    """Tear down every lab still open in this process."""
    for lab in list(_LIVE):
        try:
            lab.close()
        except Exception:  # teardown must go on for the other labs
            pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    close_all()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def _register(lab: KernelLab) -> None:
    global _ATEXIT_DONE
    _LIVE.append(lab)
    if not _ATEXIT_DONE:
        atexit.register(close_all)
        _ATEXIT_DONE = True
    # Handlers can only be installed from the main thread; SIGINT already unwinds `with`.
    if threading.current_thread() is threading.main_thread() and not _PREV_HANDLERS:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            _PREV_HANDLERS[signum] = signal.signal(signum, _on_signal)


def _unregister(lab: KernelLab) -> None:
    if lab in _LIVE:
        _LIVE.remove(lab)
    if not _LIVE and _PREV_HANDLERS and threading.current_thread() is threading.main_thread():
        for signum, prev in _PREV_HANDLERS.items():
            signal.signal(signum, prev)
        _PREV_HANDLERS.clear()
