"""make bench: every Speed target, fcq against its bare counterpart, in one run.

Same tiny guest, same machine, same run; every pair interleaved (fcq, bare,
fcq, bare, ...) and reported as the median and spread of both sides and of
the ratio, with a verdict only where the spread allows one (bench/stats.py):

1. start (Python API and CLI), kill and stop, on RBD and local storage,
   against the same QEMU command line by hand, SIGKILL, and the guest's own
   ACPI power-off (bench/lifecycle.py);
2. live migration on RBD against the same QEMU work by hand over QMP, with
   fcq's phases (bench/migrate.py);
3. snapshot: how long the guest stays frozen, against the bare agent calls
   and storage snapshots (bench/snapshot.py);
4. sweep over N converged VMs (no guest OS) against a bare QMP
   ``query-status`` of each, at growing N on local storage and on RBD, with
   the worker's RSS at each N (bench/sweep.py);
5. fan-out: beat enqueueing a sweep for 1,000 simulated hosts, against the
   same sends in a loop (bench/fanout.py, a process of its own);
6. signed commands: granting a request and verifying it, per task, against
   the same request unsigned (bench/grants.py).

    make bench                    (PAIRS=5, local sweeps at 50 100 200, RBD at 50 100)
    BENCH_PAIRS=7 BENCH_VMS="50 100" BENCH_RBD_VMS=50 make bench

Nothing else may run on the machine meanwhile: 200 idle TCG VMs alone keep
two cores busy, and a benchmark sharing them measures the sharing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lifecycle import VM, bench_lifecycle  # noqa: E402
from bench.lifecycle import report as lifecycle_report  # noqa: E402
from bench.migrate import bench_migrate  # noqa: E402
from bench.migrate import report as migration_report  # noqa: E402
from bench.snapshot import bench_snapshot  # noqa: E402
from bench.snapshot import report as snapshot_report  # noqa: E402
from bench.sweep import bench_sweep  # noqa: E402
from fcq_tasks.storage import cephconn  # noqa: E402
from tests.ceph import CephCluster  # noqa: E402
from tests.cluster import Cluster, RedisServer, cluster_settings  # noqa: E402
from tests.conftest import GUEST_DIR, Host, direct_boot, new_host, rbd_settings  # noqa: E402


def make_host(name: str, redis: RedisServer, **settings: Any) -> Host:
    return new_host(name, prefix="fcqb-", log_level="warning", shutdown_grace=30,
                    migration_timeout_max=500, vm_max_total_memory=64 * 1024,
                    cluster=cluster_settings(redis, visibility_timeout=3600,
                                             sweep_interval=3600),
                    **settings)


def sizes(var: str, default: str) -> list[int]:
    return [int(n) for n in os.environ.get(var, default).split()]


class Report:
    """Lines printed as they come and again, all together, at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for text in lines:
            print(text, flush=True)
            self.lines.append(text)


def main() -> None:
    pairs = int(os.environ.get("BENCH_PAIRS", "5"))
    local_vms = sizes("BENCH_VMS", "50 100 200")
    rbd_vms = sizes("BENCH_RBD_VMS", "50 100")
    subprocess.run([sys.executable, str(ROOT / "tools" / "guest" / "build.py"), str(GUEST_DIR)],
                   check=True, stdout=subprocess.DEVNULL)
    out = Report()
    t_start = time.monotonic()
    redis = RedisServer()
    redis.start()
    ceph = CephCluster(memory_mb=4096).start()
    boot = direct_boot(GUEST_DIR)
    # alpha and gamma boot the tiny guest from RBD images (start, migration);
    # delta boots it from local files. beta (RBD) and epsilon (local) run
    # VMs with no guest OS (SeaBIOS finds nothing to boot and idles), so 200
    # fit on two cores. alpha: the name the orchestrator takes settings from.
    alpha = make_host("alpha", redis, direct_boot=boot, **rbd_settings(ceph, "alpha"))
    gamma = make_host("gamma", redis, direct_boot=boot, **rbd_settings(ceph, "gamma"))
    delta = make_host("delta", redis, direct_boot=boot)
    beta = make_host("beta", redis, **rbd_settings(ceph, "beta"))
    epsilon = make_host("epsilon", redis)
    hosts = {h.name: h for h in (alpha, gamma, delta, beta, epsilon)}
    c = Cluster(redis, hosts)
    try:
        workers = {}
        for name in hosts:
            workers[name] = c.spawn("worker", name)
            c.wait_registered(name, timeout=300)  # a loaded machine starts Celery slowly
        out.add("fcq benchmark (TCG, tiny guest, same machine and run; "
                "median [low-high] of interleaved pairs)")
        for label, host in (("RBD", alpha), ("local", delta)):
            host.write_vm(VM, memory=256, disk=2, kvm_host=host.name)
            out.add(*lifecycle_report(label, bench_lifecycle(c, host, pairs)))
        out.add(*migration_report(bench_migrate(c, alpha, gamma, pairs)))
        for label, host in (("RBD", alpha), ("local", delta)):
            out.add(*snapshot_report(label, bench_snapshot(host, pairs)))
        for host, ns in ((epsilon, local_vms), (beta, rbd_vms)):
            results = bench_sweep(c, host, ns, pairs, worker=workers[host.name].proc.pid)
            out.add(*(r.report() for r in results))
            out.add(f"  sweep per VM on {host.settings.storage} as VMs grow, fcq median: "
                    + ", ".join(f"{r.n}: {r.fcq_median / r.n * 1000:.1f} ms" for r in results))
            for proc in host.qemu_processes():  # the next host's VMs get the cores
                proc.kill()
    finally:
        for h in hosts.values():
            for proc in h.qemu_processes():
                proc.kill()
        c.stop_all()
        redis.stop()
        cephconn.shutdown_all()
        ceph.stop()
        for path in [h.base for h in hosts.values()] + [redis.dir]:
            shutil.rmtree(path, ignore_errors=True)
    # Celery's app caches its broker connections: the fan-out gets a process
    # (and a Redis) of its own, with nothing else running.
    fan = subprocess.run([sys.executable, "-m", "bench.fanout", "1000"], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    out.add(*fan.stdout.rstrip("\n").splitlines())
    signing = subprocess.run([sys.executable, "-m", "bench.grants"], cwd=ROOT, check=True,
                             capture_output=True, text=True)
    out.add(*signing.stdout.rstrip("\n").splitlines())
    print(f"\n=== summary ({time.monotonic() - t_start:.0f} s) ===")
    print("\n".join(out.lines))


if __name__ == "__main__":
    main()
