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
