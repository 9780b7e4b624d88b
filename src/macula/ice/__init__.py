"""ICE (RFC 8445) for macula, sans-IO: candidates, pairs, the check list and the agent.

One concept per module: `candidate` (record, priorities, foundations, RFC 8839 lines),
`pair`, `checklist`, `messages` (the STUN checks), `events`, `agent`, and `gather`
(which host addresses to offer). The node owns the socket and feeds the agent.
"""

from __future__ import annotations

from .agent import GATEWAY_VIA, IceAgent, turn_via
from .candidate import (
    CANDIDATE_TYPES,
    END_OF_CANDIDATES,
    ICE_OPTIONS_TRICKLE,
    KINDS,
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
from .checklist import MAX_PAIRS, CheckList
from .events import ConsentLost, Event, Failed, PairHeard, PairSucceeded, SelectedPair
from .gather import (
    host_candidates,
    host_preference,
    list_interfaces,
    ranked_addresses,
    usable_addresses,
)
from .pair import SOCKET, CandidatePair, PairState, pair_priority

__all__ = [
    "CANDIDATE_TYPES",
    "END_OF_CANDIDATES",
    "GATEWAY_VIA",
    "ICE_OPTIONS_TRICKLE",
    "KINDS",
    "MAX_PAIRS",
    "SOCKET",
    "Candidate",
    "CandidateError",
    "CandidatePair",
    "CheckList",
    "ConsentLost",
    "Event",
    "Failed",
    "IceAgent",
    "PairState",
    "PairHeard",
    "PairSucceeded",
    "SelectedPair",
    "candidate_priority",
    "compute_foundation",
    "generate_pwd",
    "generate_ufrag",
    "host_candidates",
    "host_preference",
    "ice_options_line",
    "ice_pwd_line",
    "ice_ufrag_line",
    "is_end_of_candidates",
    "list_interfaces",
    "pair_priority",
    "parse_ice_options",
    "parse_ice_pwd",
    "parse_ice_ufrag",
    "ranked_addresses",
    "turn_via",
    "type_preferences",
    "usable_addresses",
]
