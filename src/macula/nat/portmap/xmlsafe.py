"""XML from the LAN, parsed the way defusedxml would: no DTDs, no entities, bounded size.

A device description or SOAP answer comes from whatever box answered our SSDP search, so it
is hostile input. expat is driven directly so that a DOCTYPE, an entity declaration or an
external entity reference aborts the parse (billion laughs, external entity fetches), and
element names lose their namespaces: the IGD documents are matched on local names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat

from ...errors import MaculaError
from .errors import MalformedMessage

MAX_XML = 256 * 1024


class _Forbidden(MaculaError):
    pass


def _local(name: str) -> str:
    # expat joins namespace and local name with the separator we chose (a space).
    return name.rsplit(" ", 1)[-1]


def parse(data: bytes, *, limit: int = MAX_XML) -> ET.Element:
    """The root element of `data`. Raises MalformedMessage for anything unsafe or invalid."""
    if len(data) > limit:
        raise MalformedMessage(f"XML document larger than {limit} bytes")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")

    def forbid(*args: object) -> None:
        raise _Forbidden("DTDs and entities are not accepted")

    def start(tag: str, attrs: dict[str, str]) -> None:
        builder.start(_local(tag), {_local(k): v for k, v in attrs.items()})

    parser.StartDoctypeDeclHandler = forbid
    parser.EntityDeclHandler = forbid
    parser.UnparsedEntityDeclHandler = forbid
    parser.ExternalEntityRefHandler = forbid  # type: ignore[assignment]
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(_local(tag))
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        root = builder.close()
    except (_Forbidden, expat.ExpatError, ValueError, AssertionError) as exc:
        raise MalformedMessage(f"bad XML: {exc}") from None
    return root


def child_text(element: ET.Element, name: str) -> str | None:
    """Text of the first direct child called `name` (local name), stripped, or None."""
    for child in element:
        if child.tag == name:
            return (child.text or "").strip()
    return None
