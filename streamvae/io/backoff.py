"""Exponential backoff between reconnection attempts (sources and the MQTT sink share it).

>>> backoff = Backoff(initial=0.5, maximum=4.0)
>>> [backoff.next_delay() for _ in range(5)]
[0.5, 1.0, 2.0, 4.0, 4.0]
>>> backoff.reset(); backoff.next_delay()
0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays that double from ``initial`` up to ``maximum`` seconds; :meth:`reset` after a success."""

    initial: float = 0.5
    maximum: float = 10.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ValueError(
                f"need 0 < initial <= maximum and factor >= 1, got initial={self.initial}, "
                f"maximum={self.maximum}, factor={self.factor}"
            )
        self.reset()

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return delay
