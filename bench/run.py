"""Benchmarks: fcq against raw QEMU on the same guest, in the same run.

Prints ratios, not adjectives:

1. task round trip: orchestrator → Redis → worker → result (fcq.ping);
2. start: `fcq start VM` (CLI, queue, worker, volumes, locks, QEMU) until the
   command returns and until the guest agent answers, versus launching the
   same QEMU command line by hand; on RBD (a throwaway Ceph cluster) and on
   local storage;
3. sweep: one ensure sweep over N already-converged VMs (no guest OS), per
   VM, versus the bare minimum of asking each QEMU `query-status` over QMP;
   on RBD and on local storage;
4. live migration on RBD versus a bare QMP migration of the same two QEMUs;
5. memory: RSS of the worker, and of a QEMU started by fcq versus by hand;
6. snapshot: how long the guest stays frozen, versus the bare agent calls and
   storage snapshots (bench/snapshot.py);
7. fan-out: how long beat takes to enqueue a sweep for 100 and 1,000
   simulated hosts, versus the same sends in a loop (bench/fanout.py).

Run with `make bench` (N defaults to 60; BENCH_VMS=200 make bench for more: the
2-core, 24 GiB machine holds 200 idle VMs).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.snapshot import bench_snapshot, report  # noqa: E402
from fcq_tasks.errors import FcqError  # noqa: E402
from fcq_tasks.hazmat.guestagent import GuestAgent  # noqa: E402
from fcq_tasks.hazmat.qmp import QmpSession  # noqa: E402
from fcq_tasks.storage import cephconn  # noqa: E402
from tests.ceph import CephCluster  # noqa: E402
from tests.cluster import Cluster, RedisServer, cluster_settings, free_port  # noqa: E402
from tests.conftest import GUEST_DIR, Host, direct_boot, new_host, rbd_settings  # noqa: E402


def make_host(name: str, redis: RedisServer, **settings: Any) -> Host:
    return new_host(name, prefix="fcqb-", log_level="warning", shutdown_grace=10,
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


def wait_qmp(sock: Path, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with QmpSession(str(sock), 1.0, "bench") as q:
                if q.runstate() == "running":
                    return time.monotonic()
        except FcqError:
            time.sleep(0.01)
    raise RuntimeError("QMP never answered")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def bench_round_trip(c: Cluster, n: int = 50) -> float:
    orch = c.orchestrator()
    orch.wait(orch.ping("alpha"), timeout=30)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        orch.wait(orch.ping("alpha"), timeout=30)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_start(c: Cluster, host: Host, runs: int = 3) -> dict[str, float]:
    fcq_ret, fcq_ga, raw_ret, raw_ga, fcq_rss, raw_rss = [], [], [], [], [], []
    agent = host.agent("boot01")
    for _ in range(runs):
        t0 = time.monotonic()
        proc = c.fcq("-q", "start", "boot01", "--host", host.name)
        assert proc.returncode == 0, proc.stderr
        fcq_ret.append(time.monotonic() - t0)
        fcq_ga.append(wait_ga(agent.paths.ga) - t0)
        ident = agent.qemu.identity()
        assert ident is not None
        argv = list(ident.argv)
        seed = agent.paths.seed.read_text()  # the kill's clean-up removes it
        fcq_rss.append(rss_mb(ident.pid))
        c.fcq("-q", "--local", "kill", "boot01", host=host.name)
        # The same command line by hand: same rendered config, same volumes.
        raw_dir = host.base / "raw"
        raw_dir.mkdir(exist_ok=True)
        for p in agent.paths.leftovers():
            p.unlink()
        agent.paths.seed.write_text(seed)  # the rendered config names it
        t0 = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)
        raw_ret.append(wait_qmp(agent.paths.qmp) - t0)
        raw_ga.append(wait_ga(agent.paths.ga) - t0)
        pid = int(agent.paths.pidfile.read_text())
        raw_rss.append(rss_mb(pid))
        psutil.Process(pid).kill()
        time.sleep(0.3)
        for p in agent.paths.leftovers():
            p.unlink()
    med = statistics.median
    return {"fcq_return": med(fcq_ret), "fcq_ga": med(fcq_ga), "raw_qmp": med(raw_ret),
            "raw_ga": med(raw_ga), "fcq_rss": med(fcq_rss), "raw_rss": med(raw_rss)}


def bare_migration(host: Host, argv: list[str]) -> tuple[float, float, float]:
    """Two QEMUs by hand from fcq's own command line: (wall s, total ms, downtime ms)."""
    agent = host.agent("boot01")
    run = host.base / "bare"
    run.mkdir(exist_ok=True)
    cfg_text = agent.paths.config.read_text()
    procs = []
    for side in ("src", "dst"):
        cfg = run / f"{side}.cfg"
        (run / "seed.json").write_text("{}\n")
        cfg.write_text(cfg_text.replace(str(agent.paths.qmp), str(run / f"{side}.qmp"))
                       .replace(str(agent.paths.seed), str(run / "seed.json"))
                       .replace(str(agent.paths.ga), str(run / f"{side}.ga"))
                       .replace(str(agent.paths.observer), str(run / f"{side}.obs")))
        args = [str(cfg) if a == str(agent.paths.config) else a for a in argv]
        args = [str(run / f"{side}.pid") if a == str(agent.paths.pidfile) else a for a in args]
        args = ["null" if a.startswith("file:") else a for a in args]  # no serial log
        if side == "dst":
            args += ["-incoming", "defer"]
        subprocess.run(args, check=True, capture_output=True)
        procs.append(int((run / f"{side}.pid").read_text()))
    wait_ga(run / "src.ga")
    port = free_port()
    with QmpSession(str(run / "dst.qmp"), 10, "bare") as dst:
        dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    t0 = time.monotonic()
    with QmpSession(str(run / "src.qmp"), 10, "bare") as src:
        # The same QEMU settings fcq uses, so only fcq's own work differs.
        src.execute("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": True}])
        src.execute("migrate-set-parameters", **{"downtime-limit": 300,
                                                 "max-bandwidth": 2**40})
        src.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.execute("query-migrate")
            if info["status"] == "completed" and info.get("downtime"):
                break
            time.sleep(0.02)
    wall = time.monotonic() - t0
    for pid in procs:
        psutil.Process(pid).kill()
    return wall, float(info["total-time"]), float(info["downtime"])


def bench_migrate(c: Cluster, host: Host, peer: Host, runs: int = 3) -> dict[str, float]:
    orch = c.orchestrator()
    c.fcq("-q", "start", "boot01", "--host", host.name)
    wait_ga(host.agent("boot01").paths.ga)
    ident = host.agent("boot01").qemu.identity()
    assert ident is not None
    argv = list(ident.argv)
    walls, totals, downs, handovers = [], [], [], []
    for i in range(runs):
        src, dst = (host, peer) if i % 2 == 0 else (peer, host)
        wait_ga(src.agent("boot01").paths.ga)
        wait_for_registry(orch, src.name)
        t0 = time.monotonic()
        result = orch.wait(orch.migrate("boot01", dst.name), timeout=300)
        walls.append(time.monotonic() - t0)
        totals.append(float(result["total_ms"]))
        downs.append(float(result["downtime_ms"]))
        handovers.append(float(result["handover_ms"]))
    last = peer if runs % 2 else host
    c.fcq("-q", "--local", "kill", "boot01", host=last.name)
    bare = [bare_migration(host, argv) for _ in range(runs)]
    med = statistics.median
    return {"fcq_wall": med(walls), "fcq_total": med(totals), "fcq_down": med(downs),
            "handover": med(handovers), "bare_wall": med(b[0] for b in bare),
            "bare_total": med(b[1] for b in bare), "bare_down": med(b[2] for b in bare)}


def wait_for_registry(orch: Any, host: str) -> None:
    for _ in range(100):
        if "boot01" in orch.hosts().get(host, {}).get("running", []):
            return
        time.sleep(0.1)


def bench_sweep(c: Cluster, host: Host, n: int) -> dict[str, float]:
    for i in range(n):
        host.write_vm(f"idle{i:03d}", memory=32, disk=1, nics=[])
    print(f"  ({host.name}: starting {n} idle VMs on {host.settings.storage} storage)",
          flush=True)
    t0 = time.monotonic()
    c.fcq("-q", "--local", "ensure", "--all", host=host.name)
    started = time.monotonic() - t0
    running = [p for p in host.qemu_processes()]
    assert len(running) >= n, f"only {len(running)} of {n} VMs run"
    orch = c.orchestrator()
    sweeps = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = orch.wait(orch.sweep(host.name), timeout=600)
        sweeps.append(time.perf_counter() - t0)
        assert result["failed"] == 0 and all(a == ["nothing"]
                                             for a in result["vms"].values()), result
    qmp_only = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            with QmpSession(str(host.agent(f"idle{i:03d}").paths.qmp), 5, "b") as q:
                q.runstate()
        qmp_only.append(time.perf_counter() - t0)
    return {"n": n, "start_all": started, "sweep": statistics.median(sweeps),
            "qmp_only": statistics.median(qmp_only)}


def main() -> None:
    n = int(os.environ.get("BENCH_VMS", "60"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "guest" / "build.py"), str(GUEST_DIR)],
                   check=True, stdout=subprocess.DEVNULL)
    redis = RedisServer()
    redis.start()
    ceph = CephCluster(memory_mb=4096).start()
    boot = direct_boot(GUEST_DIR)
    # alpha and gamma boot the tiny guest from RBD images (start, migration);
    # delta boots it from local files (start on local storage). beta (RBD)
    # and epsilon (local) run VMs with no guest OS (SeaBIOS finds nothing to
    # boot and idles), so N of each fit on two cores.
    host = make_host("alpha", redis, direct_boot=boot, **rbd_settings(ceph, "alpha"))
    peer = make_host("gamma", redis, direct_boot=boot, **rbd_settings(ceph, "gamma"))
    local = make_host("delta", redis, direct_boot=boot)
    idle = make_host("beta", redis, vm_max_total_memory=64 * 1024, **rbd_settings(ceph, "beta"))
    idle_local = make_host("epsilon", redis, vm_max_total_memory=64 * 1024)
    hosts = {h.name: h for h in (host, peer, local, idle, idle_local)}
    c = Cluster(redis, hosts)
    try:
        worker = c.worker("alpha")
        for name in ("beta", "gamma", "delta", "epsilon"):
            c.worker(name)
        rtt = bench_round_trip(c)
        for h in (host, peer, local):
            h.write_vm("boot01", memory=256, disk=2, kvm_host=h.name if h is local else "alpha")
        start = bench_start(c, host)
        start_local = bench_start(c, local)
        mig = bench_migrate(c, host, peer)
        sweep = bench_sweep(c, idle, n)
        sweep_local = bench_sweep(c, idle_local, n)
        worker_rss = rss_mb(worker.proc.pid)
        snap = bench_snapshot(host)
        snap_local = bench_snapshot(local)
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
    print("fcq benchmark (TCG, tiny guest, same machine and run)")
    print(f"  task round trip (fcq.ping, median of 50): {rtt * 1000:.1f} ms")
    for label, st in (("RBD", start), ("local", start_local)):
        ratio = st["fcq_return"] / st["raw_qmp"]
        print(f"  start on {label}, until the command returns (QEMU running): fcq start "
              f"{st['fcq_return']:.2f} s vs raw QEMU {st['raw_qmp']:.2f} s  ratio {ratio:.1f}x")
        print(f"  start on {label}, until the guest agent answers: fcq {st['fcq_ga']:.2f} s"
              f" vs raw QEMU {st['raw_ga']:.2f} s  ratio {st['fcq_ga'] / st['raw_ga']:.2f}x")
    print(f"  start, RBD against local (fcq start returns): "
          f"{start['fcq_return'] / start_local['fcq_return']:.2f}x")
    for label, sw in (("RBD", sweep), ("local", sweep_local)):
        print(f"  sweep over {sw['n']} converged VMs on {label}: {sw['sweep']:.2f} s"
              f" ({sw['sweep'] / sw['n'] * 1000:.1f} ms per VM) vs bare QMP query-status"
              f" {sw['qmp_only']:.2f} s  ratio {sw['sweep'] / sw['qmp_only']:.1f}x;"
              f" first ensure --all starting them: {sw['start_all']:.1f} s")
    print(f"  sweep, RBD against local: {sweep['sweep'] / sweep_local['sweep']:.2f}x")
    print(f"  live migration on RBD, idle 256 MB guest (median of 3): fcq migrate "
          f"{mig['fcq_wall']:.2f} s end to end, QEMU total {mig['fcq_total']:.0f} ms, downtime "
          f"{mig['fcq_down']:.0f} ms, handover {mig['handover']:.0f} ms")
    print(f"    vs bare QMP migration: {mig['bare_wall']:.2f} s, total {mig['bare_total']:.0f} ms,"
          f" downtime {mig['bare_down']:.0f} ms;  ratios: end to end "
          f"{mig['fcq_wall'] / mig['bare_wall']:.1f}x, guest paused (downtime + handover) "
          f"{(mig['fcq_down'] + mig['handover']) / mig['bare_down']:.1f}x")
    report("RBD", snap)
    report("local", snap_local)
    print(f"  memory: worker RSS {worker_rss:.0f} MB; QEMU RSS fcq {start['fcq_rss']:.0f} MB"
          f" vs raw {start['raw_rss']:.0f} MB (ratio {start['fcq_rss'] / start['raw_rss']:.2f})")
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "bench.fanout", "100", "1000"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
