"""The phases of a migration, from the two halves' wall-clock marks (pure)."""

from __future__ import annotations

from fcq_tasks.host.migration.phases import migration_phases


def test_phases_from_marks() -> None:
    t = 1_000_000.0
    src = {"total_ms": 300, "downtime_ms": 20,
           "marks": {"begin": t + 0.010, "held": t + 0.011, "addr": t + 0.200,
                     "migrate": t + 0.205, "completed": t + 0.510, "src_done": t + 0.530,
                     "end": t + 0.560}}
    dst = {"marks": {"begin": t + 0.005, "held": t + 0.006, "qemu_up": t + 0.150,
                     "addr": t + 0.190, "received": t + 0.505, "handed_seen": t + 0.535,
                     "resumed": t + 0.545, "end": t + 0.570}}
    p = migration_phases(src, dst, sent_at=t, callback_at=t + 0.580)
    assert p["queue_dst"] == 5.0 and p["queue_src"] == 10.0
    assert p["prepare"] == 185.0 and p["qemu_start"] == 144.0
    assert p["rendezvous"] == 190.0 and p["addr_lag"] == 10.0
    assert p["copy"] == 310.0 and p["qemu_total"] == 300.0 and p["copy_lag"] == 5.0
    assert p["handover"] == 35.0 and p["pause"] == 55.0
    assert (p["src_handover"], p["dst_notice"], p["dst_resume"]) == (20.0, 5.0, 10.0)
    assert p["finish"] == 35.0 and p["src_report"] == 15.0 and p["chord"] == 10.0


def test_missing_marks_leave_phases_out() -> None:
    """A rescued half, or one from an older worker, has no marks: no made-up phases."""
    p = migration_phases({"total_ms": 300, "downtime_ms": 20}, {}, sent_at=None,
                         callback_at=0.0)
    assert p == {"qemu_total": 300.0}
