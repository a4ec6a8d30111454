"""Live migration: fcq end to end against the same QEMU work done by hand over QMP.

Pairs, interleaved (bench/stats.py): one ``fcq migrate`` (orchestrator call
until its result), then one bare migration of the same guest, and so on.

The bare side does the QEMU work a migration needs, as fast as QMP allows,
with nothing of fcq's (no queue, no locks, no Redis):

1. start the destination QEMU from fcq's own command line, ``-incoming defer
   -S`` (as fcq does: guest code must not run before the handover);
2. ``migrate-incoming`` there, the source's capabilities and parameters
   exactly as fcq sets them (hazmat/monitor.py), ``migrate``;
3. wait for completion on QMP events (not a polling loop), ``quit`` the
   source and see it gone, ``cont`` on the destination.

Its guest moves back and forth between two QEMUs as fcq's moves between the
two hosts, so both sides migrate a guest that has idled since its last move.

The guest's pause is compared with QEMU's downtime on the bare side: fcq's
pause is QEMU's downtime plus its handover (source saw the copy completed →
destination's ``cont`` returned).

    .venv/bin/python -m bench.migrate [PAIRS]

starts its own Redis and throwaway Ceph cluster, two RBD hosts with workers
and the tiny test guest, like bench/run.py, and removes them afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import Pairs, interleave, line, spread  # noqa: E402
from fcq_tasks.errors import FcqError  # noqa: E402
from fcq_tasks.hazmat.guestagent import GuestAgent  # noqa: E402
from fcq_tasks.hazmat.monitor import MIGRATION_CAPABILITIES, UNLIMITED_BANDWIDTH  # noqa: E402
from fcq_tasks.hazmat.qemu import wait_exit  # noqa: E402
from fcq_tasks.hazmat.qmp import QmpSession  # noqa: E402
from fcq_tasks.storage import cephconn  # noqa: E402
from tests.ceph import CephCluster  # noqa: E402
from tests.cluster import Cluster, RedisServer, cluster_settings, free_port  # noqa: E402
from tests.conftest import GUEST_DIR, Host, direct_boot, new_host, rbd_settings  # noqa: E402

VM = "boot01"
#: The bare side's guest: the same VM file, volumes of its own (two QEMUs of
#: one guest on the same images while fcq's copy runs there would disturb both).
BARE_VM = "bare01"

#: The phases printed, in order (fcq_tasks/host/migration/phases.py says what each is).
PHASES = ("queue_dst", "queue_src", "prepare", "qemu_start", "rendezvous", "addr_lag", "copy",
          "qemu_total", "copy_lag", "handover", "src_handover", "dst_notice", "dst_resume",
          "pause", "stopped", "finish", "src_report", "chord", "result")

#: Seconds of quiet before each measured migration, on both sides: the
#: previous one's after-work (fcq's clean-up, sweep and chord on 2 cores, a
#: guest's catch-up after its move) would otherwise slow the next copy.
SETTLE = 1.0


def make_host(name: str, redis: RedisServer, **settings: Any) -> Host:
    return new_host(name, prefix="fcqb-", log_level="warning", shutdown_grace=10,
                    migration_timeout_max=500,
                    cluster=cluster_settings(redis, visibility_timeout=600, sweep_interval=3600),
                    **settings)


def wait_ga(sock: Path, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with GuestAgent(str(sock), 1.0, "bench") as ga:
                ga.ping()
            return time.monotonic()
        except FcqError:
            time.sleep(0.05)
    raise RuntimeError("guest agent never answered")


def wait_for_registry(orch: Any, host: str) -> None:
    for _ in range(100):
        if VM in orch.hosts().get(host, {}).get("running", []):
            return
        time.sleep(0.1)


@dataclass
class Side:
    """One side's samples: end to end (s), the guest's pause (s), phases (ms)."""

    walls: list[float] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    downtimes: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add_phases(self, phases: dict[str, float]) -> None:
        for name, ms in phases.items():
            self.phases.setdefault(name, []).append(ms)


class MigrationBench:
    """Two RBD hosts with workers, the tiny guest running on one of them."""

    def __init__(self, c: Cluster, host: Host, peer: Host) -> None:
        self.c, self.host, self.peer = c, host, peer
        self.orch = c.orchestrator()
        self.fcq = Side()
        self.bare = Side()
        self.where = host
        self.bare_run: BareRun | None = None

    def start(self) -> None:
        for h in (self.host, self.peer):
            h.write_vm(VM, memory=256, disk=2, kvm_host=self.host.name)
        self.host.write_vm(BARE_VM, memory=256, disk=2, kvm_host=self.host.name)
        for h in (self.host, self.peer):
            self.c.wait_registered(h.name)
        # fcq starts the bare side's guest once: its volumes, its rendered
        # config and command line; then it is killed and run by hand only.
        proc = self.c.fcq("-q", "start", BARE_VM, "--host", self.host.name)
        assert proc.returncode == 0, proc.stderr
        self.bare_run = BareRun(BareGuest.of(self.host, BARE_VM))
        self.c.fcq("-q", "--local", "kill", BARE_VM, host=self.host.name)
        proc = self.c.fcq("-q", "start", VM, "--host", self.host.name)
        assert proc.returncode == 0, proc.stderr
        wait_ga(self.host.agent(VM).paths.ga)

    def fcq_once(self) -> float:
        src = self.where
        dst = self.peer if src is self.host else self.host
        wait_ga(src.agent(VM).paths.ga)
        wait_for_registry(self.orch, src.name)
        time.sleep(SETTLE)
        t0 = time.monotonic()
        result = self.orch.wait(self.orch.migrate(VM, dst.name), timeout=300)
        wall = time.monotonic() - t0
        got = time.time()
        self.where = dst
        phases = dict(result.get("phases") or {})
        if result.get("callback_at"):
            phases["result"] = round((got - float(result["callback_at"])) * 1000, 1)
        self.fcq.walls.append(wall)
        self.fcq.downtimes.append(float(result["downtime_ms"]) / 1000)
        self.fcq.pauses.append(float(phases.get("pause", float(result["downtime_ms"])
                                                + float(result["handover_ms"] or 0))) / 1000)
        self.fcq.add_phases(phases)
        return wall

    def bare_once(self) -> float:
        assert self.bare_run is not None
        wall, pause, downtime, phases = bare_migration(self.bare_run)
        self.bare.walls.append(wall)
        self.bare.pauses.append(pause)
        self.bare.downtimes.append(downtime)
        self.bare.add_phases(phases)
        return wall

    def stop(self) -> None:
        if self.bare_run is not None:
            self.bare_run.end()
        self.c.fcq("-q", "--local", "kill", VM, host=self.where.name)


def _stamp(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def _wait_event(q: QmpSession, name: str, status: str | None = None,
                timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = q.next_event(frozenset({name}), deadline - time.monotonic())
        if event is not None and (status is None or event["data"].get("status") == status):
            return event
    raise RuntimeError(f"no {name} {status or ''} event")


@dataclass(frozen=True)
class BareGuest:
    """What fcq ran a guest with: its rendered config, seed and command line."""

    run: Path
    config: str
    seed: str
    argv: tuple[str, ...]
    paths: dict[str, str]

    @classmethod
    def of(cls, host: Host, vm: str) -> BareGuest:
        agent = host.agent(vm)
        ident = agent.qemu.identity()
        assert ident is not None
        p = agent.paths
        return cls(host.base / "bare", p.config.read_text(), p.seed.read_text(),
                   tuple(ident.argv), {"qmp": str(p.qmp), "seed": str(p.seed), "ga": str(p.ga),
                                       "obs": str(p.observer), "config": str(p.config),
                                       "pid": str(p.pidfile)})


def end_qemu(pid: int, qmp: Path) -> None:
    """End a bare QEMU the way fcq ends one on RBD: ``quit``, SIGKILL only if it stays.

    A SIGKILLed QEMU leaves its RBD watches behind for ~30 s, and librbd
    calls that notify watchers wait for the dead one meanwhile. fcq's own
    kill quits first for that reason; the bare side leaves the images as
    clean as fcq does, so that no pair pays for the one before it.
    """
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(FcqError), QmpSession(str(qmp), 5, "bare") as q:
        q.execute("quit")
    if wait_exit(proc, 5):
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()


@dataclass
class BareRun:
    """The bare guest between migrations: it moves between QEMUs "a" and "b" like fcq's.

    The first source is booted by hand, outside the timing; after that
    each migration's destination is the next one's source, so both sides
    migrate a guest that has run (idle) since its last move, not one still
    busy booting (a fresh boot dirties memory and doubled the bare copy).
    """

    guest: BareGuest
    args: dict[str, list[str]] = field(default_factory=dict)
    side: str = ""
    pid: int = 0

    def command(self, side: str) -> list[str]:
        if side not in self.args:
            g, run = self.guest, self.guest.run
            cfg = run / f"{side}.cfg"
            cfg.write_text(g.config.replace(g.paths["qmp"], str(run / f"{side}.qmp"))
                           .replace(g.paths["seed"], str(run / "seed.json"))
                           .replace(g.paths["ga"], str(run / f"{side}.ga"))
                           .replace(g.paths["obs"], str(run / f"{side}.obs")))
            a = [str(cfg) if x == g.paths["config"] else x for x in g.argv]
            a = [str(run / f"{side}.pid") if x == g.paths["pid"] else x for x in a]
            self.args[side] = ["null" if x.startswith("file:") else x for x in a]  # no serial log
        return self.args[side]

    def launch(self, side: str, *extra: str) -> int:
        pidfile = self.guest.run / f"{side}.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run(self.command(side) + list(extra), check=True, capture_output=True)
        return int(pidfile.read_text())

    def boot(self) -> None:
        run = self.guest.run
        run.mkdir(exist_ok=True)
        (run / "seed.json").write_text(self.guest.seed)
        self.side, self.pid = "a", self.launch("a")
        wait_ga(run / "a.ga")

    def end(self) -> None:
        if self.side:
            end_qemu(self.pid, self.guest.run / f"{self.side}.qmp")
            self.side = ""


def bare_migration(b: BareRun) -> tuple[float, float, float, dict[str, float]]:
    """The same migration by hand: (wall s, guest pause s, QEMU downtime s, phases ms).

    The destination's start is inside the timing, as in fcq.
    """
    if not b.side:
        b.boot()
    run = b.guest.run
    src_side, dst_side = b.side, ("b" if b.side == "a" else "a")
    src_pid = b.pid
    wait_ga(run / f"{src_side}.ga")
    time.sleep(SETTLE)
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    marks["t0"] = time.time()
    dst_pid = b.launch(dst_side, "-incoming", "defer", "-S")
    try:
        with QmpSession(str(run / f"{dst_side}.qmp"), 10, "bare") as dst, \
                QmpSession(str(run / f"{src_side}.qmp"), 10, "bare") as src:
            marks["qemu_up"] = time.time()
            dst.execute("migrate-set-capabilities", capabilities=[
                {"capability": "events", "state": True}])
            dst.execute("migrate-incoming", uri=uri)
            marks["addr"] = time.time()
            src.execute("migrate-set-capabilities", capabilities=MIGRATION_CAPABILITIES)
            src.execute("migrate-set-parameters", **{"downtime-limit": 300,
                                                     "max-bandwidth": UNLIMITED_BANDWIDTH})
            src.execute("migrate", uri=uri)
            marks["migrate"] = time.time()
            done = _wait_event(src, "MIGRATION", "completed")
            marks["completed"] = time.time()
            info = src.execute("query-migrate")
            while not info.get("downtime"):  # filled in a moment after "completed"
                time.sleep(0.001)
                info = src.execute("query-migrate")
            src.execute("quit")
            # Gone or a zombie, seen at once through a pidfd (as fcq sees it):
            # psutil's wait() polls and counts a zombie as alive, and the
            # daemonized QEMU's zombie waits for PID 1 to reap it (1.5-2 s
            # in containers whose init reaps lazily).
            if not wait_exit(psutil.Process(src_pid), 10):
                raise RuntimeError("bare source QEMU did not exit after quit")
            marks["src_gone"] = time.time()
            _wait_event(dst, "MIGRATION", "completed")
            dst.execute("cont")
            marks["resumed"] = time.time()
        wall = time.monotonic() - t0
        b.side, b.pid = dst_side, dst_pid
    except BaseException:
        for side, pid in ((src_side, src_pid), (dst_side, dst_pid)):
            end_qemu(pid, run / f"{side}.qmp")
        b.side = ""
        raise
    downtime = float(info["downtime"])
    handover = (marks["resumed"] - _stamp(done)) * 1000

    def ms(a: str, b: str) -> float:
        return round((marks[a] - marks[b]) * 1000, 1)
    phases = {"prepare": ms("addr", "t0"), "qemu_start": ms("qemu_up", "t0"),
              "copy": ms("completed", "addr"), "qemu_total": float(info["total-time"]),
              "copy_lag": round((marks["completed"] - _stamp(done)) * 1000, 1),
              "handover": round(handover, 1), "src_handover": ms("src_gone", "completed"),
              "dst_resume": ms("resumed", "src_gone"), "pause": round(downtime + handover, 1)}
    return wall, (downtime + handover) / 1000, downtime / 1000, phases


def report(b: MigrationBench) -> list[str]:
    """The report lines: end to end, the guest's pause, and the phase medians."""
    out = ["live migration on RBD, idle 256 MB guest, fcq migrate vs the same QEMU work by "
           "hand (QMP, events)"]
    out.append(line("end to end (orchestrator call → result)", Pairs(b.fcq.walls, b.bare.walls),
                    ratio_limit=1.10))
    out.append(line("guest pause (fcq: downtime + handover) vs bare QEMU downtime",
                    Pairs(b.fcq.pauses, b.bare.downtimes), gap_limit=0.010))
    out.append(f"  QEMU downtime: fcq {spread(b.fcq.downtimes, 1000)} ms, bare "
               f"{spread(b.bare.downtimes, 1000)} ms; bare pause incl. its own quit and cont "
               f"{spread(b.bare.pauses, 1000)} ms")
    out.append("  phases, ms, median [low-high] (fcq | bare):")
    for name in PHASES:
        f = b.fcq.phases.get(name)
        bare = b.bare.phases.get(name)
        if not f and not bare:
            continue
        fs = spread(f, 1.0, ".1f") if f else "-"
        bs = spread(bare, 1.0, ".1f") if bare else "-"
        out.append(f"    {name:<13} {fs:<28} | {bs}")
    return out


def bench_migrate(c: Cluster, host: Host, peer: Host, pairs: int = 5) -> MigrationBench:
    """*pairs* interleaved pairs on a running cluster (bench/run.py calls this)."""
    b = MigrationBench(c, host, peer)
    b.start()
    try:
        b.fcq_once()  # warm-up: first imports, first connections to Ceph on both hosts
        b.fcq, b.bare = Side(), Side()
        interleave(b.fcq_once, b.bare_once, pairs)
    finally:
        b.stop()
    return b


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    subprocess.run([sys.executable, str(ROOT / "tools" / "guest" / "build.py"), str(GUEST_DIR)],
                   check=True, stdout=subprocess.DEVNULL)
    redis = RedisServer()
    redis.start()
    ceph = CephCluster(memory_mb=2048).start()
    boot = direct_boot(GUEST_DIR)
    host = make_host("alpha", redis, direct_boot=boot, **rbd_settings(ceph, "alpha"))
    peer = make_host("gamma", redis, direct_boot=boot, **rbd_settings(ceph, "gamma"))
    hosts = {h.name: h for h in (host, peer)}
    c = Cluster(redis, hosts)
    try:
        for name in hosts:
            try:
                c.worker(name)
            except AssertionError:  # not registered within 30 s: a busy machine
                c.wait_registered(name, timeout=300)
        result = bench_migrate(c, host, peer, pairs)
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
    print("\n".join(report(result)))
    print(f"  (median fcq end to end {statistics.median(result.fcq.walls):.3f} s)")


if __name__ == "__main__":
    main()
