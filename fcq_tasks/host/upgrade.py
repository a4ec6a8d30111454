"""In-place upgrade: a running guest moves onto a fresh QEMU of this host, no reboot.

When the host's QEMU binary was updated (``qemu_generation`` raised), VMs
keep running the old binary until they are restarted. ``fcq upgrade VM``
live-migrates the guest into a second QEMU of the current binary on the
same host over a unix socket, then retires the old one:

1. *admit*: the host must have the memory for both copies at once
   (vm_max_total_memory), checked under the host's admission lock;
2. *start*: the new QEMU starts paused (``-incoming defer -S``), its
   sockets and pidfile under ``<run_dir>/u/`` (named by a hash of the VM's
   name, so socket paths stay short), reading the VM's own config file;
3. *copy*: memory is copied while the guest runs; QEMU pauses it for the
   last round (the downtime);
4. *switch*: the old QEMU is ended (quit, else SIGKILL) and gone before the
   new one runs guest code (``cont``): never two running copies. The locks
   stay with this host throughout (the same host holds them; on RBD the new
   QEMU's clients are added to the recorded writers, so a fence still
   covers it); then the new QEMU's files take the old ones' names.

Any failure before the switch leaves the guest on the old QEMU (a failed
copy resumes it there); if the old QEMU died, the VM is started again by
the ensure that follows. A process that dies anywhere in between leaves
files under ``u/``; the next operation on the VM (it holds the VM's
operation lock, as the upgrade did) settles them first (:func:`settle`):
it finishes a switch whose copy was complete, and otherwise removes the
new copy and keeps the old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcq_tasks.config.vmspec import VMSpec, parse_vm_data
from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import FcqError, Inconsistent, QemuError, Refused
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.accel import detect_accelerator
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths
from fcq_tasks.hazmat.template import render_qemu_config, run_paths
from fcq_tasks.host import admission
from fcq_tasks.host.fencewatch import record_clients
from fcq_tasks.host.plan import Run
from fcq_tasks.storage import VOLUMES

if TYPE_CHECKING:
    from fcq_tasks.host.agent import VMAgent

#: Seconds between two looks at the copy.
POLL = 0.05
#: Seconds a completed copy may take to show as received on the new QEMU.
RECEIVED_WAIT = 10.0
#: Migration states in which the copy may still complete.
ACTIVE = frozenset({"setup", "active", "cancelling", "pre-switchover", "device",
                    "postcopy-active", "wait-unplug"})
#: The new QEMU's files that take the old ones' names at the switch; the
#: identity last: until it moves, the files under u/ say which QEMU is new.
SWITCHED = ("qmp", "ga", "observer", "sweep", "seed", "serial_log", "pidfile", "identity",
            "clients")


def _prefix(agent: VMAgent) -> str:
    return hashlib.sha256(agent.name.encode()).hexdigest()[:16]


def _side_dir(agent: VMAgent) -> Path:
    return agent.settings.run_dir / admission.UPGRADE_DIR


def new_side_paths(agent: VMAgent) -> VMRunPaths:
    """Paths for one attempt's new QEMU: never an earlier attempt's.

    A QEMU deletes its sockets and pidfile by the paths it opened them
    under when it quits, even after they were renamed: a QEMU that came
    from an earlier upgrade would delete a later attempt's files.
    """
    return VMRunPaths(_side_dir(agent), f"{_prefix(agent)}-{secrets.token_hex(3)}",
                      vm=agent.name)


def side_attempts(agent: VMAgent) -> list[VMRunPaths]:
    """Every attempt that left files under u/ (normally none)."""
    try:
        entries = os.listdir(_side_dir(agent))
    except FileNotFoundError:
        return []
    prefix = _prefix(agent) + "-"
    stems = sorted({e.split(".", 1)[0] for e in entries if e.startswith(prefix)})
    return [VMRunPaths(_side_dir(agent), stem, vm=agent.name) for stem in stems]


def pending(agent: VMAgent) -> bool:
    """Whether an upgrade left files behind (cheap: one directory listing)."""
    return bool(side_attempts(agent))


def _resumed_marker(side: VMRunPaths) -> Path:
    """Written just before the new QEMU is told to run: from then on it holds the guest."""
    return side.run_dir / f"{side.name}.resumed"


def _clean_side(side: VMRunPaths) -> None:
    for entry in os.listdir(side.run_dir):
        if entry.startswith(side.name + "."):
            (side.run_dir / entry).unlink(missing_ok=True)


def upgrade(agent: VMAgent) -> dict[str, Any]:
    """Move the running VM onto a fresh QEMU of the host's current generation."""
    with agent.locked():
        spec = agent.spec()
        found = agent.observe()
        result: dict[str, Any] = {"vm": agent.name, "host": agent.settings.host,
                                  "operation": "upgrade", "found": found.run.value}
        ident = agent.qemu.identity()
        current = agent.settings.qemu_generation
        if found.run is not Run.RUNNING or ident is None:
            raise Refused(f"{agent.name}: is {found.run.value} here: only a running VM is "
                          "upgraded in place (a stopped one starts on the current QEMU)",
                          vm=agent.name, found=found.run.value)
        if ident.generation >= current:
            return {**result, "actions": [], "outcome": "current", "generation": current,
                    "status": found.run.value}
        if not agent.holds_all_locks():
            raise Refused(f"{agent.name}: this host does not hold all of its locks; not "
                          "moving it", vm=agent.name)
        from fcq_tasks.host.migration.slots import migration_slot  # the package imports the agent
        try:
            # A copy costs the host what a migration does: it takes a slot.
            with migration_slot(agent.settings.run_dir, agent.settings.max_migrations,
                                agent.name, agent.settings.host):
                moved = _move(agent, _running_spec(agent, spec), ident.pid)
        except FcqError as err:
            try:
                after = _after_failure(agent, spec)
            except FcqError as again:  # keep the first error; say what followed
                agent.log.error("upgrade-recovery-failed", error=again.message)
                after = f"and then: {again.message} (the next ensure tries again)"
            err.fields["result"] = {**result, "after": after}
            err.message += f"; {after}"
            err.args = (err.message,)
            raise
        return {**result, **moved, "from_generation": ident.generation, "generation": current,
                "outcome": "upgraded", "status": agent.observe().run.value}


def _after_failure(agent: VMAgent, spec: VMSpec) -> str:
    """Where the guest is after a failed upgrade, converging if its old QEMU died."""
    settle(agent)
    if agent.process() is not None:
        return "the VM runs on its old QEMU"
    agent.log.error("upgrade-lost-qemu", action="start",
                    detail="the old QEMU died during the upgrade: booting the VM again")
    agent._converge(spec, "ensure")
    return "the old QEMU died: the VM was booted again"


def _running_spec(agent: VMAgent, current: VMSpec) -> VMSpec:
    """The spec the running QEMU was started with (its seed file), else *current*.

    The new QEMU must match the old one (memory, cores, NICs) for the copy
    to load; a config changed since the start takes effect at the next
    restart, not here.
    """
    try:
        seed = json.loads(agent.paths.seed.read_text())
        spec = parse_vm_data({k: seed[k] for k in ("name", "parameters")
                              if k in seed}, str(agent.paths.seed))
    except (OSError, ValueError, FcqError):
        return current
    return spec if spec.name == agent.name else current


def _move(agent: VMAgent, spec: VMSpec, old_pid: int) -> dict[str, Any]:
    s = agent.settings
    side = new_side_paths(agent)
    side.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    new = QemuProcess(side, s.qmp_timeout)
    accel = detect_accelerator(s.accelerator)
    drives = [agent.storage.drive(agent.name, v) for v in VOLUMES]
    config = render_qemu_config(s, spec, accel, drives,
                                run_paths(side))
    argv = [*agent.argv(accel, side), "-incoming", "defer", "-S"]
    t0 = time.monotonic()
    agent.progress("admission", memory_mb=spec.memory_mb)
    with admission.admission(s.run_dir, agent.name, spec.memory_mb, s.vm_max_total_memory,
                             s.qmp_timeout, wait=s.start_timeout, second_copy=True):
        # The old QEMU read this file when it started and never reads it
        # again; the new one reads it now.
        write_atomically(agent.paths.config, config)
        write_atomically(side.seed, agent.seed_data(spec))
        agent.progress("qemu-start")
        agent.log.info("upgrade-start", action="upgrade", argv=" ".join(argv),
                       generation=s.qemu_generation, qemu_scope=s.qemu_scope)
        before = agent.storage.clients(agent.name) if agent.storage.fences else {}
        try:
            new.start(argv, spec.memory_mb, s.start_timeout, incoming="upgrade",
                      generation=s.qemu_generation, qemu_scope=s.qemu_scope)
        except BaseException:
            _remove_new(agent, side)
            raise
    try:
        record_clients(new, agent.storage.record_writers(agent.name, before,
                                                        secrets.token_hex(6)))
        status = _copy(agent, new, side, spec)
        _wait_received(agent, new)
    except BaseException:
        _remove_new(agent, side)
        raise
    t_copied = time.monotonic()
    _switch(agent, side)
    t_done = time.monotonic()
    return {"actions": ["start-new-qemu", "copy", "switch"], "old_pid": old_pid,
            "pid": getattr(agent.process(), "pid", None),
            "total_ms": round((t_done - t0) * 1000),
            "downtime_ms": (status.downtime_ms or 0) + round((t_done - t_copied) * 1000),
            "transferred": status.transferred}


def _copy(agent: VMAgent, new: QemuProcess, side: VMRunPaths, spec: VMSpec) -> Any:
    from fcq_tasks.host.migration import attempt_seconds  # it imports the agent
    s = agent.settings
    sock = side.run_dir / (side.name + ".mig.sock")
    with new.monitor() as mon:
        mon.listen_on_socket(sock)
    limit = attempt_seconds(s, spec.memory_mb)
    deadline = Deadline.after(limit, "the upgrade's copy")
    with agent.qemu.monitor() as mon:
        # Unlimited bandwidth: the copy never leaves this machine.
        mon.migrate_to_socket(sock, s.migration_downtime_ms, 2**40)
        last = 0.0
        while True:
            status = mon.poll_migration()
            if status.completed:
                return status
            if status.failed:
                raise QemuError(f"{agent.name}: the upgrade's copy failed: "
                                f"{status.error or status.status}", vm=agent.name)
            if deadline.passed():
                mon.cancel_migration()
                raise QemuError(f"{agent.name}: the upgrade's copy did not finish within "
                                f"{limit:.0f} s; cancelled", vm=agent.name)
            if time.monotonic() - last > 0.5:
                agent.progress("copy", transferred=status.transferred,
                               remaining=status.remaining)
                last = time.monotonic()
            time.sleep(POLL)


def _runstate(qemu: QemuProcess) -> str | None:
    try:
        with qemu.monitor() as mon:
            return mon.runstate()
    except QemuError:
        return None


def _wait_received(agent: VMAgent, new: QemuProcess) -> None:
    deadline = Deadline.after(RECEIVED_WAIT, "the new QEMU to load the copy")
    while _runstate(new) != "paused":
        if new.find() is None or deadline.passed():
            raise QemuError(f"{agent.name}: the new QEMU did not load the copy", vm=agent.name)
        time.sleep(POLL)


def _switch(agent: VMAgent, side: VMRunPaths) -> None:
    """End the old QEMU, run the new one, give it the old one's file names."""
    agent.progress("switch")
    agent.kill_qemu()  # gone for sure when this returns (it raises otherwise)
    _resume_new(agent, side)


def _resume_new(agent: VMAgent, side: VMRunPaths) -> None:
    """Run the new QEMU (the old one is gone) and give it the VM's file names."""
    if not agent.holds_all_locks():
        raise Inconsistent(agent.name, "upgrading", "the locks are no longer this host's: "
                           "the new QEMU is not resumed")
    write_atomically(_resumed_marker(side), "")
    # Until the renames are done, its monitor is under one of the two names.
    monitor = QemuProcess(side, agent.settings.qmp_timeout).monitor() if side.qmp.exists() \
        else agent.qemu.monitor()
    with monitor as mon:
        mon.resume()
    agent.log.info("upgrade-resumed", action="upgrade", detail="the new QEMU runs the guest")
    _rename(agent, side)


def _rename(agent: VMAgent, side: VMRunPaths) -> None:
    for leftover in (agent.paths.silent_mark, agent.paths.agent_silent_mark,
                     agent.paths.generation_told, agent.paths.checked):
        leftover.unlink(missing_ok=True)  # they described the old QEMU
    for attr in SWITCHED:
        src = getattr(side, attr)
        if os.path.lexists(src):
            os.replace(src, getattr(agent.paths, attr))
    agent.qemu.mark_resumed()
    _clean_side(side)  # the marker last: until then a crash finishes the renames
    try:
        spec = _restore_config(agent)
        if spec.iops or spec.bps:
            agent.throttle(spec.iops or 0, spec.bps or 0)  # limits do not travel with a copy
    except FcqError as err:  # the guest runs on the new QEMU: the next ensure fixes limits
        agent.log.warning("upgrade-limits-deferred", error=err.message)
    agent.log.info("upgraded", action="upgrade", generation=agent.settings.qemu_generation)


def _restore_config(agent: VMAgent) -> VMSpec:
    """Make the VM's config file name its own run files again; the spec.

    During the upgrade it named the new QEMU's sockets under u/. No QEMU
    reads it until the next start, which writes it anew: this only keeps
    what an operator reads true.
    """
    spec = agent.spec()
    with contextlib.suppress(FcqError, OSError):
        accel = detect_accelerator(agent.settings.accelerator)
        drives = [agent.storage.drive(agent.name, v) for v in VOLUMES]
        write_atomically(agent.paths.config, render_qemu_config(
            agent.settings, spec, accel, drives,
            run_paths(agent.paths)))
    return spec


def _remove_new(agent: VMAgent, side: VMRunPaths) -> None:
    """Kill a new QEMU that never ran guest code and remove its files; the old one runs on."""
    new = QemuProcess(side, agent.settings.qmp_timeout)
    proc = new.find()
    if proc is not None:
        new.kill(proc)
    _clean_side(side)
    with contextlib.suppress(FcqError):
        _restore_config(agent)
    _resume_stranded_old(agent)


def _resume_stranded_old(agent: VMAgent) -> None:
    """Run the old QEMU again if its copy completed but is not used (the new one is gone).

    Waits for its migration to end first: one cancelled in its last round
    may still complete after the cancel.
    """
    if agent.process() is None:
        return
    deadline = Deadline.after(RECEIVED_WAIT, "the old QEMU's copy to end")
    try:
        with agent.qemu.monitor() as mon:
            while mon.poll_migration().status in ACTIVE and not deadline.passed():
                time.sleep(POLL)
            if mon.runstate() == "postmigrate":
                mon.resume()
                agent.log.warning("upgrade-undone", action="resume",
                                  detail="copy completed but not used: the old QEMU runs on")
    except QemuError as err:
        agent.log.error("upgrade-undo-failed", action="resume", error=err.message)


def settle(agent: VMAgent) -> list[str]:
    """Finish or undo upgrades a dead process left behind (under the VM's operation lock)."""
    done = []
    for side in side_attempts(agent):
        done.append(_settle_one(agent, side))
    return done


def _settle_one(agent: VMAgent, side: VMRunPaths) -> str:
    new_qemu = QemuProcess(side, agent.settings.qmp_timeout)
    new = new_qemu.find()
    if _resumed_marker(side).exists():
        # The new QEMU was told to run: it holds the guest, never killed here.
        if new is None:
            _clean_side(side)  # renames done (its identity moved), or it died
            return "clean-up-upgrade"
        agent.log.warning("upgrade-finished", action="upgrade",
                          detail="the switch was interrupted: finishing it")
        _resume_new(agent, side)
        return "finish-upgrade"
    # No marker: the new QEMU never ran guest code, so removing it is safe.
    if new is None:
        agent.log.warning("upgrade-cleaned", action="clean-up",
                          detail="an upgrade's new QEMU was gone: its files removed")
        _clean_side(side)
        with contextlib.suppress(FcqError):
            _restore_config(agent)
        _resume_stranded_old(agent)
        return "clean-up-upgrade"
    state = _runstate(new_qemu)
    if state == "paused":
        # A complete copy: the source is postmigrate (or gone) and never
        # runs again, so the switch goes on.
        agent.log.warning("upgrade-finished", action="upgrade",
                          detail="the copy was complete when its process died: switching")
        _switch(agent, side)
        return "finish-upgrade"
    agent.log.warning("upgrade-undone", action="kill", new_state=state,
                      detail="an upgrade that did not complete: its new QEMU is removed")
    _remove_new(agent, side)
    return "undo-upgrade"
