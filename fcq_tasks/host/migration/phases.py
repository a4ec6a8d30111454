"""Where the time of one migration went: its phases, from the two halves' marks.

Each half stamps the moments it passes (``Half.mark``, wall clock: the two
halves run on two hosts, whose wall clocks are NTP-synced while their
monotonic clocks do not compare) and returns them as ``marks``; the chord's
callback turns them into phases, in milliseconds:

==================  ===========================================================
``queue_dst/src``   orchestrator sent the chord → that half began on its worker
``prepare``         dst began → its address published (op lock, slot, QEMU
                    started ``-incoming``, listening); ``qemu_start`` inside it
``rendezvous``      src began → it read the address (what it waited for dst);
                    ``addr_lag``: dst published → src read it
``copy``            src read the address → src saw the copy completed;
                    ``qemu_total``: QEMU's own total-time; ``copy_lag``: src saw
                    it that much after QEMU's total-time ended
``handover``        src saw the copy completed → dst's ``cont`` returned:
                    ``src_handover`` (kill, locks handed, config, ``src-done``),
                    ``dst_notice`` (``src-done`` → dst saw every lock handed),
                    ``dst_resume`` (locks taken, config, ``cont``)
``pause``           QEMU's downtime + ``handover``: how long the guest ran nowhere;
                    ``stopped``: the same seen directly, QEMU's STOP event on the
                    source → dst's ``cont`` returned (when the source saw the event)
``finish``          dst's ``cont`` → the callback began: ``src_report`` (until
                    the source half ended), ``chord`` (last half ended →
                    callback began)
==================  ===========================================================

A phase whose marks are missing (a rescue, an older worker) is left out.
"""

from __future__ import annotations

from typing import Any


def _ms(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000, 1)


def migration_phases(src: dict[str, Any], dst: dict[str, Any], sent_at: float | None,
                     callback_at: float) -> dict[str, float]:
    """Phases in ms of one migration, from the halves' results *src* and *dst*."""
    s: dict[str, float] = src.get("marks") or {}
    d: dict[str, float] = dst.get("marks") or {}
    total = src.get("total_ms")
    downtime = src.get("downtime_ms")
    qemu_done = (s["migrate"] + total / 1000) if "migrate" in s and total else None
    last_end = max(s.get("end", 0.0), d.get("end", 0.0)) or None
    phases = {
        "queue_dst": _ms(d.get("begin"), sent_at),
        "queue_src": _ms(s.get("begin"), sent_at),
        "prepare": _ms(d.get("addr"), d.get("begin")),
        "qemu_start": _ms(d.get("qemu_up"), d.get("held")),
        "rendezvous": _ms(s.get("addr"), s.get("begin")),
        "addr_lag": _ms(s.get("addr"), d.get("addr")),
        "copy": _ms(s.get("completed"), s.get("addr")),
        "qemu_total": float(total) if total is not None else None,
        "copy_lag": _ms(s.get("completed"), qemu_done),
        "handover": _ms(d.get("resumed"), s.get("completed")),
        "src_handover": _ms(s.get("src_done"), s.get("completed")),
        "dst_notice": _ms(d.get("handed_seen"), s.get("src_done")),
        "dst_resume": _ms(d.get("resumed"), d.get("handed_seen")),
        "stopped": _ms(d.get("resumed"), s.get("stopped")),
        "finish": _ms(callback_at, d.get("resumed")),
        "src_report": _ms(s.get("end"), d.get("resumed")),
        "chord": _ms(callback_at, last_end),
    }
    handover = phases["handover"]
    if handover is not None and downtime is not None:
        phases["pause"] = round(float(downtime) + handover, 1)
    return {k: v for k, v in phases.items() if v is not None}
