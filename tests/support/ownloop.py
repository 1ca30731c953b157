"""Fakes on an event loop of their own, in a thread: the commands under test run theirs.

``check``, ``token`` and the other commands call ``asyncio.run`` themselves, so the fakes they
reach cannot share the test's loop. A module fixture runs them here::

    async def serve(ready):            # on the fakes' own loop
        ...start servers...
        ready(Fakes(loop=asyncio.get_running_loop(), stop=asyncio.Event(), ...))
        ...await the stop event, then close them...

    yield from on_own_loop("cli-fakes", serve)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from queue import Queue
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class OnOwnLoop:
    """What runs on the fakes' loop: the loop, and the event that stops it."""

    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the fakes' loop (they are not thread-safe) and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)


F = TypeVar("F", bound=OnOwnLoop)


def on_own_loop(
    name: str, serve: Callable[[Callable[[F], None]], Coroutine[Any, Any, None]]
) -> Iterator[F]:
    """Run ``serve(ready)`` in a thread named ``name``; yield what it passed to ``ready``.

    ``serve`` starts the fakes, calls ``ready`` with them, waits for their ``stop`` event and
    closes them. A failure before ``ready`` is raised here; at the end ``stop`` is set and the
    thread joined.
    """
    started: Queue[F | BaseException] = Queue()

    def thread_main() -> None:
        try:
            asyncio.run(serve(started.put))
        except BaseException as exc:  # reported to the fixture, which raises it
            started.put(exc)

    thread = threading.Thread(target=thread_main, name=name, daemon=True)
    thread.start()
    item = started.get(timeout=30)
    if isinstance(item, BaseException):
        raise item
    try:
        yield item
    finally:
        item.loop.call_soon_threadsafe(item.stop.set)
        thread.join(timeout=20)
