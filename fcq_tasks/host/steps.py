"""One VM on this host, seen and acted on step by step: the agent's public steps.

:class:`VMSteps` observes (what runs, who holds which lock: its looks are
in host/observing.py) and carries out
single steps: start a QEMU, power it down, kill it, take, hand over or
release locks, resume a received copy, rewrite the VM's host. It decides
nothing: the planner decides and :class:`~fcq_tasks.host.agent.VMAgent`
runs the plan; the migration phases call the same steps. Each step logs
``action=…`` and undoes its own partial work when it fails.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import structlog

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import (
    VMSpec,
    load_vm_spec,
    rewrite_vm_parameters,
    spec_path,
    vm_document,
)
from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import (
    FcqError,
    Inconsistent,
    QemuError,
    Refused,
    StorageError,
)
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.accel import cpu_model, detect_accelerator
from fcq_tasks.hazmat.guestagent import GuestAgent
from fcq_tasks.hazmat.heldmonitors import HeldMonitors
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths
from fcq_tasks.hazmat.template import render_qemu_config, run_paths
from fcq_tasks.host import admission
from fcq_tasks.host.fencewatch import record_clients
from fcq_tasks.host.observing import RUNSTATES, Looks, handed_to
from fcq_tasks.host.oplock import operation_lock
from fcq_tasks.host.plan import Observed, Run
from fcq_tasks.storage import VOLUMES, Storage, open_storage

#: Called with a step name and details while a long operation runs (the
#: Celery task publishes them as task state for Flower and `fcq` to show).
Progress = Callable[..., None]


def _no_progress(step: str, **details: Any) -> None:
    pass


#: Seconds between two ACPI power-button presses during a stop.
POWERDOWN_REPEAT = 3.0

#: Seconds a kill gives QMP `quit` (connect, answer, exit) before SIGKILL.
QUIT_TIMEOUT = 2.0


#: QEMU's seccomp filter, installed before the guest runs: no new processes
#: (a migration address "exec:…" or any other way to make QEMU spawn a
#: shell dies with the QEMU, not as a root shell), no setuid/setgid, no
#: obsolete system calls, no changes to scheduling or CPU affinity.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class VMSteps(Looks):
    """Steps on VM *name* on the host *settings* describe. The constructor does no I/O."""

    def __init__(self, settings: HostSettings, name: str, storage: Storage | None = None,
                 progress: Progress | None = None) -> None:
        self.settings = settings
        self.name = name
        self.progress: Progress = progress if progress is not None else _no_progress
        self.paths = VMRunPaths(settings.run_dir, name)
        self.qemu = QemuProcess(self.paths, settings.qmp_timeout)
        self.storage = storage if storage is not None else open_storage(settings)
        self.log = structlog.get_logger().bind(vm=name, host=settings.host)
        #: What start_qemu() knows at its end (the monitor's first answer, our
        #: locks): a start need not observe the VM again to report it.
        self.started: Observed | None = None
        #: The worker's open sweep monitors, set by the sweep (ensure_all):
        #: a converged VM's run state is asked there, see observe().
        self.held_monitors: HeldMonitors | None = None

    # -- observing --------------------------------------------------------

    def spec(self) -> VMSpec:
        """The VM's config, with its I/O limits resolved (file, else the pool's default)."""
        spec = load_vm_spec(self.settings.vm_config_dir, self.name)
        for warning in spec.warnings:
            self.log.warning("config-warning", detail=warning)
        ceph = self.settings.ceph
        default = ceph.limits_for(spec.rbd_pool or ceph.pool) if ceph else None
        return dataclasses.replace(
            spec, iops=spec.iops if spec.iops is not None else (default.iops if default else 0),
            bps=spec.bps if spec.bps is not None else (default.bps if default else 0))

    def guest_agent_answers(self, timeout: float) -> bool:
        try:
            with GuestAgent(str(self.paths.ga), timeout, self.name) as ga:
                ga.ping()
            return True
        except FcqError:
            return False

    def locked(self) -> Any:
        """The VM's operation lock (reentrant): hold it across several steps."""
        return operation_lock(self.settings.run_dir, self.name, self.settings.operation_wait)

    # -- locks --------------------------------------------------------------

    def take_locks(self, instance: str = "") -> list[str]:
        """Take every lock of the VM for this host, or none (all or nothing).

        *instance* names the QEMU the locks cover (RBD puts it in the cookie).
        """
        taken: list[str] = []
        first, rest = VOLUMES[0], VOLUMES[1:]
        try:
            # The root decides: a host that loses it takes nothing. The others
            # then side by side on RBD (~7 ms of round trips each); a local
            # lock is a link(), quicker than handing it to a thread.
            if self.storage.lock(self.name, first, instance):
                taken.append(first)
            if not self.storage.fences:
                for volume in rest:
                    if self.storage.lock(self.name, volume, instance):
                        taken.append(volume)
                return taken
            futures = {v: _volume_steps.submit(self.storage.lock, self.name, v, instance)
                       for v in rest}
            concurrent.futures.wait(futures.values())
            failed: BaseException | None = None
            for volume, future in futures.items():
                try:
                    if future.result():
                        taken.append(volume)
                except BaseException as err:  # raised below, once every lock is known
                    failed = failed or err
            if failed is not None:
                raise failed
        except BaseException:
            for volume in taken:
                self.storage.unlock(self.name, volume)
            raise
        return taken

    def release_locks(self) -> None:
        """Give back this host's locks (a stop or kill ends with it)."""
        def release(volume: str) -> None:
            if self.storage.unlock(self.name, volume):
                self.log.info("unlocked", action="release-lock", volume=volume)
        if not self.storage.fences:  # a local unlock is an unlink: no thread needed
            for volume in VOLUMES:
                release(volume)
            return
        # On RBD side by side (~5 ms of round trips each); every volume is
        # tried even when one fails, the error raised once all ended.
        _each_volume(release)

    def hand_over_locks(self, to_host: str) -> None:
        """Give every lock to *to_host* (only once this host's QEMU is gone).

        The volumes at once: each handover is one image's own step, and the
        receiver resumes only once it sees all of them handed.
        """
        if self.process() is not None:
            raise Inconsistent(self.name, "running", "locks handed over while QEMU runs here")
        _each_volume(lambda volume: self.storage.hand_over(self.name, volume, to_host))
        self.log.info("locks-handed-over", action="hand-over", to=to_host)

    def locks_handed_to_us(self) -> bool:
        """Every lock was handed to this host in a migration and not yet claimed."""
        return handed_to(self.storage.volumes(self.name), self.settings.host)

    def holds_all_locks(self) -> bool:
        return all(v.lock_owner == self.settings.host for v in self.storage.volumes(self.name))

    def claim_locks(self) -> None:
        _each_volume(lambda volume: self.storage.claim(self.name, volume))

    # -- config -------------------------------------------------------------

    def set_kvm_host(self, host: str) -> None:
        """Point this host's copy of the VM's config at *host* (its version is kept)."""
        path = spec_path(self.settings.vm_config_dir, self.name)
        if not path.exists():
            return
        if self.spec().kvm_host != host:
            rewrite_vm_parameters(path, kvm_host=host)
            self.log.info("config-follows", action="set-kvm-host", kvm_host=host)

    # -- QEMU ---------------------------------------------------------------

    def clean_up(self, keep_locks: bool = False) -> None:
        if self.process() is not None:
            raise Inconsistent(self.name, "running", "clean-up asked while QEMU runs")
        removed = self.qemu.clean_up()
        if removed:
            self.log.info("cleaned-up", action="clean-up", removed=removed)
        if not keep_locks:
            self.release_locks()

    def argv(self, accel: str, paths: VMRunPaths | None = None) -> list[str]:
        """QEMU's command line; *paths*: where pidfile and serial log go (default: ours).

        The config read is always this VM's own file (VMRunPaths.config): it
        is what tells our QEMU from any other process.
        """
        p = paths or self.paths
        return [self.settings.qemu_binary, "-nodefaults", "-no-user-config",
                "-display", "none", "-cpu", cpu_model(accel),
                "-serial", f"file:{p.serial_log}", "-msg", "timestamp=on",
                "-readconfig", str(p.config),
                "-sandbox", SANDBOX, "-pidfile", str(p.pidfile)]

    def start_qemu(self, spec: VMSpec, incoming: str | None = None) -> None:
        """Start QEMU; *incoming* (an attempt id): paused, waiting for a migration, no locks."""
        s = self.settings
        self.started = None
        s.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkdir leaves a directory that was there already as it was (0755
        # seen): its sockets, pid files and serial logs are nobody else's.
        s.run_dir.chmod(0o700)
        accel = detect_accelerator(s.accelerator)
        drives = [self.storage.drive(self.name, v) for v in VOLUMES]
        config = render_qemu_config(s, spec, accel, drives,
                                    run_paths(self.paths))
        # -S: even when the migration completes, guest code waits for `cont`,
        # which comes only once the source's QEMU is gone and the locks moved.
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
            instance = secrets.token_hex(6)
            taken = [] if incoming else self.take_locks(instance)
            try:
                # Not durable: a power loss ends this QEMU too (fileio).
                write_atomically(self.paths.config, config, durable=False)
                write_atomically(self.paths.seed, self.seed_data(spec), durable=False)
                self.progress("qemu-start")
                self.log.info("qemu-start", action="start", argv=" ".join(argv),
                              accel=accel, memory_mb=spec.memory_mb, incoming=incoming,
                              instance=instance)
                before = self.storage.clients(self.name) if self.storage.fences else {}
                self.qemu.start(argv, spec.memory_mb, s.start_timeout, incoming=incoming,
                                generation=s.qemu_generation, qemu_scope=s.qemu_scope)
                # Its clients, on record for a fence that comes after their
                # watches expired (a host cut off for more than ~30 s).
                record_clients(self.qemu, self.storage.record_writers(self.name, before,
                                                                      instance))
                if (spec.iops or spec.bps) and not incoming:
                    self.throttle(spec.iops or 0, spec.bps or 0)
            except BaseException:
                self._undo_start(taken)
                raise
        self.log.info("started", action="start", seconds=round(time.monotonic() - t0, 3))
        if not incoming:
            self.started = Observed(RUNSTATES.get(self.qemu.started_runstate, Run.PAUSED),
                                    {v: s.host for v in VOLUMES}, iops=spec.iops or 0,
                                    bps=spec.bps or 0)

    def seed_data(self, spec: VMSpec) -> str:
        """What the guest reads at boot: its configuration as JSON (docs/guest.md)."""
        return json.dumps({"format": 1, "host": self.settings.host,
                           "qemu_generation": self.settings.qemu_generation,
                           **vm_document(spec)},
                          indent=2, sort_keys=True) + "\n"

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
        proc = self.process()
        if proc is not None:
            self.qemu.kill(proc)
        self.qemu.clean_up()
        for volume in taken:
            self.storage.unlock(self.name, volume)
        self.log.warning("start-undone", action="start", released=taken)

    def throttle(self, iops: int, bps: int = 0) -> None:
        self.forget_check()
        with self.qemu.monitor() as mon:
            mon.throttle(list(VOLUMES), iops, bps)
        self.log.info("limits-set", action="set-iops", iops=iops, bps=bps)

    def grow_root(self, size: int) -> None:
        self.forget_check()
        with self.qemu.monitor() as mon:
            mon.resize_disk("root", size)
        self.log.info("grown", action="grow-root", size=size)

    def pause(self) -> None:
        self.forget_check()
        with self.qemu.monitor() as mon:
            mon.pause()
        self.log.warning("paused", action="pause")

    def resume_received(self, resumed: Callable[[], None] | None = None) -> None:
        """Run the received copy: only with every lock ours, checked right before `cont`.

        *resumed* is called right after `cont` (a migration marks the moment).

        A handed lock is taken for real here (RBD cannot move a lock, the
        source left a note and released it); a lock anyone else holds
        raises, and nothing is resumed. No roll-back on failure: a handed
        lock taken here is still this host's, released it would drop the
        handover.
        """
        # The volumes at once (the guest is paused until `cont`); none is
        # resumed on unless every lock turns out ours just below.
        _each_volume(lambda volume: self.storage.lock(self.name, volume))
        if not self.holds_all_locks():
            raise Refused(f"{self.name}: not every lock is held by {self.settings.host}: "
                          "the received copy is not resumed", vm=self.name)
        self.set_kvm_host(self.settings.host)
        self.forget_check()
        with self.qemu.monitor() as mon:
            mon.resume()
        if resumed is not None:
            resumed()
        self.log.info("resumed", action="resume", detail="received copy runs here")
        self.after_resume()

    def after_resume(self) -> None:
        """Best effort once the guest runs here: nothing in here may kill it."""
        try:
            self.qemu.mark_resumed()
            self.claim_locks()
            # Throttles are QEMU settings, not guest state: they do not
            # travel with the migration.
            spec = self.spec()
            if spec.iops or spec.bps:
                self.throttle(spec.iops or 0, spec.bps or 0)
        except (FcqError, OSError) as err:
            self.log.warning("claim-deferred", action="claim", error=str(err),
                             detail="the next ensure claims the locks")

    def claim(self) -> None:
        """Take on a VM whose locks were handed to this host: config and locks follow."""
        self.set_kvm_host(self.settings.host)
        self.qemu.mark_resumed()
        self.claim_locks()
        self.log.info("claimed", action="claim")

    def stop_qemu(self) -> str | None:
        """Power the guest off: ``acpi`` (it shut down), ``quit`` (it ignored the power
        button for shutdown_grace), ``kill`` (QEMU did not quit either); None: none ran."""
        proc = self.process()
        if proc is None:
            return None
        grace = self.settings.shutdown_grace
        deadline = Deadline.after(grace, "the guest's power-off")
        self.log.info("powerdown", action="stop", grace=grace)
        self.progress("powerdown", grace=grace)
        # A power-button press that arrives while the guest boots is lost
        # (nothing listens yet), so press again every few seconds until the
        # grace runs out; a guest already shutting down ignores it. A slow
        # monitor on a loaded host is no reason to skip the rest of the grace.
        while True:
            try:
                with self.qemu.monitor() as mon:
                    mon.powerdown()
            except QemuError as err:
                self.log.warning("powerdown-failed", action="stop", error=str(err))
            if self.qemu.wait_gone(proc, min(POWERDOWN_REPEAT, deadline.remaining())):
                self.log.info("stopped", action="stop", how="acpi")
                return "acpi"
            if deadline.passed():
                break
        self.log.warning("quit", action="stop", detail=f"guest ignored ACPI for {grace} s")
        try:
            with self.qemu.monitor() as mon:
                mon.quit()
        except QemuError as err:
            self.log.warning("quit-failed", action="stop", error=str(err))
        if self.qemu.wait_gone(proc, self.settings.qmp_timeout):
            self.log.info("stopped", action="stop", how="quit")
            return "quit"
        self.log.warning("kill", action="stop", detail="QEMU did not exit: SIGKILL")
        self.qemu.kill(proc)
        return "kill"

    def kill_qemu(self) -> None:
        """End the VM's QEMU now, without asking the guest.

        On RBD, QMP ``quit`` first, SIGKILL if QEMU does not go at once: a
        QEMU that quits closes its images, and that unregisters its watches. A
        SIGKILLed QEMU's watches linger for ~30 s, and every lock or note
        change on those images meanwhile waits 5 s for each dead watcher.
        """
        proc = self.process()
        if proc is None:
            return
        # Only RBD (the storage that fences) keeps watches; local files have none.
        try:
            if self.storage.fences:
                with self.qemu.monitor(timeout=QUIT_TIMEOUT) as mon:
                    mon.quit()
                if self.qemu.wait_gone(proc, QUIT_TIMEOUT):
                    self.log.warning("killed", action="kill", pid=proc.pid, how="quit")
                    return
        except QemuError as err:
            self.log.info("quit-failed", action="kill", error=str(err))
        self.qemu.kill(proc)
        self.log.warning("killed", action="kill", pid=proc.pid, how="sigkill")


#: Threads for steps on the volumes of one VM at once (a few round trips to
#: the storage each, during which librados does not hold the GIL).
_volume_steps = concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(VOLUMES),
                                                       thread_name_prefix="fcq-volume")


def _each_volume(step: Callable[[str], object]) -> None:
    """*step* for every volume at once; all of them end before this returns.

    Every step runs; the first volume's error is raised once all ended (as
    in a loop over the volumes, steps that succeeded stay done: each caller
    checks the whole, e.g. the receiver resumes only with every lock).
    """
    futures = [_volume_steps.submit(step, volume) for volume in VOLUMES]
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()
