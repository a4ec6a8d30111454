"""Every wait in fcq: a deadline on the monotonic clock, and one polling helper.

The wall clock is stepped by NTP and by operators; a wait measured with it
can end at once or never. ``time.monotonic`` is CLOCK_MONOTONIC, shared by
every process of one boot and never stepped, so a deadline made here means
the same in any thread or process of this host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, named for error messages."""

    at: float
    what: str = "the operation"

    @classmethod
    def after(cls, seconds: float, what: str = "the operation") -> Deadline:
        return cls(time.monotonic() + seconds, what)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def sleep(self, interval: float) -> None:
        """Sleep *interval* seconds, or less if the deadline comes first."""
        time.sleep(min(interval, self.remaining()))


def poll_until(check: Callable[[], T | None], deadline: Deadline, interval: float) -> T | None:
    """Call *check* until it returns something other than None or False, or the deadline.

    Returns that value, or None when the deadline passed first. *check* is
    called at least once, and once more at the deadline, so a condition that
    became true during the last sleep is not missed.
    """
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if deadline.passed():
            return None
        deadline.sleep(interval)
