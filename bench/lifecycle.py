"""Start, stop and kill: fcq through the queue against the same QEMU by hand.

Each pair runs fcq first, then the bare counterpart, on the same host with
the same rendered QEMU command line and the same volumes:

* start: the orchestrator's call (Python API: ``Orchestrator.submit`` and
  ``wait``; CLI: ``fcq -q start VM --host H`` as a new process) until the
  result says running, against launching QEMU's command line by hand until
  QMP says ``running``;
* kill: ``fcq kill`` through the queue until its result, against SIGKILL
  and waiting for the process to be gone;
* stop: ``fcq stop`` of a booted guest until its result, against QMP
  ``system_powerdown`` and waiting for QEMU to exit (the guest's own ACPI
  power-off time).

    python -m bench.lifecycle [local|rbd] [PAIRS]
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import Pairs, line  # noqa: E402
from fcq_tasks.errors import FcqError  # noqa: E402
from fcq_tasks.hazmat.guestagent import GuestAgent  # noqa: E402
from fcq_tasks.hazmat.qmp import QmpSession  # noqa: E402
from tests.cluster import Cluster, RedisServer, cluster_settings  # noqa: E402
from tests.conftest import GUEST_DIR, Host, direct_boot, new_host, rbd_settings  # noqa: E402

VM = "boot01"


def make_host(name: str, redis: RedisServer, **settings: Any) -> Host:
    return new_host(name, prefix="fcqb-", log_level="warning", shutdown_grace=30,
                    migration_timeout_max=500,
                    cluster=cluster_settings(redis, visibility_timeout=600, sweep_interval=3600),
                    **settings)


def wait_ga(sock: Path, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with GuestAgent(str(sock), 1.0, "bench") as ga:
                ga.ping()
            return time.monotonic()
        except FcqError:
            time.sleep(0.05)
    raise RuntimeError("guest agent never answered")


def wait_qmp_running(sock: Path, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with QmpSession(str(sock), 1.0, "bench") as q:
                if q.runstate() == "running":
                    return time.monotonic()
        except FcqError:
            time.sleep(0.005)
    raise RuntimeError("QMP never answered")


def wait_pid_gone(pid: int, timeout: float = 30) -> None:
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise RuntimeError(f"pid {pid} still runs after {timeout} s")
    finally:
        os.close(fd)


class Lifecycle:
    """fcq's and the bare side's operations on VM boot01 of *host*."""

    def __init__(self, c: Cluster, host: Host) -> None:
        self.c, self.host = c, host
        self.orch = c.orchestrator()
        self.agent = host.agent(VM)
        self.argv: list[str] = []
        self.seed = ""

    # -- fcq --------------------------------------------------------------

    def api(self, op: str) -> float:
        t0 = time.perf_counter()
        result = self.orch.wait(self.orch.submit(op, VM, self.host.name), timeout=120)
        took = time.perf_counter() - t0
        want = {"start": "running", "kill": "stopped", "stop": "stopped"}[op]
        assert result["status"] == want, result
        return took

    def cli_start(self) -> float:
        t0 = time.perf_counter()
        proc = self.c.fcq("-q", "start", VM, "--host", self.host.name)
        took = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        return took

    def remember_command_line(self) -> None:
        """Once fcq started the VM: its command line and seed, for the bare side."""
        ident = self.agent.qemu.identity()
        assert ident is not None
        self.argv = list(ident.argv)
        self.seed = self.agent.paths.seed.read_text()

    # -- bare -------------------------------------------------------------

    def bare_start(self) -> float:
        """The same command line by hand, until QMP says running."""
        for p in self.agent.paths.leftovers():
            p.unlink()
        self.agent.paths.seed.write_text(self.seed)  # the rendered config names it
        t0 = time.perf_counter()
        subprocess.run(self.argv, check=True, capture_output=True)
        wait_qmp_running(self.agent.paths.qmp)
        return time.perf_counter() - t0

    def bare_pid(self) -> int:
        return int(self.agent.paths.pidfile.read_text())

    def bare_kill(self) -> float:
        pid = self.bare_pid()
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid)
        took = time.perf_counter() - t0
        self.bare_clean()
        return took

    def bare_stop(self) -> float:
        pid = self.bare_pid()
        wait_ga(self.agent.paths.ga)
        t0 = time.perf_counter()
        with QmpSession(str(self.agent.paths.qmp), 5, "bench") as q:
            q.execute("system_powerdown")
        wait_pid_gone(pid, 60)
        took = time.perf_counter() - t0
        self.bare_clean()
        return took

    def bare_clean(self) -> None:
        time.sleep(0.05)
        for p in self.agent.paths.leftovers():
            p.unlink()

    # -- pairs ------------------------------------------------------------

    def starts(self, pairs: int, via: str) -> Pairs:
        fcq_side, bare_side = [], []
        for _ in range(pairs):
            fcq_side.append(self.api("start") if via == "api" else self.cli_start())
            self.remember_command_line()
            self.api("kill")
            bare_side.append(self.bare_start())
            self.bare_kill()
        return Pairs(fcq_side, bare_side)

    def kills(self, pairs: int) -> Pairs:
        fcq_side, bare_side = [], []
        for _ in range(pairs):
            self.api("start")
            fcq_side.append(self.api("kill"))
            self.bare_start()
            bare_side.append(self.bare_kill())
        return Pairs(fcq_side, bare_side)

    def stops(self, pairs: int) -> Pairs:
        fcq_side, bare_side = [], []
        for _ in range(pairs):
            self.api("start")
            wait_ga(self.agent.paths.ga)  # booted: it listens to the power button
            fcq_side.append(self.api("stop"))
            self.bare_start()
            bare_side.append(self.bare_stop())
        return Pairs(fcq_side, bare_side)


def bench_lifecycle(c: Cluster, host: Host, pairs: int = 5) -> dict[str, Pairs]:
    """Every pair set on *host* (boot01 configured there, stopped)."""
    life = Lifecycle(c, host)
    life.orch.wait(life.orch.ping(host.name), timeout=30)
    life.api("start")  # a first start creates the volumes: not what is measured
    life.remember_command_line()
    life.api("kill")
    out = {"start_api": life.starts(pairs, "api"), "start_cli": life.starts(pairs, "cli"),
           "kill": life.kills(pairs), "stop": life.stops(pairs)}
    return out


def report(label: str, r: dict[str, Pairs]) -> list[str]:
    return [
        line(f"start on {label}, Python API (until running)", r["start_api"], gap_limit=0.050),
        line(f"start on {label}, CLI `fcq start` (until it returns)", r["start_cli"],
             gap_limit=0.050),
        line(f"kill on {label} (fcq kill vs SIGKILL, until gone)", r["kill"], gap_limit=0.020),
        line(f"stop on {label} (fcq stop vs ACPI power-off, until QEMU exits)", r["stop"],
             gap_limit=0.050)]


def main(argv: list[str]) -> None:
    storage = argv[0] if argv else "local"
    pairs = int(argv[1]) if len(argv) > 1 else 5
    redis = RedisServer()
    redis.start()
    ceph: Any = None
    extra: dict[str, Any] = {}
    if storage == "rbd":
        from tests.ceph import CephCluster
        ceph = CephCluster(memory_mb=2048).start()
        extra = rbd_settings(ceph, "alpha")
    host = make_host("alpha", redis, direct_boot=direct_boot(GUEST_DIR), **extra)
    c = Cluster(redis, {"alpha": host})
    try:
        c.spawn("worker", "alpha")
        c.wait_registered("alpha", timeout=120)  # a loaded machine starts Celery slowly
        host.write_vm(VM, memory=256, disk=2, kvm_host="alpha")
        print("\n".join(report(storage, bench_lifecycle(c, host, pairs))))
    finally:
        for proc in host.qemu_processes():
            proc.kill()
        c.stop_all()
        redis.stop()
        if ceph is not None:
            from fcq_tasks.storage import cephconn
            cephconn.shutdown_all()
            ceph.stop()
        shutil.rmtree(host.base, ignore_errors=True)
        shutil.rmtree(redis.dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
