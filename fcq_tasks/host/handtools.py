"""An operator's hands on one VM: its locks taken or released by hand, its human monitor.

``fcq lock VM`` takes every volume lock of a stopped VM for this host and
keeps it: while the VM is *held*, no host can start it (the locks are
this host's), and this host's own ensure neither starts it nor releases
the locks (a mark in ``<state_dir>/held/``, kept across reboots). It is
for work on a VM's disks with the guest down. ``fcq unlock VM`` gives the
locks back and lifts the mark. Both refuse what would break an invariant:
locking a VM whose QEMU runs (its locks are its QEMU's), taking a lock
another host holds (for a dead holder that is ``fcq force-unlock``, which
fences first), and unlocking a VM whose QEMU runs here (a running QEMU
without its locks invites a second writer).

``fcq monitor VM`` is QEMU's human monitor (HMP) through QMP's
``human-monitor-command``. Each line opens its own short QMP session under
the VM's operation lock, never one session held open while an operator
types: fcq's own sweeps need the monitor too, and a monitor kept busy
would look silent, which ensure ends by killing the QEMU. The commands
that fcq's bookkeeping stands on are refused: only ALLOWED passes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fcq_tasks.errors import BadRequest, Refused
from fcq_tasks.fileio import write_atomically
from fcq_tasks.host import maintenance
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.storage import VOLUMES

#: The HMP commands `fcq monitor` passes on: looking, and what a console
#: user does to a guest (keys, ACPI button, reset). Everything else is
#: refused, because fcq's bookkeeping stands on it: `stop` leaves a guest
#: paused that only fcq may resume (a paused copy may be one that must never
#: run again), `cont`/`quit`/`migrate*` belong to ensure, stop, kill and
#: migrate, and block commands (snapshot_blkdev, drive_mirror, nbd_server_*,
#: block_resize, drive_del, …) would write or expose the disks outside the
#: locks and fencing.
ALLOWED = frozenset({"info", "help", "?", "sendkey", "screendump", "system_powerdown",
                     "system_reset", "x", "xp", "print", "p", "log", "mouse_move",
                     "mouse_button"})

#: Where the refused commands operators reach for most are done in fcq.
INSTEAD = {"cont": "fcq ensure, or fcq restart", "c": "fcq ensure, or fcq restart",
           "stop": "nothing: a paused guest is left to the operator, and only fcq resumes",
           "quit": "fcq stop or fcq kill", "q": "fcq stop or fcq kill",
           "migrate": "fcq migrate", "block_resize": "fcq resize"}


def lock_by_hand(agent: VMAgent) -> dict[str, Any]:
    """Take and keep every lock of the stopped VM for this host."""
    with agent.locked():
        found = agent.observe()
        agent._refuse_impostor(found)
        if agent.process() is not None:
            raise Refused(f"{agent.name}: runs on this host: its QEMU holds its locks already; "
                          "stop it before holding them by hand", vm=agent.name,
                          rule="hand locks only for a VM that is not running")
        others = sorted({o for o in found.lock_owners.values()
                         if o is not None and o != agent.settings.host})
        if others:
            raise Refused(f"{agent.name}: locked by host {others[0]}; a live holder releases "
                          f"them itself, a dead one loses them to `fcq force-unlock`",
                          vm=agent.name, host=others[0])
        missing = [v.name for v in agent.storage.volumes(agent.name) if v.size is None]
        if missing:
            raise Refused(f"{agent.name}: has no volume {', '.join(missing)} yet (never "
                          "started): nothing to hold", vm=agent.name)
        taken = agent.take_locks()  # all or none
        mark = maintenance.held_mark(agent.settings, agent.name)
        mark.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(mark, json.dumps({"since": time.time()}) + "\n", mode=0o644)
        agent.log.warning("held-by-hand", action="lock", volumes=list(VOLUMES), taken=taken)
        return {"vm": agent.name, "host": agent.settings.host, "operation": "lock",
                "outcome": "held", "volumes": list(VOLUMES), "taken": taken}


def unlock_by_hand(agent: VMAgent) -> dict[str, Any]:
    """Give this host's locks of the stopped VM back; lift the hand mark."""
    with agent.locked():
        found = agent.observe()
        agent._refuse_impostor(found)
        if agent.process() is not None:
            raise Refused(f"{agent.name}: runs on this host: its locks belong to its QEMU; "
                          "`fcq stop` releases them", vm=agent.name,
                          rule="a running QEMU keeps its locks")
        ours = sorted(v for v, o in found.lock_owners.items() if o == agent.settings.host)
        others = sorted({o for o in found.lock_owners.values()
                         if o is not None and o != agent.settings.host})
        was_held = maintenance.held(agent.settings, agent.name)
        agent.release_locks()
        maintenance.held_mark(agent.settings, agent.name).unlink(missing_ok=True)
        agent.log.warning("unheld-by-hand", action="unlock", released=ours)
        result: dict[str, Any] = {"vm": agent.name, "host": agent.settings.host,
                                  "operation": "unlock", "released": ours,
                                  "outcome": "released" if ours or was_held else "unchanged"}
        if others:
            result["note"] = (f"host {others[0]} holds locks of {agent.name}: only it can "
                              "release them (or `fcq force-unlock` once it is dead)")
        return result


def human_monitor(agent: VMAgent, line: str) -> str:
    """Run one HMP command line on the VM's QEMU; its text output."""
    words = line.split()
    if not words:
        return ""
    if words[0] not in ALLOWED:
        instead = INSTEAD.get(words[0])
        raise BadRequest("command", f"{words[0]!r} is refused here"
                         + (f" (instead: {instead})" if instead else "")
                         + f"; fcq monitor runs only: {', '.join(sorted(ALLOWED))}")
    with agent.locked():
        if agent.process() is None:
            raise Refused(f"{agent.name}: no QEMU runs on this host", vm=agent.name)
        # sendkey, system_reset, ...: what QEMU or its guest report may change.
        agent.forget_check()
        with agent.qemu.monitor() as mon:
            return mon.human(line)
