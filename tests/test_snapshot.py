"""Snapshots with the real guest: freeze, snapshot, always thaw; retention; ensure's thaw.

The guest's /tmp is an xfs on its tmp volume: what fsfreeze freezes. Where a
test needs a freeze that takes seconds, the VM's bandwidth limit (bps) makes
flushing a few MB of dirty data slow, for real.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fcq_tasks.config.vmspec import parse_vm_data
from fcq_tasks.errors import BadRequest, GuestAgentError, GuestAgentTimeout, StorageError
from fcq_tasks.hazmat.guestagent import GuestAgent
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.snapshots import expired
from fcq_tasks.host.sweep import ensure_all
from fcq_tasks.storage import SnapshotInfo
from tests.ceph import CephCluster
from tests.conftest import Host, HostFactory, rbd_settings
from tests.helpers import events, guest_sh, qmp, stopped_with_volumes, wait_for, wait_guest

MiB = 2**20


def vm_name(tag: str) -> str:
    return f"snap{tag}{os.getpid() % 1000}"


def freeze_status(agent: VMAgent) -> str:
    with GuestAgent(str(agent.paths.ga), 10, agent.name) as ga:
        return ga.freeze_status()


def guards() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "fcq_tasks.hazmat.freezeguard" in " ".join(p.info["cmdline"] or [])]


def running(host: Host, vm: str, **params: Any) -> VMAgent:
    host.write_vm(vm, **params)
    agent = host.agent(vm)
    agent.start()
    wait_guest(agent)
    return agent


def writer_and_dirty_data(agent: VMAgent, dirty_mb: int) -> None:
    """A guest loop stamping /proc/uptime into /tmp/w.log every 50 ms, and unsynced data."""
    guest_sh(agent, "(while :; do cut -d' ' -f1 /proc/uptime >> /tmp/w.log; usleep 50000; "
             "done) </dev/null >/dev/null 2>&1 & sleep 1; "
             f"dd if=/dev/zero of=/tmp/big bs=1M count={dirty_mb} 2>/dev/null; echo ok")


def stamps(agent: VMAgent) -> list[float]:
    out = guest_sh(agent, "cat /tmp/w.log")
    return [float(x) for x in out.split() if x.replace(".", "").isdigit()]


def test_writes_block_during_the_freeze_and_complete_after(host: Host) -> None:
    # 1 MiB/s: the freeze has to flush the dirty MB first, so it lasts seconds.
    agent = running(host, vm_name("w"), bps=1 * MiB)
    writer_and_dirty_data(agent, dirty_mb=4)
    result = agent.snapshot("s1")
    assert result["outcome"] == "taken" and result["consistency"] == "filesystem"
    assert result["frozen"] is True and result["actions"] == ["freeze", "snapshot", "thaw"]
    assert freeze_status(agent) == "thawed"
    time.sleep(1)
    seen = stamps(agent)
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    widest = max(gaps)
    # The writer was held up while the file system froze (the flush) and
    # while it was frozen, then went on writing.
    blocked = (result["freeze_ms"] + result["frozen_ms"]) / 1000
    assert blocked > 0.5, result
    assert widest >= 0.7 * blocked, (widest, result)
    after = seen[gaps.index(widest) + 1:]
    assert len(after) >= 5, "the writer did not go on after the thaw"
    assert [s["name"] for s in agent.snapshots()["snapshots"]] == ["s1"]
    assert not guards()


def test_freeze_that_times_out_leaves_the_guest_thawed(host: Host) -> None:
    agent = running(host, vm_name("t"), bps=1 * MiB)
    host.update_settings(freeze_timeout=0.5)
    agent = host.agent(agent.name)
    writer_and_dirty_data(agent, dirty_mb=4)  # the flush alone takes seconds
    with pytest.raises(GuestAgentTimeout) as info:
        agent.snapshot("s1")
    assert "freeze_timeout" in info.value.message
    assert freeze_status(agent) == "thawed"
    assert agent.snapshots()["snapshots"] == []
    wait_for(lambda: not guards(), 30, "the freeze guard to exit")
    # And the guest writes again.
    before = len(stamps(agent))
    time.sleep(1)
    assert len(stamps(agent)) > before


def test_sigterm_mid_snapshot_leaves_the_guest_thawed(host: Host) -> None:
    agent = running(host, vm_name("k"), bps=1 * MiB)
    writer_and_dirty_data(agent, dirty_mb=4)
    proc = host.fcq_async("snapshot", agent.name, "s1")
    wait_for(lambda: "freeze" in events(host), 30, "fcq to start freezing")
    time.sleep(0.3)  # inside the freeze: it takes seconds at 1 MiB/s
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    wait_for(lambda: freeze_status(agent) == "thawed", 60, "the guest to be thawed")
    wait_for(lambda: not guards(), 60, "the freeze guard to exit")
    # All or nothing: no volume holds a snapshot the other lacks.
    names = [{s.name for s in agent.storage.snapshots(agent.name, v)} for v in ("root", "tmp")]
    assert names[0] == names[1]


def test_guard_thaws_when_the_snapshotting_process_is_killed(host: Host) -> None:
    """SIGKILL: no finally runs in fcq; the guard sees its pipe close and thaws."""
    agent = running(host, vm_name("9"), bps=1 * MiB)
    writer_and_dirty_data(agent, dirty_mb=4)
    proc = host.fcq_async("snapshot", agent.name, "s1")
    wait_for(lambda: "freeze" in events(host), 30, "the freeze")
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: freeze_status(agent) == "thawed", 60, "the guest to be thawed")
    wait_for(lambda: not guards(), 60, "the freeze guard to exit")
    # The next operation on the VM settles what the dead process left.
    marker = host.settings.run_dir / f"{agent.name}.snapshotting"
    assert marker.exists()
    assert host.agent(agent.name).ensure()["status"] == "running"
    assert not marker.exists()
    names = [{s.name for s in agent.storage.snapshots(agent.name, v)} for v in ("root", "tmp")]
    assert names[0] == names[1] == set()


def test_failed_snapshot_leaves_the_guest_thawed_and_nothing_half_made(
        make_host: HostFactory, ceph: CephCluster) -> None:
    pool = ceph.new_pool()
    try:
        alpha = make_host("alpha", **rbd_settings(ceph, "alpha", pool=pool))
        agent = running(alpha, vm_name("f"))
        assert agent.snapshot("s0")["consistency"] == "filesystem"
        # tmp may have one snapshot: s1 is made on root, then refused on
        # tmp (EDQUOT) for real, while the guest is frozen.
        ceph.rbd("snap", "limit", "set", f"{pool}/{agent.name}.tmp", "--limit", "1")
        with pytest.raises(StorageError):
            agent.snapshot("s1")
        assert freeze_status(agent) == "thawed"
        assert [s["name"] for s in agent.snapshots()["snapshots"]] == ["s0"]  # root's s1 undone
        assert not guards()
        assert guest_sh(agent, "echo still >> /tmp/after; cat /tmp/after").startswith("still")
        agent.kill()
    finally:
        ceph.delete_pool(pool)


def test_guest_without_agent(host: Host) -> None:
    agent = running(host, vm_name("n"))
    with GuestAgent(str(agent.paths.ga), 10, agent.name) as ga:
        ga.execute("guest-exec", path="/bin/sh", arg=["-c", "kill $(cat /run/qemu-ga.pid)"])
    wait_for(lambda: not qmp_agent_open(agent), 30, "the agent's port to close")
    t0 = time.monotonic()
    result = agent.snapshot("s1")
    assert time.monotonic() - t0 < host.settings.guest_agent_timeout
    assert result["outcome"] == "taken" and result["frozen"] is False
    assert result["consistency"] == "crash" and "no guest agent" in result["reason"]
    # Local volumes are copied: the guest is paused for the copy, then runs on.
    assert result["actions"] == ["pause", "snapshot", "resume"]
    assert agent.status()["status"] == "running"
    ensured = agent.ensure()  # no error, no thaw attempted
    assert ensured["status"] == "running" and "thaw" not in ensured["actions"]
    assert agent.status()["guest_agent"] is False


def qmp_agent_open(agent: VMAgent) -> bool:
    devices = qmp(agent, "query-chardev")
    return any(d["label"] == "ga" and d["frontend-open"] for d in devices)


def test_two_snapshots_on_one_vm_never_interleave(host: Host) -> None:
    agent = running(host, vm_name("i"), bps=1 * MiB)
    host.update_settings(operation_wait=120)
    writer_and_dirty_data(agent, dirty_mb=2)
    first = host.fcq_async("--json", "snapshot", agent.name, "one")
    second = host.fcq_async("--json", "snapshot", agent.name, "two")
    outs = [json.loads(p.communicate(timeout=180)[0]) for p in (first, second)]
    assert all(o["outcome"] == "taken" and o["frozen"] for o in outs), outs
    kinds = [e for e in events(host) if e in ("freeze", "thawed")]
    # Each freeze is followed by its own thaw before the next freeze starts.
    assert kinds == ["freeze", "thawed", "freeze", "thawed"], kinds


def test_names_lists_removal_and_same_name_twice(host: Host) -> None:
    vm = vm_name("c")
    agent = stopped_with_volumes(host, vm)  # a snapshot without a freeze
    bad = host.fcq("snapshot", vm, "a/b")
    assert bad.returncode == 2 and "snapshot" in bad.stderr and "'a/b'" in bad.stderr
    taken = json.loads(host.fcq("--json", "snapshot", vm, "before-upgrade", check=True).stdout)
    assert taken["consistency"] == "stopped" and taken["outcome"] == "taken"
    again = json.loads(host.fcq("--json", "snapshot", vm, "before-upgrade", check=True).stdout)
    assert again["outcome"] == "exists" and again["actions"] == []
    listed = json.loads(host.fcq("--json", "snapshot", "--list", vm, check=True).stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["before-upgrade"]
    assert set(listed["snapshots"][0]["volumes"]) == {"root", "tmp"}
    # The stopped VM's locks were taken for the copy and given back.
    assert all(v.lock_owner is None for v in agent.storage.volumes(vm))
    removed = json.loads(host.fcq("--json", "snapshot", "--remove", "before-upgrade", vm,
                                  check=True).stdout)
    assert removed["outcome"] == "removed"
    gone = json.loads(host.fcq("--json", "snapshot", "--remove", "before-upgrade", vm,
                               check=True).stdout)
    assert gone["outcome"] == "absent"
    assert host.fcq("snapshot", vm, "x", "--list").returncode == 2
    with pytest.raises(BadRequest):
        agent.remove_snapshot("../etc")


def test_retention_prunes_exactly_the_expired_auto_snapshots(host: Host) -> None:
    vm = vm_name("r")
    agent = stopped_with_volumes(host, vm)
    autos = [agent.snapshot()["snapshot"] for _ in range(4)]
    assert len(set(autos)) == 4 and all(a.startswith("auto-") for a in autos)
    agent.snapshot("by-hand")
    host.write_vm(vm, online=False, snapshot_keep=2)
    result = VMAgent(host.settings, vm).ensure()
    assert result["pruned"] == sorted(autos[:2])
    left = [s["name"] for s in agent.snapshots()["snapshots"]]
    assert left == [*autos[2:], "by-hand"]
    assert "pruned" not in VMAgent(host.settings, vm).ensure()  # nothing more to prune


def test_retention_rules_as_a_table() -> None:
    day = 86400.0
    now = 100 * day
    snaps = [SnapshotInfo(f"auto-{i}", 1, now - i * day) for i in range(6)] + [
        SnapshotInfo("manual", 1, now - 50 * day)]

    def spec(**p: Any) -> Any:
        return parse_vm_data({"name": "v", "parameters": {
            "id": 1, "resource_group": "g", "online": True, "disk": 1, "memory": 128,
            "cores": 1, **p}}, "<test>")
    assert expired(spec(), snaps, now) == []
    assert expired(spec(snapshot_keep=4), snaps, now) == ["auto-4", "auto-5"]
    assert expired(spec(snapshot_keep_days=2.5), snaps, now) == ["auto-3", "auto-4", "auto-5"]
    # Both: kept if either rule keeps it.
    assert expired(spec(snapshot_keep=1, snapshot_keep_days=2.5), snaps, now) == [
        "auto-3", "auto-4", "auto-5"]
    assert expired(spec(snapshot_keep=5, snapshot_keep_days=1.5), snaps, now) == ["auto-5"]


def test_frozen_guest_is_thawed_and_limits_put_back_by_the_next_sweep(host: Host) -> None:
    agent = running(host, vm_name("s"), iops=200)
    with GuestAgent(str(agent.paths.ga), 10, agent.name) as ga:
        assert ga.freeze() >= 1  # frozen by hand, behind fcq's back
    qmp(agent, "block_set_io_throttle", device="root", iops=7, bps=0, bps_rd=0, bps_wr=0,
        iops_rd=0, iops_wr=0)
    sweep = ensure_all(host.settings)
    actions = sweep["vms"][agent.name]["actions"]
    assert "thaw" in actions and "set-iops" in actions, actions
    assert freeze_status(agent) == "thawed"
    root = next(b for b in qmp(agent, "query-block") if b["device"] == "root")
    assert root["inserted"]["iops"] == 200
    assert ensure_all(host.settings)["vms"][agent.name]["actions"] == ["nothing"]


def test_freeze_guard_thaws_on_its_own_when_its_parent_stops(host: Host, tmp_path: Path) -> None:
    """SIGSTOP: the parent lives but is silent; the guard thaws after max_frozen."""
    import subprocess
    import sys
    agent = running(host, vm_name("p"))
    script = tmp_path / "freeze.py"
    script.write_text(
        "import sys, time\n"
        "from fcq_tasks.hazmat.freezeguard import FreezeGuard\n"
        "from fcq_tasks.hazmat.guestagent import AgentTimeouts\n"
        f"g = FreezeGuard({str(agent.paths.ga)!r}, 'x', AgentTimeouts(), max_frozen=2.0)\n"
        "g.__enter__(); g.freeze(); print('frozen', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "frozen"
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        # The guard holds the agent until it thawed and left, then we may ask.
        wait_for(lambda: not guards(), 30, "the guard to thaw and exit")
        assert time.monotonic() - t0 < 10
        assert freeze_status(agent) == "thawed"
    finally:
        proc.kill()
        proc.communicate()


def test_agent_sessions_exclude_each_other(host: Host) -> None:
    agent = running(host, vm_name("x"))
    with GuestAgent(str(agent.paths.ga), 10, agent.name) as ga:
        ga.ping()
        with pytest.raises(GuestAgentError) as info, \
                GuestAgent(str(agent.paths.ga), 0.5, agent.name) as other:
            other.ping()
        assert "another fcq process" in info.value.message
        ga.ping()  # the first session is undisturbed
