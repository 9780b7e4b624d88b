"""nftables rulesets that make a Linux namespace behave like a given kind of NAT.

The base is natlab.md's verified port-restricted cone (conntrack masquerade, input policy
drop); the other kinds are small variations of it. Interfaces are always named "wan" (the
outside veth) and "lan" (the inside bridge).
"""

from __future__ import annotations

from dataclasses import dataclass

# Every preset the lab can build, in the order the matrices list them.
PRESETS: tuple[str, ...] = (
    "open", "full_cone", "restricted_cone", "port_restricted", "symmetric", "cgnat")
# Presets outside the matrices: symmetric NATs whose router also runs a port-mapping
# daemon (miniupnpd: UPnP-IGD, NAT-PMP, PCP; see miniupnpd.py).
PORTMAP_PRESETS: tuple[str, ...] = ("symmetric_upnp",)
# Presets outside the matrices: a dual-stack router, port-restricted NAT for IPv4 and plain
# IPv6 routing (2001:db8::/32, no NAT66) behind a stateful firewall that only lets replies
# in, so IPv6 needs punching too (firewall6_ruleset).
IPV6_PRESETS: tuple[str, ...] = ("ipv6_firewall",)
# Networks that drop UDP (also in the simulator, outside the default matrix): a
# port-restricted NAT whose router lets no UDP through, and one that lets nothing out but
# TCP to the lab's HTTP proxy (tinyproxy on the server, LAB_PROXY).
TCP_PRESETS: tuple[str, ...] = ("udp_blocked", "proxy_only")
LAB_PROXY: tuple[str, int] = ("203.0.113.10", 3128)
# Everything only the kernel lab can build.
KERNEL_ONLY_PRESETS: tuple[str, ...] = PORTMAP_PRESETS + IPV6_PRESETS
# Kinds a single NAT namespace can have (cgnat is two port-restricted NATs, open is none).
NAT_KINDS: tuple[str, ...] = ("full_cone", "restricted_cone", "port_restricted", "symmetric")
DEFAULT_MAP_TIMEOUT = 120  # seconds; Linux's default established-UDP conntrack timeout


@dataclass(frozen=True)
class NatOptions:
    """Per-NAT knobs: hairpinning and the mapping (conntrack + map) timeout in seconds."""

    hairpin: bool = False
    mapping_timeout: int | None = None
    # Cone NATs: map every flow to this one external port instead of preserving the
    # source port (a NAT that rebinds its single host to a new port; see rebind_nat).
    external_port: int | None = None


def nat_chain(preset: str) -> tuple[str, ...]:
    """NAT kinds from the outermost (internet side) to the innermost (host side)."""
    if preset == "open":
        return ()
    if preset == "cgnat":
        # Carrier NAT first, then the home NAT whose wan sits on the carrier's lan.
        return ("port_restricted", "port_restricted")
    if preset in NAT_KINDS:
        return (preset,)
    if preset == "symmetric_upnp":
        return ("symmetric",)
    if preset == "ipv6_firewall" or preset in TCP_PRESETS:
        return ("port_restricted",)
    raise ValueError(f"unknown NAT preset {preset!r}; choose from "
                     f"{', '.join(PRESETS + TCP_PRESETS + KERNEL_ONLY_PRESETS)}")


def udp_block_ruleset(proxy: tuple[str, int] | None = None) -> str:
    """A firewall table in front of a NAT's own rules: every forwarded UDP packet dropped
    (both ways, counted), and with `proxy` everything else too except TCP to the proxy
    and its replies: a network whose only way out is an HTTP proxy."""
    lines = ["table inet macula_udp {", "  counter udp_dropped { }",
             "  chain forward { type filter hook forward priority filter - 10; "
             + ("policy drop;" if proxy else "policy accept;"),
             "    meta l4proto udp counter name udp_dropped drop"]
    if proxy:
        lines += ["    ct state established,related accept",
                  f'    iifname "lan" ip daddr {proxy[0]} tcp dport {proxy[1]} accept']
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def conntrack_sysctls(options: NatOptions) -> dict[str, int]:
    """Per-namespace conntrack timeouts that make the mapping expire after T seconds."""
    t = options.mapping_timeout
    if t is None:
        return {}
    if t <= 0:
        raise ValueError(f"mapping_timeout must be positive, got {t}")
    return {"net.netfilter.nf_conntrack_udp_timeout": t,
            "net.netfilter.nf_conntrack_udp_timeout_stream": t}


def ruleset(kind: str, *, wan_ip: str, lan_net: str,
            options: NatOptions = NatOptions()) -> str:
    """The nft script (for `nft -f -`) for one NAT namespace of the given kind."""
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r}; choose from {', '.join(NAT_KINDS)}")
    timeout = options.mapping_timeout or DEFAULT_MAP_TIMEOUT
    full = kind == "full_cone"
    restricted = kind == "restricted_cone"
    # The endpoint map (mapped port -> internal ip.port) drives full-cone inbound DNAT and
    # hairpinning; the restricted map adds the remote IP to the key.
    want_fcm = full or options.hairpin
    lines = ["add table ip natlab", "delete table ip natlab", "table ip natlab {"]
    if want_fcm:
        lines.append(f"  map fcm {{ type inet_service : ipv4_addr . inet_service; "
                     f"flags dynamic,timeout; timeout {timeout}s; }}")
    if restricted:
        lines.append(f"  map rcm {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; "
                     f"flags dynamic,timeout; timeout {timeout}s; }}")

    dnat: list[str] = []
    if full:
        # Without "iifname wan" the same rule also serves hairpinned packets from the lan.
        scope = "" if options.hairpin else 'iifname "wan" '
        dnat.append(f"{scope}ip daddr {wan_ip} meta l4proto udp dnat ip to udp dport map @fcm")
    else:
        if restricted:
            dnat.append(f'iifname "wan" ip daddr {wan_ip} meta l4proto udp '
                        f"dnat ip to ip saddr . udp dport map @rcm")
        if options.hairpin:
            dnat.append(f'iifname "lan" ip daddr {wan_ip} meta l4proto udp '
                        f"dnat ip to udp dport map @fcm")
    if dnat:
        lines.append("  chain dnat_in { type nat hook prerouting priority dstnat;")
        lines += [f"    {rule}" for rule in dnat]
        lines.append("  }")

    masq = "masquerade fully-random" if kind == "symmetric" else "masquerade"
    lines.append("  chain snat_out { type nat hook postrouting priority srcnat;")
    if options.hairpin:
        # Hairpinned replies must come back through us, so the source becomes our wan IP.
        lines.append(f'    oifname "lan" ip saddr {lan_net} ct status dnat snat to {wan_ip}')
    if options.external_port is not None and kind != "symmetric":
        # nft maps ports only after a transport match; other protocols masquerade as usual.
        lines.append(f'    oifname "wan" meta l4proto {{ tcp, udp }} '
                     f"masquerade to :{options.external_port}")
    lines.append(f'    oifname "wan" {masq}')
    lines.append("  }")

    track: list[str] = []
    if want_fcm:
        track += [
            'oifname "wan" meta l4proto udp ct direction original '
            "update @fcm { udp sport : ct original ip saddr . ct original proto-src }",
            'oifname "wan" meta l4proto udp ct direction reply '
            "update @fcm { udp sport : ct reply ip saddr . ct reply proto-src }",
        ]
    if restricted:
        track += [
            'oifname "wan" meta l4proto udp ct direction original '
            "update @rcm { ip daddr . udp sport : ct original ip saddr . ct original proto-src }",
            'oifname "wan" meta l4proto udp ct direction reply '
            "update @rcm { ip daddr . udp sport : ct reply ip saddr . ct reply proto-src }",
        ]
    if track:
        # After SNAT, so "udp sport" is the mapped (public) port.
        lines.append("  chain track { type filter hook postrouting priority srcnat + 1;")
        lines += [f"    {rule}" for rule in track]
        lines.append("  }")

    # Input policy drop is essential: an accepted early packet from a peer would create a
    # conntrack entry that steals the port our own outbound packet needs (natlab.md).
    lines += [
        "  chain input { type filter hook input priority filter; policy drop;",
        '    iifname "lo" accept',
        "    ct state established,related accept",
        '    iifname "lan" accept',
        "  }",
        "  chain forward { type filter hook forward priority filter; policy drop;",
        '    iifname "lan" accept',
        "    ct state established,related accept",
        "    ct status dnat accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def firewall6_ruleset() -> str:
    """The IPv6 half of an ipv6_firewall router: routed, never translated; what comes in
    on "wan" passes only as a reply to a flow the lan opened (conntrack), like a home
    router's default IPv6 policy. Unsolicited packets are counted by the last rule."""
    return "\n".join([
        "add table ip6 fw6", "delete table ip6 fw6", "table ip6 fw6 {",
        "  counter unsolicited { }",
        "  chain input { type filter hook input priority filter; policy drop;",
        '    iifname "lo" accept',
        "    ct state established,related accept",
        '    iifname "lan" accept',
        # Neighbour discovery on the wan link (the lab pins most neighbours, not all).
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
        "  }",
        "  chain forward { type filter hook forward priority filter; policy drop;",
        '    iifname "lan" oifname "wan" accept',
        "    ct state established,related accept",
        '    iifname "wan" counter name unsolicited drop',
        "  }",
        "}",
    ]) + "\n"
