"""VMSteps' looks at its VM: what runs here, who holds which lock, and what a full look found.

Every planner decision starts from :meth:`Looks.observe`. Locks, the QEMU
process (and whether it is fcq's) and QEMU's run state are read at every
look; a running QEMU's drives and guest agent port may come from the last
full look (``<vm>.checked``), under the rules :meth:`Looks._last_check`
gives. :meth:`Looks.glance` is the look a kill needs, without the monitor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import psutil

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import file_version, spec_path
from fcq_tasks.errors import QemuRefused, QmpError
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.heldmonitors import HeldMonitors
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths, boot_id
from fcq_tasks.host.plan import Observed, Run
from fcq_tasks.storage import Storage, VolumeInfo

#: Seconds a full look's findings about a running QEMU's drives and guest agent
#: stand in for new ones at later sweeps (Looks._last_check). The guest
#: agent is asked (a frozen guest thawed, QEMU generations told) at each
#: full look, so also this often when nothing else changes.
FULL_CHECK_AFTER = 300.0

#: QEMU's run states with a name of their own here (any other: paused).
RUNSTATES = {"running": Run.RUNNING, "inmigrate": Run.INMIGRATE,
             "postmigrate": Run.POSTMIGRATE, "io-error": Run.IO_ERROR}


def taking_over_from(vols: list[VolumeInfo], me: str) -> str:
    """The host this host broke some of the VM's locks from, while it holds others."""
    broken = {v.broken_from for v in vols if v.broken_by == me and v.lock_owner is None}
    for old in sorted(h for h in broken if h):
        if any(v.lock_owner == old for v in vols):
            return old
    return ""


class Looks:
    """VMSteps' looks at its VM: what runs, who holds which lock, what a full look found.

    A mixin: VMSteps' constructor sets the attributes below.
    """

    settings: HostSettings
    name: str
    paths: VMRunPaths
    qemu: QemuProcess
    storage: Storage
    log: Any
    held_monitors: HeldMonitors | None

    def process(self) -> psutil.Process | None:
        return self.qemu.find()

    def observe(self, reuse: bool = False) -> Observed:
        """What runs here and who holds which lock, looked at now.

        Locks, the process and QEMU's run state are read at every call:
        every safety rule of the planner rests on them. *reuse* (the sweep's
        ensure): a running QEMU's drives (size, I/O limits) and whether its
        guest agent holds its port are taken from the last full look when
        that is recent, so that a converged VM costs one ``query-status``
        (see :meth:`_last_check`).
        """
        vols = self.storage.volumes(self.name)
        owners = {v.name: v.lock_owner for v in vols}
        me = self.settings.host
        handed_to_us = handed_to(vols, me)
        holders = {v.lock_owner for v in vols}
        handed_away_to = ""
        if len(holders) == 1 and all(v.handed_from == me for v in vols):
            handed_away_to = str(next(iter(holders)))
        base = Observed(Run.STOPPED, owners, next((v.size for v in vols if v.name == "root"),
                                                    None),
                        handed_to_us=handed_to_us, handed_away_to=handed_away_to,
                        taking_over_from=taking_over_from(vols, me))
        found = self.qemu.examine()
        if found.impostor is not None:
            self.log.error("impostor", pid=found.impostor, action="refuse",
                           detail="a process names this VM's config but is not the QEMU "
                           "fcq started (start time differs)")
            return _with(base, run=Run.IMPOSTOR, impostor_pid=found.impostor)
        if found.proc is None:
            return _with(base, run=Run.CRASHED if self.paths.leftovers() else Run.STOPPED)
        key = self._check_key(found.proc) if reuse else None
        last = self._last_check(key) if key is not None else None
        if last is not None and self.held_monitors is not None:
            assert key is not None
            # Only "running" is taken from the held connection; any other
            # answer, or none, is asked anew below on fcq's own monitor.
            held = self.held_monitors.runstate(self.name, str(self.paths.sweep),
                                               (key["pid"], key["start_ticks"]))
            if held == "running":
                self.paths.silent_mark.unlink(missing_ok=True)
                return _from_last(base, last)
        refused = False
        try:
            with self.qemu.monitor() as mon:
                state = mon.runstate()
                if last is not None and state == "running":
                    blocks = None
                else:
                    try:
                        blocks = mon.blocks()
                    except QemuRefused as err:
                        # A fenced QEMU (blocklisted RBD client) answers but
                        # cannot describe its disks: what runs is still known.
                        self.log.warning("query-block-refused", error=str(err))
                        blocks = {}
                        refused = True
                    # In the same session: ensure asks the guest agent only when it runs.
                    agent = state == "running" and mon.guest_agent_open()
        except QmpError as err:
            silent_for = self._silent_for()
            self.log.warning("qmp-unreachable", error=str(err), silent_for=round(silent_for, 1))
            return _with(base, run=Run.UNRESPONSIVE, silent_for=silent_for)
        self.paths.silent_mark.unlink(missing_ok=True)
        run = RUNSTATES.get(state, Run.PAUSED)
        if run is Run.PAUSED:
            ident = self.qemu.identity()
            if ident is not None and ident.incoming is not None:
                run = Run.RECEIVED
        if blocks is None:
            assert last is not None
            return _from_last(base, last)
        root = blocks.get("root")
        if key is not None and run is Run.RUNNING and root is not None and not refused:
            write_atomically(self.paths.checked, json.dumps({
                **key, "since": time.monotonic(), "root": root.size, "iops": root.iops,
                "bps": root.bps, "agent_open": agent}))
        return _with(base, run=run, root_bytes=root.size if root else base.root_bytes,
                     iops=root.iops if root else 0, bps=root.bps if root else 0,
                     agent_open=agent)

    def glance(self) -> Observed:
        """What observe() finds without asking the monitor: locks, and whether our QEMU lives.

        Enough to kill a VM or to report one killed, and a hung monitor (the
        usual reason for a kill) cannot delay it. A live QEMU counts as
        running whatever its runstate.
        """
        vols = self.storage.volumes(self.name)
        base = Observed(Run.STOPPED, {v.name: v.lock_owner for v in vols})
        found = self.qemu.examine()
        if found.impostor is not None:
            return _with(base, run=Run.IMPOSTOR, impostor_pid=found.impostor)
        if found.proc is None:
            return _with(base, run=Run.CRASHED if self.paths.leftovers() else Run.STOPPED)
        return _with(base, run=Run.RUNNING)

    def _check_key(self, proc: psutil.Process) -> dict[str, Any] | None:
        """What a full look's findings hold for: this very QEMU, this config file, this boot."""
        ident = self.qemu.identity()
        if ident is None or ident.start_ticks is None or ident.pid != proc.pid:
            return None  # a QEMU not started (or adopted) by this fcq: always looked at in full
        try:
            config = list(file_version(os.stat(spec_path(self.settings.vm_config_dir,
                                                         self.name))))
        except OSError:
            return None
        return {"boot_id": boot_id(), "pid": proc.pid, "start_ticks": ident.start_ticks,
                "config": config, "generation": self.settings.qemu_generation}

    def _last_check(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The findings of the last full look at this QEMU, if they may stand in for a new one.

        Why reusing them is safe: they are facts of one QEMU instance that
        only an order to that QEMU changes (a block resize, a throttle, a
        guest agent starting or stopping, a freeze), and they feed no
        safety rule (those rest on locks, the process and the run state,
        read at every look). Every fcq step that gives such an order
        forgets them first (:meth:`forget_check`: throttle, grow_root,
        pause, resume, snapshot, ``fcq monitor``), whichever process runs
        it; a new QEMU (start, migration, upgrade), another config file
        version, boot or qemu_generation does not match their key; and
        after :data:`FULL_CHECK_AFTER` seconds they are looked at anew,
        which is also how an order given behind fcq's back (a throttle by
        hand, a guest frozen from inside) is noticed.
        """
        try:
            data = json.loads(self.paths.checked.read_text())
            if not isinstance(data, dict) or any(data.get(k) != v for k, v in key.items()):
                return None
            age = time.monotonic() - float(data["since"])
            facts = {"root": int(data["root"]), "iops": int(data["iops"]),
                     "bps": int(data["bps"]), "agent_open": bool(data["agent_open"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return facts if 0 <= age < FULL_CHECK_AFTER else None

    def forget_check(self) -> None:
        """The next look at this VM asks QEMU everything (an order may change what it said)."""
        self.paths.checked.unlink(missing_ok=True)

    def _silent_for(self) -> float:
        """Seconds since QMP was first seen silent; the mark survives across sweeps.

        The mark holds a reading of the monotonic clock (shared by every
        process of one boot, never stepped): a wall-clock step can neither
        make a slow monitor look silent for hours nor reset its grace.
        """
        mark = self.paths.silent_mark
        now = time.monotonic()
        try:
            data = json.loads(mark.read_text())
            if data.get("boot_id") == boot_id():
                return max(0.0, now - float(data["since"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        write_atomically(mark, json.dumps({"boot_id": boot_id(), "since": now}))
        return 0.0


def handed_to(vols: list[VolumeInfo], host: str) -> bool:
    return all(v.lock_owner == host and v.handed_from is not None and not v.claimed
               for v in vols)


def _from_last(base: Observed, last: dict[str, Any]) -> Observed:
    """A running QEMU as the last full look described it (observe's *reuse*)."""
    return _with(base, run=Run.RUNNING, root_bytes=last["root"], iops=last["iops"],
                 bps=last["bps"], agent_open=bool(last["agent_open"]), fresh=False)


def _with(observed: Observed, **changes: Any) -> Observed:
    return dataclasses.replace(observed, **changes)
