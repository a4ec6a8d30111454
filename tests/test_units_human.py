"""fcq_tasks/units.py: numbers as a person reads them."""

from __future__ import annotations

from fcq_tasks import units


def test_sizes_rates_durations() -> None:
    assert units.size(3 * 2**30) == "3 GiB"
    assert units.size(3221225472 + 2**29) == "3.5 GiB"
    assert units.size(1.4567 * 2**30) == "1.46 GiB"
    assert units.size(512 * 2**20) == "512 MiB"
    assert units.size(115072379) == "110 MiB"
    assert units.size(100) == "100 B"
    assert units.size(None) == "?"
    assert units.rate_mbit(1493.9350714285713) == "178 MiB/s"
    assert units.rate_mbit(16) == "1.91 MiB/s"
    assert units.duration_ms(17.4) == "17 ms" and units.duration_ms(12500) == "12.5 s"
