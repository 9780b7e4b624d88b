import pytest
from helpers import Mesh


@pytest.fixture
async def mesh():
    m = Mesh()
    await m.start_gateway()
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
def procs(tmp_path):
    """`macula` processes for one test (test_cli_up.Processes), stopped at its end."""
    from test_cli_up import Processes

    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()
