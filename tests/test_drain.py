"""fcq drain / undrain / evacuate: placement as a table, then real hosts and guests on Ceph.

Three worker hosts on one machine, each with its own run, config and state
directories and its own cephx identity; the VMs' disks are RBD images. A
sampler per VM watches, every 100 ms, that no guest ever runs on two hosts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psutil
import pytest

from fcq_tasks.cluster.drain import place
from fcq_tasks.errors import FcqError
from fcq_tasks.host.plan import Do, Observed, Run, plan
from tests.cluster import Cluster
from tests.helpers import guest_answers, wait_for, wait_guest
from tests.invariants import GuestSampler

ClusterFactory = Any
VISIBILITY = 200


def record(limit: int, booked: int = 0, vms: tuple[str, ...] = (), drained: bool = False,
           storage: str = "rbd") -> dict[str, Any]:
    return {"limit_mb": limit, "booked_mb": booked, "running": [], "storage": storage,
            "vms": {v: {"kvm_host": "alpha", "online": True, "memory_mb": 128} for v in vms},
            "drained": {"since": 1.0} if drained else None}


def test_placement_by_free_memory_largest_first() -> None:
    hosts = {"alpha": record(4096, 2000, ("a", "b", "c", "d")),
             "beta": record(1000, 0, ("a", "b", "c", "d")),
             "gamma": record(700, 0, ("a", "b", "c")),
             "delta": record(9000, 0, ("a", "b", "c", "d"), drained=True)}
    moves = {m.vm: m for m in place([("a", 600), ("b", 500), ("c", 300), ("d", 900)],
                                    "alpha", hosts)}
    # d (900) first onto beta (1000 free); a (600) onto gamma (700); b (500)
    # fits nowhere (100 and 100 left); c (300) nowhere either. delta is drained.
    assert (moves["d"].dst, moves["a"].dst) == ("beta", "gamma")
    assert moves["b"].dst is None and "needs 500 MB" in moves["b"].reason
    assert moves["c"].dst is None and "100 MB" in moves["c"].reason
    assert "delta" not in {m.dst for m in moves.values()}


def test_placement_prefers_the_host_the_config_names() -> None:
    hosts = {"alpha": record(4096, vms=("a",)), "beta": record(4096, vms=("a",)),
             "gamma": record(1000, vms=("a",))}
    assert place([("a", 128)], "alpha", hosts)[0].dst == "beta"  # most free
    assert place([("a", 128)], "alpha", hosts, preferred={"a": "gamma"})[0].dst == "gamma"
    # ... unless it has no room there.
    assert place([("a", 2000)], "alpha", hosts, preferred={"a": "gamma"})[0].dst == "beta"


def test_placement_reasons() -> None:
    hosts = {"alpha": record(4096), "beta": record(4096, vms=("known",)),
             "gamma": record(4096, vms=("known",), storage="local")}
    moves = {m.vm: m for m in place([("known", 128), ("unknown", 128)], "alpha", hosts)}
    assert moves["known"].dst == "beta"  # more free than gamma? equal: by name
    assert moves["unknown"].dst is None and "has its config" in moves["unknown"].reason
    fenced = {m.vm: m for m in place([("known", 128)], "alpha",
                                     {"alpha": record(1), "gamma": hosts["gamma"]},
                                     fencing=True)}
    assert fenced["known"].dst is None
    assert fenced["known"].reason == "no live host can fence it (storage local): gamma"
    assert place([("x", 1)], "alpha", {"alpha": record(1)})[0].reason == \
        "no other live host that is not drained"
    # A drain needs RBD on both sides, like an evacuation: refused in the plan,
    # before any half starts (local storage cannot live-migrate).
    to_local = place([("known", 128)], "alpha", {"alpha": record(1), "gamma": hosts["gamma"]})
    assert to_local[0].dst is None and to_local[0].reason == \
        "no live host can receive it by live migration (storage local): gamma"
    from_local = place([("known", 128)], "gamma", hosts)[0]
    assert from_local.dst is None and from_local.exit_code == 4
    assert from_local.reason.startswith("gamma keeps its VMs on local storage")


def test_drained_host_plans_no_start(make_host: Any) -> None:
    host = make_host("alpha")
    host.write_vm("vm01")
    spec = host.agent("vm01").spec()
    stopped = Observed(run=Run.STOPPED, lock_owners={"root": None, "swap": None, "tmp": None})
    assert [a.do for a in plan(spec, stopped, "alpha")] == [Do.START]
    acts = plan(spec, stopped, "alpha", drained=True)
    assert [a.do for a in acts] == [Do.NOTHING] and "drained" in acts[0].reason


def three_hosts(make_cluster: ClusterFactory) -> Cluster:
    c: Cluster = make_cluster(names=("alpha", "beta", "gamma"), visibility_timeout=VISIBILITY,
                              storage="rbd")
    # Room for one 128 MB guest each on beta and gamma: placement must spread.
    for name in ("beta", "gamma"):
        c.hosts[name].update_settings(vm_max_total_memory=200)
    return c


def test_drain_moves_each_vm_once_and_reports_what_cannot_move(
        make_cluster: ClusterFactory) -> None:
    c = three_hosts(make_cluster)
    alpha = c.hosts["alpha"]
    for vm in ("vm01", "vm02"):
        for h in c.hosts.values():
            h.write_vm(vm, kvm_host="alpha")
    alpha.write_vm("vm03", kvm_host="alpha")  # nobody else has its config
    for name in c.hosts:
        c.worker(name)
    orch = c.orchestrator()
    for vm in ("vm01", "vm02", "vm03"):
        orch.wait(orch.submit("start", vm), timeout=120)
        wait_guest(alpha.agent(vm))
    wait_for(lambda: len(orch.hosts()["alpha"]["running"]) == 3, 30, "three VMs on alpha")

    dry = c.fcq("--json", "drain", "alpha", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = {r["vm"]: r["to"] for r in json.loads(dry.stdout)}
    assert planned["vm03"] is None and {planned["vm01"], planned["vm02"]} == {"beta", "gamma"}
    assert not orch.hosts()["alpha"]["drained"]  # a dry run marks nothing

    samplers = [GuestSampler(c, vm) for vm in ("vm01", "vm02", "vm03")]
    for s in samplers:
        s.start()
    try:
        out = c.fcq("--json", "drain", "alpha", timeout=400)
    finally:
        for s in samplers:
            s.stop()
    assert out.returncode == 4, out.stderr  # not emptied: vm03 had nowhere to go
    summary = json.loads(out.stdout)
    rows = {r["vm"]: r for r in summary["vms"]}
    assert (summary["moved"], summary["still_running"]) == (2, ["vm03"])
    assert {rows["vm01"]["to"], rows["vm02"]["to"]} == {"beta", "gamma"}
    assert rows["vm03"]["outcome"] == "unplaced" and "config" in rows["vm03"]["reason"]
    for vm in ("vm01", "vm02"):
        dst = c.hosts[rows[vm]["to"]]
        assert guest_answers(dst.agent(vm))
        assert dst.agent(vm).spec().kvm_host == dst.name
    assert guest_answers(alpha.agent("vm03"))  # left running where it was
    for s in samplers:
        s.assert_never_twice()
        # Moved once: where the guest ran went alpha, then (if moved) its
        # destination, and never back or on to a third host.
        where: list[tuple[str, ...]] = []
        for sample in s.snapshot():
            if sample.running and (not where or where[-1] != sample.running):
                where.append(sample.running)
        dst = rows[s.vm]["to"]
        assert where == ([("alpha",), (dst,)] if rows[s.vm]["outcome"] == "moved"
                         else [("alpha",)]), where
    # Admission respected: no host ran more than its limit allows.
    for name in ("beta", "gamma"):
        assert len(c.hosts[name].qemu_processes()) == 1

    # Drained: alpha starts nothing and receives nothing; undrain lifts it.
    stop = c.fcq("stop", "vm03")
    assert stop.returncode == 0, stop.stderr
    refused = c.fcq("start", "vm03")
    assert refused.returncode == 4 and "drained for maintenance" in refused.stderr
    back = c.fcq("migrate", "vm01", "--to", "alpha")
    assert back.returncode == 4 and "drained" in back.stderr
    hosts = c.fcq("hosts")
    assert "alpha" in hosts.stdout and "yes" in hosts.stdout.split("alpha", 1)[1].splitlines()[0]
    assert c.fcq("undrain", "alpha").returncode == 0
    started = c.fcq("start", "vm03")
    assert started.returncode == 0, started.stderr
    wait_guest(alpha.agent("vm03"))


def resume(pids: list[int]) -> None:
    for pid in pids:
        if pid < 0:
            os.killpg(-pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGCONT)


def test_evacuate_fences_a_hung_host_then_starts_its_vms_elsewhere(
        make_cluster: ClusterFactory, ceph: Any) -> None:
    c: Cluster = make_cluster(visibility_timeout=VISIBILITY, storage="rbd")
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_guest(alpha.agent("vm01"))

    alive = c.fcq("evacuate", "alpha")
    assert alive.returncode == 4 and "heartbeat" in alive.stderr
    assert len(beta.qemu_processes()) == 0

    old_qemu = alpha.qemu_processes()[0].pid
    # First only alpha's worker hangs: its heartbeat ends, but its QEMU runs
    # on and keeps its watch on the images, a sign of life that refuses.
    worker = next(s for s in c.services if s.name == "worker@alpha")
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    pids = [-worker.proc.pid]
    try:
        wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to expire")
        wait_for(lambda: not beta.agent("vm01").storage.host_watchers("alpha"), 60,
                 "alpha's host watch to lapse")
        dry = c.fcq("--json", "evacuate", "alpha", "--dry-run", host="beta")
        assert dry.returncode == 0 and json.loads(dry.stdout)["to"] == "beta", dry.stdout
        early = c.fcq("evacuate", "alpha", host="beta", timeout=300)
        # The refusal says whose the watch is: alpha's QEMU, noted at its start.
        assert "alpha's QEMU, noted at its start" in early.stderr, early.stderr
        assert early.returncode == 4 and "images are still watched" in early.stderr, \
            early.stderr
        assert not beta.qemu_processes()
        assert guest_answers(alpha.agent("vm01"))  # untouched, not fenced
        # Now the whole host hangs: its QEMU's watch lapses (5 s on the
        # test cluster, ~30 s by default), and evacuation goes ahead.
        os.kill(old_qemu, signal.SIGSTOP)
        pids.append(old_qemu)
        wait_for(lambda: not beta.agent("vm01").storage.other_watchers("vm01"), 90,
                 "alpha's watch to lapse")
        out = c.fcq("--json", "evacuate", "alpha", host="beta", timeout=300)
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout)["vms"][0]
        assert (row["vm"], row["outcome"], row["to"]) == ("vm01", "evacuated", "beta")
        # Every lock broken was alpha's, after its writers were blocklisted.
        assert row["fenced"] and set(row["fenced"].values()) == {"alpha"}, row
        assert ceph.blocklist(), "nothing was blocklisted"
        wait_guest(beta.agent("vm01"))
        assert beta.agent("vm01").spec().kvm_host == "beta"
        # Again, and the same message delivered twice: nothing more happens.
        again = c.fcq("--json", "evacuate", "alpha", host="beta")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["vms"] == []  # no live config names alpha now
        assert "nothing to evacuate" in c.fcq("evacuate", "alpha", host="beta").stdout
        replay = orch.wait(orch._vm_task("fcq.evacuate", "evacuate", "vm01", "beta",
                                         dead="alpha"), timeout=60)
        assert (replay["outcome"], replay["status"], replay["fenced"]) == \
            ("here", "running", {})
        assert len(beta.qemu_processes()) == 1
    finally:
        resume(pids)
    # alpha wakes up fenced: its fence watch finds its QEMU's clients on the
    # blocklist and kills the stale copy (which could not write meanwhile),
    # without waiting for a sweep; its ensure then refuses to start vm01.
    c.wait_registered("alpha")
    wait_for(lambda: not psutil.pid_exists(old_qemu) or
             psutil.Process(old_qemu).status() == psutil.STATUS_ZOMBIE, 60,
             "alpha's fenced QEMU to be killed")
    log = alpha.settings.log_file.read_text()  # type: ignore[union-attr]
    assert "fenced-guest-killed" in log
    ensure = c.fcq("ensure", "vm01", "--host", "alpha")
    assert ensure.returncode == 4 and "locked by host beta" in ensure.stderr, ensure.stderr
    assert not alpha.qemu_processes()
    assert guest_answers(beta.agent("vm01"))


def test_evacuate_refuses_where_locks_cannot_be_fenced(make_cluster: ClusterFactory) -> None:
    """Local storage: the dead host's disks cannot be fenced; nothing starts elsewhere."""
    c: Cluster = make_cluster()
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha")
    worker = c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    c.kill9(worker)  # its QEMU keeps running: exactly why nothing may start elsewhere
    wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to expire")
    out = c.fcq("--json", "evacuate", "alpha", host="beta")
    assert out.returncode == 4, out.stderr
    row = json.loads(out.stdout)["vms"][0]
    assert row["outcome"] == "unplaced" and "fence" in row["reason"]
    # And the host-side rule holds for a request made by hand.
    job = orch._vm_task("fcq.evacuate", "evacuate", "vm01", "beta", dead="alpha")
    with pytest.raises(FcqError, match="cannot fence"):
        orch.wait(job, timeout=60)
    time.sleep(1)
    assert len(beta.qemu_processes()) == 0
    assert guest_answers(alpha.agent("vm01"))
