"""Bounded polling: wait until a condition holds, fail after a timeout."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout_s: float = 5.0
) -> None:
    """Wait until ``condition`` (plain or async) holds; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(0.01)
