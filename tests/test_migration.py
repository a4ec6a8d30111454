"""Live migration between two worker hosts on one machine, real QEMU, idle guests.

The VM's disks are RBD images on the throwaway Ceph cluster, in a pool of
the test's own; alpha and beta have their own cephx identities and their own
run, config and state directories, like two machines. Nothing on this
kernel protects one QEMU's images from another's: only fcq's locks do.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fcq_tasks.errors import FcqError
from tests.cluster import Cluster
from tests.helpers import (
    events,
    guest_answers,
    scrape_until,
    series,
    value,
    wait_for,
    wait_guest,
)

ClusterFactory = Any


#: Migration tests run halves longer than the suite's usual 10 s visibility
#: timeout; settings refuse a migration that could outlive it.
VISIBILITY = 200


def shared_pair(make_cluster: ClusterFactory, **alpha_settings: Any) -> Cluster:
    c: Cluster = make_cluster(visibility_timeout=VISIBILITY, storage="rbd")
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    if alpha_settings:
        alpha.update_settings(**alpha_settings)
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha", memory=256)
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_guest(alpha.agent("vm01"))
    c.wait_registered("beta")
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 in the registry")
    return c


def where(c: Cluster) -> dict[str, int]:
    return {n: len(h.qemu_processes()) for n, h in c.hosts.items()}


def test_migration_moves_a_running_guest(make_cluster: ClusterFactory) -> None:
    """The guest answers on beta, alpha's QEMU is gone, locks and configs name beta."""
    c = shared_pair(make_cluster)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    cli = c.fcq("--json", "migrate", "vm01", "--to", "beta")
    assert cli.returncode == 0, cli.stderr
    result = json.loads(cli.stdout)
    assert (result["from"], result["to"], result["status"]) == ("alpha", "beta", "running")
    assert result["downtime_ms"] > 0 and result["handover_ms"] is not None
    assert where(c) == {"alpha": 0, "beta": 1}
    assert guest_answers(beta.agent("vm01"))
    assert set(beta.agent("vm01").status()["locks"].values()) == {"beta"}
    for h in (alpha, beta):
        assert "kvm_host: beta" in (h.settings.vm_config_dir / "vm01.cfg").read_text()
    # Both hosts agree afterwards: a sweep of each changes nothing.
    assert alpha.agent("vm01").ensure()["actions"] == ["nothing"]
    assert beta.agent("vm01").ensure()["actions"] == ["nothing"]


def test_migration_to_unknown_or_same_host_is_refused(make_cluster: ClusterFactory) -> None:
    """Clear errors, and the VM keeps running where it was."""
    c = shared_pair(make_cluster)
    unknown = c.fcq("migrate", "vm01", "--to", "gamma")
    assert unknown.returncode == 2 and "host 'gamma' has no live worker" in unknown.stderr
    same = c.fcq("migrate", "vm01", "--to", "alpha")
    assert same.returncode == 2 and "already runs on alpha" in same.stderr
    assert where(c) == {"alpha": 1, "beta": 0}


def test_destination_refusing_leaves_vm_on_source(make_cluster: ClusterFactory) -> None:
    """beta's memory admission refuses: the VM runs on alpha only, no QEMU left on beta."""
    c = shared_pair(make_cluster)
    c.hosts["beta"].update_settings(vm_max_total_memory=128)
    for s in list(c.services):
        if "beta" in s.name:
            c.kill9(s)
    c.worker("beta")
    orch = c.orchestrator()
    with pytest.raises(FcqError):
        orch.wait(orch.migrate("vm01", "beta"), timeout=120)
    wait_for(lambda: where(c) == {"alpha": 1, "beta": 0}, 30, "vm01 on alpha only")
    alpha_vm = c.hosts["alpha"].agent("vm01")
    assert alpha_vm.status()["status"] == "running"
    assert set(alpha_vm.status()["locks"].values()) == {"alpha"}
    assert guest_answers(alpha_vm)
    # The refusal and the failed migration are counted where they happened.
    beta_seen = scrape_until(c.hosts["beta"].settings.metrics_port, {series(
        "fcq_operation_duration_seconds_count", host="beta", operation="inmigrate",
        result="rejected", outcome="MemoryLimitExceeded"): 1})
    assert value(beta_seen, "fcq_admission_refusals_total", host="beta", reason="memory") == 1
    assert value(beta_seen, "fcq_operation_duration_seconds_count", host="beta",
                 operation="inmigrate", result="rejected", outcome="MemoryLimitExceeded") == 1
    alpha_seen = scrape_until(c.hosts["alpha"].settings.metrics_port, {series(
        "fcq_migrations_total", host="alpha", outcome="failed"): 1})
    # Exported at 0 from the start (known outcomes are), not merely missing.
    assert value(alpha_seen, "fcq_migrations_total", host="alpha", outcome="migrated") == 0


def converged(c: Cluster) -> str | None:
    """The one host running vm01 with all its locks, after a sweep of every host."""
    c.fcq("-q", "ensure", "--all", "--timeout", "120")
    procs = where(c)
    if sum(procs.values()) != 1:
        return None
    host = next(n for n, k in procs.items() if k == 1)
    status = c.hosts[host].agent("vm01").status()
    if status["status"] != "running" or set(status["locks"].values()) != {host}:
        return None
    return host


def start_slow_migration(c: Cluster) -> str:
    """Start vm01's migration alpha → beta and return once the memory copy runs."""
    orch = c.orchestrator()
    task_id = orch.migrate("vm01", "beta")
    client = c.redis.client()
    wait_for(lambda: any(True for _ in client.scan_iter("fcq:mig:vm01:*:addr")), 60,
             "the destination to publish its address")
    wait_for(lambda: c.hosts["beta"].agent("vm01").paths.pidfile.exists(), 10, "beta's QEMU")
    import time
    time.sleep(1.0)  # the copy is running now (bandwidth is limited to 16 Mbit/s)
    return task_id


SLOW = {"migration_bandwidth_mbps": 16}


def test_fault_destination_qemu_killed(make_cluster: ClusterFactory) -> None:
    """kill -9 of beta's incoming QEMU mid-copy: vm01 keeps running on alpha."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    for proc in c.hosts["beta"].qemu_processes():
        proc.kill()
    assert wait_for(lambda: converged(c), 120, "one running copy") == "alpha"
    assert guest_answers(c.hosts["alpha"].agent("vm01"))


def test_fault_source_qemu_killed(make_cluster: ClusterFactory) -> None:
    """kill -9 of alpha's QEMU mid-copy: beta gives up, one sweep later one copy runs."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    for proc in c.hosts["alpha"].qemu_processes():
        proc.kill()
    assert wait_for(lambda: converged(c), 120, "one running copy") in ("alpha", "beta")


def test_fault_destination_worker_killed(make_cluster: ClusterFactory) -> None:
    """kill -9 of beta's worker mid-copy: alpha cancels, vm01 stays on alpha."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    beta_worker = next(s for s in c.services if s.name == "worker@beta")
    c.kill9(beta_worker)
    c.worker("beta")
    assert wait_for(lambda: converged(c), 120, "one running copy") == "alpha"


def test_fault_source_worker_killed(make_cluster: ClusterFactory) -> None:
    """kill -9 of alpha's worker mid-copy: QEMU may finish the copy, but the
    destination never runs the guest without the source's word; one sweep later one
    copy runs, and never two at any time."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    alpha_worker = next(s for s in c.services if s.name == "worker@alpha")
    c.kill9(alpha_worker)
    c.worker("alpha")

    def never_two_running() -> str | None:
        running = [n for n, h in c.hosts.items() if h.agent("vm01").status()["status"]
                   == "running"]
        assert len(running) <= 1, running
        return converged(c)
    assert wait_for(never_two_running, 150, "one running copy") in ("alpha", "beta")


def test_pushing_a_new_kvm_host_migrates_the_vm(make_cluster: ClusterFactory) -> None:
    """apply-config with kvm_host: beta is all it takes: alpha's ensure asks the
    controller (hosts never send each other work), which starts the migration."""
    c = shared_pair(make_cluster)
    src = c.hosts["alpha"].base / "moved" / "vm01.cfg"
    src.parent.mkdir()
    src.write_text((c.hosts["alpha"].settings.vm_config_dir / "vm01.cfg").read_text()
                   .replace("kvm_host: alpha", "kvm_host: beta"))
    cli = c.fcq("apply-config", str(src))
    assert "waiting for alpha to hand it over" in cli.stdout, cli.stdout + cli.stderr

    def on_beta() -> bool:
        return where(c) == {"alpha": 0, "beta": 1} and \
            c.hosts["beta"].agent("vm01").status()["status"] == "running"
    # The first ensure may run before beta's heartbeat lists the new config;
    # alpha's next sweep then asks again.
    c.spawn("beat")
    wait_for(on_beta, 90, "vm01 to move to beta")
    assert guest_answers(c.hosts["beta"].agent("vm01"))
    assert "move-requested" in events(c.hosts["alpha"])


def test_abort_rolls_back_to_the_source(make_cluster: ClusterFactory) -> None:
    """fcq migrate --abort mid-copy: both halves stop, vm01 runs on alpha only."""
    c = shared_pair(make_cluster, **SLOW)
    task_id = start_slow_migration(c)
    cli = c.fcq("migrate", "--abort", "vm01")
    assert cli.returncode == 0 and "abort requested" in cli.stdout
    with pytest.raises(FcqError, match="abort"):
        c.orchestrator().wait(task_id, timeout=60)
    assert wait_for(lambda: converged(c), 60, "one running copy") == "alpha"
    assert guest_answers(c.hosts["alpha"].agent("vm01"))


def test_second_migration_refused_while_one_runs(make_cluster: ClusterFactory) -> None:
    """At most one attempt per VM: a second `fcq migrate` is refused (exit 4)."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    cli = c.fcq("migrate", "vm01", "--to", "beta")
    assert cli.returncode == 4 and "already in flight" in cli.stderr
    c.fcq("migrate", "--abort", "vm01")
    assert wait_for(lambda: converged(c), 60, "one running copy") == "alpha"


def test_fault_redis_restart_mid_copy(make_cluster: ClusterFactory) -> None:
    """Redis restarts during the copy: one sweep later vm01 runs on exactly one host."""
    c = shared_pair(make_cluster, **SLOW)
    start_slow_migration(c)
    c.redis.restart()
    c.wait_registered("alpha")
    c.wait_registered("beta")
    assert wait_for(lambda: converged(c), 150, "one running copy") in ("alpha", "beta")


def test_migration_limit_per_host(make_cluster: ClusterFactory) -> None:
    """max_migrations 1: a second VM's migration from the same host is refused while
    the first copies; that VM stays where it runs."""
    c = shared_pair(make_cluster, **SLOW)
    for h in c.hosts.values():
        h.write_vm("vm02", kvm_host="alpha", memory=128, nics=[{"srv": "02-00-00-00-00-02"}])
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm02", host="alpha"), timeout=120)
    wait_for(lambda: "vm02" in orch.hosts()["alpha"]["running"], 30, "vm02 in the registry")
    # The orchestrator refuses a destination whose record lacks the VM's
    # config: wait for beta's next heartbeat to list vm02 (seen missing on a
    # loaded machine, where the refusal was "beta has no config for vm02").
    wait_for(lambda: "vm02" in orch.hosts()["beta"]["vms"], 30, "vm02 in beta's record")
    start_slow_migration(c)
    with pytest.raises(FcqError, match="already runs 1 migration"):
        orch.wait(orch.migrate("vm02", "beta"), timeout=120)
    assert c.hosts["alpha"].agent("vm02").status()["status"] == "running"
    assert len(c.hosts["beta"].qemu_processes()) <= 1  # only vm01's incoming copy


def test_a_migration_ends_when_the_controller_comes(make_cluster: ClusterFactory) -> None:
    """The chord's callback waits in the controller's queue while no controller
    runs (hosts send it without declaring the queue: the orchestrator bound it),
    and the migration is recorded once one starts."""
    c = shared_pair(make_cluster)
    controller = c.controller()
    c.kill9(controller)
    c.services.remove(controller)
    orch = c.orchestrator()
    task = orch.migrate("vm01", "beta")
    wait_for(lambda: where(c) == {"alpha": 0, "beta": 1}, 120, "vm01 to move to beta")
    wait_for(lambda: c.redis.client().llen("fcq.controller") == 1, 30,
             "the callback to wait in the controller's queue")
    assert orch.state(task)[0] == "PENDING"
    c.controller()
    assert orch.wait(task, timeout=120)["outcome"] == "migrated"
