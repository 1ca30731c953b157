"""Own the concurrency caps of the proxy listener: two phases of a request, each with its own cap.

A request with a body first *receives* it (the part buffered before anything goes upstream:
all of a replayable body, the first ``upstream.replay_max_bytes`` of a larger one), and only
then is *in flight* (token, upstream connection, answer). The two are counted apart
(SECURITY 32, 42): 300 callers that send a header and one body byte fill at most
``listen.max_receiving`` and never take an in-flight slot, so every other caller is still served.
Past either cap the answer is 503 ``overloaded`` at once, with ``Retry-After``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.errors import NotReady


@dataclass(slots=True)
class Admission:
    """Count requests receiving their body and requests in flight, against their caps."""

    max_receiving: int
    max_in_flight: int
    receiving: int = 0
    in_flight: int = 0
    _receiving_slot: _ReceivingSlot = field(init=False, repr=False)
    _in_flight_slot: _InFlightSlot = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._receiving_slot = _ReceivingSlot(self)
        self._in_flight_slot = _InFlightSlot(self)

    def receiving_body(self) -> _ReceivingSlot:
        """Hold a receiving slot for a ``with`` block; 503 when all are taken."""
        if self.receiving >= self.max_receiving:
            raise _overloaded("Too many requests are still sending their body.")
        return self._receiving_slot

    def forwarding(self) -> _InFlightSlot:
        """Hold an in-flight slot for a ``with`` block; 503 when all are taken."""
        if self.in_flight >= self.max_in_flight:
            raise _overloaded("Too many requests in flight.")
        return self._in_flight_slot


# Plain classes, made once per Admission, rather than ``contextlib.contextmanager``: this runs
# for every request, and a generator-based context manager costs several times as much.


class _ReceivingSlot:
    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __enter__(self) -> None:
        self._admission.receiving += 1

    def __exit__(self, *exc: object) -> None:
        self._admission.receiving -= 1


class _InFlightSlot:
    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __enter__(self) -> None:
        self._admission.in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self._admission.in_flight -= 1


def _overloaded(detail: str) -> NotReady:
    return NotReady(detail, reason="overloaded")
