"""The gateway process: a GatewayCore driven on one UDP socket, plus optional metrics."""

from __future__ import annotations

import asyncio

from ..driver import Driver
from ..identity import Identity
from ..net.endpoint import Address, DatagramEndpoint
from ..net.udp import open_udp_endpoint
from .core import GatewayCore
from .registry import Registry


class Gateway:
    def __init__(self, core: GatewayCore, driver: Driver) -> None:
        self.core = core
        self._driver = driver

    @classmethod
    async def start(
        cls,
        identity: Identity | None = None,
        *,
        listen: Address = ("0.0.0.0", 9443),
        endpoint: DatagramEndpoint | None = None,
        registry: Registry | None = None,
        node_timeout: float = 30.0,
        keepalive_interval: float = 5.0,
        max_nodes: int = 100_000,
    ) -> "Gateway":
        identity = identity or Identity.generate()
        if endpoint is None:
            endpoint = await open_udp_endpoint(*listen)
        core = GatewayCore(
            identity, registry=registry, node_timeout=node_timeout,
            keepalive_interval=keepalive_interval, max_nodes=max_nodes,
        )
        return cls(core, Driver(core, endpoint))

    @property
    def address(self) -> Address:
        return self._driver.endpoint.local_address

    @property
    def node_id(self):
        return self.core.identity.node_id

    @property
    def handler_errors(self) -> int:
        return self._driver.errors

    async def close(self) -> None:
        self.core.close()
        self._driver.flush()
        await asyncio.sleep(0)
        self._driver.close()
