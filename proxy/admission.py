"""Own the concurrency caps of the proxy listener: two phases of a request, each with its own cap.

A request with a body first *receives* it (the part buffered before anything goes upstream:
all of a replayable body, the first ``upstream.replay_max_bytes`` of a larger one), and only
then is *in flight* (token, upstream connection, answer). The two are counted apart
(SECURITY 32, 42): 300 callers that send a header and one body byte fill at most
``listen.max_receiving`` and never take an in-flight slot, so every other caller is still served.
Past either cap the answer is 503 ``overloaded`` at once, with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import NotReady


@dataclass(slots=True)
class Admission:
    """Count requests receiving their body and requests in flight, against their caps."""

    max_receiving: int
    max_in_flight: int
    receiving: int = 0
    in_flight: int = 0

    @contextmanager
    def receiving_body(self) -> Iterator[None]:
        """Hold a receiving slot for the block; 503 when all are taken."""
        if self.receiving >= self.max_receiving:
            raise _overloaded("Too many requests are still sending their body.")
        self.receiving += 1
        try:
            yield
        finally:
            self.receiving -= 1

    @contextmanager
    def forwarding(self) -> Iterator[None]:
        """Hold an in-flight slot for the block; 503 when all are taken."""
        if self.in_flight >= self.max_in_flight:
            raise _overloaded("Too many requests in flight.")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _overloaded(detail: str) -> NotReady:
    return NotReady(detail, reason="overloaded")
