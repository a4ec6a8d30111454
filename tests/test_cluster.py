"""The cluster for real: redis-server, fcq worker processes for two hosts, QEMU."""

from __future__ import annotations

import itertools
import json
import re
import signal
import sys
import time
from typing import Any

import pytest

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import UnroutedTask
from fcq_tasks.errors import RemoteError
from tests.cluster import Cluster, send_signed
from tests.helpers import wait_for

SLOW_CREATE_VM = [sys.executable, "-c",
                  "import sys, time; time.sleep(3); open(sys.argv[1], 'wb').truncate("
                  "int(sys.argv[2]))", "{path}", "{size_bytes}"]

ClusterFactory = Any


def test_start_reaches_the_right_host_only(make_cluster: ClusterFactory) -> None:
    """An orchestrator start goes to the VM's kvm_host; the VM runs there and nowhere else."""
    c: Cluster = make_cluster()
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    alpha.write_vm("vm01")
    beta.write_vm("vm01", kvm_host="alpha")  # beta knows the VM, but it is alpha's
    beta.write_vm("vm02")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    result = orch.wait(orch.submit("start", "vm01"), timeout=120)
    assert (result["host"], result["status"]) == ("alpha", "running")
    assert len(alpha.qemu_processes()) == 1 and beta.qemu_processes() == []
    result = orch.wait(orch.submit("start", "vm02"), timeout=120)
    assert result["host"] == "beta" and len(beta.qemu_processes()) == 1


def test_cli_start_wait_jobs_hosts(make_cluster: ClusterFactory) -> None:
    """`fcq start` waits and shows progress; --no-wait + `fcq wait`; jobs and hosts list them."""
    c: Cluster = make_cluster(("alpha",))
    c.hosts["alpha"].write_vm("vm01")
    c.worker("alpha")
    started = c.fcq("start", "vm01")
    assert started.returncode == 0, started.stderr
    assert "vm01@alpha: start: found stopped, did start; now running" in started.stdout
    assert "vm01: success" in started.stderr
    task_id = c.fcq("stop", "vm01", "--no-wait").stdout.strip()
    waited = c.fcq("--json", "wait", task_id)
    assert json.loads(waited.stdout)["status"] == "stopped"
    jobs = json.loads(c.fcq("--json", "jobs").stdout)
    assert [(j["op"], j["vm"], j["state"]) for j in jobs] == [("stop", "vm01", "SUCCESS"),
                                                              ("start", "vm01", "SUCCESS")]
    # Sent when, and how long it took from sending to its result.
    assert all(isinstance(j["seconds"], float) and 0 < j["seconds"] < 120 for j in jobs), jobs
    table = c.fcq("jobs").stdout.splitlines()
    assert table[0].split()[:3] == ["TASK", "SENT", "TOOK"]
    assert re.search(r" \d\d:\d\d:\d\d +\d+(\.\d+)? m?s +stop ", table[1]), table[1]
    hosts = json.loads(c.fcq("--json", "hosts").stdout)
    assert hosts["host"] == "alpha" and hosts["vms"] == 1


def test_worker_killed_mid_start_task_is_delivered_again(make_cluster: ClusterFactory) -> None:
    """kill -9 of the worker during a start: the task comes back and the VM runs exactly once."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    worker = c.worker("alpha")
    orch = c.orchestrator()
    task_id = orch.submit("start", "vm01")
    wait_for(lambda: orch.state(task_id)[0] == "PROGRESS", 30, "the start to be running")
    c.kill9(worker)
    t_killed = time.monotonic()
    c.worker("alpha")
    result = orch.wait(task_id, timeout=120)
    redelivered_after = time.monotonic() - t_killed
    assert result["status"] == "running"
    assert len(alpha.qemu_processes()) == 1
    assert redelivered_after < 60, f"redelivery took {redelivered_after:.0f} s"


def test_redis_restart_loses_no_task(make_cluster: ClusterFactory) -> None:
    """Tasks queued when Redis restarts (AOF on) are all executed afterwards."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    for i in range(3):
        alpha.write_vm(f"vm0{i}")
    orch = c.orchestrator()
    # alpha's record, as its worker would sign it: let submit() accept the host.
    registry.publish_host(registry.connect(alpha.settings), alpha.settings)
    ids = [orch.submit("start", f"vm0{i}", host="alpha") for i in range(3)]
    assert c.redis.client().llen("host.alpha") == 3
    c.redis.restart()
    assert c.redis.client().llen("host.alpha") == 3
    c.worker("alpha")
    results = [orch.wait(i, timeout=120) for i in ids]
    assert [r["status"] for r in results] == ["running"] * 3
    assert len(alpha.qemu_processes()) == 3


def test_worker_survives_redis_restart_during_work(make_cluster: ClusterFactory) -> None:
    """A worker whose Redis restarts under it reconnects and takes new work."""
    c: Cluster = make_cluster(("alpha",))
    c.hosts["alpha"].write_vm("vm01")
    c.worker("alpha")
    c.redis.restart()
    c.wait_registered("alpha")
    orch = c.orchestrator()
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"


def test_two_tasks_on_one_vm_never_interleave(make_cluster: ClusterFactory) -> None:
    """Two ensures of one VM at once: one starts it, the other waits and then finds it done."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    first, second = orch.submit("ensure", "vm01"), orch.submit("ensure", "vm01")
    results = [orch.wait(first, timeout=120), orch.wait(second, timeout=120)]
    assert sorted(r["actions"][0] for r in results) == ["nothing", "start"]
    # The log shows every event of one task before any of the other's.
    events = [json.loads(line) for line in (alpha.base / "fcq.log").read_text().splitlines()]
    order = [e["task_id"] for e in events if e.get("task_id") in (first, second)]
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches == 1, order


def test_bad_arguments_and_unknown_vm_are_clear_errors(make_cluster: ClusterFactory) -> None:
    """Bad task arguments and unknown VMs fail with a named field; the worker keeps working."""
    c: Cluster = make_cluster(("alpha",))
    c.hosts["alpha"].write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    soon = time.time() + 300
    bad = send_signed(orch, "start", "alpha", {"vm": "../../etc", "expires_at": soon})
    with pytest.raises(RemoteError) as info:
        orch.wait(bad, timeout=60)
    assert info.value.fields["error"] == "BadRequest" and info.value.fields["field"] == "vm"
    assert info.value.exit_code == 2
    unknown = send_signed(orch, "start", "alpha", {"vm": "ghost", "expires_at": soon})
    with pytest.raises(RemoteError, match="ghost: no config"):
        orch.wait(unknown, timeout=60)
    wrong = send_signed(orch, "apply_config", "alpha", {"vm": "vm01", "config": "x: [",
                                                       "version": 1, "expires_at": soon})
    with pytest.raises(RemoteError, match="not valid YAML"):
        orch.wait(wrong, timeout=60)
    cli = c.fcq("start", "nosuch")
    assert cli.returncode == 2 and "no live host has a config for 'nosuch'" in cli.stderr
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"


def test_unrouted_tasks_are_refused_and_no_queue_is_orphaned(
        make_cluster: ClusterFactory) -> None:
    """Nothing can be published to a queue nobody consumes; after work all queues are empty."""
    c: Cluster = make_cluster(("alpha",))
    c.hosts["alpha"].write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    with pytest.raises(UnroutedTask, match="no queue"):
        orch.app.send_task("fcq.start", kwargs={"vm": "vm01"})
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    client = c.redis.client()
    lists = {k for k in client.scan_iter("*") if client.type(k) == "list"}
    assert lists <= {"host.alpha"}, lists
    assert all(client.llen(k) == 0 for k in lists)


def test_apply_config_writes_newer_ignores_older(make_cluster: ClusterFactory) -> None:
    """apply-config writes the file atomically and ensures; an older file is ignored."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    c.worker("alpha")
    src = alpha.base / "vm01.cfg"
    src.write_text("version: 2\n" + alpha.write_vm("vm01").read_text())
    (alpha.settings.vm_config_dir / "vm01.cfg").unlink()
    cli = c.fcq("apply-config", str(src))
    assert cli.returncode == 0, cli.stderr
    assert "did write-config, start" in cli.stdout
    older = alpha.base / "old" / "vm01.cfg"
    older.parent.mkdir()
    older.write_text(src.read_text().replace("memory: 128", "memory: 256")
                     .replace("version: 2", "version: 1"))
    cli = c.fcq("apply-config", str(older))
    assert "ignored" in cli.stdout
    assert "memory: 128" in (alpha.settings.vm_config_dir / "vm01.cfg").read_text()


def test_busy_task_is_retried_not_dropped(make_cluster: ClusterFactory) -> None:
    """With no time to wait, a task on a busy VM is retried on the same host until it runs."""
    c: Cluster = make_cluster(("alpha",), task_busy_wait=0, busy_retry_delay=1,
                              busy_retries=30)
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    first, second = orch.submit("ensure", "vm01"), orch.submit("ensure", "vm01")
    results = [orch.wait(first, timeout=120), orch.wait(second, timeout=120)]
    assert sorted(r["actions"][0] for r in results) == ["nothing", "start"]
    log = (alpha.base / "fcq.log").read_text()
    assert '"busy-retry"' in log


def test_force_unlock_refused_while_vm_runs_on_a_live_host(make_cluster: ClusterFactory) -> None:
    """The orchestrator never breaks locks of a VM another live host reports running."""
    c: Cluster = make_cluster()
    c.hosts["alpha"].write_vm("vm01")
    c.hosts["beta"].write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    cli = c.fcq("force-unlock", "vm01", "--host", "beta")
    assert cli.returncode == 4 and "runs on live host alpha" in cli.stderr
    assert c.hosts["alpha"].agent("vm01").status()["locks"]["root"] == "alpha"


def test_redis_restart_while_a_task_runs(make_cluster: ClusterFactory) -> None:
    """Redis restarts while a worker runs a start and more tasks wait: all of them finish,
    and the VM runs exactly once."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    for vm in ("vm01", "vm02"):
        alpha.write_vm(vm)
    c.worker("alpha")
    orch = c.orchestrator()
    running = orch.submit("start", "vm01")
    queued = orch.submit("start", "vm02")
    wait_for(lambda: orch.state(running)[0] == "PROGRESS", 30, "vm01's start to run")
    c.redis.restart()
    results = [orch.wait(running, timeout=120), orch.wait(queued, timeout=120)]
    assert [r["status"] for r in results] == ["running", "running"]
    assert len(alpha.qemu_processes()) == 2


def test_worker_sigterm_finishes_running_task(make_cluster: ClusterFactory) -> None:
    """SIGTERM is a warm shutdown: the running start completes, then the worker exits 0."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    worker = c.worker("alpha")
    orch = c.orchestrator()
    task_id = orch.submit("start", "vm01")
    wait_for(lambda: orch.state(task_id)[0] == "PROGRESS", 30, "the start to run")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    assert orch.state(task_id)[0] == "SUCCESS"
    assert not c.redis.client().exists("fcq:host:alpha"), "the host stays registered"
