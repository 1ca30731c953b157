"""Own the drain: which requests are in flight, and whether the proxy is shutting down."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Drain:
    """The requests in flight on the proxy listener, and the draining flag both listeners read."""

    in_flight: int = 0
    draining: bool = False
    # Set whenever no request is in flight; the drain waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # The handler tasks in flight, so that a drain that runs out can cancel them.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def enter(self, task: asyncio.Task[Any] | None) -> None:
        """Count a request in."""
        self.in_flight += 1
        if self.in_flight == 1:
            self.idle.clear()
        if task is not None:
            self.tasks.add(task)

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """Count a request out."""
        self.in_flight -= 1
        if task is not None:
            self.tasks.discard(task)
        if self.in_flight == 0:
            self.idle.set()
