"""Host-candidate gathering policy and Linux interface listing."""

from __future__ import annotations

import sys

import pytest

from macula.ice import Candidate, host_candidates, list_interfaces, usable_addresses
from macula.ice.gather import parse_if_inet6

MACHINE = [
    ("lo", "127.0.0.1"),
    ("eth0", "192.0.2.10"),
    ("eth0", "fe80::1"),
    ("eth0", "2001:db8::10"),
    ("wlan0", "169.254.7.7"),
    ("docker0", "172.17.0.1"),
    ("br-3f2a1b", "172.18.0.1"),
    ("veth12ab", "fe80::2"),
    ("virbr0", "192.168.122.1"),
    ("vmnet8", "192.168.200.1"),
    ("wg0", "10.8.0.2"),
    ("tun0", "10.9.0.2"),
    ("lo", "::1"),
    ("eth1", "192.0.2.10"),  # duplicate address
    ("eth2", "not an ip"),
    ("eth3", "224.0.0.1"),
    ("eth4", "::ffff:192.0.2.99"),
]


def test_policy_skips_loopback_link_local_and_virtual_bridges():
    assert usable_addresses(MACHINE) == [
        ("eth0", "192.0.2.10"), ("eth0", "2001:db8::10"), ("wg0", "10.8.0.2"),
        ("tun0", "10.9.0.2")]


def test_loopback_only_when_nothing_else_is_there():
    assert usable_addresses([("lo", "127.0.0.1"), ("lo", "::1"), ("eth0", "fe80::1")]) == [
        ("lo", "127.0.0.1"), ("lo", "::1")]
    assert usable_addresses([]) == []


def test_host_candidates_rank_physical_ipv6_first_and_vpn_last():
    candidates = host_candidates(MACHINE, 4433)
    assert all(isinstance(c, Candidate) and c.type == "host" and c.port == 4433
               for c in candidates)
    ranked = [c.address for c in sorted(candidates, key=lambda c: -c.priority)]
    assert ranked == ["2001:db8::10", "192.0.2.10", "10.8.0.2", "10.9.0.2"]
    assert len({c.priority for c in candidates}) == len(candidates)


def test_parse_if_inet6_skips_unusable_addresses():
    text = (
        "20010db8000000000000000000000010 02 40 00 00     eth0\n"
        "20010db8000000000000000000000011 02 40 00 20     eth0\n"  # deprecated
        "20010db8000000000000000000000012 02 40 00 40     eth0\n"  # tentative
        "20010db8000000000000000000000013 02 40 00 01     eth0\n"  # temporary: fine
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "garbage line\n"
        "zz010db8000000000000000000000010 02 40 00 00     eth0\n"
    )
    assert parse_if_inet6(text) == [("eth0", "2001:db8::10"), ("eth0", "2001:db8::13"),
                                    ("lo", "::1")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux interface listing")
def test_list_interfaces_smoke():
    # An ioctl on an unbound socket: no traffic.
    found = list_interfaces()
    assert all(isinstance(name, str) and isinstance(addr, str) for name, addr in found)
    assert ("lo", "127.0.0.1") in found or not found
