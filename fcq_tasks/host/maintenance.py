"""A host's maintenance mark: drained hosts start nothing and receive nothing.

``fcq drain HOST`` sets it before it moves the host's VMs away, ``fcq
undrain HOST`` clears it. The mark is a file in the host's ``state_dir``,
not a key in Redis, for two reasons: the host itself enforces it (its own
start, ensure and incoming migrations read it), so a message sent late or
by hand cannot bring a VM onto a host in maintenance, and it survives
the reboot that maintenance usually is, and a broker outage. The
heartbeat publishes it, so the orchestrator never places a VM there.

The same module keeps the mark of a VM whose locks an operator holds by
hand (``fcq lock``, see :mod:`fcq_tasks.host.handtools`).

What the drain mark does not do: stop or move anything by itself (VMs running
on a drained host keep running; ensure keeps them healthy), or refuse an
in-place upgrade (the guest stays on this host).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import Refused
from fcq_tasks.fileio import write_atomically

MARK = "drained"


def drained(settings: HostSettings) -> dict[str, Any] | None:
    """The mark (``since``, ``reason``) if this host is drained, else None."""
    path = settings.state_dir / MARK
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        mark = json.loads(text)
    except ValueError:
        mark = None
    # A mark that cannot be read still drains: a torn or hand-edited file
    # must not put a host in maintenance back into service.
    return mark if isinstance(mark, dict) else {"since": None, "reason": "unreadable mark"}


def mark_drained(settings: HostSettings, reason: str) -> tuple[dict[str, Any], bool]:
    """Drain this host (again: the first mark's time is kept); the mark, and if it is new."""
    current = drained(settings)
    if current is not None and current.get("since") is not None:
        return current, False
    mark = {"since": time.time(), "reason": reason}
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(settings.state_dir / MARK, json.dumps(mark) + "\n", mode=0o644)
    return mark, True


def clear_drained(settings: HostSettings) -> bool:
    """Put this host back into service; True if it was drained."""
    try:
        (settings.state_dir / MARK).unlink()
    except FileNotFoundError:
        return False
    return True


def refuse_if_drained(settings: HostSettings, vm: str, what: str) -> None:
    """Raise Refused if this host is drained: *what* ("start", "receive") would put *vm* here."""
    mark = drained(settings)
    if mark is None:
        return
    since = mark.get("since")
    when = "" if not isinstance(since, (int, float)) else \
        time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
    raise Refused(f"{vm}: host {settings.host} is drained for maintenance{when}: it does not "
                  f"{what} VMs; use another host, or `fcq undrain {settings.host}`",
                  vm=vm, host=settings.host, rule="a drained host starts and receives nothing")


def held_mark(settings: HostSettings, vm: str) -> Path:
    """Where ``fcq lock`` marks a VM whose locks this host holds by hand."""
    return settings.state_dir / "held" / vm


def held(settings: HostSettings, vm: str) -> bool:
    return held_mark(settings, vm).exists()


def refuse_if_held(settings: HostSettings, vm: str, why: str = "") -> None:
    if held(settings, vm):
        raise Refused(f"{vm}: its locks are held by hand on {settings.host} (fcq lock): "
                      + (why or f"it is not started until `fcq unlock {vm}`"), vm=vm,
                      host=settings.host, rule="a VM held by hand keeps its locks, not started")
