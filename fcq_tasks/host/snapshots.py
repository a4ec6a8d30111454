"""Snapshots of a VM's volumes: freeze, snapshot, always thaw; list, remove, prune.

A snapshot covers the volumes that hold file systems, ``root`` and ``tmp``
(swap holds nothing worth keeping), under one name. It is all or nothing:
a volume that fails is rolled back on the others.

* A running guest with an agent is frozen for the snapshot through a
  :class:`~fcq_tasks.hazmat.freezeguard.FreezeGuard`, which thaws on every
  path, including this process dying or hanging: the result says
  ``consistency: filesystem``.
* A running guest without an agent, or a paused one, is snapshotted as it
  is (``consistency: crash``, like a power cut) and the result says why.
* A stopped VM is snapshotted while this host holds its locks for the
  moment (nobody can start it meanwhile): ``consistency: stopped``.

Names fcq chooses itself start with ``auto-``; only those are pruned by the
VM's retention (``snapshot_keep``, ``snapshot_keep_days``), which ensure
applies. A snapshot given a name by hand stays until it is removed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.errors import FcqError, GuestAgentError, NoGuestAgent, Refused
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.freezeguard import FreezeGuard, thaw_directly
from fcq_tasks.host.guest import agent_open, agent_timeouts
from fcq_tasks.host.plan import Run
from fcq_tasks.storage import AUTO_PREFIX, SnapshotInfo, auto_snapshot_name, check_snapshot

if TYPE_CHECKING:
    from fcq_tasks.host.steps import VMSteps

#: The volumes a snapshot covers.
SNAPSHOT_VOLUMES = ("root", "tmp")


def _base(steps: VMSteps, operation: str) -> dict[str, Any]:
    return {"vm": steps.name, "host": steps.settings.host, "operation": operation}


def _where(steps: VMSteps) -> Run:
    """What runs here, refusing states in which no snapshot may be taken."""
    found = steps.observe()
    me = steps.settings.host
    others = sorted({o for o in found.lock_owners.values() if o not in (None, me)})
    if found.run in (Run.RUNNING, Run.PAUSED) and not others:
        return found.run
    if found.run in (Run.STOPPED, Run.CRASHED) and not others:
        return Run.STOPPED
    if others:
        raise Refused(f"{steps.name}: its volumes are locked by host {others[0]}: take the "
                      "snapshot there", vm=steps.name, host=others[0])
    raise Refused(f"{steps.name}: is {found.run.value} here; a snapshot waits until it runs "
                  "or is stopped", vm=steps.name, found=found.run.value)


def take(steps: VMSteps, name: str | None = None) -> dict[str, Any]:
    """Snapshot the VM under *name* (default: ``auto-<UTC time>``).

    The same name twice is a no-op.
    """
    with steps.locked():
        steps.spec()  # a VM this host knows (UnknownVM otherwise)
        snap = check_snapshot(steps.name, name) if name is not None else auto_snapshot_name()
        result = {**_base(steps, "snapshot"), "snapshot": snap, "volumes": list(SNAPSHOT_VOLUMES)}
        have = [v for v in SNAPSHOT_VOLUMES if snap in _names(steps, v)]
        if len(have) == len(SNAPSHOT_VOLUMES):
            steps.log.info("snapshot-exists", action="nothing", snapshot=snap)
            return {**result, "outcome": "exists", "actions": []}
        run = _where(steps)
        if have:
            # Left by a snapshot that died half-way: from another moment
            # than what we take now, so it goes before the set is made.
            steps.log.warning("snapshot-partial", action="remove-snapshot", snapshot=snap,
                              volumes=have, detail="an earlier attempt did not finish")
            _roll_back(steps, snap, have)
        # What a process killed from here on leaves is settled by the next
        # operation on the VM (settle_interrupted).
        _write_marker(steps, snap, paused=False)
        # A freeze (or a pause) ends in a thaw, but should it not, the next
        # sweep must ask the guest instead of trusting an earlier full look.
        steps.forget_check()
        try:
            return {**result, **_take(steps, snap, run)}
        finally:
            _marker(steps).unlink(missing_ok=True)
            steps.forget_check()


def _take(steps: VMSteps, snap: str, run: Run) -> dict[str, Any]:
    if run is Run.STOPPED:
        taken = steps.take_locks()  # nobody starts it while we copy
        try:
            _snapshot_all(steps, snap)
        finally:
            for volume in taken:
                steps.storage.unlock(steps.name, volume)
        return {"outcome": "taken", "actions": ["snapshot"],
                "consistency": "stopped", "frozen": False}
    if run is Run.PAUSED:
        _snapshot_all(steps, snap)
        return {"outcome": "taken", "actions": ["snapshot"],
                "consistency": "crash", "frozen": False,
                "reason": "the VM is paused: its guest cannot freeze"}
    return _frozen_snapshot(steps, snap)


def _frozen_snapshot(steps: VMSteps, snap: str) -> dict[str, Any]:
    s = steps.settings
    if not agent_open(steps):
        return _unfrozen(steps, snap, "no guest agent runs in the guest (its port is closed)")
    guard = FreezeGuard(str(steps.paths.ga), steps.name, agent_timeouts(steps),
                        max_frozen=s.freeze_timeout + s.snapshot_timeout,
                        agent_gone=lambda: not agent_open(steps))
    try:
        guard.__enter__()
    except NoGuestAgent as err:
        return _unfrozen(steps, snap, err.message)
    actions = []
    try:
        steps.log.info("freeze", action="freeze", snapshot=snap)
        t0 = time.monotonic()
        count = guard.freeze()
        t_frozen = time.monotonic()
        actions.append("freeze")
        steps.progress("frozen", filesystems=count)
        steps.log.info("frozen", action="freeze", filesystems=count,
                       ms=round((t_frozen - t0) * 1000, 1))
        made = _snapshot_all(steps, snap)
        actions.append("snapshot")
        if not guard.still_frozen():
            # The guard may have thawed before the last volume was done.
            _roll_back(steps, snap, made)
            raise GuestAgentError(f"{steps.name}: the snapshot took longer than freeze_timeout "
                                  "+ snapshot_timeout; the guest was thawed before it "
                                  "finished, so it was removed", vm=steps.name)
        steps.progress("snapshotted", snapshot=snap)
        guard.thaw()
        t_thawed = time.monotonic()
        actions.append("thaw")
    finally:
        guard.__exit__(None, None, None)  # thaws if anything above did not
        _check_thawed(steps)
    steps.progress("thawed")
    frozen_ms = round((t_thawed - t_frozen) * 1000, 1)
    steps.log.info("thawed", action="thaw", snapshot=snap, frozen_ms=frozen_ms)
    return {"outcome": "taken", "actions": actions, "consistency": "filesystem",
            "frozen": True, "filesystems": count, "frozen_ms": frozen_ms,
            "freeze_ms": round((t_frozen - t0) * 1000, 1)}


def _unfrozen(steps: VMSteps, snap: str, why: str) -> dict[str, Any]:
    steps.log.warning("snapshot-unfrozen", action="snapshot", snapshot=snap, reason=why)
    if steps.storage.atomic_snapshots:
        _snapshot_all(steps, snap)
        return {"outcome": "taken", "actions": ["snapshot"], "consistency": "crash",
                "frozen": False, "reason": why}
    # A file copy of a disk the guest writes would be torn: the guest is
    # paused for the copy, which makes it one point in time (crash-consistent).
    _write_marker(steps, snap, paused=True)
    steps.pause()
    t0 = time.monotonic()
    try:
        _snapshot_all(steps, snap)
    finally:
        with steps.qemu.monitor() as mon:
            mon.resume()
        _write_marker(steps, snap, paused=False)
    return {"outcome": "taken", "actions": ["pause", "snapshot", "resume"],
            "consistency": "crash", "frozen": False, "reason": why,
            "paused_ms": round((time.monotonic() - t0) * 1000, 1)}


def _marker(steps: VMSteps) -> Path:
    return steps.settings.run_dir / f"{steps.name}.snapshotting"


def _write_marker(steps: VMSteps, snap: str, paused: bool) -> None:
    write_atomically(_marker(steps), json.dumps({"snapshot": snap, "paused": paused}))


def settle_interrupted(steps: VMSteps) -> list[str]:
    """Clean up after a snapshot whose process died (the VM's operation lock held).

    A set on only some volumes is removed (it is from two moments); a guest
    the snapshot paused is resumed. A frozen guest is ensure's business
    (it checks every guest).
    """
    try:
        left = json.loads(_marker(steps).read_text())
    except (OSError, ValueError):
        return []
    done = []
    snap = str(left.get("snapshot", ""))
    have = [v for v in SNAPSHOT_VOLUMES if snap in _names(steps, v)] if snap else []
    if have and len(have) < len(SNAPSHOT_VOLUMES):
        steps.log.warning("snapshot-partial", action="remove-snapshot", snapshot=snap,
                          volumes=have, detail="its process died half-way")
        _roll_back(steps, snap, have)
        done.append("remove-partial-snapshot")
    if left.get("paused") and steps.observe().run is Run.PAUSED:
        with steps.qemu.monitor() as mon:
            mon.resume()
        steps.log.warning("snapshot-resumed", action="resume",
                          detail="a snapshot paused the guest and its process died")
        done.append("resume")
    _marker(steps).unlink(missing_ok=True)
    return done


def _check_thawed(steps: VMSteps) -> None:
    """Ask the guest itself once more; thaw again if it is still frozen."""
    try:
        thaw_directly(str(steps.paths.ga), steps.name, agent_timeouts(steps),
                      lambda: not agent_open(steps))
    except FcqError as err:
        steps.log.error("thaw-failed", action="thaw", error=err.message)
        raise


def _names(steps: VMSteps, volume: str) -> set[str]:
    return {s.name for s in steps.storage.snapshots(steps.name, volume)}


def _snapshot_all(steps: VMSteps, snap: str) -> list[str]:
    """Snapshot every volume or none; the volumes this call created it on."""
    made: list[str] = []
    try:
        for volume in SNAPSHOT_VOLUMES:
            if steps.storage.snapshot(steps.name, volume, snap):
                made.append(volume)
    except BaseException:
        _roll_back(steps, snap, made)
        raise
    steps.log.info("snapshotted", action="snapshot", snapshot=snap, volumes=made)
    return made


def _roll_back(steps: VMSteps, snap: str, made: list[str]) -> None:
    for volume in made:
        try:
            steps.storage.remove_snapshot(steps.name, volume, snap)
        except FcqError as err:
            steps.log.error("snapshot-rollback-failed", volume=volume, snapshot=snap,
                            error=err.message)


def listing(steps: VMSteps) -> dict[str, Any]:
    """The VM's snapshots: name, time, size of each volume."""
    rows: dict[str, dict[str, Any]] = {}
    for volume in SNAPSHOT_VOLUMES:
        for info in steps.storage.snapshots(steps.name, volume):
            row = rows.setdefault(info.name, {"name": info.name, "created": info.created,
                                              "volumes": {}})
            row["created"] = min(row["created"], info.created)
            row["volumes"][volume] = info.size
    snaps = sorted(rows.values(), key=lambda r: (r["created"], r["name"]))
    return {**_base(steps, "snapshots"), "snapshots": snaps}


def remove(steps: VMSteps, name: str) -> dict[str, Any]:
    """Remove snapshot *name* from every volume; removing one that is gone is a no-op."""
    with steps.locked():
        snap = check_snapshot(steps.name, name)
        removed = [v for v in SNAPSHOT_VOLUMES
                   if steps.storage.remove_snapshot(steps.name, v, snap)]
        steps.log.info("snapshot-removed", action="remove-snapshot", snapshot=snap,
                       volumes=removed)
        return {**_base(steps, "remove-snapshot"), "snapshot": snap, "volumes": removed,
                "outcome": "removed" if removed else "absent",
                "actions": ["remove-snapshot"] if removed else []}


def expired(spec: VMSpec, snaps: list[SnapshotInfo], now: float) -> list[str]:
    """The auto- snapshots *spec*'s retention no longer keeps (pure).

    Kept: the ``snapshot_keep`` newest, and those younger than
    ``snapshot_keep_days``; with both set a snapshot is kept if either rule
    keeps it. Without retention nothing expires.
    """
    if spec.snapshot_keep is None and spec.snapshot_keep_days is None:
        return []
    auto = sorted((s for s in snaps if s.name.startswith(AUTO_PREFIX)),
                  key=lambda s: (s.created, s.name), reverse=True)
    keep: set[str] = set()
    if spec.snapshot_keep is not None:
        keep.update(s.name for s in auto[:spec.snapshot_keep])
    if spec.snapshot_keep_days is not None:
        horizon = now - spec.snapshot_keep_days * 86400
        keep.update(s.name for s in auto if s.created >= horizon)
    return sorted(s.name for s in auto if s.name not in keep)


def prune(steps: VMSteps, spec: VMSpec) -> list[str]:
    """Remove what the retention of *spec* expires (ensure calls this); the names removed."""
    if spec.snapshot_keep is None and spec.snapshot_keep_days is None:
        return []
    # Whole sets only: a set on some volumes belongs to a snapshot still
    # being taken elsewhere in time, or to one settle_interrupted removes.
    snaps = {s.name: s for s in steps.storage.snapshots(steps.name, SNAPSHOT_VOLUMES[0])}
    for volume in SNAPSHOT_VOLUMES[1:]:
        names = {s.name for s in steps.storage.snapshots(steps.name, volume)}
        snaps = {n: s for n, s in snaps.items() if n in names}
    gone = expired(spec, list(snaps.values()), time.time())
    for snap in gone:
        for volume in SNAPSHOT_VOLUMES:
            steps.storage.remove_snapshot(steps.name, volume, snap)
        steps.log.info("snapshot-pruned", action="prune-snapshot", snapshot=snap)
    return gone
