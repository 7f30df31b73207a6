"""Figures of repeated measurements: a bench figure is the median of several repeats, warm-up left out, printed
with its minimum and maximum so that a reader sees how still the machine held."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Spread:
    """Minimum, median and maximum of a figure's repeats."""

    min: float
    median: float
    max: float
    repeats: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(min(values), statistics.median(values), max(values), len(values))

    def text(self, digits: int = 2) -> str:
        """'median (min-max of N)'."""
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f} of {self.repeats})"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def repeated(measure: Callable[[], float], repeats: int, warmup: int = 1) -> Spread:
    """Call ``measure`` ``warmup`` times untimed, then ``repeats`` times; the spread of what it returned."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        measure()
    return Spread.of([measure() for _ in range(repeats)])
