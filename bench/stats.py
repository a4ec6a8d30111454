"""Paired measurements: fcq against its bare counterpart, interleaved.

Every target in ``make bench`` is measured as pairs run one after the
other (fcq, bare, fcq, bare, ...), so that a machine that slows down for a
while slows both sides alike. A pair gives one ratio; the report is the
median and the spread (lowest to highest) of each side and of the ratio.

A verdict against a target is only given when the spread allows it: a
target is *met* when even the worst pair meets it, *missed* when even the
best pair misses it, and otherwise the run could not tell (the spread is
wider than the gap it would claim), which is printed as such.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Pairs:
    """fcq and bare measurements, one pair per index, in seconds (or MB)."""

    fcq: list[float]
    bare: list[float]

    def __post_init__(self) -> None:
        if len(self.fcq) != len(self.bare) or not self.fcq:
            raise ValueError("pairs: fcq and bare need the same, non-zero number of samples")

    @property
    def ratios(self) -> list[float]:
        return [f / b for f, b in zip(self.fcq, self.bare, strict=True)]

    @property
    def gaps(self) -> list[float]:
        return [f - b for f, b in zip(self.fcq, self.bare, strict=True)]


def interleave(fcq: Callable[[], float], bare: Callable[[], float], pairs: int = 5) -> Pairs:
    """Run *fcq* and *bare* alternately *pairs* times; each returns one measurement."""
    f, b = [], []
    for _ in range(pairs):
        f.append(fcq())
        b.append(bare())
    return Pairs(f, b)


def spread(values: list[float], scale: float = 1.0, fmt: str = ".0f") -> str:
    """``median [low-high]`` of *values* times *scale*."""
    med = statistics.median(values) * scale
    return (f"{med:{fmt}} [{min(values) * scale:{fmt}}-{max(values) * scale:{fmt}}]")


def verdict(values: list[float], limit: float) -> str:
    """met / missed / undecided for "every value <= limit"."""
    if max(values) <= limit:
        return "met"
    if min(values) > limit:
        return "MISSED"
    return "undecided: the spread straddles the target"


def line(label: str, p: Pairs, *, unit: str = "ms", scale: float = 1000.0, fmt: str = ".0f",
         ratio_limit: float | None = None, gap_limit: float | None = None,
         abs_limit: float | None = None) -> str:
    """One report line: both sides, the ratio, and a verdict against the target.

    *ratio_limit* is a target such as "fcq <= 1.2x bare"; *gap_limit* (in the
    measurement's own unit, seconds) one such as "fcq <= bare + 50 ms";
    *abs_limit* (seconds too) one for fcq alone, such as "fcq <= 1 s".
    """
    out = (f"  {label}: fcq {spread(p.fcq, scale, fmt)} {unit} vs bare "
           f"{spread(p.bare, scale, fmt)} {unit}; ratio {spread(p.ratios, 1.0, '.2f')}x"
           f" ({len(p.fcq)} pairs, median [low-high])")
    if ratio_limit is not None:
        out += f"\n      target <= {ratio_limit:.2f}x: {verdict(p.ratios, ratio_limit)}"
    if gap_limit is not None:
        out += (f"\n      target <= bare + {gap_limit * scale:{fmt}} {unit} (gap "
                f"{spread(p.gaps, scale, fmt)} {unit}): {verdict(p.gaps, gap_limit)}")
    if abs_limit is not None:
        out += (f"\n      target fcq <= {abs_limit * scale:{fmt}} {unit}: "
                f"{verdict(p.fcq, abs_limit)}")
    return out
