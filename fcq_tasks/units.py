"""Numbers as a person reads them: sizes in KiB/MiB/GiB, rates in MiB/s, times in ms or s.

Only for text meant for people (progress lines, messages); JSON keeps the
exact numbers.
"""

from __future__ import annotations

_SIZES = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _short(value: float) -> str:
    """At most three significant digits, no trailing zeros: 3, 2.5, 1.46, 178."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") if value < 10 else f"{value:.1f}".rstrip(
        "0").rstrip(".")


def size(n: float | None) -> str:
    """Bytes: ``3 GiB``, ``1.46 GiB``, ``512 MiB``, ``100 B``."""
    if n is None:
        return "?"
    for unit, factor in _SIZES:
        if abs(n) >= factor:
            return f"{_short(n / factor)} {unit}"
    return f"{n:.0f} B"


def rate_mbit(mbps: float | None) -> str:
    """A rate QEMU gives in megabits (10^6 bits) per second, as MiB/s."""
    if mbps is None:
        return "?"
    return f"{_short(mbps * 1e6 / 8 / 2**20)} MiB/s"


def duration_ms(ms: float | None) -> str:
    """Milliseconds: ``17 ms`` below 10 s, ``12.5 s`` above."""
    if ms is None:
        return "?"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{_short(ms / 1000)} s"
