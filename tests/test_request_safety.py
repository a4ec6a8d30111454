"""Requests that arrive late or by hand must not act on a world that has moved on.

Real redis-server, real `fcq worker` processes, real QEMU, nothing faked:

* imperative requests (start, stop, restart, kill, force-unlock) carry
  ``expires_at`` and are refused, doing nothing, once it has passed: sent
  already stale (what a late redelivery looks like), stale after busy
  retries, and redelivered for real after a worker was killed;
* force-unlock checks for a live lock holder when it runs, on the host that
  breaks the locks, not only when it is submitted;
* apply-config orders pushes by the file's ``version`` key, never by
  modification times.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from fcq_tasks.cluster.tasks import refuse_live_holder
from fcq_tasks.config.vmspec import rewrite_vm_parameters, vm_file_version
from fcq_tasks.errors import Refused, RemoteError
from fcq_tasks.host.oplock import operation_lock
from tests.cluster import Cluster, free_port, send_signed
from tests.conftest import HostFactory
from tests.helpers import wait_for

ClusterFactory = Any

#: Expiry that tests can wait out: no busy wait, five retries one second
#: apart (a chain of 5 s), so request_ttl may be 5 s; visibility_timeout (10 s
#: in tests/cluster.py) exceeds it, so a redelivery always arrives expired.
FAST_EXPIRY = {"request_ttl": 5, "task_busy_wait": 0, "busy_retry_delay": 1,
               "busy_retries": 5}

IMPERATIVE = ("start", "stop", "restart", "kill", "force_unlock")

SLOW_CREATE_VM = [sys.executable, "-c",
                  "import sys, time; time.sleep(3); open(sys.argv[1], 'wb').truncate("
                  "int(sys.argv[2]))", "{path}", "{size_bytes}"]


def send(c: Cluster, task: str, host: str = "alpha", **kwargs: Any) -> str:
    """Send a hand-made message straight to a host's queue, bypassing submit().

    Granted like the orchestrator's own, with exactly these arguments;
    expires_at is five minutes from now unless given (None: left out).
    """
    kwargs.setdefault("expires_at", time.time() + 300)
    return send_signed(c.orchestrator(), task, host,
                       {k: v for k, v in kwargs.items() if v is not None})


def refusal(c: Cluster, task_id: str) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        c.orchestrator().wait(task_id, timeout=60)
    return info.value


def assert_expired(err: RemoteError, vm: str, operation: str) -> None:
    assert err.fields["error"] == "Refused" and err.fields["field"] == "expires_at", err.fields
    assert err.exit_code == 4
    assert f"{vm}: {operation} request expired: it was due by " in err.message
    assert "nothing was done" in err.message


def pid_of(c: Cluster, host: str = "alpha") -> list[int]:
    return sorted(p.pid for p in c.hosts[host].qemu_processes())


def test_stale_imperative_requests_are_refused_and_change_nothing(
        make_cluster: ClusterFactory) -> None:
    """A message past its expires_at (a late redelivery) is refused with a clear error and
    leaves the VM as it was; no expires_at (an older orchestrator) and ensure still act."""
    c: Cluster = make_cluster(("alpha",), **FAST_EXPIRY)
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01", online=False)  # nothing but an imperative request starts it
    c.worker("alpha")
    orch = c.orchestrator()
    # submit() stamps imperative requests with sent + request_ttl.
    before = time.time()
    started = orch.submit("start", "vm01")
    assert orch.wait(started, timeout=120)["status"] == "running"
    sent = AsyncResult(started, app=orch.app).kwargs  # result_extended keeps them
    assert sent is not None
    stamp = sent["expires_at"]
    assert before + 5 <= stamp <= time.time() + 5
    running = pid_of(c)
    assert len(running) == 1

    stale = time.time() - 60
    stop = send(c, "stop", vm="vm01", host="alpha", expires_at=stale)
    assert_expired(refusal(c, stop), "vm01", "stop")
    assert pid_of(c) == running, "a stale stop touched the VM"
    assert set(alpha.agent("vm01").status()["locks"].values()) == {"alpha"}
    # The CLI turns it into exit 4 with the same message.
    cli = c.fcq("wait", stop)
    assert cli.returncode == 4 and "stop request expired" in cli.stderr, cli.stderr
    assert "nothing was done" in cli.stderr

    for op in ("kill", "restart", "force_unlock"):
        assert_expired(refusal(c, send(c, op, vm="vm01", expires_at=stale)), "vm01",
                       op.replace("_", "-"))
    assert pid_of(c) == running

    # Without expires_at: refused, even granted (a request that never
    # expires could be replayed forever).
    never = refusal(c, send(c, "stop", vm="vm01", expires_at=None))
    assert (never.fields["error"], never.fields["field"]) == ("Unauthorized", "expires_at")
    assert pid_of(c) == running
    assert orch.wait(orch.submit("stop", "vm01"), timeout=120)["status"] == "stopped"
    assert alpha.qemu_processes() == []
    start = send(c, "start", vm="vm01", expires_at=stale)
    assert_expired(refusal(c, start), "vm01", "start")
    assert alpha.qemu_processes() == [] and not any(
        alpha.agent("vm01").status()["locks"].values())
    # ensure converges to the config as it is now: it never expires.
    ensured = orch.wait(send(c, "ensure", vm="vm01", expires_at=stale), timeout=60)
    assert ensured["actions"] == ["nothing"]
    bad = refusal(c, send(c, "start", vm="vm01", expires_at="soon"))
    assert (bad.fields["error"], bad.fields["field"]) == ("Unauthorized", "expires_at")
    assert alpha.qemu_processes() == []


def test_busy_retries_keep_expires_at(make_cluster: ClusterFactory) -> None:
    """A request retried while its VM is busy keeps its expires_at: the chain ends in
    'expired', never in a late start."""
    c: Cluster = make_cluster(("alpha",), **FAST_EXPIRY)
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01", online=False)
    c.worker("alpha")
    # This test process holds vm01's operation lock (an flock), as a long
    # operation of another process on this host would.
    with operation_lock(alpha.settings.run_dir, "vm01"):
        task_id = send(c, "start", vm="vm01", host="alpha", expires_at=time.time() + 2.5)
        err = refusal(c, task_id)
    assert_expired(err, "vm01", "start")
    assert '"busy-retry"' in (alpha.base / "fcq.log").read_text()
    assert alpha.qemu_processes() == []


def test_real_late_redelivery_is_refused(make_cluster: ClusterFactory) -> None:
    """kill -9 of the worker during a start: the task comes back after visibility_timeout,
    later than request_ttl, and is refused; no QEMU runs, no lock is held."""
    c: Cluster = make_cluster(("alpha",), **FAST_EXPIRY)
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01", online=False)
    worker = c.worker("alpha")
    orch = c.orchestrator()
    task_id = orch.submit("start", "vm01")
    wait_for(lambda: orch.state(task_id)[0] == "PROGRESS", 30, "the start to run")
    c.kill9(worker)  # the message stays unacknowledged in Redis
    c.worker("alpha")
    err = refusal(c, task_id)
    assert_expired(err, "vm01", "start")
    assert alpha.qemu_processes() == []
    assert not any(alpha.agent("vm01").status()["locks"].values())


def shared_storage_pair(c: Cluster) -> None:
    """alpha and beta share one state dir (stand-in for shared storage); vm01 runs on alpha."""
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    beta.update_settings(state_dir=str(alpha.settings.state_dir))
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 in the registry")


def test_force_unlock_checks_for_a_live_holder_when_it_runs(
        make_cluster: ClusterFactory) -> None:
    """A force-unlock sent straight to beta (bypassing submit's check) is refused while
    alpha runs the VM, and while alpha is alive holding the locks; once alpha's worker is
    dead, its heartbeat expired and its QEMU gone, beta breaks them."""
    c: Cluster = make_cluster()
    shared_storage_pair(c)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    orch = c.orchestrator()

    def locks() -> set[str | None]:
        return set(beta.agent("vm01").status()["locks"].values())

    err = refusal(c, send(c, "force_unlock", host="beta", vm="vm01"))
    assert err.fields["error"] == "Refused" and err.fields["host"] == "alpha"
    assert "runs on live host alpha" in err.message
    assert locks() == {"alpha"}

    # alpha's QEMU dies behind fcq's back; alpha's worker lives on, still holding the locks.
    for proc in alpha.qemu_processes():
        proc.kill()
    wait_for(lambda: "vm01" not in orch.hosts()["alpha"]["running"], 30,
             "alpha's heartbeat to drop vm01")
    err = refusal(c, send(c, "force_unlock", host="beta", vm="vm01"))
    assert err.fields["host"] == "alpha" and "locked by live host alpha" in err.message
    assert locks() == {"alpha"}

    # alpha's worker dies too; once its heartbeat has expired the operator may vouch.
    for service in list(c.services):
        if service.name == "worker@alpha":
            c.kill9(service)
    wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to expire")
    cli = c.fcq("--json", "force-unlock", "vm01", "--host", "beta")
    assert cli.returncode == 0, cli.stderr
    assert locks() == {None}
    assert '"root": "alpha"' in cli.stdout


def test_force_unlock_refused_when_the_registry_cannot_be_read(make_host: HostFactory) -> None:
    """No registry, no broken lock: an unreachable Redis refuses, the lock stays."""
    host = make_host("beta")
    host.write_vm("vm01", kvm_host="alpha")
    agent = host.agent("vm01")
    assert agent.storage.lock("vm01", "root")
    nobody = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=2,
                         socket_timeout=2, decode_responses=True)
    with pytest.raises(Refused, match="cannot read the host registry"):
        refuse_live_holder(agent, nobody)
    assert agent.status()["locks"]["root"] == "beta"


def test_pushes_are_ordered_by_version_not_mtime(make_cluster: ClusterFactory) -> None:
    """A lower version pushed after a higher one is ignored, whatever the mtimes; copying a
    file changes nothing; an equal version is applied again; fcq's own rewrite of kvm_host
    keeps the version."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    c.worker("alpha")
    on_host = alpha.settings.vm_config_dir / "vm01.cfg"
    body = alpha.write_vm("vm01", online=False).read_text()
    on_host.unlink()
    inventory = alpha.base / "inventory"
    inventory.mkdir()

    def version_file(name: str, version: int, memory: int, mtime: float | None) -> Path:
        path = inventory / name / "vm01.cfg"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"version: {version}\n" + body.replace("memory: 128",
                                                                f"memory: {memory}"))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def push(path: Path) -> str:
        cli = c.fcq("apply-config", str(path))
        assert cli.returncode == 0, cli.stderr
        return cli.stdout

    v2 = version_file("v2", 2, 256, mtime=1)  # ancient mtime, higher version
    assert "did write-config" in push(v2)
    v1 = version_file("v1", 1, 512, mtime=time.time() + 3600)  # newest mtime, lower version
    out = push(v1)
    assert "ignored: this host has a newer config (version 2 > 1)" in out, out
    copy = inventory / "copy" / "vm01.cfg"
    copy.parent.mkdir()
    shutil.copy(v1, copy)  # a fresh mtime, as a copy or a checkout gives
    assert "ignored" in push(copy)
    assert (vm_file_version(on_host), "memory: 256" in on_host.read_text()) == (2, True)
    assert "did write-config" in push(v2)  # equal: applied again (idempotent)

    # fcq's own rewrite (what a migration does to kvm_host) keeps the version: a
    # concurrent push of the same version still applies, a lower one still loses.
    rewrite_vm_parameters(on_host, kvm_host="beta")
    assert vm_file_version(on_host) == 2
    assert "ignored" in push(v1)
    assert "did write-config" in push(v2)
    assert "kvm_host: alpha" in on_host.read_text()

    # An orchestrator from before versions sends the mtime as "version": the text's
    # version decides all the same.
    orch = c.orchestrator()
    old = orch.wait(send(c, "apply_config", vm="vm01", config=v1.read_text(),
                         version=time.time() + 7200), timeout=60)
    assert old["outcome"] == "ignored"
    mismatch = refusal(c, send(c, "apply_config", vm="vm01", config=v2.read_text(),
                               config_version=5))
    assert mismatch.fields["field"] == "config_version"
    v3 = version_file("v3", 3, 384, mtime=1)
    assert "did write-config" in push(v3)
    assert (vm_file_version(on_host), "memory: 384" in on_host.read_text()) == (3, True)
