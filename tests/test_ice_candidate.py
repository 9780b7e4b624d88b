"""ICE candidates: RFC 8445 priorities and foundations, RFC 8839 lines (hardened parsing)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.ice import (
    CANDIDATE_TYPES,
    END_OF_CANDIDATES,
    ICE_OPTIONS_TRICKLE,
    Candidate,
    CandidateError,
    candidate_priority,
    compute_foundation,
    generate_pwd,
    generate_ufrag,
    ice_options_line,
    ice_pwd_line,
    ice_ufrag_line,
    is_end_of_candidates,
    parse_ice_options,
    parse_ice_pwd,
    parse_ice_ufrag,
    type_preferences,
)
from macula.ice.candidate import compose_priority


# ---------------------------------------------------------------------- priorities
def test_priority_formula_matches_rfc_8445():
    # RFC 8445 5.1.2.1 with its recommended host preference 126: the classic 2130706431.
    assert compose_priority(126, 65535, 1) == 2130706431
    assert compose_priority(0, 0, 256) == 0
    for type_pref, local_pref, component in [(126, 65535, 1), (100, 1234, 2), (0, 0, 1)]:
        assert compose_priority(type_pref, local_pref, component) == (
            2**24 * type_pref + 2**8 * local_pref + (256 - component))


def test_default_type_preferences_follow_config_order():
    prefs = type_preferences()
    assert tuple(CANDIDATE_TYPES) == ("local", "stun", "turn", "relay")
    assert prefs == {"host": 120, "prflx": 96, "srflx": 90, "turn": 60, "gateway": 30}
    assert candidate_priority("host") == (120 << 24) + (65535 << 8) + 255 == 2030043135


def test_custom_order_reorders_preferences():
    prefs = type_preferences(["relay", "turn", "stun", "local"])
    assert prefs["gateway"] > prefs["turn"] > prefs["prflx"] > prefs["srflx"] > prefs["host"]
    # Types left out still sort, after the listed ones, in the default order.
    partial = type_preferences(["stun"])
    assert (partial["prflx"] > partial["srflx"] > partial["host"] > partial["turn"]
            > partial["gateway"])


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_order_keeps_preferences_legal(size):
    for order in itertools.permutations(CANDIDATE_TYPES, size):
        prefs = type_preferences(order)
        assert all(0 <= v <= 126 for v in prefs.values())
        assert len(set(prefs.values())) == 5
        # prflx just above srflx (RFC 8445 5.1.2.2), and below the next tier up.
        above = [v for k, v in prefs.items() if v > prefs["srflx"] and k != "prflx"]
        assert prefs["srflx"] < prefs["prflx"] < min(above, default=127)


@pytest.mark.parametrize("order", [["local", "local"], ["nope"], ["host"]])
def test_bad_orders_are_refused(order):
    with pytest.raises(ValueError):
        type_preferences(order)


def test_local_preference_and_component_enter_priority():
    hi = candidate_priority("host", local_preference=65535)
    lo = candidate_priority("host", local_preference=100)
    assert hi - lo == (65535 - 100) << 8
    assert candidate_priority("host", component=1) - candidate_priority("host", component=2) == 1
    with pytest.raises(ValueError):
        candidate_priority("host", local_preference=65536)
    with pytest.raises(ValueError):
        candidate_priority("mdns")


def test_factories_set_types_bases_and_priorities():
    host = Candidate.host("10.0.0.1", 5000)
    srflx = Candidate.server_reflexive("203.0.113.7", 62000, base=host.addr, server="192.0.2.9")
    relay = Candidate.turn_relay("198.51.100.4", 49152, server="198.51.100.4",
                                 mapped=("203.0.113.7", 62001))
    gateway = Candidate.gateway_relay("192.0.2.1", 9443)
    prflx = Candidate.peer_reflexive("203.0.113.7", 62002, base=host.addr,
                                     priority=candidate_priority("prflx"))
    assert [c.kind for c in (host, srflx, prflx, relay, gateway)] == [
        "host", "srflx", "prflx", "turn", "gateway"]
    assert host.priority > prflx.priority > srflx.priority > relay.priority > gateway.priority
    assert srflx.base == host.addr == prflx.base
    assert relay.base == relay.addr and host.base == host.addr
    assert gateway.type == "relay" and ("macula-relay", "gateway") in gateway.extensions


# ---------------------------------------------------------------------- foundations
def test_foundations_follow_rfc_8445_5_1_1_3():
    # Same type, base IP, server and transport -> same; any of them different -> different.
    a = Candidate.host("10.0.0.1", 5000)
    b = Candidate.host("10.0.0.1", 6000)  # port is not part of it
    c = Candidate.host("10.0.0.2", 5000)
    assert a.foundation == b.foundation != c.foundation
    s1 = Candidate.server_reflexive("203.0.113.7", 1, base=a.addr, server="192.0.2.9")
    s2 = Candidate.server_reflexive("203.0.113.8", 2, base=b.addr, server="192.0.2.9")
    s3 = Candidate.server_reflexive("203.0.113.7", 1, base=a.addr, server="192.0.2.10")
    assert s1.foundation == s2.foundation != s3.foundation
    assert s1.foundation != a.foundation
    assert compute_foundation("host", "10.0.0.1", transport="UDP") == a.foundation
    assert compute_foundation("host", "10.0.0.1", transport="tcp") != a.foundation
    # Stable text made of ice-chars, at most 32 of them.
    assert a.foundation.isascii() and a.foundation.isdigit() and len(a.foundation) <= 32


# ---------------------------------------------------------------------- SDP lines
ROUND_TRIPS = [
    "a=candidate:1 1 udp 2130706431 192.0.2.1 3478 typ host",
    "a=candidate:1 1 UDP 2130706431 203.0.113.141 8998 typ host",  # RFC 8839's example
    "a=candidate:2 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 10.0.1.1 rport 8998",
    "a=candidate:3 1 udp 2122260223 2001:db8::1 50000 typ host generation 0",
    "a=candidate:4 1 udp 16777215 203.0.113.9 3478 typ relay raddr 198.51.100.7 rport 61234",
    "a=candidate:5 1 udp 520093695 198.51.100.1 9443 typ relay macula-relay gateway",
    "a=candidate:6 2 udp 1686052607 2001:db8:85a3::8a2e:370:7334 61000 typ srflx "
    "raddr 2001:db8::2 rport 50001 network-id 1 network-cost 10",
    "a=candidate:x+/Y 1 udp 1 10.0.0.1 1 typ prflx raddr 10.0.0.2",
]


@pytest.mark.parametrize("line", ROUND_TRIPS)
def test_published_lines_round_trip_exactly(line):
    candidate = Candidate.from_sdp(line)
    assert candidate.to_sdp() == line
    assert Candidate.from_sdp(candidate.to_sdp(prefix=False)) == candidate
    assert Candidate.from_sdp(line + "\r\n") == candidate


def test_parsed_fields():
    c = Candidate.from_sdp(ROUND_TRIPS[2])
    assert (c.foundation, c.component, c.transport, c.priority) == ("2", 1, "UDP", 1694498815)
    assert (c.address, c.port, c.type, c.kind) == ("192.0.2.3", 45664, "srflx", "srflx")
    assert (c.related_address, c.related_port, c.base) == ("10.0.1.1", 8998, ("10.0.1.1", 8998))
    v6 = Candidate.from_sdp(ROUND_TRIPS[3])
    assert v6.family == 6 and v6.extensions == (("generation", "0"),)
    assert Candidate.from_sdp(ROUND_TRIPS[4]).kind == "turn"
    assert Candidate.from_sdp(ROUND_TRIPS[5]).kind == "gateway"
    # WebRTC's form, without "a=".
    webrtc = ("candidate:842163049 1 udp 1677729535 198.51.100.7 61234 typ srflx raddr 0.0.0.0 "
              "rport 0 generation 0 ufrag EsAw network-cost 999")
    assert Candidate.from_sdp(webrtc).to_sdp(prefix=False) == webrtc


def test_ip_text_is_canonicalised():
    c = Candidate.from_sdp("a=candidate:1 1 udp 1 2001:DB8:0::1 5 typ host")
    assert c.address == "2001:db8::1"


MALFORMED = [
    "", "a=", "a=candidate:", "candidate:1 1 udp", "a=cand:1 1 udp 1 10.0.0.1 1 typ host",
    "a=candidate:1 1 udp 2130706431 192.0.2.1 3478 host",
    "a=candidate:1 1 udp 2130706431 192.0.2.1 3478 typ mdns",
    "a=candidate:1 1 udp 0 192.0.2.1 3478 typ host",
    "a=candidate:1 1 udp 2147483648 192.0.2.1 3478 typ host",
    "a=candidate:1 1 udp -1 192.0.2.1 3478 typ host",
    "a=candidate:1 0 udp 1 192.0.2.1 3478 typ host",
    "a=candidate:1 257 udp 1 192.0.2.1 3478 typ host",
    "a=candidate:1 1 udp 1 192.0.2.1 0 typ host",
    "a=candidate:1 1 udp 1 192.0.2.1 65536 typ host",
    "a=candidate:1 1 udp 1 192.0.2.1 1e3 typ host",
    "a=candidate:1 1 udp 1 256.1.1.1 1 typ host",
    "a=candidate:1 1 udp 1 abcd.local 1 typ host",
    "a=candidate:1 1 udp 1 fe80::1%eth0 1 typ host",
    "a=candidate:1 1 udp 1 01.2.3.4 1 typ host",
    "a=candidate:1  1 udp 1 10.0.0.1 1 typ host",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host ",
    "a=candidate:1 1 udp 1 10.0.0.1 1\ttyp host",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host generation",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ srflx raddr",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ srflx raddr 10.0.0.2 rport x",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ srflx rport 99999",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ srflx generation 0 raddr 10.0.0.2",
    "a=candidate:" + "a" * 33 + " 1 udp 1 10.0.0.1 1 typ host",
    "a=candidate:a-b 1 udp 1 10.0.0.1 1 typ host",
    "a=candidate:1 \u0661 udp 1 10.0.0.1 1 typ host",
    "a=candidate:1 1 udp \u0661 10.0.0.1 1 typ host",
    "a=candidate:1 1 u/dp 1 10.0.0.1 1 typ host",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host macula-relay gateway",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ relay macula-relay tunnel",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ relay macula-relay turn macula-relay gateway",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host ext caf\u00e9",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host\n\n",
    "a=candidate:1 1 udp 1 10.0.0.1 1 typ host " + "x " * 600,
]


@pytest.mark.parametrize("line", MALFORMED)
def test_malformed_lines_raise_candidate_error(line):
    with pytest.raises(CandidateError):
        Candidate.from_sdp(line)


@pytest.mark.parametrize("value", [None, 5, b"a=candidate:1 1 udp 1 10.0.0.1 1 typ host"])
def test_non_text_raises_candidate_error(value):
    with pytest.raises(CandidateError):
        Candidate.from_sdp(value)  # type: ignore[arg-type]


def test_direct_construction_is_validated():
    with pytest.raises(CandidateError):
        Candidate("1", 1, "udp", 1, "10.0.0.1", 1, "host", extensions=(("raddr", "x"),))
    with pytest.raises(CandidateError):
        Candidate("1", True, "udp", 1, "10.0.0.1", 1, "host")  # type: ignore[arg-type]
    assert issubclass(CandidateError, ValueError)


def _parse_or_error(text: str) -> Candidate | None:
    try:
        return Candidate.from_sdp(text)
    except CandidateError:
        return None  # the one allowed failure; anything else propagates and fails the test


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_candidate_error(text):
    for line in (text, "a=candidate:" + text, "a=candidate:1 1 udp 1 10.0.0.1 1 typ " + text):
        candidate = _parse_or_error(line)
        if candidate is not None:
            assert Candidate.from_sdp(candidate.to_sdp()) == candidate


_ALPHABET = st.sampled_from(list("0123456789abcdefABCDEF:. -+/%\t\r\nxyz") + ["\u0661", "typ",
                                                                                "raddr", "rport"])


@st.composite
def mutated_lines(draw):
    line = draw(st.sampled_from(ROUND_TRIPS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "swap", "dup"]))
        pos = draw(st.integers(0, len(line)))
        if op == "insert":
            line = line[:pos] + draw(_ALPHABET) + line[pos:]
        elif op == "delete":
            line = line[:pos] + line[pos + 1:]
        elif op == "replace":
            line = line[:pos] + draw(_ALPHABET) + line[pos + 1:]
        else:
            tokens = line.split(" ")
            i = draw(st.integers(0, len(tokens) - 1))
            j = draw(st.integers(0, len(tokens) - 1))
            if op == "swap":
                tokens[i], tokens[j] = tokens[j], tokens[i]
            else:
                tokens.insert(i, tokens[j])
            line = " ".join(tokens)
    return line


@settings(max_examples=200, deadline=None)
@given(mutated_lines())
def test_mutated_lines_parse_or_raise_candidate_error(line):
    candidate = _parse_or_error(line)
    if candidate is not None:
        assert Candidate.from_sdp(candidate.to_sdp()) == candidate


_ICE_CHARS = st.sampled_from("abcXYZ019+/")
_ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ipv6 = st.integers(0, 2**128 - 1).map(
    lambda n: __import__("ipaddress").IPv6Address(n).compressed)


@st.composite
def candidates(draw):
    ctype = draw(st.sampled_from(["host", "srflx", "prflx", "relay"]))
    related = draw(st.none() | _ipv4 | _ipv6)
    extensions = tuple(draw(st.lists(
        st.tuples(st.sampled_from(["generation", "ufrag", "network-id", "x.y"]),
                  st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                          max_size=8)), max_size=3)))
    if ctype == "relay" and draw(st.booleans()):
        extensions += (("macula-relay", draw(st.sampled_from(["gateway", "turn"]))),)
    return Candidate(
        draw(st.text(_ICE_CHARS, min_size=1, max_size=32)), draw(st.integers(1, 256)),
        draw(st.sampled_from(["udp", "UDP", "tcp"])), draw(st.integers(1, 2**31 - 1)),
        draw(_ipv4 | _ipv6), draw(st.integers(1, 65535)), ctype, related,
        draw(st.none() | st.integers(0, 65535)), extensions)


@settings(max_examples=80, deadline=None)
@given(candidates())
def test_generated_candidates_round_trip_exactly(candidate):
    line = candidate.to_sdp()
    parsed = Candidate.from_sdp(line)
    assert parsed == candidate and parsed.to_sdp() == line


# ---------------------------------------------------------------------- session attributes
def test_session_attribute_helpers():
    ufrag, pwd = generate_ufrag(), generate_pwd()
    assert parse_ice_ufrag(ice_ufrag_line(ufrag)) == ufrag
    assert parse_ice_pwd(ice_pwd_line(pwd)) == pwd
    assert parse_ice_ufrag("ice-ufrag:abcd") == "abcd"
    assert ice_options_line("trickle") == ICE_OPTIONS_TRICKLE
    assert parse_ice_options("a=ice-options:trickle ice2") == ("trickle", "ice2")
    assert is_end_of_candidates(END_OF_CANDIDATES) and is_end_of_candidates("end-of-candidates")
    assert not is_end_of_candidates("a=end-of-candidates:x")
    assert not is_end_of_candidates(None)  # type: ignore[arg-type]
    assert len(generate_ufrag()) == 8 and len(generate_pwd()) == 24
    assert generate_ufrag() != generate_ufrag()


@pytest.mark.parametrize("call,line", [
    (parse_ice_ufrag, "a=ice-ufrag:abc"),  # shorter than 4
    (parse_ice_ufrag, "a=ice-ufrag:ab:cd"),
    (parse_ice_ufrag, "a=ice-pwd:abcd"),
    (parse_ice_pwd, "a=ice-pwd:tooshort"),
    (parse_ice_pwd, "a=ice-pwd:" + "x" * 257),
    (parse_ice_options, "a=ice-options:"),
    (parse_ice_options, "a=ice-options:trickle  ice2"),
])
def test_session_attribute_parsers_raise_candidate_error(call, line):
    with pytest.raises(CandidateError):
        call(line)
    with pytest.raises(CandidateError):
        ice_ufrag_line("a b c d")


def test_a_predicted_port_travels_as_a_marked_srflx_line_and_only_that_is_predicted():
    predicted = Candidate.predicted_reflexive("198.51.100.11", 40001,
                                              base=("192.168.1.2", 40001))
    line = predicted.to_sdp(prefix=False)
    assert line.endswith("typ srflx raddr 192.168.1.2 rport 40001 macula-port predicted")
    parsed = Candidate.from_sdp(line)
    assert parsed == predicted and parsed.predicted and parsed.kind == "srflx"
    seen = Candidate.server_reflexive("198.51.100.11", 40001, base=("192.168.1.2", 40001))
    assert not seen.predicted
    assert not Candidate.from_sdp(line.replace("predicted", "seen")).predicted
