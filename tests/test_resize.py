"""Resize with the real guest, and the day-two tasks through the cluster (Celery, Redis)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import yaml

from fcq_tasks.config.vmspec import vm_file_version
from fcq_tasks.hazmat.guestagent import GuestAgent
from tests.cluster import Cluster
from tests.conftest import Host
from tests.helpers import (
    events,
    guest_disk_bytes,
    guest_sh,
    stopped_with_volumes,
    wait_for,
    wait_guest,
)

GiB = 2**30
ClusterFactory = Any


def vm_name(tag: str) -> str:
    return f"rsz{tag}{os.getpid() % 1000}"


def test_resize_is_seen_by_the_running_guest_and_never_shrinks(host: Host) -> None:
    vm = vm_name("a")
    path = host.write_vm(vm)
    agent = host.agent(vm)
    agent.start()
    wait_guest(agent)
    assert guest_disk_bytes(agent, "root") == 1 * GiB
    grown = json.loads(host.fcq("--json", "resize", vm, "2G", check=True).stdout)
    assert grown["actions"] == ["record-config", "grow", "tell-qemu"]
    assert guest_disk_bytes(agent, "root") == 2 * GiB
    # Recorded with a higher version: an older push of the file is ignored.
    assert yaml.safe_load(path.read_text())["parameters"]["disk"] == 2
    assert vm_file_version(path) == 1 == grown["version"]
    same = json.loads(host.fcq("--json", "resize", vm, "2", check=True).stdout)
    assert same["actions"] == [] and same["outcome"] == "unchanged"
    text, image = path.read_text(), host.settings.volume_dir / f"{vm}.root.raw"
    size = agent.storage.volumes(vm)[0].size
    shrink = host.fcq("resize", vm, "1")
    assert shrink.returncode == 4 and "never shrink" in shrink.stderr
    bad = host.fcq("resize", vm, "2.5T")
    assert bad.returncode == 2 and "SIZE" in bad.stderr
    assert path.read_text() == text and agent.storage.volumes(vm)[0].size == size
    assert guest_disk_bytes(agent, "root") == 2 * GiB
    assert image.exists() or size == 2 * GiB  # whatever the file is called, it did not shrink
    # ensure agrees with what resize did: nothing to grow, nothing refused.
    assert host.agent(vm).ensure()["actions"] == ["nothing"]


def test_resize_of_a_stopped_vm_grows_the_volume(host: Host) -> None:
    vm = vm_name("s")
    agent = stopped_with_volumes(host, vm)
    result = agent.resize(3)
    assert result["actions"] == ["record-config", "grow"] and result["status"] == "stopped"
    assert next(v.size for v in agent.storage.volumes(vm) if v.name == "root") == 3 * GiB


def test_day_two_tasks_through_the_cluster(make_cluster: ClusterFactory, tmp_path: Path) -> None:
    """snapshot, resize, jobs and an older push through real workers; SIGTERM mid-snapshot."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    vm = vm_name("c")
    old_file = alpha.write_vm(vm, bps=2**20)
    old_text = old_file.read_text()
    worker = c.worker("alpha")
    assert c.fcq("start", vm).returncode == 0
    agent = alpha.agent(vm)
    wait_guest(agent)
    snap = json.loads(c.fcq("--json", "snapshot", vm, "nightly").stdout)
    assert snap["outcome"] == "taken" and snap["consistency"] == "filesystem"
    listed = json.loads(c.fcq("--json", "snapshot", "--list", vm).stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["nightly"]
    grown = json.loads(c.fcq("--json", "resize", vm, "2").stdout)
    assert grown["version"] == 1 and guest_disk_bytes(agent, "root") == 2 * GiB
    shrink = c.fcq("resize", vm, "1")
    assert shrink.returncode == 4 and "never shrink" in shrink.stderr
    # The inventory pushes the file it had before the resize: ignored.
    pushed = tmp_path / f"{vm}.cfg"
    pushed.write_text(old_text)
    push = json.loads(c.fcq("--json", "apply-config", str(pushed)).stdout)
    assert push["outcome"] == "ignored", push
    assert yaml.safe_load(old_file.read_text())["parameters"]["disk"] == 2
    # The inventory raised its own copy to version 1 too, with the old disk:
    # the same number, another desired state. Refused, not applied: the
    # resize stays, and the message says what to push.
    clash = yaml.safe_load(old_text)
    clash["version"] = 1
    pushed.write_text(yaml.safe_dump(clash))
    refused = c.fcq("apply-config", str(pushed))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "version 1 too" in refused.stderr and "disk_gib 2 here, 1 pushed" in refused.stderr
    assert "push the file with version 2" in refused.stderr
    assert yaml.safe_load(old_file.read_text())["parameters"]["disk"] == 2
    # The same state at the same version (a push repeated) is still fine.
    pushed.write_text(old_file.read_text())
    again = json.loads(c.fcq("--json", "apply-config", str(pushed)).stdout)
    assert again["actions"][0] == "write-config" and again["status"] == "running", again
    jobs = json.loads(c.fcq("--json", "jobs", "--limit", "10").stdout)
    ops = {(j["op"], j["vm"], j["host"], j["state"]) for j in jobs}
    for op in ("snapshot", "snapshots", "resize"):
        assert (op, vm, "alpha", "SUCCESS") in ops, ops
    assert ("resize", vm, "alpha", "FAILURE") in ops
    # SIGTERM to the worker while a snapshot is frozen: a warm shutdown
    # finishes it (and thaws); the guest is never left frozen.
    guest_sh(agent, "dd if=/dev/zero of=/tmp/big bs=1M count=4 2>/dev/null; echo ok")
    orch = c.orchestrator()
    task_id = orch.snapshot(vm, "late")
    wait_for(lambda: "freeze" in events(alpha), 60, "the worker to start freezing")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    with GuestAgent(str(agent.paths.ga), 10, vm) as ga:
        assert ga.freeze_status() == "thawed"
    assert orch.state(task_id)[0] == "SUCCESS"
