"""Sweep: one ensure sweep over N converged VMs against a bare query-status of each.

The VMs have no guest OS (SeaBIOS finds nothing to boot and idles), 32 MB
each, so 200 fit on the 2-core, 24 GiB machine. fcq's side is a whole
``fcq.ensure_host`` task through a real worker and Redis, waited for by
the orchestrator (queue, every VM's ensure, the heartbeat after it). The
bare side is what any manager has to do at least: connect to each QEMU's
monitor, handshake, ``query-status``, close. Both are measured as
interleaved pairs (bench/stats.py); the target is fcq <= 1.2x bare, flat per
VM as the VMs grow.

    python -m bench.sweep [local|rbd] [N...]      (default: local 50 100 200)

``make bench`` calls :func:`bench_sweep` for its RBD and local hosts.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import Pairs, interleave, line, spread  # noqa: E402
from fcq_tasks.hazmat.qmp import QmpSession  # noqa: E402
from tests.cluster import Cluster, RedisServer, cluster_settings  # noqa: E402
from tests.conftest import Host, new_host, rbd_settings  # noqa: E402

#: The target: a sweep of converged VMs costs at most this times the bare loop.
RATIO_LIMIT = 1.2
#: The memory target: the worker's RSS with 200 VMs on its host, in MB.
RSS_LIMIT_MB = 80


@dataclass(frozen=True)
class SweepResult:
    n: int
    storage: str
    start_all: float      # s: the ensure --all that started the VMs added for this N
    pairs: Pairs          # s per sweep: fcq, bare
    opening: float        # s: the sweep that opened the worker's held monitor connections
    worker_rss: float | None = None  # MB: the host's worker after the sweeps, if known

    def report(self) -> str:
        p = self.pairs
        return (line(f"sweep over {self.n} converged VMs on {self.storage}", p,
                     ratio_limit=RATIO_LIMIT)
                + f"\n      per VM: fcq {spread(p.fcq, 1000 / self.n, '.1f')} ms vs bare "
                f"{spread(p.bare, 1000 / self.n, '.1f')} ms; starting the "
                f"VMs added for this N: {self.start_all:.0f} s; the sweep that opened the "
                f"held monitor connections: {self.opening * 1000 / self.n:.1f} ms per VM"
                + ("" if self.worker_rss is None else
                   f"\n      memory: worker RSS {self.worker_rss:.0f} MB with {self.n} VMs "
                   f"(target <= {RSS_LIMIT_MB} MB: "
                   f"{'met' if self.worker_rss <= RSS_LIMIT_MB else 'MISSED'})"))

    @property
    def fcq_median(self) -> float:
        return statistics.median(self.pairs.fcq)


def vm_name(i: int) -> str:
    return f"idle{i:03d}"


def bench_sweep(c: Cluster, host: Host, sizes: list[int], pairs: int = 5,
                worker: int | None = None) -> list[SweepResult]:
    """For each N in *sizes* (growing): run N idle VMs on *host*, then measure pairs.

    *worker*: the pid of *host*'s worker, whose RSS is reported at each N.
    """
    orch = c.orchestrator()
    results = []
    have = 0
    for n in sorted(sizes):
        for i in range(have, n):
            host.write_vm(vm_name(i), memory=32, disk=1, nics=[])
        print(f"  ({host.name}: starting VMs {have}-{n - 1} on {host.settings.storage} "
              "storage)", flush=True)
        t0 = time.monotonic()
        started = c.fcq("-q", "--local", "ensure", "--all", host=host.name, timeout=3600)
        assert started.returncode == 0, started.stderr[-2000:]
        start_all = time.monotonic() - t0
        have = n
        measured, opening = measure(orch, host, n, pairs)
        rss = None if worker is None else psutil.Process(worker).memory_info().rss / 2**20
        results.append(SweepResult(n, host.settings.storage, start_all, measured, opening,
                                   rss))
        print(results[-1].report(), flush=True)
    return results


def measure(orch: Any, host: Host, n: int, pairs: int) -> tuple[Pairs, float]:
    """Interleaved pairs: a sweep of *host* through its worker, a bare loop over its N VMs.

    Also the time of the sweep that opened the worker's held monitor
    connections to the VMs added for this N.
    """
    socks = [str(host.agent(vm_name(i)).paths.qmp) for i in range(n)]

    def fcq() -> float:
        t0 = time.perf_counter()
        result = orch.wait(orch.sweep(host.name), timeout=3600)
        took = time.perf_counter() - t0
        assert result["failed"] == 0 and len(result["vms"]) == n and all(
            a == ["nothing"] for a in result["vms"].values()), result
        return took

    def bare() -> float:
        t0 = time.perf_counter()
        for sock in socks:
            with QmpSession(sock, 30, "bare") as q:
                q.runstate()
        return time.perf_counter() - t0

    # A worker's steady state, as beat's sweeps see it, begins at the third
    # sweep after a start: the first looks at every VM in full, the second
    # opens the held monitor connections (hazmat/heldmonitors.py).
    fcq()
    opening = fcq()
    return interleave(fcq, bare, pairs), opening


def make_host(name: str, redis: RedisServer, **settings: Any) -> Host:
    return new_host(name, prefix="fcqb-", log_level="warning", vm_max_total_memory=64 * 1024,
                    cluster=cluster_settings(redis, visibility_timeout=3600,
                                             sweep_interval=3600), **settings)


def main(argv: list[str]) -> None:
    storage = argv[0] if argv and argv[0] in ("local", "rbd") else "local"
    sizes = [int(a) for a in argv if a.isdigit()] or [50, 100, 200]
    redis = RedisServer()
    redis.start()
    ceph = None
    host = None
    c = None
    try:
        extra: dict[str, Any] = {}
        if storage == "rbd":
            from tests.ceph import CephCluster
            ceph = CephCluster(memory_mb=4096).start()
            extra = rbd_settings(ceph, "alpha")
        # alpha: the name the test cluster's orchestrator takes its settings from.
        host = make_host("alpha", redis, **extra)
        c = Cluster(redis, {host.name: host})
        bench_sweep(c, host, sizes, worker=c.worker(host.name).proc.pid)
    finally:
        if host is not None:
            for proc in host.qemu_processes():
                proc.kill()
        if c is not None:
            c.stop_all()
        redis.stop()
        if ceph is not None:
            from fcq_tasks.storage import cephconn
            cephconn.shutdown_all()
            ceph.stop()
        for path in ([host.base] if host else []) + [redis.dir]:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
