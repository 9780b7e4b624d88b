"""Shared test helpers: a loopback mesh and a bounded wait."""

import asyncio
import contextlib

from macula.gateway.server import Gateway
from macula.identity import Identity
from macula.node.node import Node


class Mesh:
    """A gateway and nodes on loopback, all closed at the end of the test."""

    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.nodes: list[Node] = []

    async def start_gateway(self, **kwargs) -> Gateway:
        kwargs.setdefault("listen", ("127.0.0.1", 0))
        self.gateway = await Gateway.start(**kwargs)
        return self.gateway

    async def node(self, identity: Identity | None = None, **kwargs) -> Node:
        kwargs.setdefault("gateway", self.gateway.address)
        kwargs.setdefault("listen", ("127.0.0.1", 0))
        node = await Node.start(identity or Identity.generate(), **kwargs)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.close()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.close()


async def wait_until(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)

