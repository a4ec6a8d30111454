"""QEMU never lives in the worker's cgroup: killing the worker's whole cgroup
(what systemd does to a service on stop or restart, KillMode=control-group)
leaves every guest running, and the next worker takes them over as they are.

Real cgroups: the worker runs in a cgroup v2 group of its own and is killed
through that group's ``cgroup.kill``, as systemd kills a service.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from fcq_tasks.hazmat import scope
from tests.cluster import Cluster
from tests.helpers import wait_for, wait_guest

ClusterFactory = Any

UNIFIED = next((h for h in scope.hierarchies() if (h / "cgroup.kill").exists()
                or (h / "cgroup.controllers").exists()), None)


def test_this_machine_has_a_cgroup_v2_tree() -> None:
    """Not a skip: CI machines are Debian 12, which mounts one; say so if not."""
    assert UNIFIED is not None, f"no cgroup v2 hierarchy under {scope.CGROUP_ROOT}"


def test_killing_the_workers_cgroup_spares_the_guests(make_cluster: ClusterFactory) -> None:
    assert UNIFIED is not None
    service_group = UNIFIED / f"fcq-test-worker-{secrets.token_hex(3)}"
    service_group.mkdir()
    try:
        c: Cluster = make_cluster(("alpha",))
        alpha = c.hosts["alpha"]
        alpha.write_vm("vm01")
        alpha.write_vm("vm02", nics=[{"srv": "02-00-00-00-00-02"}])
        worker = c.spawn("worker", "alpha")
        (service_group / "cgroup.procs").write_text(f"{worker.proc.pid}\n")  # the service
        c.wait_registered("alpha")
        orch = c.orchestrator()
        for vm in ("vm01", "vm02"):
            assert orch.wait(orch.submit("start", vm), timeout=120)["status"] == "running"
        pids = {vm: alpha.agent(vm).status()["pid"] for vm in ("vm01", "vm02")}
        for vm, pid in pids.items():
            groups = scope.cgroups_of(pid)
            assert f"/{scope.SLICE}/fcq-{vm}.scope" in groups, groups
            assert not any(g.startswith(f"/{service_group.name}") for g in groups), groups
        wait_guest(alpha.agent("vm01"))

        # systemd stops the service: every process in its cgroup, at once.
        (service_group / "cgroup.kill").write_text("1\n")
        worker.proc.wait(30)
        for pid in pids.values():
            os.kill(pid, 0)  # alive
        assert Path(service_group / "cgroup.procs").read_text().strip() == ""

        # The next worker finds them running: nothing restarted.
        c.worker("alpha")
        for vm, pid in pids.items():
            result = orch.wait(orch.submit("ensure", vm), timeout=120)
            assert result["status"] == "running" and "start" not in result["actions"], result
            assert alpha.agent(vm).status()["pid"] == pid
        wait_guest(alpha.agent("vm01"))
    finally:
        wait_for(lambda: _rmdir(service_group), 10, "the test's cgroup to empty")


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
