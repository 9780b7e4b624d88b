"""IPv6 in the kernel lab (root only): the ipv6_firewall preset's reply-only firewall, and a
dual-stack pair behind two of them that ends direct over IPv6.

Only lab namespaces and documentation prefixes (2001:db8::/32, 203.0.113.0/24, ...) are used.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from macula_lab.kernel import KernelLab, cleanup_leftovers, kernel_lab_available, netns
from macula_lab.kernel.nat_rules import IPV6_PRESETS, firewall6_ruleset, nat_chain
from macula_lab.kernel_trial import KernelMatrix
from macula_lab.matrix import run_matrix
from macula_lab.sim_trial import TrialOptions

AVAILABLE, REASON = kernel_lab_available()

kernel = pytest.mark.kernel
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")

DOC_V6 = ipaddress.ip_network("2001:db8::/32")

# A UDP socket in a namespace, driven by JSON lines on stdin: {"op": "send", ...} sends one
# datagram, {"op": "recv", "wait": s} reports what arrived within s seconds.
_POKE = r"""
import json, select, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "send":
        s.sendto(cmd["data"].encode(), (cmd["ip"], cmd["port"]))
        print(json.dumps({"sent": True}), flush=True)
    else:
        got, end = [], time.monotonic() + cmd["wait"]
        while (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, src = s.recvfrom(2048)
                got.append([src[0], src[1], data.decode()])
        print(json.dumps({"got": got}), flush=True)
"""


class Poke:
    def __init__(self, lab: KernelLab, ns: str, port: int) -> None:
        self.port = port
        self.proc = lab.popen(ns, [sys.executable, "-u", "-c", _POKE, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._answer(10.0) == {"ready": True}

    def _answer(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        import select

        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        assert ready, "poke process did not answer"
        return json.loads(self.proc.stdout.readline())

    def _ask(self, cmd: dict, timeout: float = 10.0) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def send(self, ip: str, port: int, data: str) -> None:
        assert self._ask({"op": "send", "ip": ip, "port": port, "data": data}) == {"sent": True}

    def recv(self, wait: float = 0.4) -> list[tuple[str, int, str]]:
        return [tuple(x) for x in self._ask({"op": "recv", "wait": wait}, wait + 10.0)["got"]]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _dropped(lab: KernelLab, router: str) -> int:
    """Packets the router's IPv6 firewall dropped as unsolicited (its named counter)."""
    out = lab.run(router, ["nft", "list", "counter", "ip6", "fw6", "unsolicited"]).stdout
    match = re.search(r"packets (\d+)", out)
    assert match, out
    return int(match.group(1))


def _our_namespaces(prefix: str) -> list[str]:
    return [n for n in netns.list_ns() if n.startswith(prefix)]


# --- pure ------------------------------------------------------------------------------------

def test_ipv6_preset_is_port_restricted_for_ipv4_and_firewalled_for_ipv6() -> None:
    assert IPV6_PRESETS == ("ipv6_firewall",)
    assert nat_chain("ipv6_firewall") == ("port_restricted",)
    rules = firewall6_ruleset()
    assert "table ip6 fw6" in rules and "nat" not in rules  # routed, never translated
    forward = rules.split("chain forward", 1)[1]
    assert "policy drop" in forward and "ct state established,related accept" in forward
    assert 'iifname "lan" oifname "wan" accept' in forward


# --- kernel ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Iterator[KernelLab]:
    if not AVAILABLE:
        pytest.skip(REASON)
    cleanup_leftovers("mlab")
    with KernelLab() as kl:
        prefix = kl.prefix
        yield kl
    assert _our_namespaces(prefix) == []


@kernel
@needs_kernel
def test_firewall_lets_only_replies_in(lab: KernelLab) -> None:
    pair = lab.build_pair("ipv6_firewall", "ipv6_firewall")
    pokes: list[Poke] = []
    try:
        a, b = pair.a, pair.b
        assert a.host_ip6 == f"2001:db8:{a.index}::2" and b.host_ip6 == f"2001:db8:{b.index}::2"
        assert all(ipaddress.ip_address(ip) in DOC_V6 for ip in (a.host_ip6, b.host_ip6))
        host_a, host_b = Poke(lab, a.host_ns, 4000), Poke(lab, b.host_ns, 4000)
        srv, srv2 = Poke(lab, lab.server_ns, 5000), Poke(lab, lab.server_ns, 5001)
        pokes += [host_a, host_b, srv, srv2]
        router_a, router_b = a.nat_ns[0], b.nat_ns[0]
        before = _dropped(lab, router_a)

        # Unsolicited: reaches A's router (its drop counter moves) and no further.
        srv.send(a.host_ip6, 4000, "unsolicited")
        assert host_a.recv() == []
        assert _dropped(lab, router_a) == before + 1

        # Outbound first: the server sees A's own address (no NAT66), its reply comes in...
        host_a.send(lab.server_ip6, 5000, "out")
        assert srv.recv() == [(a.host_ip6, 4000, "out")]
        srv.send(a.host_ip6, 4000, "reply")
        assert host_a.recv() == [(lab.server_ip6, 5000, "reply")]
        # ...but only from that flow: another port of the same server stays outside.
        srv2.send(a.host_ip6, 4000, "other port")
        assert host_a.recv() == []
        assert _dropped(lab, router_a) == before + 2

        # Host to host needs punching: A's first datagram dies at B's firewall; once B has
        # sent towards A (which A's own send opened), both directions pass.
        b_before = _dropped(lab, router_b)
        host_a.send(b.host_ip6, 4000, "a1")
        assert host_b.recv() == []
        assert _dropped(lab, router_b) == b_before + 1
        host_b.send(a.host_ip6, 4000, "b1")
        assert host_a.recv() == [(b.host_ip6, 4000, "b1")]
        host_a.send(b.host_ip6, 4000, "a2")
        assert host_b.recv() == [(a.host_ip6, 4000, "a2")]
    finally:
        for poke in pokes:
            poke.close()
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_other_presets_stay_ipv4_only(lab: KernelLab) -> None:
    pair = lab.build_pair("ipv6_firewall", "port_restricted")
    try:
        assert pair.b.host_ip6 is None
        for ns in (pair.b.host_ns, *pair.b.nat_ns):
            # No IPv6 address at all (not even link-local) outside the IPv6 presets.
            assert lab.run(ns, ["cat", "/proc/net/if_inet6"]).stdout.strip() == "", ns
    finally:
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_ipv6_pair_behind_stateful_firewalls_ends_direct_over_ipv6() -> None:
    started = time.monotonic()
    with KernelMatrix(TrialOptions(latency_ms=5, messages=100)) as matrix:
        assert matrix.lab is not None
        prefix = matrix.lab.prefix
        result = matrix.run_trial("ipv6_firewall", "ipv6_firewall", 0)
        mixed = matrix.run_trial("ipv6_firewall", "port_restricted", 0)
    assert _our_namespaces(prefix) == []
    assert result["connected"] and result["errors"] == [], result
    assert result["path"] == "direct", result
    assert result["lost"] == result["duplicated"] == 0, result
    host, _, port = result["direct_address"].rpartition(":")
    assert host.startswith("[") and int(port) > 0, result
    assert ipaddress.ip_address(host.strip("[]")) in DOC_V6, result
    # A dual-stack node whose peer has no IPv6 punches over IPv4 (same-family pairs only).
    assert mixed["connected"] and mixed["path"] == "direct", mixed
    assert mixed["lost"] == 0 and not mixed["direct_address"].startswith("["), mixed
    assert time.monotonic() - started < 60


@kernel
@needs_kernel
def test_matrix_row_counts_ipv6_direct_trials() -> None:
    with KernelMatrix(TrialOptions(messages=40)) as matrix:
        result = run_matrix(["ipv6_firewall"], 1, matrix.run_trial)
    (row,) = result["pairs"]
    assert row["connected"] == row["direct"] == row["direct_ipv6"] == 1, row
    assert result["summary"]["direct_ipv6"] == 1


@kernel
@needs_kernel
def test_ipv6_crosses_delay_lines_that_fix_checksums_in_python() -> None:
    """Without vnet headers the delay line recomputes UDP checksums itself: IPv6 too."""
    with KernelLab(delay_vnet=False) as kl:
        pair = kl.build_pair("ipv6_firewall", "open", latency_ms=(3, 0))
        host, srv = Poke(kl, pair.a.host_ns, 4000), Poke(kl, kl.server_ns, 5000)
        try:
            for n in range(3):
                host.send(kl.server_ip6, 5000, f"ping{n}")
                assert srv.recv() == [(pair.a.host_ip6, 4000, f"ping{n}")]
                srv.send(pair.a.host_ip6, 4000, f"pong{n}")
                assert host.recv() == [(kl.server_ip6, 5000, f"pong{n}")]
        finally:
            host.close()
            srv.close()
        prefix = kl.prefix
    assert _our_namespaces(prefix) == []
