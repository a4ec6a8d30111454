"""A chaos campaign: N live migrations, each with one random fault, invariants checked.

    .venv/bin/python -m tests.chaos --runs 50 [--seed S]      (make chaos N=50)

One real cluster (redis-server, a throwaway Ceph cluster holding the VM's
disks, fcq workers for alpha and beta with their own cephx identities, as
tests/test_migration.py's shared_pair) runs vm01. Each
run migrates it to the other host, injects one fault at a random moment
0–4 s later (kill -9 or SIGSTOP/SIGCONT of either worker or either QEMU, a
Redis restart, or a replayed half), while a GuestSampler watches every
QEMU's run state. Then it waits for the attempt to end (bounded), restarts
killed workers, lets redeliveries land, sweeps every host once and records:
did the guest ever run twice, is it lost, did anything stale stay behind
(locks, configs, keys, slots, QEMUs), and was it moved, kept, or cold-booted.
Afterwards the VM is brought back to one clean running copy, so that every
run starts alike.

Not collected by pytest (not a test_ file): a campaign takes about a minute
per run at the default bandwidth, and its failures are findings about the
migration protocol. Exit status 1 if any run ran the guest twice or lost it.

"guest hung" (the running guest does not answer its agent) is reported but
does not fail the campaign: under TCG, a copy slowed to 16 Mbit/s (~55 s)
left the test guest's kernel oopsing right after resume in about half the
completed moves, also when QEMU was migrated by hand without fcq; unlimited
copies (~0.6 s) did not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import yaml

from fcq_tasks.cluster.api import Orchestrator, remote_error
from fcq_tasks.cluster.celeryapp import host_queue
from fcq_tasks.errors import FcqError
from fcq_tasks.storage import cephconn
from tests.ceph import CephCluster
from tests.cluster import Cluster, RedisServer, Service, make_cluster
from tests.conftest import GUEST_DIR, ROOT, Host, direct_boot, new_host, rbd_settings
from tests.helpers import guest_answers
from tests.invariants import ClusterState, GuestSampler, Qemu, cluster_state, find_qemus

VM = "vm01"

KINDS = ("kill9-src-worker", "kill9-dst-worker", "kill9-src-qemu", "kill9-dst-qemu",
         "stop-src-worker", "stop-dst-worker", "stop-src-qemu", "stop-dst-qemu",
         "redis-restart", "replay-inmigrate", "replay-outmigrate")

#: The broker's redelivery delay. Above an attempt's longest run (settings
#: refuse less), and short enough that a killed worker's half comes back
#: within the run that killed it.
VISIBILITY_TIMEOUT = 90

#: Seconds a freshly booted guest is left alone before it is migrated (see
#: Campaign.settle_guest).
BOOT_QUIET = 10.0

#: Bounds of the waits of one run; passing one is recorded, not fatal.
ATTEMPT_BOUND = 180.0
CHORD_GRACE = 15.0
SWEEP_BOUND = 180.0


def say(text: str) -> None:
    print(text, flush=True)


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Like tests.helpers.wait_for, but returns None on timeout, and Redis
    errors (a restart in progress) count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (redis.RedisError, FcqError):
            value = None
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@dataclass
class RunResult:
    index: int
    kind: str
    src: str
    dst: str
    at: float                       # seconds after migrate() returned
    fault: str = ""                 # what the fault hit
    task: str = ""                  # how the migration ended, as the orchestrator saw it
    twice: bool = False
    lost: bool = False
    stale: list[str] = field(default_factory=list)
    outcome: str = ""               # moved, kept, cold-booted, lost, twice
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    worker_died: list[str] = field(default_factory=list)  # workers that exited unasked
    guest_ok: bool | None = None    # the running guest answers its agent (None: none runs)
    samples: int = 0
    longest_gap: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        flags = [f for f, on in (("RAN TWICE", self.twice), ("LOST", self.lost),
                                 ("stale", bool(self.stale)),
                                 ("worker died", bool(self.worker_died)),
                                 ("guest hung", self.guest_ok is False)) if on]
        return (f"run {self.index:>3} {self.kind:<18} {self.src}>{self.dst} at {self.at:4.2f}s: "
                f"{self.outcome:<11} {' '.join(flags) or 'ok':<10} task: {self.task}; "
                f"{self.samples} samples, gap {self.longest_gap * 1000:.0f} ms, "
                f"{self.seconds:.0f} s")


class Campaign:
    """The cluster, vm01 on it, and the runs."""

    def __init__(self, bandwidth: int, memory: int, rng: random.Random) -> None:
        self.rng = rng  # for the draws made during a run (SIGSTOP pauses)
        self.bandwidth = bandwidth
        self.memory = memory
        self.redis = RedisServer()
        self.ceph = CephCluster()
        self.made: list[Host] = []
        self.c: Cluster | None = None
        self.orch: Orchestrator | None = None
        self.resume: list[threading.Timer] = []
        self.keep = False  # keep the cluster's files (a run went wrong, or --keep)

    # -- the cluster ----------------------------------------------------------

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None
        return self.c

    @property
    def orchestrator(self) -> Orchestrator:
        assert self.orch is not None
        return self.orch

    def __enter__(self) -> Campaign:
        try:
            self.setup()
        except BaseException:
            self.teardown(keep=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown(keep=self.keep)

    def setup(self) -> None:
        subprocess.run([sys.executable, str(ROOT / "tools" / "guest" / "build.py"),
                        str(GUEST_DIR)], check=True, stdout=subprocess.DEVNULL)
        self.redis.start()
        self.ceph.start()

        def factory(name: str, **settings: Any) -> Host:
            # As the make_host fixture makes them: the test guest, direct boot.
            host = new_host(name, prefix="fcq-chaos-",
                            **{"direct_boot": direct_boot(GUEST_DIR), **settings})
            self.made.append(host)
            return host

        self.c = make_cluster(factory, self.redis, ("alpha", "beta"),
                              storage=lambda name: rbd_settings(self.ceph, name),
                              visibility_timeout=VISIBILITY_TIMEOUT)
        alpha, beta = self.cluster.hosts["alpha"], self.cluster.hosts["beta"]
        for h in (alpha, beta):
            # Either host is the source in turn: slow copies on both, so that
            # faults land mid-copy.
            h.update_settings(migration_bandwidth_mbps=self.bandwidth)
            h.write_vm(VM, kvm_host="alpha", memory=self.memory)
        self.cluster.worker("alpha")
        self.cluster.worker("beta")
        self.orch = self.cluster.orchestrator()
        self.orch.wait(self.orch.submit("start", VM, host="alpha"), timeout=120)
        self.settle_guest("alpha", booted=True)

    def teardown(self, keep: bool) -> None:
        for timer in self.resume:
            timer.cancel()
        for h in self.made:  # a stopped process ignores SIGTERM until continued
            for q in find_qemus({h.name: h}, VM)[h.name]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(q.pid, signal.SIGCONT)
        if self.c is not None:
            for s in self.c.services:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGCONT)
            self.c.stop_all()  # closes the orchestrators first, while Redis runs
        for h in self.made:
            for p in h.qemu_processes():
                with contextlib.suppress(Exception):
                    p.kill()
        self.redis.stop()
        cephconn.shutdown_all()
        self.ceph.stop()
        if keep:
            say(f"kept for inspection: {' '.join(str(h.base) for h in self.made)} "
                f"{self.redis.dir}")
            return
        for h in self.made:
            shutil.rmtree(h.base, ignore_errors=True)
        shutil.rmtree(self.redis.dir, ignore_errors=True)

    def worker(self, host: str) -> Service | None:
        return next((s for s in reversed(self.cluster.services)
                     if s.name == f"worker@{host}" and s.proc.poll() is None), None)

    def settle_guest(self, host: str, booted: bool = False) -> None:
        """Wait until *host* runs a booted guest and the registry says so.

        Migrations start from an idle guest: under TCG, migrating a guest
        busy writing memory corrupted it in about half the runs, with or
        without fcq. A guest that just booted gets BOOT_QUIET seconds more.
        """
        agent = self.cluster.hosts[host].agent(VM)
        if not poll(lambda: guest_answers(agent), 60, 0.3):
            raise RuntimeError(f"{VM}'s guest agent does not answer on {host}")
        if booted:
            time.sleep(BOOT_QUIET)
        if not poll(lambda: self.registry_running() == [host], 30):
            raise RuntimeError(f"the registry does not show {VM} on {host} only: "
                               f"{self.registry_running()}")

    def registry_running(self) -> list[str]:
        return sorted(h for h, rec in self.orchestrator.hosts().items()
                      if VM in rec["running"])

    # -- one run --------------------------------------------------------------

    def run(self, index: int, kind: str, at: float, late_replay: bool) -> RunResult:
        t_start = time.monotonic()
        src = self.registry_running()[0]
        dst = "beta" if src == "alpha" else "alpha"
        result = RunResult(index, kind, src, dst, at)
        (original,) = find_qemus(self.cluster.hosts, VM)[src]
        client = self.redis.client()
        killed: list[str] = []
        with GuestSampler(self.cluster, VM) as sampler:
            task_id = self.orchestrator.migrate(VM, dst)
            t_sent = time.monotonic()
            attempt = str(client.get(f"fcq:mig:{VM}:current"))
            time.sleep(max(0.0, t_sent + at - time.monotonic()))
            result.fault = self.inject(kind, src, dst, attempt, killed,
                                       late_replay=late_replay)
            result.task = self.wait_attempt_end(task_id, attempt, src, dst)
            for timer in self.resume:  # every SIGCONT is sent before the sweep
                timer.join()
            self.resume.clear()
            if kind.startswith("replay") and late_replay:
                result.fault += "; " + self.replay(kind, src, dst, attempt)
            self.revive_workers(result, killed)
            result.notes += self.drain()
            result.notes += self.sweep(attempt, result)
            state = cluster_state(self.cluster, VM)
        result.samples = sampler.sample_count
        result.longest_gap = sampler.longest_gap()
        self.classify(result, state, sampler, original, attempt)
        if len(state.running) == 1:
            result.guest_ok = self.guest_check(state.running[0], result)
        result.repaired = self.repair(state, result.guest_ok,
                                      fresh_boot=result.outcome == "cold-booted")
        result.seconds = time.monotonic() - t_start
        return result

    def revive_workers(self, result: RunResult, killed: list[str]) -> None:
        """Restart the workers this run killed, and any that died or went deaf by itself.

        A worker is expected to outlive every one of these faults (and, for a
        SIGSTOP longer than registry_ttl, to register again once continued):
        one that exited, or stopped heartbeating, is a finding of its own; it
        is restarted so that the run can be judged.
        """
        since = time.time()
        for host in self.cluster.hosts:
            service = self.worker(host)
            if service is None and host in killed:
                self.cluster.worker(host)
                continue
            if service is not None:
                if poll(functools.partial(self.heartbeat_since, host, since), 30, 0.5):
                    continue
                self.cluster.kill9(service)
                what = f"stopped heartbeating (killed it; log {service.log})"
            else:
                last = next(s for s in reversed(self.cluster.services)
                            if s.name == f"worker@{host}")
                what = f"exited by itself, status {last.proc.returncode} (log {last.log})"
            result.worker_died.append(host)
            result.notes.append(f"worker@{host} {what}")
            self.cluster.worker(host)

    def heartbeat_since(self, host: str, since: float) -> bool:
        """Did *host*'s worker publish its registry record after *since* (wall clock,
        as the record's ``seen``)? A record that merely exists may be the last one
        of a worker that has stopped: Redis keeps it (AOF) until it expires."""
        raw = self.redis.client().get(f"fcq:host:{host}")
        return raw is not None and float(json.loads(raw)["seen"]) > since

    def inject(self, kind: str, src: str, dst: str, attempt: str, killed: list[str],
               late_replay: bool) -> str:
        """Inject *kind*'s fault now; return what it hit."""
        action, _, target = kind.partition("-")
        if action == "redis":
            self.redis.restart()
            return "redis restarted"
        if action == "replay":
            return "replay later" if late_replay else self.replay(kind, src, dst, attempt)
        side, _, what = target.partition("-")
        host = src if side == "src" else dst
        if what == "worker":
            service = self.worker(host)
            if service is None:
                return f"no live worker on {host}"
            if action == "kill9":
                self.cluster.kill9(service)
                killed.append(host)
                return f"worker@{host} pid {service.proc.pid} killed"
            pgid = service.proc.pid
            return self.stop_then_continue(lambda sig: os.killpg(pgid, sig),
                                           f"worker@{host} pid {pgid}")
        # A QEMU: the destination's may not exist yet at the drawn moment.
        qemus: tuple[Qemu, ...] = poll(lambda: find_qemus(self.cluster.hosts, VM)[host], 3, 0.05)
        if not qemus:
            return f"no QEMU on {host} (fault not applied)"
        pids = [q.pid for q in qemus]
        names = f"{host} QEMU pid {','.join(map(str, pids))}"
        if action == "kill9":
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return f"{names} killed"

        def signal_all(sig: int) -> None:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        return self.stop_then_continue(signal_all, names)

    def stop_then_continue(self, send: Callable[[int], None], what: str) -> str:
        pause = self.rng.uniform(2, 20)
        send(signal.SIGSTOP)

        def cont() -> None:
            with contextlib.suppress(ProcessLookupError):
                send(signal.SIGCONT)
        timer = threading.Timer(pause, cont)
        timer.daemon = True
        timer.start()
        self.resume.append(timer)
        return f"{what} stopped for {pause:.1f} s"

    def replay(self, kind: str, src: str, dst: str, attempt: str) -> str:
        """Send one half again with the kwargs the orchestrator stored for it."""
        half = "inmigrate" if kind == "replay-inmigrate" else "outmigrate"
        host = dst if half == "inmigrate" else src
        raw = poll(lambda: self.redis.client().get(f"fcq:mig:{VM}:{attempt}:request"), 2)
        if raw:
            kwargs = json.loads(raw)[half]
            how = "stored kwargs"
        else:
            # An orchestrator that does not store the request yet: the same
            # arguments it sends, rebuilt.
            peer = {"src": src} if half == "inmigrate" else {"dst": dst}
            kwargs = {"vm": VM, "attempt": attempt, "host": host, **peer}
            how = "kwargs rebuilt (no request key)"
        # The same message, as a replay copies it: its task id with its grant.
        self.orchestrator.app.send_task(f"fcq.{half}", kwargs=kwargs, queue=host_queue(host),
                                        task_id=f"{attempt}-{half[:-len('migrate')]}")
        return f"{half} replayed to {host} ({how})"

    def wait_attempt_end(self, task_id: str, attempt: str, src: str, dst: str) -> str:
        """Wait (bounded) until both halves ended or their workers are dead."""
        client = self.redis.client()
        prefix = f"fcq:mig:{VM}:{attempt}:"
        orch = self.orchestrator

        def chord_done() -> str | None:
            state, info = orch.state(task_id)
            if state not in ("SUCCESS", "FAILURE", "REVOKED"):
                return None
            if state == "FAILURE":
                # A chord reports "Dependency X raised TaskFailed({...})": the
                # half's own message is the informative part.
                text = remote_error(info).message
                inner = re.search(r"'message': '([^']*)", text)
                return f"FAILURE {(inner.group(1) if inner else text)[:90]}"
            return f"{state}" + (f" {info.get('outcome')}" if isinstance(info, dict) else "")

        def ended() -> str | None:
            done = chord_done()
            if done is not None:
                return done
            for side, host in (("src", src), ("dst", dst)):
                if not client.exists(prefix + f"done:{side}") and self.worker(host) is not None:
                    return None
            return "halves ended"

        outcome = poll(ended, ATTEMPT_BOUND, 0.3)
        if outcome is None:
            return f"not ended after {ATTEMPT_BOUND:.0f} s"
        if outcome != "halves ended":
            return str(outcome)
        # Each half writes done:<side> just before it returns; the chord's body
        # runs after both: give it time before calling it stuck.
        late = poll(chord_done, CHORD_GRACE, 0.3)
        if late is not None:
            return str(late)
        done = {side: client.get(prefix + f"done:{side}") for side in ("src", "dst")}
        return f"halves ended, chord pending {CHORD_GRACE:.0f} s later: " + ", ".join(
            f"{k}={str(v)[:30] if v else 'worker dead'}" for k, v in done.items())

    def drain(self) -> list[str]:
        """Wait until no message of this run is queued or delivered-unacknowledged.

        A half whose worker died comes back after the visibility timeout; it
        must land in this run, not in the next one.
        """
        client = self.redis.client()
        queues = [host_queue(h) for h in self.cluster.hosts]

        def quiet() -> bool:
            return not client.hlen("unacked") and not any(client.llen(q) for q in queues)
        t0 = time.monotonic()
        if poll(quiet, VISIBILITY_TIMEOUT + 30, 0.5):
            waited = time.monotonic() - t0
            return [f"waited {waited:.0f} s for redeliveries"] if waited > 5 else []
        return ["messages still in flight after the visibility timeout"]

    def sweep(self, attempt: str, result: RunResult | None = None) -> list[str]:
        """One ensure sweep of every host, and any migration that sweep started."""
        notes = []
        orch = self.orchestrator
        ids = {}
        for host in self.cluster.hosts:
            try:
                ids[host] = orch.sweep(host)
            except FcqError as err:
                # Refused: no live worker. One that passed revive_workers() and
                # died since (it may finish its running half first) is revived
                # once more, then swept.
                notes.append(f"sweep {host} refused: {err}")
                if result is None:
                    raise
                self.revive_workers(result, [])
                ids[host] = orch.sweep(host)
        for host, task_id in ids.items():
            try:
                res = orch.wait(task_id, timeout=SWEEP_BOUND)
                acted = {vm: a for vm, a in res.get("vms", {}).items() if a != ["nothing"]}
                if acted:
                    notes.append(f"sweep {host}: {acted}")
            except FcqError as err:
                notes.append(f"sweep {host} failed: {err}")
        client = self.redis.client()
        raw = client.get(f"fcq:mig:{VM}:current")
        current = None if raw is None else str(raw)
        if current is not None and current != attempt:
            notes.append(f"the sweep started migration {current}")
            poll(lambda: client.get(f"fcq:mig:{VM}:current") != current, ATTEMPT_BOUND, 0.5)
        return notes

    def classify(self, result: RunResult, state: ClusterState, sampler: GuestSampler,
                 original: Qemu, attempt: str) -> None:
        running = state.running
        result.twice = sampler.max_running() > 1 or len(running) > 1
        result.lost = not running
        result.stale = state.stale()
        # Earlier attempts' records expire on their own schedule: only this one's.
        result.notes += [n for n in state.notes()
                         if not n.startswith("attempt ") or n.startswith(f"attempt {attempt}:")]
        if sampler.twice():
            result.notes.append(f"twice at: {sampler.twice()[0].describe()}")
        if result.twice:
            result.outcome = "twice"
        elif result.lost:
            result.outcome = "lost"
        else:
            host = running[0]
            final = state.hosts[host].qemus
            if host == result.src and [q.ident for q in final] == [original.ident]:
                result.outcome = "kept"
            elif host == result.dst and len(final) == 1 and final[0].incoming:
                result.outcome = "moved"
            else:
                result.outcome = "cold-booted"

    def guest_check(self, host: str, result: RunResult) -> bool:
        """Does the guest that runs answer its agent? A QEMU in runstate running
        may carry a guest that crashed (its memory arrived corrupted)."""
        agent = self.cluster.hosts[host].agent(VM)
        if poll(lambda: guest_answers(agent), 30, 0.5):
            return True
        try:
            log = agent.paths.serial_log.read_text(errors="replace").splitlines()
        except OSError:
            log = []
        crash = next((line for line in log if "BUG:" in line or "Oops" in line
                      or "Kernel panic" in line), "no oops in its serial log")
        result.notes.append(f"the guest on {host} does not answer its agent: {crash.strip()}")
        return False

    def repair(self, state: ClusterState, guest_ok: bool | None, fresh_boot: bool) -> list[str]:
        """Bring vm01 back to one clean running copy for the next run; say what it took.

        Only after the run was recorded: these are an operator's moves, not
        fcq's, and a run that needed them says so.
        """
        done: list[str] = []
        client = self.redis.client()
        booted = False
        if guest_ok is False:
            # A crashed guest in a live QEMU: boot it afresh where it runs.
            for q in state.hosts[state.running[0]].qemus:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(q.pid, signal.SIGKILL)
            done.append(f"killed the crashed guest's QEMU on {state.running[0]}")
            self.sweep("")
            state = cluster_state(self.cluster, VM)
            booted = True
        for _ in range(3):
            if not state.problems():
                break
            owners = {o for s in state.hosts.values() for o in s.locks.values() if o}
            keeper = next((h for h in state.running if h in owners),
                          state.running[0] if state.running else None)
            for name, s in state.hosts.items():
                # Copies that do not run the guest, and every running copy but one.
                doomed = [q for q in s.qemus if name != keeper or s.runstate != "running"]
                doomed += list(s.qemus[1:]) if name == keeper and not doomed else []
                for q in doomed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(q.pid, signal.SIGKILL)
                    done.append(f"killed QEMU {q.pid} on {name}")
            for key in state.stale_keys:
                client.delete(key)
                done.append(f"deleted key {key.split(':', 2)[-1]}")
            for name, s in state.hosts.items():
                if s.slots:  # held by a thread of a live worker: restart it
                    worker = self.worker(name)
                    if worker is not None:
                        self.cluster.kill9(worker)
                    self.cluster.worker(name)
                    done.append(f"restarted worker@{name} (slot held)")
            target = keeper or next(iter(owners), None) or "alpha"
            for name, h in self.cluster.hosts.items():
                if state.hosts[name].kvm_host not in (None, target):
                    set_kvm_host(h, target)
                    done.append(f"config of {name}: kvm_host {target}")
            if keeper is None and owners - {target}:
                # Nothing runs: locks some other host holds would refuse the start.
                orch = self.orchestrator
                for owner in owners - {target}:
                    with contextlib.suppress(FcqError):
                        orch.wait(orch.submit("force_unlock", VM, host=owner), timeout=60)
                    done.append(f"force-unlock on {owner}")
            time.sleep(1)  # let the registry see the changed configs
            self.sweep("")
            state = cluster_state(self.cluster, VM)
        if state.problems():
            raise RuntimeError(f"could not restore one clean copy of {VM}: {state.problems()}")
        booted = booted or any("killed QEMU" in d or "force-unlock" in d for d in done)
        self.settle_guest(state.running[0], booted or fresh_boot)
        return done


def set_kvm_host(host: Host, target: str) -> None:
    """Point *host*'s VM file at *target*, keeping everything else (version too)."""
    path = host.settings.vm_config_dir / f"{VM}.cfg"
    raw = yaml.safe_load(path.read_text())
    raw["parameters"]["kvm_host"] = target
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    tmp.replace(path)


def table(results: list[RunResult], seed: int) -> str:
    cols = ("runs", "ran twice", "lost", "stale", "cold-booted", "moved", "kept",
            "worker died", "guest hung")
    rows = []
    for kind in [*KINDS, "total"]:
        rs = [r for r in results if kind in (r.kind, "total")]
        if not rs:
            continue
        rows.append((kind, len(rs), sum(r.twice for r in rs), sum(r.lost for r in rs),
                     sum(bool(r.stale) for r in rs), sum(r.outcome == "cold-booted" for r in rs),
                     sum(r.outcome == "moved" for r in rs), sum(r.outcome == "kept" for r in rs),
                     sum(bool(r.worker_died) for r in rs), sum(r.guest_ok is False for r in rs)))
    head = f"{'fault':<18}" + "".join(f"{c:>12}" for c in cols)
    lines = [head, "-" * len(head)]
    lines += [f"{r[0]:<18}" + "".join(f"{v:>12}" for v in r[1:]) for r in rows]
    lines.append(f"seed {seed}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10, help="migrations to attempt (default 10)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: drawn)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated fault kinds to draw from (default: all)")
    p.add_argument("--bandwidth", type=int, default=16,
                   help="migration bandwidth in Mbit/s, so that faults land mid-copy")
    p.add_argument("--memory", type=int, default=256, help="guest memory in MB")
    p.add_argument("--max-delay", type=float, default=4.0,
                   help="the fault comes 0..this many seconds after migrate()")
    p.add_argument("--keep", action="store_true", help="keep the cluster's files afterwards")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    # A stream of its own for every draw (kind, moment, pause), so that a
    # seed replays the same campaign: the module-level random is also drawn
    # from by fcq (guest-agent sync ids), as often as the guest answers.
    rng = random.Random(seed)
    say(f"chaos: {args.runs} runs, seed {seed}, bandwidth {args.bandwidth} Mbit/s, "
        f"{args.memory} MB guest")
    results: list[RunResult] = []
    failed = False
    t0 = time.monotonic()
    campaign = Campaign(args.bandwidth, args.memory, rng)
    campaign.keep = args.keep
    try:
        with campaign:
            say(f"cluster up in {time.monotonic() - t0:.0f} s")
            for i in range(1, args.runs + 1):
                kind = rng.choice(kinds)
                at = rng.uniform(0, args.max_delay)
                late = rng.random() < 0.5
                try:
                    result = campaign.run(i, kind, at, late)
                except Exception as err:  # the campaign cannot go on; the table still prints
                    say(f"run {i} ({kind} at {at:.2f} s) could not complete: {err!r}")
                    campaign.keep = True
                    failed = True
                    break
                results.append(result)
                say(result.line())
                say(f"    fault: {result.fault}")
                for text in [*(f"STALE: {s}" for s in result.stale), *result.notes,
                             *(f"repair: {r}" for r in result.repaired)]:
                    say(f"    {text}")
                if result.twice or result.lost:
                    campaign.keep = True
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("")
        say(table(results, seed))
        if results:
            per_run = sum(r.seconds for r in results) / len(results)
            say(f"{len(results)} runs in {time.monotonic() - t0:.0f} s, {per_run:.0f} s per run")
    return 1 if failed or any(r.twice or r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
