"""One VM's QEMU process on this host: start, identify, stop, kill.

A QEMU process is *ours* only if the PID in its pidfile belongs to a live,
non-zombie process whose command line reads our rendered config file, and,
when we recorded it at start, whose create time matches. A PID recycled by an
unrelated process is therefore never signalled. Zombies count as dead: PID 1
here reaps orphans only every ~1.5 s (FACTS.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fcq_tasks.errors import QemuError
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.qmp import QmpSession

#: How often we look at a process we wait for.
POLL_INTERVAL = 0.05
#: How long SIGKILL may take to make a process disappear.
KILL_WAIT = 10.0


@dataclass(frozen=True)
class VMRunPaths:
    """Every run-time file of one VM, all under the host's run directory."""

    run_dir: Path
    name: str

    def _p(self, suffix: str) -> Path:
        return self.run_dir / f"{self.name}.{suffix}"

    @property
    def config(self) -> Path:
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
    def serial_log(self) -> Path:
        return self._p("serial.log")

    @property
    def silent_mark(self) -> Path:
        return self._p("silent")

    def leftovers(self) -> list[Path]:
        """Run files that exist although no process may be running."""
        return [p for p in (self.pidfile, self.identity, self.qmp, self.ga, self.observer,
                          self.silent_mark)
                if p.exists()]


@dataclass(frozen=True)
class Identity:
    """What we recorded when we started the process."""

    pid: int
    create_time: float
    memory_mb: int
    argv: tuple[str, ...]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class QemuProcess:
    """Manage the QEMU process of VM *paths.name*. The constructor does no I/O."""

    def __init__(self, paths: VMRunPaths, qmp_timeout: float) -> None:
        self.paths = paths
        self.qmp_timeout = qmp_timeout

    # -- identification -------------------------------------------------

    def identity(self) -> Identity | None:
        try:
            data = json.loads(self.paths.identity.read_text())
            return Identity(pid=int(data["pid"]), create_time=float(data["create_time"]),
                            memory_mb=int(data["memory_mb"]), argv=tuple(data["argv"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _pid_from_pidfile(self) -> int | None:
        try:
            return int(self.paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def find(self) -> psutil.Process | None:
        """Our live QEMU process, or None. Never returns a stranger."""
        ident = self.identity()
        pid = ident.pid if ident is not None else self._pid_from_pidfile()
        if pid is None or pid <= 1:
            return None
        try:
            proc = psutil.Process(pid)
            if not _alive(proc):
                return None
            cmdline = proc.cmdline()
            if str(self.paths.config) not in cmdline:
                return None
            if ident is not None and abs(proc.create_time() - ident.create_time) > 0.5:
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        return proc

    # -- life cycle -----------------------------------------------------

    def start(self, argv: list[str], memory_mb: int, timeout: float) -> Identity:
        """Start QEMU daemonized and return once its monitor answers."""
        for stale in (self.paths.pidfile, self.paths.qmp, self.paths.ga, self.paths.observer):
            stale.unlink(missing_ok=True)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    umask=0o077, stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise QemuError(f"{self.paths.name}: QEMU did not start: {err}",
                            vm=self.paths.name) from err
        if result.returncode != 0:
            raise QemuError(f"{self.paths.name}: QEMU exited with {result.returncode}: "
                            f"{result.stderr.strip()[-2000:]}", vm=self.paths.name,
                            returncode=result.returncode)
        pid = self._pid_from_pidfile()
        if pid is None:
            raise QemuError(f"{self.paths.name}: QEMU started but wrote no pidfile",
                            vm=self.paths.name)
        # -daemonize resets QEMU's umask to 027; the sockets exist once the
        # parent has exited, so tighten them to owner-only now.
        for sock in (self.paths.qmp, self.paths.ga, self.paths.observer):
            if sock.exists():
                os.chmod(sock, 0o600)
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess as err:
            raise QemuError(f"{self.paths.name}: QEMU exited right after starting",
                            vm=self.paths.name) from err
        ident = self._write_identity(pid, create_time, memory_mb, list(argv))
        self.wait_for_qmp(time.monotonic() + timeout)
        return ident

    def _write_identity(self, pid: int, create_time: float, memory_mb: int,
                        argv: list[str]) -> Identity:
        write_atomically(self.paths.identity, json.dumps({
            "pid": pid, "create_time": create_time, "memory_mb": memory_mb, "argv": argv}))
        return Identity(pid=pid, create_time=create_time, memory_mb=memory_mb,
                        argv=tuple(argv))

    def record_identity(self, proc: psutil.Process, memory_mb: int) -> Identity:
        """Write the identity of *proc* (which find() returned) after the fact."""
        return self._write_identity(proc.pid, proc.create_time(), memory_mb, proc.cmdline())

    def wait_for_qmp(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.find() is None:
                raise QemuError(f"{self.paths.name}: QEMU exited while starting; see "
                                f"{self.paths.serial_log}", vm=self.paths.name)
            try:
                with self.qmp() as qmp:
                    qmp.runstate()
                return
            except QemuError as err:
                last = err
                time.sleep(POLL_INTERVAL)
        raise QemuError(f"{self.paths.name}: QMP did not answer after start: {last}",
                        vm=self.paths.name)

    def qmp(self) -> QmpSession:
        return QmpSession(str(self.paths.qmp), self.qmp_timeout, self.paths.name)

    def wait_gone(self, proc: psutil.Process, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(proc):
                return True
            time.sleep(POLL_INTERVAL)
        return not _alive(proc)

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


def read_identity_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """name → recorded identity for every VM that has one in *run_dir*."""
    out: dict[str, dict[str, Any]] = {}
    try:
        entries = os.listdir(run_dir)
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.endswith(".json") and not entry.startswith("."):
            try:
                out[entry[:-5]] = json.loads((run_dir / entry).read_text())
            except (OSError, ValueError):
                continue
    return out
