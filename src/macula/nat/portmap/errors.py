"""The error types of the port-mapping package."""

from __future__ import annotations

from ...errors import MaculaError


class PortMapError(MaculaError):
    """A port-mapping protocol could not give us a mapping (the message says why)."""


class MalformedMessage(PortMapError, ValueError):
    """Bytes that are not a valid NAT-PMP, PCP, SSDP, device description or SOAP message.

    This is the only exception the parsers raise, whatever the input.
    """
