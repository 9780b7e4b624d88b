"""docs/API.md cannot drift: each of its Python examples runs as written, and every public
name, method and event of the package is described there."""

import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import macula
from macula import Gateway, Identity, Node, NodeId, PeerSession, Stream
from macula.forward import Exposer, Forwarder
from macula.session import events

API = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "API.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", API, flags=re.S)


def test_the_page_has_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_each_example_runs_as_written(index: int, tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", EXAMPLES[index]], capture_output=True,
                         text=True, timeout=90, cwd=tmp_path)
    assert out.returncode == 0, f"example {index + 1}:\n{EXAMPLES[index]}\n{out.stderr}"


def test_every_public_name_is_described() -> None:
    missing = [name for name in macula.__all__ if name != "__version__" and f"`{name}" not in API
               and f"{name}(" not in API and f"{name}," not in API]
    assert not missing, f"docs/API.md does not describe {missing}"


@pytest.mark.parametrize("cls", [Node, PeerSession, Stream, Gateway, Identity, NodeId,
                                 Exposer, Forwarder])
def test_every_public_method_is_described(cls) -> None:
    public = [name for name, _ in inspect.getmembers(cls) if not name.startswith("_")
              and name not in ("core",)]
    missing = [name for name in public if not re.search(rf"\b{name}\b", API)]
    assert not missing, f"docs/API.md does not describe {cls.__name__}.{missing}"


def test_every_event_is_described() -> None:
    names = [name for name, obj in vars(events).items()
             if inspect.isclass(obj) and obj.__module__ == events.__name__]
    missing = [name for name in names if f"`{name}`" not in API]
    assert not missing, f"docs/API.md does not describe events {missing}"
