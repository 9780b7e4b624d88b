"""Port mapping: ask the home router to forward a public port to the node's socket.

Three protocols, tried in this order by `PortMapper.discover`:

- PCP (RFC 6887) and NAT-PMP (RFC 6886): sans-IO codecs (`pcp`, `natpmp`) and clients
  (`PcpClient`, `NatPmpClient`) fed datagrams and time. Their requests leave from the node's
  ONE UDP socket to the router's port 5351, because the mapping is for that socket's port.
- UPnP-IGD: SSDP search + device description + SOAP (`igd` codecs, `UpnpClient`), on
  sockets of its own; it names our address and port inside the request.

Integrating with the node (one socket, RFC 7983 demux by first byte):

- Demux: NAT-PMP and PCP answers start with 0 or 2, inside STUN's 0-3, so the first byte
  cannot tell them apart. The source can: every datagram from (gateway, 5351) goes to
  `PortMapper.receive` (or test `PortMapper.owns(addr)` first), before the STUN branch.
- Timers: the mapper renews on the event loop by itself (NAT-PMP at 1/2 the lifetime, PCP
  at a random 1/2-5/8 then 3/4, 7/8, UPnP at 1/2, 3/4, ...); the node only calls `close()`
  on shutdown (it deletes the mapping) and `discover()` again after a network change.
- Candidate: `DiscoveryResult.mapping.external` (and later `PortMapper.mapping`) is the
  public (ip, port) that reaches the socket unsolicited, even behind a symmetric NAT; it
  is a server-reflexive-like candidate. `on_change` reports when it changes or disappears.
"""

from __future__ import annotations

from .errors import MalformedMessage, PortMapError
from .mapper import PortMapper
from .mapping import PROTOCOLS, DiscoveryResult, PortMapping, ProtocolName
from .natpmp_client import NatPmpClient
from .netinfo import default_gateway, local_ip_toward
from .pcp_client import PcpClient
from .upnp_client import IgdControl, NoIgdFound, UpnpClient, UpnpError
from .upnp_lease import UpnpLease

__all__ = [
    "DiscoveryResult",
    "IgdControl",
    "MalformedMessage",
    "NatPmpClient",
    "NoIgdFound",
    "PROTOCOLS",
    "PcpClient",
    "PortMapError",
    "PortMapper",
    "PortMapping",
    "ProtocolName",
    "UpnpClient",
    "UpnpError",
    "UpnpLease",
    "default_gateway",
    "local_ip_toward",
]
