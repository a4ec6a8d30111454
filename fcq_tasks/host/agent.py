"""The agent for one VM on this host: observe, plan, act, observe again.

``VMAgent`` is what the CLI's local commands and (from the Cluster issue on)
the Celery tasks call. Every public operation holds the VM's operation lock,
logs ``wanted=… found=… action=…`` for each step, and returns a JSON-safe
result. Decisions come from :func:`fcq_tasks.plan.plan`; this module only
carries them out, and undoes its own partial work when a start fails, so a
failure never leaves a half-started VM or a leaked lock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import psutil
import structlog

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import VMSpec, load_vm_spec
from fcq_tasks.errors import (
    FcqError,
    Inconsistent,
    LockedByOtherHost,
    QemuError,
    QmpError,
    Refused,
    ShrinkRefused,
    StorageError,
)
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.accel import cpu_model, detect_accelerator
from fcq_tasks.hazmat.guestagent import GuestAgent
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths
from fcq_tasks.hazmat.template import RunPaths, render_qemu_config
from fcq_tasks.host import admission
from fcq_tasks.host.oplock import operation_lock
from fcq_tasks.host.plan import Action, Do, Observed, Run, plan, wanted
from fcq_tasks.storage import VOLUMES, Storage, open_storage

#: Called with a step name and details while a long operation runs (the
#: Celery task publishes them as task state for Flower and `fcq` to show).
Progress = Callable[..., None]


def _no_progress(step: str, **details: Any) -> None:
    pass


#: Seconds between two ACPI power-button presses during a stop.
POWERDOWN_REPEAT = 3.0

#: QMP runstates that mean "guest code may run".
RUNNING_STATES = frozenset({"running"})


class VMAgent:
    """Operations on VM *name* on the host *settings* describe. No I/O here."""

    def __init__(self, settings: HostSettings, name: str, storage: Storage | None = None,
                 progress: Progress | None = None,
                 outmigrate_hook: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        # How "config moved me elsewhere" becomes a migration: the Celery
        # layer passes a hook that launches one; locally it is only reported.
        self.outmigrate_hook = outmigrate_hook
        self.progress: Progress = progress if progress is not None else _no_progress
        self.name = name
        self.paths = VMRunPaths(settings.run_dir, name)
        self.qemu = QemuProcess(self.paths, settings.qmp_timeout)
        self.storage = storage if storage is not None else open_storage(settings)
        self.log = structlog.get_logger().bind(vm=name, host=settings.host)

    # -- observing --------------------------------------------------------

    def spec(self) -> VMSpec:
        spec = load_vm_spec(self.settings.vm_config_dir, self.name)
        for warning in spec.warnings:
            self.log.warning("config-warning", detail=warning)
        return spec

    def _process(self) -> psutil.Process | None:
        return self.qemu.find()

    def observe(self) -> Observed:
        vols = self.storage.volumes(self.name)
        owners = {v.name: v.lock_owner for v in vols}
        root = next((v.size for v in vols if v.name == "root"), None)
        if self._process() is None:
            run = Run.CRASHED if self.paths.leftovers() else Run.STOPPED
            return Observed(run, owners, root)
        try:
            with self.qemu.qmp() as qmp:
                state = qmp.runstate()
                blocks = qmp.execute("query-block")
        except QmpError as err:
            silent_for = self._silent_since_mark()
            self.log.warning("qmp-unreachable", error=str(err), silent_for=round(silent_for, 1))
            return Observed(Run.UNRESPONSIVE, owners, root, silent_for=silent_for)
        self.paths.silent_mark.unlink(missing_ok=True)
        if state in RUNNING_STATES:
            run = Run.RUNNING
        elif state == "inmigrate":
            run = Run.INMIGRATE
        elif state == "postmigrate":
            run = Run.POSTMIGRATE
        else:
            run = Run.PAUSED
        iops = 0
        for block in blocks:
            if block.get("device") == "root" and "inserted" in block:
                iops = int(block["inserted"].get("iops", 0))
                root = int(block["inserted"]["image"]["virtual-size"])
        return Observed(run, owners, root, iops)

    def _silent_since_mark(self) -> float:
        """Seconds since QMP was first seen silent; the mark survives across sweeps."""
        mark = self.paths.silent_mark
        try:
            return max(0.0, time.time() - mark.stat().st_mtime)
        except FileNotFoundError:
            mark.touch(mode=0o600)
            return 0.0

    def status(self) -> dict[str, Any]:
        """What runs and who holds what, without changing anything."""
        result: dict[str, Any] = {"vm": self.name, "host": self.settings.host}
        try:
            spec: VMSpec | None = self.spec()
        except FcqError as err:
            spec = None
            result["config_error"] = err.message
        obs = self.observe()
        proc = self._process()
        ident = self.qemu.identity()
        result.update({
            "status": obs.run.value,
            "wanted": wanted(spec, self.settings.host) if spec else None,
            "pid": proc.pid if proc else None,
            "memory_mb": ident.memory_mb if proc and ident else None,
            "root_bytes": obs.root_bytes,
            "locks": obs.lock_owners,
            "iops": obs.iops,
        })
        if obs.run is Run.RUNNING:
            result["guest_agent"] = self._guest_agent_answers(timeout=1.0)
        return result

    def _guest_agent_answers(self, timeout: float) -> bool:
        try:
            with GuestAgent(str(self.paths.ga), timeout, self.name) as ga:
                ga.ping()
            return True
        except FcqError:
            return False

    # -- operations -------------------------------------------------------

    def locked(self) -> Any:
        """The VM's operation lock (reentrant): hold it across several steps."""
        return operation_lock(self.settings.run_dir, self.name, self.settings.operation_wait)

    def ensure(self) -> dict[str, Any]:
        """Converge the VM to its config on this host."""
        with self.locked():
            spec = self.spec()
            return self._converge(spec, "ensure")

    def _converge(self, spec: VMSpec, operation: str) -> dict[str, Any]:
        found = self.observe()
        self._adopt(spec)
        actions = plan(spec, found, self.settings.host, self.settings.kill_silent_after)
        want = wanted(spec, self.settings.host)
        done: list[str] = []
        refusals: list[Action] = []
        for action in actions:
            self.log.info("decision", action=action.do.value, wanted=want, found=found.run.value,
                          reason=action.reason)
            if action.do is Do.REFUSE:
                refusals.append(action)
                continue
            self._execute(action, spec)
            done.append(action.do.value)
        # Observing costs QMP round trips; when nothing was done (the sweep's
        # common case) what we found is still what is.
        after = found if done in ([], ["nothing"]) else self.observe()
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
        if self.qemu.identity() is None:
            proc = self._process()
            if proc is not None:
                self.qemu.record_identity(proc, spec.memory_mb)
                self.log.warning("adopted", action="adopt", pid=proc.pid,
                                 detail="QEMU had a pidfile but no identity record")

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
            err = LockedByOtherHost(self.name, volume, action.host)
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
            self._start(spec)
        elif do is Do.STOP:
            self._stop()
        elif do is Do.KILL:
            self._kill()
        elif do is Do.PAUSE:
            with self.qemu.qmp() as qmp:
                qmp.execute("stop")
        elif do is Do.CLEAN_UP:
            self._clean_up()
        elif do is Do.TAKE_LOCKS:
            self._take_locks()
        elif do is Do.GROW_ROOT:
            with self.qemu.qmp() as qmp:
                qmp.execute("block_resize", device="root", size=action.size)
            self.log.info("grown", action="grow-root", size=action.size)
        elif do is Do.SET_IOPS:
            self._set_iops(action.iops)
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
            if self._process() is not None:
                self.log.warning("orphan-running", action="nothing", found=found.run.value,
                                 detail="runs without a config file: restore or remove it")
                return self._result("ensure", "unknown", found, [], found)
            self._clean_up()
            return self._result("ensure", "unknown", found, ["clean-up"], self.observe())

    def start(self) -> dict[str, Any]:
        """Start the VM here if it is not running (the config must allow this host)."""
        with self.locked():
            spec = self.spec()
            self._check_may_start(spec)
            if not spec.online:
                self.log.warning("start-offline-vm", action="start",
                                 detail="config says online: false; the next ensure stops it")
            found = self.observe()
            if found.run in (Run.RUNNING, Run.PAUSED, Run.INMIGRATE):
                return self._result("start", "here", found, [], found)
            online = dataclasses.replace(spec, online=True, kvm_host=self.settings.host)
            return self._converge(online, "start")

    def _check_may_start(self, spec: VMSpec) -> None:
        if spec.kvm_host not in (None, self.settings.host):
            raise Refused(f"{self.name}: config puts it on host {spec.kvm_host}; "
                          "starting it here could run it twice", vm=self.name,
                          kvm_host=spec.kvm_host)

    def stop(self) -> dict[str, Any]:
        """Power the VM off gracefully (ACPI, then quit, then kill) and release its locks."""
        with self.locked():
            found = self.observe()
            done = []
            if self._process() is not None:
                self._stop()
                done.append("stop")
            if found.run is not Run.STOPPED or any(
                    o == self.settings.host for o in found.lock_owners.values()):
                self._clean_up()
                done.append("clean-up")
            return self._result("stop", "stopped", found, done, self.observe())

    def restart(self) -> dict[str, Any]:
        with self.locked():
            self._check_may_start(self.spec())  # refuse before powering anything off
            self.stop()
            result = self.start()
            result["operation"] = "restart"
            return result

    def kill(self) -> dict[str, Any]:
        """SIGKILL the VM's QEMU and release its locks."""
        with self.locked():
            found = self.observe()
            done = []
            if self._process() is not None:
                self._kill()
                done.append("kill")
            self._clean_up()
            done.append("clean-up")
            return self._result("kill", "stopped", found, done, self.observe())

    def force_unlock(self) -> dict[str, Any]:
        """Break every lock of the VM's volumes, whoever holds them.

        Refused while the VM's QEMU runs here: breaking our own live lock
        would invite a second writer. For a lock of another host the
        operator vouches that that host's QEMU is gone.
        """
        with self.locked():
            if self._process() is not None:
                raise Refused(f"{self.name}: runs on this host; stop it before breaking locks",
                              vm=self.name)
            broken = {}
            for volume in VOLUMES:
                owner = self.storage.force_unlock(self.name, volume)
                if owner is not None:
                    broken[volume] = owner
                    self.log.warning("lock-broken", action="force-unlock", volume=volume,
                                     previous_owner=owner)
            return {"vm": self.name, "host": self.settings.host, "operation": "force-unlock",
                    "broken": broken}

    # -- steps ------------------------------------------------------------

    def _take_locks(self) -> list[str]:
        taken = []
        try:
            for volume in VOLUMES:
                if self.storage.lock(self.name, volume):
                    taken.append(volume)
        except BaseException:
            for volume in taken:
                self.storage.unlock(self.name, volume)
            raise
        return taken

    def _release_locks(self) -> None:
        for volume in VOLUMES:
            if self.storage.unlock(self.name, volume):
                self.log.info("unlocked", action="release-lock", volume=volume)

    def _clean_up(self) -> None:
        if self._process() is not None:
            raise Inconsistent(self.name, "running", "clean-up asked while QEMU runs")
        removed = self.qemu.clean_up()
        if removed:
            self.log.info("cleaned-up", action="clean-up", removed=removed)
        self._release_locks()

    def argv(self, accel: str) -> list[str]:
        p = self.paths
        return [self.settings.qemu_binary, "-nodefaults", "-no-user-config",
                "-display", "none", "-cpu", cpu_model(accel),
                "-serial", f"file:{p.serial_log}", "-msg", "timestamp=on",
                "-readconfig", str(p.config),
                "-daemonize", "-pidfile", str(p.pidfile)]

    def _start(self, spec: VMSpec, incoming: bool = False) -> None:
        """Start QEMU; *incoming*: paused, waiting for a migration, taking no locks."""
        s = self.settings
        s.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        accel = detect_accelerator(s.accelerator)
        drives = [self.storage.drive(self.name, v) for v in VOLUMES]
        config = render_qemu_config(s, spec, accel, drives,
                                    RunPaths(qmp=str(self.paths.qmp), ga=str(self.paths.ga),
                                             observer=str(self.paths.observer)))
        # -S: even when the migration completes, guest code waits for `cont`,
        # which comes only once the source has stopped and the locks moved.
        argv = self.argv(accel) + (["-incoming", "defer", "-S"] if incoming else [])
        t0 = time.monotonic()
        if incoming:
            missing = [v.name for v in self.storage.volumes(self.name) if v.size is None]
            if missing:
                raise StorageError(f"{self.name}: volumes {', '.join(missing)} are not "
                                   "visible on this host: migration needs shared storage",
                                   vm=self.name)
        else:
            self._prepare_volumes(spec)
        self.progress("admission", memory_mb=spec.memory_mb)
        with admission.admission(s.run_dir, self.name, spec.memory_mb, s.vm_max_total_memory,
                                 s.qmp_timeout, wait=s.start_timeout):
            taken = [] if incoming else self._take_locks()
            try:
                write_atomically(self.paths.config, config)
                self.progress("qemu-start")
                self.log.info("qemu-start", action="start", argv=" ".join(argv),
                              accel=accel, memory_mb=spec.memory_mb, incoming=incoming)
                self.qemu.start(argv, spec.memory_mb, s.start_timeout)
                if spec.iops and not incoming:
                    self._set_iops(spec.iops)
            except BaseException:
                self._undo_start(taken)
                raise
        self.log.info("started", action="start", seconds=round(time.monotonic() - t0, 3))

    def start_incoming(self, spec: VMSpec) -> None:
        """Start this VM's QEMU paused, waiting for an incoming migration."""
        self._start(spec, incoming=True)

    def _prepare_volumes(self, spec: VMSpec) -> None:
        # Volumes first, outside the host-wide admission lock: creating a
        # root can take minutes and must not hold up other VMs' starts. We
        # still hold this VM's operation lock.
        self.progress("volumes")
        created = self.storage.ensure_volumes(spec)
        if created:
            self.log.info("volumes-created", action="start", volumes=created)
        root = next(v.size for v in self.storage.volumes(self.name) if v.name == "root")
        if root is not None and root < spec.disk_bytes:
            self.storage.grow(self.name, "root", spec.disk_bytes)
            self.log.info("grown", action="grow-root", size=spec.disk_bytes)

    def _undo_start(self, taken: list[str]) -> None:
        """Leave no half-started VM: kill what we started, give back what we took."""
        proc = self._process()
        if proc is not None:
            self.qemu.kill(proc)
        self.qemu.clean_up()
        for volume in taken:
            self.storage.unlock(self.name, volume)
        self.log.warning("start-undone", action="start", released=taken)

    def _set_iops(self, iops: int) -> None:
        with self.qemu.qmp() as qmp:
            for volume in VOLUMES:
                qmp.execute("block_set_io_throttle", device=volume, bps=0, bps_rd=0, bps_wr=0,
                            iops=iops, iops_rd=0, iops_wr=0)
        self.log.info("iops-set", action="set-iops", iops=iops)

    def _stop(self) -> None:
        proc = self._process()
        if proc is None:
            return
        grace = self.settings.shutdown_grace
        deadline = time.monotonic() + grace
        self.log.info("powerdown", action="stop", grace=grace)
        self.progress("powerdown", grace=grace)
        # A power-button press that arrives while the guest boots is lost
        # (nothing listens yet), so press again every few seconds until the
        # grace runs out; a guest already shutting down ignores it. A slow
        # monitor on a loaded host is no reason to skip the rest of the grace.
        while True:
            try:
                with self.qemu.qmp() as qmp:
                    qmp.execute("system_powerdown")
            except QemuError as err:
                self.log.warning("powerdown-failed", action="stop", error=str(err))
            wait = min(POWERDOWN_REPEAT, deadline - time.monotonic())
            if self.qemu.wait_gone(proc, max(wait, 0)):
                self.log.info("stopped", action="stop", how="acpi")
                return
            if time.monotonic() >= deadline:
                break
        self.log.warning("quit", action="stop", detail=f"guest ignored ACPI for {grace} s")
        try:
            with self.qemu.qmp() as qmp:
                qmp.execute("quit")
        except QemuError as err:
            self.log.warning("quit-failed", action="stop", error=str(err))
        if self.qemu.wait_gone(proc, self.settings.qmp_timeout):
            self.log.info("stopped", action="stop", how="quit")
            return
        self.log.warning("kill", action="stop", detail="QEMU did not exit: SIGKILL")
        self.qemu.kill(proc)

    def _kill(self) -> None:
        proc = self._process()
        if proc is not None:
            self.qemu.kill(proc)
            self.log.warning("killed", action="kill", pid=proc.pid)
