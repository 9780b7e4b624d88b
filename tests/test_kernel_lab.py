"""Kernel NAT lab: rulesets and codecs (always), namespaces + nftables (root only).

The kernel tests in the default run are a short smoke set; the full six-preset table, the
21-pair punching matrix, hairpinning and mapping timeouts run with MACULA_LAB_FULL=1.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula_lab.kernel import (
    PRESETS,
    KernelLab,
    NatOptions,
    cleanup_leftovers,
    kernel_lab_available,
    netns,
    probes,
)
from macula_lab.kernel.addrprobe import classify_mapping
from macula_lab.kernel.delay import SO_TIMESTAMPNS, arrival_time, fix_l4_checksum, inet_checksum
from macula_lab.kernel.nat_rules import conntrack_sysctls, nat_chain, ruleset

AVAILABLE, REASON = kernel_lab_available()
FULL = os.environ.get("MACULA_LAB_FULL") == "1"

kernel = pytest.mark.kernel
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
needs_full = pytest.mark.skipif(not FULL, reason="full kernel NAT matrix: set MACULA_LAB_FULL=1")


# --- pure: rulesets, checksums, expectations -------------------------------------------------

def test_presets_and_chains() -> None:
    assert PRESETS == ("open", "full_cone", "restricted_cone", "port_restricted", "symmetric",
                       "cgnat")
    assert nat_chain("open") == ()
    assert nat_chain("cgnat") == ("port_restricted", "port_restricted")
    assert nat_chain("symmetric") == ("symmetric",)
    with pytest.raises(ValueError, match="unknown NAT preset"):
        nat_chain("cone")


def test_rulesets_follow_natlab() -> None:
    wan, lan = "198.51.100.11", "192.168.1.0/24"
    base = ruleset("port_restricted", wan_ip=wan, lan_net=lan)
    assert "policy drop" in base.split("chain input", 1)[1].split("}", 1)[0]
    assert 'oifname "wan" masquerade\n' in base
    assert "map " not in base and "dnat" not in base.split("chain forward")[0]
    assert 'oifname "wan" masquerade fully-random' in ruleset("symmetric", wan_ip=wan,
                                                               lan_net=lan)
    full = ruleset("full_cone", wan_ip=wan, lan_net=lan)
    assert "map fcm" in full and 'iifname "wan" ip daddr 198.51.100.11' in full
    assert "dnat ip to udp dport map @fcm" in full
    restricted = ruleset("restricted_cone", wan_ip=wan, lan_net=lan)
    assert "dnat ip to ip saddr . udp dport map @rcm" in restricted
    assert "update @rcm { ip daddr . udp sport" in restricted
    hairpin = ruleset("full_cone", wan_ip=wan, lan_net=lan, options=NatOptions(hairpin=True))
    assert 'iifname "wan" ip daddr' not in hairpin
    snat = 'oifname "lan" ip saddr 192.168.1.0/24 ct status dnat snat to 198.51.100.11'
    assert hairpin.index(snat) < hairpin.index("masquerade")
    timed = ruleset("full_cone", wan_ip=wan, lan_net=lan, options=NatOptions(mapping_timeout=7))
    assert "timeout 7s" in timed
    assert conntrack_sysctls(NatOptions(mapping_timeout=7)) == {
        "net.netfilter.nf_conntrack_udp_timeout": 7,
        "net.netfilter.nf_conntrack_udp_timeout_stream": 7}
    assert conntrack_sysctls(NatOptions()) == {}


def _udp_frame(payload: bytes, csum: int | None = None) -> bytes:
    src, dst = bytes([192, 168, 1, 2]), bytes([203, 0, 113, 10])
    udp_len = 8 + len(payload)
    ip = bytearray(b"\x45\x00" + (20 + udp_len).to_bytes(2, "big") + b"\x00\x01\x40\x00\x40\x11"
                   + b"\x00\x00" + src + dst)
    ip[10:12] = inet_checksum(bytes(ip)).to_bytes(2, "big")
    if csum is None:  # reference checksum, computed the textbook way
        pseudo = src + dst + b"\x00\x11" + udp_len.to_bytes(2, "big")
        header = (40000).to_bytes(2, "big") + (3478).to_bytes(2, "big") + udp_len.to_bytes(2,
                                                                                      "big")
        csum = inet_checksum(pseudo + header + b"\x00\x00" + payload) or 0xFFFF
    udp = ((40000).to_bytes(2, "big") + (3478).to_bytes(2, "big") + udp_len.to_bytes(2, "big")
           + csum.to_bytes(2, "big") + payload)
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + bytes(ip) + udp


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world", bytes(range(256)) * 5])
def test_delay_line_fixes_partial_udp_checksums(payload: bytes) -> None:
    good = _udp_frame(payload)
    partial = _udp_frame(payload, csum=0x1234)  # what CHECKSUM_PARTIAL leaves behind
    assert fix_l4_checksum(partial) == good
    assert fix_l4_checksum(good) == good
    padded = good + b"\x00" * 8  # Ethernet padding after the IP packet stays untouched
    assert fix_l4_checksum(partial + b"\x00" * 8) == padded
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 28
    assert fix_l4_checksum(arp) == arp


def test_expectations_match_natlab_table() -> None:
    assert probes.EXPECTED_BEHAVIOR["restricted_cone"][1] == (True, True, False, False)
    assert classify_mapping(["a:1", "a:1", "a:1"]) == "endpoint_independent"
    assert classify_mapping(["a:1", "a:2", "a:3"]) == "address_and_port_dependent"
    assert classify_mapping(["a:1", None, "a:1"]) == "unknown"
    failing = {pair for pair in itertools.combinations_with_replacement(PRESETS, 2)
               if not probes.expected_punch(*pair)}
    assert failing == {("port_restricted", "symmetric"), ("symmetric", "symmetric"),
                       ("symmetric", "cgnat")}


def test_availability_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns._probe_available() == (
        False, "kernel lab needs root (network namespaces, nftables)")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "nft" else tool)
    ok, reason = netns._probe_available()
    assert not ok and "'nft'" in reason and "apt-get install nftables" in reason


# --- kernel: shared fixtures -------------------------------------------------------------

def _our_namespaces() -> list[str]:
    mine = f"mlab{os.getpid()}-"
    return [n for n in netns.list_ns() if n.startswith(mine)]


def _delay_processes() -> list[int]:
    """Delay-line processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"macula_lab.kernel.delay" in cmd and ppid == os.getpid():
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def lab() -> Iterator[KernelLab]:
    if not AVAILABLE:
        pytest.skip(REASON)
    cleanup_leftovers("mlab")
    with KernelLab() as kl:
        yield kl
    assert _our_namespaces() == []
    assert _delay_processes() == []


@pytest.fixture(scope="module")
def server(lab: KernelLab) -> Iterator[probes.ProbeServer]:
    with probes.ProbeServer(lab, ports=(3478, 3479)) as srv:
        yield srv


def _check_behavior(result: dict, preset: str) -> None:
    mapping, inbound = probes.EXPECTED_BEHAVIOR[preset]
    assert (result["mapping_behavior"], tuple(result["inbound"])) == (mapping, inbound), result


# --- kernel: smoke set (default run) ----------------------------------------------------------

@kernel
@needs_kernel
def test_netns_helpers_and_errors() -> None:
    a, b = f"mlab{os.getpid()}-t-a", f"mlab{os.getpid()}-t-b"
    netns.claim_prefix(f"mlab{os.getpid()}-t-")
    try:
        for name in (a, b):
            netns.add_ns(name)
            netns.set_sysctls(name, netns.base_sysctls(router=False))
        netns.add_veth(a, "x0", b, "y0", mac_a=netns.mac_for(9, 1), mac_b=netns.mac_for(9, 2))
        netns.link_up(a, "x0")
        netns.link_up(b, "y0")
        netns.add_addr(a, "x0", "192.0.2.1/24")
        netns.add_addr(b, "y0", "192.0.2.2/24")
        netns.add_route(a, "198.51.100.0/24", "192.0.2.2")
        netns.add_neigh(a, "x0", "192.0.2.2", netns.mac_for(9, 2))
        out = netns.run_in(a, ["ip", "-br", "route"]).stdout
        assert "198.51.100.0/24 via 192.0.2.2" in out
        assert "PERMANENT" in netns.run_in(a, ["ip", "neigh", "show", "192.0.2.2"]).stdout
        listener = netns.popen_in(b, [sys.executable, "-c", (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind(('192.0.2.2', 7000)); s.settimeout(5); print(s.recv(100).decode())")],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)
        netns.run_in(a, [sys.executable, "-c", (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'over veth', ('192.0.2.2', 7000))")])
        assert listener.communicate(timeout=10)[0].strip() == "over veth"
        with pytest.raises(netns.LabError, match=r"ip -n .* addr add .*\n.*stderr: .+"):
            netns.add_addr(a, "nosuch0", "192.0.2.9/24")
        with pytest.raises(netns.LabError, match="1..15 characters"):
            netns.add_veth(a, "much-too-long-name", b, "y1")
    finally:
        for name in (a, b):
            netns.del_ns(name)
        netns.release_prefix(f"mlab{os.getpid()}-t-")
    assert a not in netns.list_ns() and b not in netns.list_ns()


@kernel
@needs_kernel
def test_smoke_port_restricted_and_symmetric(lab: KernelLab, server: probes.ProbeServer) -> None:
    pair = lab.build_pair("port_restricted", "symmetric")
    try:
        assert pair.server_ips == ("203.0.113.10", "203.0.113.20")
        assert (pair.preset_a, pair.preset_b) == ("port_restricted", "symmetric")
        assert pair.host_a_ip.startswith("192.168.") and pair.host_b_ip.startswith("192.168.")
        _check_behavior(probes.probe_nat(lab, pair.host_a_ns, server), "port_restricted")
        _check_behavior(probes.probe_nat(lab, pair.host_b_ns, server), "symmetric")
    finally:
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_smoke_open_host_sees_its_own_address(lab: KernelLab,
                                              server: probes.ProbeServer) -> None:
    pair = lab.build_pair("open", "cgnat")
    try:
        result = probes.probe_nat(lab, pair.host_a_ns, server)
        _check_behavior(result, "open")
        assert result["mapping"][0] == f"{pair.host_a_ip}:{result['local_port']}"
        assert pair.host_a_ip.startswith("198.51.100.")
        # The carrier NAT's wan is public, the home NAT sits in 100.64.0.0/10.
        assert len(pair.b.nat_ns) == 2
        r = probes.punch(lab, pair, server, duration=2.0)
        assert r[0]["received"] and r[1]["received"], r
    finally:
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_delay_line_rtt(lab: KernelLab, server: probes.ProbeServer) -> None:
    # 10 ms each way on each uplink: host->server crosses one delay line twice (20 ms),
    # host->host crosses two delay lines twice (40 ms). The lines count each frame's delay
    # from its kernel arrival stamp and the probes are Python: ~0.5 ms over (2026-12-05).
    pair = lab.build_pair("open", "open", latency_ms=10)
    try:
        echo = lab.popen_python(pair.host_b_ns, probes.PROBE_MODULE, "serve", "--bind",
                                f"{pair.host_b_ip}:4000", "--max-seconds", "60",
                                stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and "ready" in echo.stdout.readline()
        to_server = probes.measure_rtt(lab, pair.host_a_ns, server.addresses[0], count=15)
        to_host = probes.measure_rtt(lab, pair.host_a_ns, f"{pair.host_b_ip}:4000", count=10)
        for result, low, high in ((to_server, 20.0, 22.0), (to_host, 40.0, 44.0)):
            assert result["lost"] == 0, result
            rtts = result["rtts_ms"]
            assert min(rtts) >= low - 0.5, rtts
            assert statistics.median(rtts) <= high, rtts
            assert max(rtts) < high + 15.0, rtts
        echo.terminate()
        echo.wait(timeout=5)
    finally:
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_delay_line_loss_and_tcp(lab: KernelLab, server: probes.ProbeServer) -> None:
    pair = lab.build_pair("full_cone", "open", latency_ms=(2, 0), loss=(0.0, 0.2), seed=7)
    try:
        assert pair.a.delay_ns is not None and pair.b.delay_ns is not None
        # 20 % loss each way: 64 % of round trips survive (binomial sd ~ 5 of 100).
        lossy = probes.measure_rtt(lab, pair.host_b_ns, server.addresses[0], count=100,
                                   wait=0.05)
        assert 45 <= len(lossy["rtts_ms"]) <= 83, lossy["lost"]
        # TSO super-frames must cross the delay line (vnet headers), so TCP works too.
        sink = textwrap.dedent("""
            import socket
            s = socket.socket(); s.bind(("203.0.113.10", 5555)); s.listen(1); s.settimeout(20)
            c, _ = s.accept(); c.settimeout(20); n = 0
            for _ in range(100000):
                d = c.recv(65536)
                if not d: break
                n += len(d)
            c.sendall(str(n).encode()); c.close()
        """)
        source = textwrap.dedent("""
            import socket, time
            for _ in range(50):
                try:
                    s = socket.create_connection(("203.0.113.10", 5555), timeout=10); break
                except ConnectionRefusedError:
                    time.sleep(0.05)
            s.sendall(b"x" * 2_000_000); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())
        """)
        lab.popen(lab.server_ns, [sys.executable, "-c", sink])
        out = lab.run(pair.host_a_ns, [sys.executable, "-c", source], timeout=30).stdout
        assert out.strip() == "2000000"
        stats = lab.delay_stats(pair.a)
        assert stats is not None and stats["vnet"] == 1 and stats["in_to_out"]["dropped"] == 0
    finally:
        lab.remove_pair(pair)


@kernel
@needs_kernel
def test_delay_line_python_checksum_fallback() -> None:
    # Without vnet headers the copier must fix veth's partial UDP checksums itself.
    with KernelLab(delay_vnet=False) as kl, probes.ProbeServer(kl) as srv:
        pair = kl.build_pair("symmetric", "open", latency_ms=5)
        result = probes.measure_rtt(kl, pair.host_a_ns, srv.addresses[0], count=5)
        assert result["lost"] == 0 and min(result["rtts_ms"]) >= 9.5, result
        stats = kl.delay_stats(pair.a)
        assert stats is not None and stats["vnet"] == 0
        prefix = kl.prefix
    assert not [n for n in netns.list_ns() if n.startswith(prefix)]


@kernel
@needs_kernel
def test_leftovers_of_a_killed_run_are_cleaned() -> None:
    script = textwrap.dedent("""
        import time
        from macula_lab.kernel import KernelLab
        lab = KernelLab()
        lab.start()
        lab.build_pair("cgnat", "full_cone", latency_ms=1)
        print("built", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True, env=netns.python_env())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "built"
        prefix = f"mlab{child.pid}-"
        assert [n for n in netns.list_ns() if n.startswith(prefix)]
        # A live owner (and our own running labs) is never touched.
        assert not any(n.startswith(prefix) for n in cleanup_leftovers("mlab"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
    removed = cleanup_leftovers("mlab")
    assert removed and all(n.startswith(prefix) for n in removed)
    assert not [n for n in netns.list_ns() if n.startswith(prefix)]
    # The killed run's delay lines noticed their parent died and exited on their own.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _orphan_delay_lines(child.pid):
        time.sleep(0.1)
    assert not _orphan_delay_lines(child.pid)


def _orphan_delay_lines(parent_pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"macula_lab.kernel.delay" in cmd and f"--parent-pid\0{parent_pid}\0".encode() in cmd:
            found.append(int(entry))
    return found


# --- kernel: full set (MACULA_LAB_FULL=1) ------------------------------------------------------

@kernel
@needs_kernel
@needs_full
@pytest.mark.parametrize("preset", PRESETS)
def test_full_probe_table(lab: KernelLab, server: probes.ProbeServer, preset: str) -> None:
    start = time.monotonic()
    pair = lab.build_pair(preset, preset)
    built = time.monotonic() - start
    try:
        for ns in (pair.host_a_ns, pair.host_b_ns):
            result = probes.probe_nat(lab, ns, server)
            _check_behavior(result, preset)
            distinct = len(set(result["mapping"]))
            assert distinct == (3 if preset == "symmetric" else 1), result
    finally:
        lab.remove_pair(pair)
    print(f"\n{preset}: built in {built:.3f}s, probed in "
          f"{time.monotonic() - start - built:.2f}s")


@kernel
@needs_kernel
@needs_full
def test_full_punch_matrix(lab: KernelLab, server: probes.ProbeServer) -> None:
    outcomes = {}
    start = time.monotonic()
    for a, b in itertools.combinations_with_replacement(PRESETS, 2):
        pair = lab.build_pair(a, b)
        try:
            ra, rb = probes.punch(lab, pair, server, duration=2.0)
        finally:
            lab.remove_pair(pair)
        outcomes[(a, b)] = ra["received"] and rb["received"]
    print(f"\n21-pair punch matrix in {time.monotonic() - start:.1f}s")
    wrong = {k: v for k, v in outcomes.items() if v != probes.expected_punch(*k)}
    assert not wrong, wrong


@kernel
@needs_kernel
@needs_full
@pytest.mark.parametrize("preset", ["full_cone", "restricted_cone", "port_restricted",
                                    "symmetric", "cgnat"])
def test_full_hairpin_behind_one_nat(lab: KernelLab, server: probes.ProbeServer,
                                     preset: str) -> None:
    for hairpin in (False, True):
        pair = lab.build_pair(preset, preset, shared_nat=True, hairpin=hairpin)
        try:
            assert pair.a.public_ip == pair.b.public_ip
            ra, rb = probes.punch(lab, pair, server, duration=1.5)
        finally:
            lab.remove_pair(pair)
        assert (ra["received"] and rb["received"]) == hairpin, (hairpin, ra, rb)


@kernel
@needs_kernel
@needs_full
def test_full_mapping_timeout(lab: KernelLab, server: probes.ProbeServer) -> None:
    # Full cone lets anyone in while the mapping lives; after T idle seconds it is gone.
    short = lab.build_pair("full_cone", "full_cone", mapping_timeout=2)
    try:
        late = probes.probe_nat(lab, short.host_a_ns, server, filter_delay=3.0)
        assert tuple(late["inbound"]) == (True, False, False, False), late
        fresh = probes.probe_nat(lab, short.host_b_ns, server, filter_delay=1.0)
        assert tuple(fresh["inbound"]) == (True, True, True, True), fresh
    finally:
        lab.remove_pair(short)
    default = lab.build_pair("full_cone", "open")
    try:
        held = probes.probe_nat(lab, default.host_a_ns, server, filter_delay=3.0)
        assert tuple(held["inbound"]) == (True, True, True, True), held
    finally:
        lab.remove_pair(default)


def _stamp(at: float) -> list[tuple[int, int, bytes]]:
    seconds = int(at)
    return [(socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("qq", seconds,
                                                            round((at - seconds) * 1e9)))]


@given(late=st.floats(min_value=0.0, max_value=0.9), ahead=st.floats(min_value=0.0, max_value=2e9))
def test_a_frame_read_late_is_delayed_from_its_arrival(late: float, ahead: float) -> None:
    # The line was busy or off the CPU for `late` seconds after the frame came in: the
    # kernel's stamp, not the moment we read it, starts the frame's delay.
    now = 1000.0
    arrived = arrival_time(_stamp(now - late + ahead), now, ahead)
    assert arrived == pytest.approx(now - late, abs=2e-6)


def test_a_frame_without_a_usable_stamp_is_delayed_from_now() -> None:
    now, ahead = 1000.0, 1.7e9
    assert arrival_time([], now, ahead) == now
    assert arrival_time(_stamp(now + 0.5 + ahead), now, ahead) == now  # from the future
    assert arrival_time(_stamp(now - 5.0 + ahead), now, ahead) == now  # the clock was set
    assert arrival_time([(socket.SOL_SOCKET, SO_TIMESTAMPNS, b"\0" * 8)], now, ahead) == now
