"""Refusals and warnings an operator gets at once, not after something started.

Real workers, real QEMU: a migration on local storage is refused before
either half runs; `fcq status` of an unknown VM and `fcq wait` of an
unknown task id exit 2 at once; a start against `online: false` and a
stop that had to force QEMU off say so.
"""

from __future__ import annotations

from typing import Any

from tests.cluster import Cluster
from tests.helpers import qmp, wait_for

ClusterFactory = Any


def test_migration_on_local_storage_is_refused_before_any_half(
        make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster()
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 in the registry")
    out = c.fcq("migrate", "vm01", "--to", "beta")
    assert out.returncode == 4, out.stdout + out.stderr
    assert "live migration needs RBD on both hosts" in out.stderr
    assert "Dependency" not in out.stderr
    assert not beta.qemu_processes() and len(alpha.qemu_processes()) == 1
    assert not c.redis.client().keys("fcq:mig:*")  # no attempt was claimed
    plan = c.fcq("drain", "alpha", "--dry-run")
    assert "alpha keeps its VMs on local storage" in plan.stdout, plan.stdout + plan.stderr
    drain = c.fcq("drain", "alpha")
    assert drain.returncode == 4 and "cannot live-migrate" in drain.stdout + drain.stderr
    assert not beta.qemu_processes() and len(alpha.qemu_processes()) == 1


def test_unknown_vm_and_unknown_task_exit_2_at_once(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(("alpha",))
    c.worker("alpha")
    status = c.fcq("status", "nosuchvm")
    assert status.returncode == 2 and "nosuchvm is unknown on alpha" in status.stderr
    # Celery calls any id it never heard of PENDING: fcq must not wait 30 minutes.
    waited = c.fcq("wait", "0b5e4e0c-0000-4000-8000-000000000000", "--timeout", "1800",
                   timeout=60)
    assert waited.returncode == 2 and "no task" in waited.stderr, waited.stderr


def test_start_offline_vm_and_forced_stop_say_so(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    alpha.update_settings(shutdown_grace=2)
    alpha.write_vm("vm01", online=False)
    c.worker("alpha")
    started = c.fcq("start", "vm01")
    assert started.returncode == 0, started.stderr
    assert "fcq: warning: vm01: its config says online: false" in started.stderr
    # A paused guest cannot hear the power button: the stop must force it off.
    qmp(alpha.agent("vm01"), "stop")
    stopped = c.fcq("stop", "vm01")
    assert stopped.returncode == 0, stopped.stderr
    assert "the guest ignored the power button for 2 s" in stopped.stderr, stopped.stderr
    assert not alpha.qemu_processes()
