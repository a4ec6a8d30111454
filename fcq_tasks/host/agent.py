"""The agent for one VM on this host: observe, plan, act, observe again.

``VMAgent`` is what the CLI's local commands and the Celery tasks call.
Every public operation holds the VM's operation lock, logs ``wanted=…
found=… action=…`` for each step, and returns a JSON-safe result. Decisions
come from :func:`fcq_tasks.host.plan.plan`; the steps themselves are
:class:`~fcq_tasks.host.steps.VMSteps`'. A failure never leaves a
half-started VM or a leaked lock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from fcq_tasks import metrics
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import GiB, VMSpec, spec_path, update_vm_file
from fcq_tasks.errors import (
    BadRequest,
    FcqError,
    Inconsistent,
    LockedByOtherHost,
    Refused,
    ShrinkRefused,
)
from fcq_tasks.host import guest, maintenance, oplock, snapshots, upgrade
from fcq_tasks.host.plan import Action, Do, Observed, Run, plan, wanted
from fcq_tasks.host.steps import Progress, VMSteps
from fcq_tasks.storage import VOLUMES, Storage

#: Seconds ensure waits before it tries a failed upgrade_on_ensure again.
UPGRADE_RETRY = 3600.0


class VMAgent(VMSteps):
    """Operations on VM *name* on the host *settings* describe. No I/O here."""

    def __init__(self, settings: HostSettings, name: str, storage: Storage | None = None,
                 progress: Progress | None = None,
                 outmigrate_hook: Callable[[str], None] | None = None) -> None:
        super().__init__(settings, name, storage, progress)
        self.last_observed = Observed(Run.STOPPED)  # what the last converge saw at its end
        # Whether the host was drained when the sweep began (the sweep sets
        # it: one read for all its VMs); None: read the mark at each plan.
        self.sweep_drained: bool | None = None
        # Held while this VM's ensure acts (starts, stops, upgrades, ...): a
        # sweep looks at several VMs side by side, but acts on one at a time.
        self.sweep_act_lock: AbstractContextManager[Any] = nullcontext()
        # How "config moved me elsewhere" becomes a migration: the Celery
        # layer passes a hook that launches one; locally it is only reported.
        self.outmigrate_hook = outmigrate_hook

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The VM's operation lock; its first holder settles what a dead process left.

        An upgrade or a snapshot whose process died mid-way (SIGKILL, OOM)
        is finished or undone here, before anything else looks at the VM.
        Only at the outermost hold: a nested one is inside an operation.
        """
        with super().locked():
            if oplock.depth(self.settings.run_dir, self.name) == 1:
                if upgrade.pending(self):
                    upgrade.settle(self)
                snapshots.settle_interrupted(self)
            yield

    def status(self) -> dict[str, Any]:
        """What runs and who holds what, without changing anything."""
        result: dict[str, Any] = {"vm": self.name, "host": self.settings.host}
        try:
            spec: VMSpec | None = self.spec()
        except FcqError as err:
            spec = None
            result["config_error"] = err.message
        obs = self.observe()
        proc = self.process()
        ident = self.qemu.identity()
        result.update({
            "status": obs.run.value,
            "wanted": wanted(spec, self.settings.host) if spec else None,
            "pid": proc.pid if proc else None,
            "memory_mb": ident.memory_mb if proc and ident else None,
            "root_bytes": obs.root_bytes,
            "locks": obs.lock_owners,
            "iops": obs.iops,
            "bps": obs.bps,
            "generation": ident.generation if proc and ident else None,
            "generation_behind": bool(proc and ident
                                      and ident.generation < self.settings.qemu_generation),
        })
        if obs.run is Run.RUNNING:
            result["guest_agent"] = self.guest_agent_answers(timeout=1.0)
        return result

    def preview(self) -> dict[str, Any]:
        """What ensure would do now and why, doing nothing (``fcq plan``).

        Takes no lock: it must not block real work, so it may describe a
        moment that an operation in flight is changing (then it says so).
        """
        result: dict[str, Any] = {"vm": self.name, "host": self.settings.host,
                                  "operation": "plan"}
        try:
            spec = self.spec()
        except FcqError as err:
            return {**result, "wanted": None, "found": None, "actions": [],
                    "error": err.message}
        found = self.observe()
        actions = plan(spec, found, self.settings.host, self.settings.kill_silent_after,
                       maintenance.drained(self.settings) is not None,
                       maintenance.held(self.settings, self.name))
        busy = oplock.held_elsewhere(self.settings.run_dir, self.name)
        return {**result, "wanted": wanted(spec, self.settings.host), "found": found.run.value,
                "actions": [{"do": a.do.value, "reason": a.reason} for a in actions],
                "busy": busy}

    # -- operations -------------------------------------------------------

    def ensure(self) -> dict[str, Any]:
        """Converge the VM to its config on this host, and keep its guest healthy."""
        with self.locked():
            spec = self.spec()
            result = self._converge(spec, "ensure")
            if result["status"] == Run.RUNNING.value and result["wanted"] == "here":
                ident = self.qemu.identity()
                generation = ident.generation if ident else 0
                if generation < self.settings.qemu_generation and \
                        self.settings.upgrade_on_ensure:
                    with self.sweep_act_lock:
                        result["actions"] += self._upgrade_by_ensure()
                    ident = self.qemu.identity()
                    generation = ident.generation if ident else 0
                # The guest agent is asked at each full look (observe says
                # when), not at every sweep: see observing.FULL_CHECK_AFTER.
                if self.last_observed.fresh:
                    result["actions"] += guest.keep_healthy(self, generation,
                                                            self.last_observed.agent_open)
            if spec.kvm_host == self.settings.host:  # its home host keeps its retention
                try:
                    pruned = snapshots.prune(self, spec)
                except FcqError as err:  # retention can wait for the next sweep
                    self.log.warning("prune-failed", action="prune-snapshot", error=err.message)
                    pruned = []
                if pruned:
                    result["actions"].append("prune-snapshots")
                    result["pruned"] = pruned
            return result

    def _upgrade_by_ensure(self) -> list[str]:
        """upgrade_on_ensure: move the VM, one VM per ensure; after a failure wait an hour.

        A copy costs the host the guest's whole memory in bandwidth: one
        that fails (no room for two copies, a guest that cannot be copied)
        is not tried again at every sweep.
        """
        mark = self.settings.run_dir / f"{self.name}.upgrade-failed"
        try:
            if time.time() - mark.stat().st_mtime < UPGRADE_RETRY:
                return []
        except OSError:
            pass
        try:
            self.upgrade()
        except FcqError as err:  # e.g. no memory for two copies: the VM runs on as it is
            self.log.warning("upgrade-skipped", action="upgrade", error=err.message,
                             detail=f"ensure tries again in {UPGRADE_RETRY:.0f} s")
            mark.touch()
            return ["upgrade-failed"]
        mark.unlink(missing_ok=True)
        return ["upgrade"]

    # -- day two ----------------------------------------------------------

    def upgrade(self) -> dict[str, Any]:
        """Move the running VM onto a fresh QEMU of the current generation (no reboot)."""
        return upgrade.upgrade(self)

    def snapshot(self, name: str | None = None) -> dict[str, Any]:
        """Snapshot root and tmp under *name*, the guest frozen if it can be.

        See :mod:`fcq_tasks.host.snapshots`.
        """
        return snapshots.take(self, name)

    def snapshots(self) -> dict[str, Any]:
        return snapshots.listing(self)

    def remove_snapshot(self, name: str) -> dict[str, Any]:
        return snapshots.remove(self, name)

    def resize(self, disk_gib: object) -> dict[str, Any]:
        """Grow the root volume to *disk_gib* GiB, tell a running QEMU, record it in the config.

        Refused before anything is touched when it would shrink the disk
        (below its current size or the config's). The config's ``version``
        goes up, so a later push of the file as it was cannot undo it.
        """
        if isinstance(disk_gib, bool) or not isinstance(disk_gib, int) \
                or not 1 <= disk_gib <= 65536:
            raise BadRequest("disk", f"must be a whole number of GiB from 1 to 65536 "
                             f"(got {disk_gib!r})")
        with self.locked():
            spec = self.spec()
            self._check_may_start(spec)
            found = self.observe()
            self._refuse_impostor(found)
            others = sorted({o for o in found.lock_owners.values()
                             if o not in (None, self.settings.host)})
            if others:
                metrics.lock_conflict("volume")
                raise LockedByOtherHost(self.name, "root", others[0])
            if found.run not in (Run.RUNNING, Run.PAUSED, Run.STOPPED, Run.CRASHED):
                raise Refused(f"{self.name}: is {found.run.value} here; resize it once it "
                              "runs or is stopped", vm=self.name, found=found.run.value)
            new = disk_gib * GiB
            current = max(found.root_bytes or 0, spec.disk_bytes)
            if new < current:
                raise ShrinkRefused(self.name, "root", current, new)
            actions = []
            version = spec.version
            # The desired state first: a crash after this leaves a config
            # bigger than the volume, which ensure grows; the other order
            # would leave a volume bigger than the config, which every
            # ensure refuses as a shrink.
            if spec.disk_gib != disk_gib:
                version = update_vm_file(spec_path(self.settings.vm_config_dir, self.name),
                                         {"disk": disk_gib}, bump_version=True).version
                actions.append("record-config")
                self.log.info("config-resized", action="resize", disk=disk_gib,
                              version=version)
            if found.root_bytes is not None and found.root_bytes < new:
                self.storage.grow(self.name, "root", new)
                actions.append("grow")
                if found.run in (Run.RUNNING, Run.PAUSED):
                    self.grow_root(new)
                    actions.append("tell-qemu")
                self.progress("grown", size=new)
            return {"vm": self.name, "host": self.settings.host, "operation": "resize",
                    "disk": disk_gib, "root_bytes": new, "version": version,
                    "actions": actions, "outcome": "grown" if actions else "unchanged",
                    "status": found.run.value,
                    "note": f"the inventory's file for {self.name} must say disk: {disk_gib} "
                            f"and a version above {version - 1} (a push of version "
                            f"{version} or more with a smaller disk is refused as a shrink)"}

    def _converge(self, spec: VMSpec, operation: str,
                  found: Observed | None = None) -> dict[str, Any]:
        # Only ensure reuses a recent full look (the sweep's common case); an
        # operator's request always looks at everything.
        found = found if found is not None else self.observe(reuse=operation == "ensure")
        self._adopt(spec)
        held = maintenance.held(self.settings, self.name)
        drained = self.sweep_drained if self.sweep_drained is not None else \
            maintenance.drained(self.settings) is not None
        actions = plan(spec, found, self.settings.host, self.settings.kill_silent_after,
                       drained, held)
        if self.sweep_drained is not None and any(a.do is Do.START for a in actions):
            # The sweep read the drain mark once, before its first VM: a
            # start must see the mark as it is now (fcq drain may have come).
            actions = plan(spec, found, self.settings.host, self.settings.kill_silent_after,
                           maintenance.drained(self.settings) is not None, held)
        want = wanted(spec, self.settings.host)
        done: list[str] = []
        refusals: list[Action] = []
        for action in actions:
            self.log.info("decision", action=action.do.value, wanted=want, found=found.run.value,
                          reason=action.reason)
            if action.do is Do.REFUSE:
                refusals.append(action)
                continue
            if action.do is Do.NOTHING:
                self._execute(action, spec)
            else:
                with self.sweep_act_lock:
                    self._execute(action, spec)
            done.append(action.do.value)
        # Observing costs QMP round trips; when nothing was done (the sweep's
        # common case) what we found is still what is.
        if done in ([], ["nothing"]):
            after = found
        elif done == ["start"] and self.started is not None:
            after = self.started  # its monitor has just answered: ~30 ms saved per start
        else:
            after = self.observe()
        self.last_observed = after
        result = self._result(operation, want, found, done, after)
        if refusals:
            raise self._refusal_error(refusals[0], spec, found, result)
        return result

    def _adopt(self, spec: VMSpec) -> None:
        """Record the identity of a QEMU known only by its pidfile.

        That happens when a worker died between QEMU daemonizing and fcq
        writing the identity; without it the VM's memory would not be
        booked and it would not show as running here.
        """
        ident = self.qemu.identity()
        if ident is None or ident.start_ticks is None:
            proc = self.process()
            if proc is not None:
                self.qemu.record_identity(proc, ident.memory_mb if ident else spec.memory_mb)
                self.log.warning("adopted", action="adopt", pid=proc.pid,
                                 detail="QEMU had a pidfile but no identity record"
                                 if ident is None else "identity recorded by an older fcq")

    def _result(self, operation: str, want: str, found: Observed, done: list[str],
                after: Observed) -> dict[str, Any]:
        return {"vm": self.name, "host": self.settings.host, "operation": operation,
                "wanted": want, "found": found.run.value, "actions": done,
                "status": after.run.value}

    def _refusal_error(self, action: Action, spec: VMSpec, found: Observed,
                       result: dict[str, Any]) -> FcqError:
        err: FcqError
        if action.refusal == "locked":
            volume = next(v for v, o in found.lock_owners.items() if o == action.host)
            metrics.lock_conflict("volume")
            err = LockedByOtherHost(self.name, volume, action.host)
        elif action.refusal == "impostor":
            err = Inconsistent(self.name, found.run.value, action.reason)
        elif action.refusal == "shrink":
            err = ShrinkRefused(self.name, "root", found.root_bytes or 0, spec.disk_bytes)
        else:
            err = Inconsistent(self.name, found.run.value, action.reason)
        err.fields["result"] = result
        self.log.error("refused", action=action.refusal, reason=err.message)
        return err

    def _execute(self, action: Action, spec: VMSpec) -> None:
        do = action.do
        if do is Do.START:
            self.start_qemu(spec)
        elif do is Do.STOP:
            self.stop_qemu()
        elif do is Do.KILL:
            self.kill_qemu()
        elif do is Do.PAUSE:
            self.pause()
        elif do is Do.CLEAN_UP:
            self.clean_up(keep_locks=action.keep_locks)
        elif do is Do.TAKE_LOCKS:
            self.take_locks()
        elif do is Do.GROW_ROOT:
            self.grow_root(action.size)
        elif do is Do.RESUME:
            self.resume_received()
        elif do is Do.CONTINUE:
            with self.qemu.monitor() as mon:
                mon.resume()
        elif do is Do.CLAIM:
            self.claim()
        elif do is Do.FOLLOW:
            self.set_kvm_host(action.host)
        elif do is Do.TAKE_OVER:
            broken = self.break_locks(only_from=action.host)
            self.log.warning("takeover-finished", action="take-over", previous_owner=action.host,
                             broken=broken)
        elif do is Do.SET_IOPS:
            self.throttle(action.iops, action.bps)
        elif do is Do.OUTMIGRATE:
            if self.outmigrate_hook is None:
                self.log.warning("needs-outmigration", action="outmigrate", to=action.host,
                                 detail="no cluster here to migrate through")
            else:
                self.outmigrate_hook(action.host)
        elif do is Do.NOTHING:
            pass

    def orphan(self) -> dict[str, Any]:
        """A VM with run files here but no config: clean up, never stop it.

        A running VM whose config vanished is left running and reported: a
        lost file is not an order to power a guest off.
        """
        with self.locked():
            found = self.observe()
            self._refuse_impostor(found)
            if self.process() is not None:
                self.log.warning("orphan-running", action="nothing", found=found.run.value,
                                 detail="runs without a config file: restore or remove it")
                return self._result("ensure", "unknown", found, [], found)
            self.clean_up(keep_locks=maintenance.held(self.settings, self.name))
            return self._result("ensure", "unknown", found, ["clean-up"], self.observe())

    def start(self) -> dict[str, Any]:
        """Start the VM here if it is not running (the config must allow this host)."""
        with self.locked():
            spec = self.spec()
            self._check_may_start(spec)
            warnings = []
            if not spec.online:
                self.log.warning("start-offline-vm", action="start",
                                 detail="config says online: false; the next ensure stops it")
                warnings.append(f"{self.name}: its config says online: false: the next "
                                "ensure stops it again (push online: true to keep it)")
            found = self.observe()
            if found.run in (Run.RUNNING, Run.PAUSED, Run.INMIGRATE, Run.RECEIVED):
                return {**self._result("start", "here", found, [], found),
                        "warnings": warnings}
            maintenance.refuse_if_drained(self.settings, self.name, "start")
            maintenance.refuse_if_held(self.settings, self.name)
            online = dataclasses.replace(spec, online=True, kvm_host=self.settings.host)
            # What we just found, under the same operation lock: still what is.
            return {**self._converge(online, "start", found), "warnings": warnings}

    def _refuse_impostor(self, found: Observed) -> None:
        """Nothing that assumes 'no QEMU here' may run next to a process we cannot identify."""
        if found.run is Run.IMPOSTOR:
            raise Inconsistent(self.name, found.run.value,
                               f"pid {found.impostor_pid} names this VM's config but is not "
                               "the QEMU fcq started: stop it by hand once you know what it is")

    def _check_may_start(self, spec: VMSpec) -> None:
        if spec.kvm_host not in (None, self.settings.host):
            raise Refused(f"{self.name}: config puts it on host {spec.kvm_host}; "
                          "starting it here could run it twice", vm=self.name,
                          kvm_host=spec.kvm_host)

    def stop(self) -> dict[str, Any]:
        """Power the VM off gracefully (ACPI, then quit, then kill) and release its locks."""
        with self.locked():
            # The monitor is asked to power off, not to describe the VM first.
            found = self.glance()
            self._refuse_impostor(found)
            done, how, warnings = [], None, []
            if self.process() is not None:
                how = self.stop_qemu()
                done.append("stop")
            if how in ("quit", "kill"):
                warnings.append(f"{self.name}: the guest ignored the power button for "
                                f"{self.settings.shutdown_grace:g} s (shutdown_grace): QEMU "
                                + ("was told to quit" if how == "quit" else "was killed")
                                + "; the guest did not shut down cleanly")
            if found.run is not Run.STOPPED or any(
                    o == self.settings.host for o in found.lock_owners.values()):
                # Locks held by hand (fcq lock) stay held: only fcq unlock gives them back.
                self.clean_up(keep_locks=maintenance.held(self.settings, self.name))
                done.append("clean-up")
            return {**self._result("stop", "stopped", found, done, self.glance()),
                    "how": how, "warnings": warnings}

    def restart(self) -> dict[str, Any]:
        with self.locked():
            self._check_may_start(self.spec())  # refuse before powering anything off
            maintenance.refuse_if_drained(self.settings, self.name, "start")
            maintenance.refuse_if_held(self.settings, self.name)
            self.stop()
            result = self.start()
            result["operation"] = "restart"
            return result

    def kill(self) -> dict[str, Any]:
        """SIGKILL the VM's QEMU and release its locks."""
        with self.locked():
            # No monitor questions: a kill must not wait for a hung QEMU.
            found = self.glance()
            self._refuse_impostor(found)
            done = []
            if self.process() is not None:
                self.kill_qemu()
                done.append("kill")
            self.clean_up(keep_locks=maintenance.held(self.settings, self.name))
            done.append("clean-up")
            return self._result("kill", "stopped", found, done, self.glance())

    def force_unlock(self, only_from: str | None = None) -> dict[str, Any]:
        """Break every lock of the VM's volumes, whoever holds them.

        Refused while the VM's QEMU runs here: breaking our own live lock
        would invite a second writer. For a lock of another host the
        operator vouches that that host's QEMU is gone. *only_from*: only
        that host's locks may be broken; one held by anyone else, read as
        it is broken, refuses (an evacuation must not break the lock of a
        host that took the VM meanwhile).
        """
        with self.locked():
            self._refuse_impostor(self.observe())
            if self.process() is not None:
                raise Refused(f"{self.name}: runs on this host; stop it before breaking locks",
                              vm=self.name)
            maintenance.refuse_if_held(self.settings, self.name, "fcq unlock gives them back")
            return {"vm": self.name, "host": self.settings.host, "operation": "force-unlock",
                    "broken": self.break_locks(only_from)}

    def break_locks(self, only_from: str | None = None) -> dict[str, str]:
        """Fence and break each volume's lock (only *only_from*'s, if given): volume → owner.

        One volume after the other, root first: a takeover that stops
        halfway leaves root broken (marked by this host) and the rest still
        locked, which the next ensure here finishes (plan: take-over).
        """
        broken = {}
        for volume in VOLUMES:
            owner = self.storage.force_unlock(self.name, volume, only_from=only_from)
            if owner is not None:
                metrics.fencing("break-lock")
                broken[volume] = owner
                self.log.warning("lock-broken", action="force-unlock", volume=volume,
                                 previous_owner=owner)
        return broken

