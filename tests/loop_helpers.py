"""Helpers for tests that drive channels in a fresh event loop of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from meshai import linkem
from meshai.protocol import PROTOCOL_VERSION, Hello

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 9.0) -> T:
    """Run ``coro`` in a fresh loop, then check it left no task behind."""

    async def main() -> T:
        result = await asyncio.wait_for(coro, timeout)
        await asyncio.sleep(0)
        others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert not others, f"tasks left running: {others}"
        return result

    return asyncio.run(main())


def hello(node_id: str, role: str = "node") -> Hello:
    """A Hello as a node (or a client) would send it."""
    return Hello(node_id, PROTOCOL_VERSION, role, {"accel": "cpu"}, "127.0.0.1:9" if role == "node" else "")


@pytest.fixture
def clean_linkem() -> Iterator[None]:
    """The test starts and ends with no link emulation installed and the link up (module state)."""
    linkem.uninstall()
    linkem.link_up()
    try:
        yield
    finally:
        linkem.uninstall()
        linkem.link_up()
