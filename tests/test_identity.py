import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.identity import (
    NODE_ID_BYTES,
    Identity,
    IdentityError,
    NodeId,
    node_id_of_certificate,
)


@given(st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES))
def test_node_id_text_round_trips(raw):
    node_id = NodeId(raw)
    assert NodeId.parse(node_id.text) == node_id
    assert NodeId.parse(node_id.text.upper()) == node_id
    assert len(node_id.text) == 26


@given(st.text(max_size=40))
def test_parse_rejects_garbage_with_identity_error_only(text):
    try:
        NodeId.parse(text)
    except IdentityError:
        pass


def test_node_id_is_hash_of_public_key_and_matches_certificate():
    ident = Identity.generate()
    assert node_id_of_certificate(ident.certificate) == ident.node_id
    assert Identity.generate().node_id != ident.node_id


def test_key_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "sub" / "node.key"
    first = Identity.load_or_create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600
    second = Identity.load_or_create(path)
    assert second.node_id == first.node_id


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "node.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


def test_garbage_key_file_names_the_file(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match=str(path)):
        Identity.load(path)


def test_non_canonical_node_id_rejected():
    text = NodeId(b"\x00" * 16).text
    bad = text[:-1] + "b"  # sets padding bits that the raw value cannot have
    with pytest.raises(IdentityError):
        NodeId.parse(bad)
