"""Redis away for 60 s under a running fleet: real redis-server, workers, beat, QEMU.

The one 60 s outage of the suite. While Redis is down the test samples,
every 100 ms, that no QEMU changed (same pids, same start ticks, not a
zombie) and that no fcq process exited; afterwards, that everything came
back by itself: heartbeats, beat's lock and sweeps, a fresh ping, the task
that waited in Redis through the outage (done exactly once), and an
orchestrator object made before the outage. The recovery times are printed
(``pytest -s``); docs/operations.md quotes them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import Cluster, Service
from tests.conftest import vm_params
from tests.helpers import guest_answers, qmp, wait_for, wait_guest
from tests.test_cluster import SLOW_CREATE_VM

ClusterFactory = Any

OUTAGE = 60.0
SAMPLE_EVERY = 0.1


def start_ticks(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of *pid*, from /proc; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[19])  # state, field 22 (starttime)


class Sampler(threading.Thread):
    """Checks every SAMPLE_EVERY s that QEMUs and fcq processes stay as they were."""

    def __init__(self, qemus: dict[int, int], services: list[Service]) -> None:
        super().__init__(name="outage-sampler", daemon=True)
        self.qemus = qemus
        self.services = services
        self.samples = 0
        self.faults: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid, ticks in self.qemus.items():
                seen = start_ticks(pid)
                if seen is None or seen[0] in ("Z", "X", "T") or seen[1] != ticks:
                    self.faults.append(f"QEMU {pid}: {seen}")
            for s in self.services:
                if s.proc.poll() is not None:
                    self.faults.append(f"{s.name} exited with {s.proc.returncode}")
            self.samples += 1
            self.done.wait(SAMPLE_EVERY)


def vm_file(base: Path, name: str, host: str, nic: int) -> Path:
    """A VM file for the orchestrator to push, outside the host's config directory."""
    path = base / "push" / f"{name}.cfg"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"name": name, "parameters": vm_params(
        kvm_host=host, nics=[{"srv": f"02-00-00-00-00-{nic:02d}"}])}, sort_keys=False))
    return path


def since(log: Path, offset: int, text: str) -> int:
    """How many lines of *log* after byte *offset* contain *text*."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        return sum(1 for line in fh.read().decode(errors="replace").splitlines()
                   if text in line)


def test_redis_down_60s_fleet_keeps_running_and_recovers(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(sweep_interval=3)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    beta.update_settings(create_vm=SLOW_CREATE_VM)  # a start that is still running
    alpha.write_vm("vm01")
    beta.write_vm("vm02", nics=[{"srv": "02-00-00-00-00-02"}])
    worker_alpha = c.worker("alpha")
    worker_beta = c.worker("beta")
    beat = c.spawn("beat")
    orch = c.orchestrator()  # lives through the outage, never recreated
    for vm in ("vm01", "vm02"):
        assert orch.wait(orch.submit("start", vm), timeout=120)["status"] == "running"
    wait_guest(alpha.agent("vm01"))
    wait_guest(beta.agent("vm02"))
    wait_for(lambda: c.redis.client().get("fcq:beat"), 30, "beat to take its lock")
    qemus = {p.pid: t[1] for h in (alpha, beta) for p in h.qemu_processes()
             if (t := start_ticks(p.pid)) is not None}
    assert len(qemus) == 2

    # The task that waits in Redis through the outage: alpha's worker dies
    # (kill -9: its heartbeat stays valid for registry_ttl), and a new VM's
    # file is pushed to alpha meanwhile. Applied once, vm03 runs once.
    c.kill9(worker_alpha)
    queued = orch.apply_config(vm_file(alpha.base, "vm03", "alpha", 3), hosts=["alpha"])["alpha"]
    wait_for(lambda: c.redis.client().llen("host.alpha") == 1, 5, "the push queued in Redis")
    # And a task running when Redis goes: beta gets vm04's file and starts
    # it (its volume takes 3 s to create). Its result and its acknowledgement
    # cannot reach Redis; Redis delivers it again after visibility_timeout,
    # and that run finds vm04 running. (Before cluster/transport.py, losing
    # Redis under a running task made the worker exit.)
    in_flight = orch.apply_config(vm_file(beta.base, "vm04", "beta", 4), hosts=["beta"])["beta"]
    wait_for(lambda: orch.state(in_flight)[0] == "PROGRESS", 30, "vm04's start to run")
    waited: dict[str, dict[str, Any]] = {queued: {}, in_flight: {}}

    def wait_through(task_id: str) -> None:  # orchestrator calls in progress when Redis goes
        try:
            waited[task_id]["result"] = orch.wait(task_id, timeout=OUTAGE + 120)
            waited[task_id]["at"] = time.monotonic()
        except Exception as err:  # reported by the assertion below
            waited[task_id]["error"] = err
    waiters = [threading.Thread(target=wait_through, args=(t,), name=f"waiter-{t}")
               for t in waited]
    for waiter in waiters:
        waiter.start()

    logs = {s.name: s.log.stat().st_size for s in (worker_beta, beat)}
    sweep_log = beta.base / "fcq.log"
    sweeps_before = sweep_log.stat().st_size
    c.redis.stop()
    t_down = time.monotonic()
    # Alpha's worker is started again while Redis is away: it must wait for it.
    worker_alpha = c.spawn("worker", "alpha")
    sampler = Sampler(qemus, [worker_alpha, worker_beta, beat])
    sampler.start()
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - t_down)))
    c.redis.start()
    t_up = time.monotonic()

    client = c.redis.client()
    back: dict[str, float] = {}
    for name in ("alpha", "beta"):
        key = f"fcq:host:{name}"
        wait_for(lambda: client.exists(key), 30, f"{name}'s heartbeat")  # noqa: B023
        back[f"heartbeat {name}"] = time.monotonic() - t_up
    wait_for(lambda: client.get("fcq:beat"), 40, "beat to take its lock again")
    back["beat lock"] = time.monotonic() - t_up
    for host in ("beta", "alpha"):
        assert orch.wait(orch.ping(host), timeout=30) == {"host": host, "operation": "ping"}
        back[f"ping {host}"] = time.monotonic() - t_up
    for waiter in waiters:
        waiter.join(150)
    back["waiters joined"] = time.monotonic() - t_up
    for task_id, what in ((queued, "queued task"), (in_flight, "in-flight task")):
        assert "error" not in waited[task_id], waited[task_id]["error"]
        back[f"{what} done"] = waited[task_id]["at"] - t_up
    wait_for(lambda: since(sweep_log, sweeps_before, '"sweep-done"') >= 1, 30,
             "beat's sweep of beta after the outage")
    back["first sweep of beta"] = time.monotonic() - t_up
    sampler.done.set()
    sampler.join()
    print("\nafter Redis came back (s):", {k: round(v, 1) for k, v in back.items()},
          f"| {sampler.samples} samples in {time.monotonic() - t_down:.0f} s")

    assert sampler.faults == []
    assert sampler.samples >= OUTAGE / SAMPLE_EVERY * 0.8
    assert waited[queued]["result"]["vm"] == "vm03"
    assert waited[in_flight]["result"]["vm"] == "vm04"
    # Back within seconds of Redis: workers retry every 5 s at most.
    assert back["ping beta"] < 15 and back["ping alpha"] < 15, back
    # During the outage the processes said what happened, and kept trying.
    assert since(worker_beta.log, logs[worker_beta.name], "Connection to broker lost") == 1
    assert since(worker_beta.log, logs[worker_beta.name], "Unrecoverable error") == 0
    assert since(beat.log, logs[beat.name], "beat-active") == 1

    # vm03 started exactly once: one QEMU, never restarted; the old guests
    # still answer, and the same QEMUs run them.
    agent03 = alpha.agent("vm03")
    wait_for(lambda: agent03.status()["status"] == "running", 60, "vm03 to run")
    first03 = agent03.status()["pid"]
    wait_for(lambda: beta.agent("vm04").status()["status"] == "running", 60, "vm04 to run")
    first04 = beta.agent("vm04").status()["pid"]
    assert set(qemus) <= {p.pid for h in (alpha, beta) for p in h.qemu_processes()}
    for agent in (alpha.agent("vm01"), beta.agent("vm02")):
        assert guest_answers(agent)
        assert qmp(agent, "query-status")["status"] == "running"
    # One sweep of each host converges: nothing left to do anywhere. A sweep
    # skips a VM another operation holds, and the task that was running when
    # Redis went is delivered again after visibility_timeout (its
    # acknowledgement could not reach Redis): the sweep that counts is the
    # first one that looked at every VM.
    for name in ("alpha", "beta"):
        def full_sweep(host: str = name) -> dict[str, Any] | None:
            sweep = orch.wait(orch.sweep(host), timeout=120)
            return None if "skipped" in sweep["vms"].values() else sweep
        sweep = wait_for(full_sweep, 90, f"a sweep of {name} that skipped no VM")
        assert sweep["failed"] == 0 and sweep["errors"] == {}, sweep
        assert all(actions == ["nothing"] for actions in sweep["vms"].values()), sweep
    assert len(alpha.qemu_processes()) == 2 and len(beta.qemu_processes()) == 2
    assert agent03.status()["pid"] == first03
    assert beta.agent("vm04").status()["pid"] == first04
