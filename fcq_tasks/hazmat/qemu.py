"""One VM's QEMU process on this host: start, identify, stop, kill.

A QEMU process is *ours* only if the PID in its pidfile belongs to a live,
non-zombie process whose command line reads our rendered config file, and
whose start time in clock ticks since boot equals the one recorded at start.
A PID recycled by an unrelated process is therefore never signalled, and a
wall-clock step changes nothing. Zombies count as dead: a QEMU whose
starter is gone stays a zombie until PID 1 reaps it (seconds, on some init
systems), and a zombie still answers ``kill -0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from fcq_tasks.deadline import Deadline, poll_until
from fcq_tasks.errors import QemuError
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat import scope
from fcq_tasks.hazmat.monitor import Monitor

log = structlog.get_logger()

#: How often we look at a process we wait for.
POLL_INTERVAL = 0.05
#: How long SIGKILL may take to make a process disappear.
KILL_WAIT = 10.0
#: How often a starting QEMU is looked at until it wrote its pidfile.
START_POLL = 0.005
#: How long a QEMU that failed to come up gets to exit by itself.
EXIT_WAIT = 1.0


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


@dataclass(frozen=True)
class VMRunPaths:
    """Every run-time file of one VM, all under the host's run directory."""

    run_dir: Path
    name: str
    vm: str = ""    # the VM's name when *name* is not it (an upgrade's second QEMU)

    def _p(self, suffix: str) -> Path:
        return self.run_dir / f"{self.name}.{suffix}"

    @property
    def config(self) -> Path:
        # A second QEMU of the VM (an upgrade's) reads the VM's own config
        # file too: the file named on a command line is what marks our QEMUs.
        if self.vm:
            return self.run_dir.parent / f"{self.vm}.cfg"
        return self._p("cfg")

    @property
    def pidfile(self) -> Path:
        return self._p("pid")

    @property
    def identity(self) -> Path:
        return self._p("json")

    @property
    def qmp(self) -> Path:
        return self._p("qmp.sock")

    @property
    def ga(self) -> Path:
        return self._p("ga.sock")

    @property
    def observer(self) -> Path:
        return self._p("obs.sock")

    @property
    def sweep(self) -> Path:
        """The monitor a worker keeps open between sweeps (hazmat/heldmonitors.py)."""
        return self._p("swp.sock")  # no longer than "qmp.sock": see RUN_DIR_MAX

    @property
    def sockets(self) -> tuple[Path, Path, Path, Path]:
        return (self.qmp, self.ga, self.observer, self.sweep)

    @property
    def seed(self) -> Path:
        return self._p("seed.json")

    @property
    def serial_log(self) -> Path:
        return self._p("serial.log")

    @property
    def clients(self) -> Path:
        """This QEMU's storage clients (RBD: addresses), for the host's fence watch."""
        return self._p("clients")

    @property
    def stderr_log(self) -> Path:
        """What QEMU wrote to stderr (its start errors, block layer messages)."""
        return self._p("stderr")

    @property
    def silent_mark(self) -> Path:
        return self._p("silent")

    @property
    def agent_silent_mark(self) -> Path:
        """Since when the guest agent has not answered (the sweep backs off meanwhile)."""
        return self._p("ga.silent")

    @property
    def generation_told(self) -> Path:
        """What the guest was last told about QEMU generations."""
        return self._p("generation")

    @property
    def checked(self) -> Path:
        """What the last full look at the running QEMU found (its drives, its agent's port)."""
        return self._p("checked")

    def leftovers(self) -> list[Path]:
        """Run files that exist although no process may be running."""
        return [p for p in (self.pidfile, self.identity, *self.sockets, self.silent_mark,
                            self.seed, self.agent_silent_mark, self.generation_told,
                            self.checked, self.clients)
                if p.exists()]


@dataclass(frozen=True)
class Identity:
    """What we recorded when we started the process.

    ``start_ticks`` is when the process started, in clock ticks since boot
    (field 22 of ``/proc/<pid>/stat``), and ``boot_id`` names the boot. Both
    are immune to wall-clock steps; psutil's ``create_time()`` is not (it
    adds the boot time, which moves when NTP steps the clock), so a 1 s step
    would make a live QEMU look like a stranger.
    """

    pid: int
    start_ticks: int | None     # None: a record written by an older fcq (create time only)
    boot_id: str
    memory_mb: int
    argv: tuple[str, ...]
    incoming: str | None = None  # the migration attempt this QEMU was started to receive
    generation: int = 0          # the host's qemu_generation when it started (older fcq: 0)


_boot_id = ""


def boot_id() -> str:
    """This boot's random id: a pid and start ticks from another boot mean nothing.

    Read once per process (a process never outlives its boot); an empty
    answer (no /proc) is asked again.
    """
    global _boot_id
    if not _boot_id:
        try:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""
    return _boot_id


def start_ticks(pid: int) -> int | None:
    """When process *pid* started, in clock ticks since boot; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces
    # or parentheses itself: count fields from the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 overall; fields[0] is field 3


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Examined:
    """What the pid on record turned out to be."""

    proc: psutil.Process | None    # our QEMU, alive
    impostor: int | None = None    # a live process naming our config that is not the one we started


class QemuProcess:
    """Manage the QEMU process of VM *paths.name*. The constructor does no I/O."""

    def __init__(self, paths: VMRunPaths, qmp_timeout: float) -> None:
        self.paths = paths
        self.qmp_timeout = qmp_timeout
        #: What the monitor said when start() first reached it ("" before).
        self.started_runstate = ""
        self._identity: tuple[tuple[int, ...], Identity] | None = None

    # -- identification -------------------------------------------------

    def identity(self) -> Identity | None:
        # One ensure asks this three to five times; the record is parsed
        # again only when the file changed. Every write of it replaces the
        # file (write_atomically: a new inode), and a file written within
        # the last two seconds is always read again: a freed inode may be
        # reused within one coarse time stamp tick.
        try:
            st = os.stat(self.paths.identity)
        except OSError:
            self._identity = None
            return None
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._identity is not None and self._identity[0] == version:
            return self._identity[1]
        try:
            data = json.loads(self.paths.identity.read_text())
            ticks = data.get("start_ticks")
            ident = Identity(pid=int(data["pid"]),
                             start_ticks=None if ticks is None else int(ticks),
                             boot_id=str(data.get("boot_id", "")),
                             memory_mb=int(data["memory_mb"]), argv=tuple(data["argv"]),
                             incoming=data.get("incoming"),
                             generation=int(data.get("generation") or 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._identity = None
            return None
        self._identity = (version, ident) \
            if time.time() - max(st.st_mtime, st.st_ctime) > 2.0 else None
        return ident

    def _pid_from_pidfile(self) -> int | None:
        try:
            return int(self.paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def examine(self) -> Examined:
        """Look at the process on record: ours, gone, or a stranger naming our config.

        A process counts as ours when it is alive (not a zombie), its
        command line reads our rendered config, and its start ticks and
        boot id equal what we recorded. One that names our config but was
        started at another moment is an impostor: it is neither ours (never
        signalled) nor gone (its guest may be running, so its locks are
        never released on its behalf).
        """
        ident = self.identity()
        pid = ident.pid if ident is not None else self._pid_from_pidfile()
        if pid is None or pid <= 1:
            return Examined(None)
        try:
            proc = psutil.Process(pid)
            if not _alive(proc):
                return Examined(None)
            if str(self.paths.config) not in proc.cmdline():
                return Examined(None)  # the pid was recycled by an unrelated process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return Examined(None)
        if ident is not None and ident.start_ticks is not None and (
                start_ticks(pid) != ident.start_ticks or ident.boot_id != boot_id()):
            return Examined(None, impostor=pid)
        return Examined(proc)

    def find(self) -> psutil.Process | None:
        """Our live QEMU process, or None. Never returns a stranger."""
        return self.examine().proc

    # -- life cycle -----------------------------------------------------

    def start(self, argv: list[str], memory_mb: int, timeout: float,
              incoming: str | None = None, generation: int = 0,
              qemu_scope: str = "none") -> Identity:
        """Start QEMU in a session of its own and return once its monitor answers.

        Not ``-daemonize``: QEMU's seccomp sandbox (``-sandbox
        spawn=deny,elevateprivileges=deny``) forbids the fork and setsid that
        daemonizing does after the filter is in place. fcq gives QEMU what
        daemonizing would (its own session, cwd ``/``, no terminal) and
        reaps it when it exits, so it never lingers as a zombie while this
        process lives; if this process goes first, QEMU runs on, as before.

        *incoming*: the migration attempt this QEMU is to receive (recorded,
        so that a later look can tell an incoming copy from a paused VM).
        *qemu_scope*: the cgroup QEMU goes into (hazmat/scope.py: never the
        worker's, so that restarting the worker's service spares the guests).
        """
        mode = scope.resolve(qemu_scope)
        for stale in (self.paths.pidfile, *self.paths.sockets):
            stale.unlink(missing_ok=True)
        deadline = Deadline.after(timeout, "QEMU's start")
        try:
            with open(self.paths.stderr_log, "wb", opener=_private) as err_out:
                popen = subprocess.Popen([*scope.command_prefix(mode, self.paths.name), *argv],
                                         stdin=subprocess.DEVNULL, stdout=err_out,
                                         stderr=err_out, cwd="/", umask=0o077,
                                         start_new_session=True)
        except OSError as err:
            raise QemuError(f"{self.paths.name}: QEMU did not start: {err}",
                            vm=self.paths.name) from err
        try:
            if mode == "cgroupfs":
                self._move_to_scope(popen.pid, explicit=qemu_scope != "auto")
            pid = poll_until(lambda: None if popen.poll() is not None
                             else self._pid_from_pidfile(), deadline, START_POLL)
            if pid is None:
                raise QemuError(f"{self.paths.name}: QEMU started but wrote no pidfile "
                                f"within {timeout:.0f} s", vm=self.paths.name)
            ticks = start_ticks(pid)
            if ticks is None:
                raise QemuError(f"{self.paths.name}: QEMU exited right after starting",
                                vm=self.paths.name)
            ident = self._write_identity(Identity(pid, ticks, boot_id(), memory_mb,
                                                  tuple(argv), incoming, generation))
            self.started_runstate = self.wait_for_monitor(deadline)
        except QemuError as err:
            raise self._start_failure(popen, err) from err
        # A socket is made 0777 & ~umask: 0700. No one executes a socket;
        # owner read/write is what it needs.
        for sock in self.paths.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(sock, 0o600)
        def reap() -> None:
            popen.wait()
            if mode == "cgroupfs":
                scope.forget(self.paths.name)
        threading.Thread(target=reap, daemon=True, name=f"fcq-reap-{self.paths.name}").start()
        return ident

    def _move_to_scope(self, pid: int, explicit: bool) -> None:
        try:
            scope.move(pid, self.paths.name)
        except scope.ScopeError as err:
            if explicit:
                raise QemuError(f"{self.paths.name}: {err.strerror} (qemu_scope: cgroupfs)",
                                vm=self.paths.name) from err
            log.warning("qemu-scope-failed", vm=self.paths.name, error=err.strerror,
                        detail="QEMU stays in the worker's cgroup: a stop of the worker's "
                        "service would take it down too")

    def _start_failure(self, popen: subprocess.Popen[bytes], err: QemuError) -> QemuError:
        """*err*, or QEMU's own words if it exited: its status and what it wrote."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(EXIT_WAIT)
        if popen.returncode is None:
            popen.kill()  # never leave a QEMU that did not come up
            popen.wait()
            return err
        try:
            said = self.paths.stderr_log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            said = ""
        return QemuError(f"{self.paths.name}: QEMU exited with {popen.returncode}: {said}",
                         vm=self.paths.name, returncode=popen.returncode)

    def _write_identity(self, ident: Identity) -> Identity:
        self._identity = None
        write_atomically(self.paths.identity, json.dumps({
            "pid": ident.pid, "start_ticks": ident.start_ticks, "boot_id": ident.boot_id,
            "memory_mb": ident.memory_mb, "argv": list(ident.argv),
            "incoming": ident.incoming, "generation": ident.generation,
            "vm": self.paths.vm or self.paths.name}), durable=False)
        return ident

    def record_identity(self, proc: psutil.Process, memory_mb: int) -> Identity:
        """Write the identity of *proc* (which find() returned) after the fact."""
        old = self.identity()
        return self._write_identity(Identity(
            proc.pid, start_ticks(proc.pid), boot_id(), memory_mb, tuple(proc.cmdline()),
            old.incoming if old is not None and old.pid == proc.pid else None,
            old.generation if old is not None and old.pid == proc.pid else 0))

    def mark_resumed(self) -> None:
        """The incoming copy runs: from now on it is an ordinary VM of this host."""
        ident = self.identity()
        if ident is not None and ident.incoming is not None:
            self._write_identity(dataclasses.replace(ident, incoming=None))

    def wait_for_monitor(self, deadline: Deadline) -> str:
        """The runstate QEMU's monitor reports once it first answers."""
        last: list[Exception] = []

        def answers() -> str | None:
            if self.find() is None:
                raise QemuError(f"{self.paths.name}: QEMU exited while starting; see "
                                f"{self.paths.serial_log}", vm=self.paths.name)
            try:
                with self.monitor() as mon:
                    return mon.runstate()
            except QemuError as err:
                last[:] = [err]
                return None
        state = poll_until(answers, deadline, POLL_INTERVAL)
        if state is None:
            raise QemuError(f"{self.paths.name}: QMP did not answer after start: "
                            f"{last[0] if last else ''}", vm=self.paths.name)
        return state

    def monitor(self, timeout: float | None = None) -> Monitor:
        """fcq's monitor of this QEMU (one client at a time: hold it briefly)."""
        return Monitor(str(self.paths.qmp), timeout or self.qmp_timeout, self.paths.name)

    def wait_gone(self, proc: psutil.Process, timeout: float) -> bool:
        return wait_exit(proc, timeout)

    def kill(self, proc: psutil.Process) -> None:
        """SIGKILL *proc* (which find() returned) and wait until it is gone."""
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return
        if not self.wait_gone(proc, KILL_WAIT):
            raise QemuError(f"{self.paths.name}: QEMU pid {proc.pid} survived SIGKILL",
                            vm=self.paths.name, pid=proc.pid)

    def clean_up(self) -> list[str]:
        """Remove run files of a process that is gone; returns what was removed."""
        removed = []
        for path in self.paths.leftovers():
            path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed


def wait_exit(proc: psutil.Process, timeout: float) -> bool:
    """Whether *proc* is gone (or a zombie) within *timeout* s.

    QEMU is usually not our child (another worker or process started it),
    so waitpid() cannot wait for it; a pidfd can: poll() on it returns the moment the process exits,
    where a polling loop would add up to its interval to every stop and
    kill. Polling stays as the fallback where pidfds are unavailable.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd_open (kernel < 5.3, seccomp): poll instead
        return bool(poll_until(lambda: not _alive(proc), Deadline.after(timeout),
                               POLL_INTERVAL))
    try:
        # The pid may have been reused between find() and pidfd_open(): the
        # fd names *proc* only if proc (same start time) still runs now.
        if not proc.is_running() or not _alive(proc):
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000)) or not _alive(proc)
    finally:
        os.close(fd)


def identity_names(run_dir: Path) -> list[str]:
    """The names with an identity file in *run_dir* (one listing, no file read).

    ``<name>.json``; not ``<name>.seed.json`` (what the guest reads) nor a
    temporary file of write_atomically (``.<name>.json.…``).
    """
    try:
        entries = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return [e[:-5] for e in entries
            if e.endswith(".json") and not e.startswith(".") and "." not in e[:-5]]


def read_identity_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """name → recorded identity for every VM that has one in *run_dir*."""
    out: dict[str, dict[str, Any]] = {}
    for name in identity_names(run_dir):
        try:
            out[name] = json.loads((run_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue
    return out
