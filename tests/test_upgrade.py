"""In-place upgrade onto a fresh QEMU with the real guest: no reboot, never two copies.

The QEMU binary is the same file in these tests; what changes is the host's
``qemu_generation``, which is what fcq acts on. The sampler asks both QEMUs
of the VM (the old one at the VM's run files, the new one under ``u/``)
through their observer monitors every 100 ms: at most one may say running.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil
import pytest

from fcq_tasks.host.agent import VMAgent
from tests.ceph import CephCluster
from tests.conftest import Host, HostFactory, rbd_settings
from tests.helpers import guest_sh, wait_for, wait_guest
from tests.invariants import NOT_ANSWERING, probe_runstate


def vm_name(tag: str) -> str:
    return f"upg{tag}{os.getpid() % 1000}"


def side_files(host: Host, vm: str, suffix: str) -> list[Path]:
    """The files of upgrade attempts of *vm* under u/ ending in *suffix*."""
    digest = hashlib.sha256(vm.encode()).hexdigest()[:16]
    side = host.settings.run_dir / "u"
    return sorted(side.glob(f"{digest}-*{suffix}")) if side.exists() else []


def qemus(host: Host, vm: str) -> list[psutil.Process]:
    """Live QEMUs reading the VM's config (both copies do during an upgrade)."""
    cfg = str(host.settings.run_dir / f"{vm}.cfg")
    return [p for p in host.qemu_processes() if cfg in p.cmdline()]


class CopySampler(threading.Thread):
    """Every 100 ms: how many of the VM's QEMUs on this host say "running"."""

    def __init__(self, host: Host, vm: str) -> None:
        super().__init__(daemon=True)
        self.host = host
        self.vm = vm
        self.counts: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sockets = [self.host.settings.run_dir / f"{self.vm}.obs.sock",
                       *side_files(self.host, self.vm, ".obs.sock")]
            states = [probe_runstate(s, self.vm, 0.3) if s.exists() else NOT_ANSWERING
                      for s in sockets]
            self.counts.append(sum(s == "running" for s in states))
            self._halt.wait(0.1)

    def __enter__(self) -> CopySampler:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._halt.set()
        self.join(10)


def uptime(agent: VMAgent) -> float:
    return float(guest_sh(agent, "cut -d' ' -f1 /proc/uptime").split()[0])


def booted(host: Host, vm: str) -> VMAgent:
    host.write_vm(vm)
    agent = host.agent(vm)
    agent.start()
    wait_guest(agent)
    return agent


def test_upgrade_moves_the_guest_without_a_reboot(make_host: HostFactory) -> None:
    host = make_host("alpha", qemu_generation=1)
    vm = vm_name("a")
    agent = booted(host, vm)
    guest_sh(agent, "echo kept > /tmp/marker")
    old_pid = agent.process().pid  # type: ignore[union-attr]
    before = uptime(agent)
    host.update_settings(qemu_generation=2)
    listed = json.loads(host.fcq("--json", "ls", check=True).stdout)
    assert listed["generation"] == 1 and listed["generation_behind"] is True
    assert "1*" in host.fcq("ls", check=True).stdout
    with CopySampler(host, vm) as sampler:
        result = json.loads(host.fcq("--json", "upgrade", vm, check=True).stdout)
        time.sleep(0.5)
    assert result["outcome"] == "upgraded" and result["from_generation"] == 1
    assert result["generation"] == 2 and result["old_pid"] == old_pid
    assert max(sampler.counts) == 1 and len(sampler.counts) >= 5, sampler.counts
    agent = host.agent(vm)
    wait_guest(agent)
    assert uptime(agent) > before  # the same boot, still counting
    assert guest_sh(agent, "cat /tmp/marker").startswith("kept")
    status = agent.status()
    assert status["pid"] != old_pid and status["generation"] == 2
    assert not status["generation_behind"]
    assert [p.pid for p in qemus(host, vm)] == [status["pid"]]
    assert set(status["locks"].values()) == {"alpha"}
    assert agent.spec().kvm_host == "alpha"
    assert str(agent.paths.qmp) in agent.paths.config.read_text()
    assert not list((host.settings.run_dir / "u").iterdir())
    # The guest can tell: the next ensure tells it both generations.
    agent.ensure()
    assert guest_sh(agent, "cat /run/qemu-binary-generation-booted "
                    "/run/qemu-binary-generation-current").split()[:2] == ["2", "2"]
    again = json.loads(host.fcq("--json", "upgrade", vm, check=True).stdout)
    assert again["outcome"] == "current" and again["actions"] == []
    # A second upgrade starts from a QEMU that came from the first one (its
    # sockets were opened under u/): still no reboot.
    host.update_settings(qemu_generation=3)
    mid = uptime(agent)
    with CopySampler(host, vm) as sampler:
        third = json.loads(host.fcq("--json", "upgrade", vm, check=True).stdout)
        time.sleep(0.5)
    assert third["outcome"] == "upgraded" and third["generation"] == 3
    assert max(sampler.counts) == 1, sampler.counts
    agent = host.agent(vm)
    wait_guest(agent)
    assert uptime(agent) > mid
    assert guest_sh(agent, "cat /tmp/marker").startswith("kept")
    assert len(qemus(host, vm)) == 1 and agent.status()["generation"] == 3


def test_upgrade_on_rbd_keeps_locks_and_fencing_records(make_host: HostFactory,
                                                        ceph: CephCluster) -> None:
    """On Ceph both QEMUs have the images open for a moment; the lock never moves."""
    pool = ceph.new_pool()
    try:
        host = make_host("alpha", qemu_generation=1, **rbd_settings(ceph, "alpha", pool=pool))
        vm = vm_name("r")
        agent = booted(host, vm)
        guest_sh(agent, "echo kept > /tmp/marker")
        cookies = {v.name: v.cookie for v in agent.storage.volumes(vm)}
        watched_before = agent.storage.clients(vm)["root"]
        before = uptime(agent)
        host.update_settings(qemu_generation=2, upgrade_on_ensure=True)
        with CopySampler(host, vm) as sampler:
            result = host.agent(vm).ensure()  # the host setting asks ensure to do it
            time.sleep(0.5)
        assert "upgrade" in result["actions"], result
        assert max(sampler.counts) == 1, sampler.counts
        agent = host.agent(vm)
        wait_guest(agent)
        assert uptime(agent) > before
        assert guest_sh(agent, "cat /tmp/marker").startswith("kept")
        assert agent.status()["generation"] == 2 and len(qemus(host, vm)) == 1
        vols = agent.storage.volumes(vm)
        assert {v.lock_owner for v in vols} == {"alpha"}
        assert {v.name: v.cookie for v in vols} == cookies  # never released, never retaken
        # The new QEMU's clients are on record: a fence would cover them.
        watchers = agent.storage.clients(vm)["root"]
        # As many clients as before (the old QEMU's left), not the same ones.
        assert len(watchers) == len(watched_before) and watchers != watched_before
        record = json.loads(ceph.rados("-p", pool, "getomapval", f"fcq.writers.{vm}.root",
                                       "alpha", "/dev/stdout"))
        assert watchers - watched_before <= set(record["addrs"]), (watchers, record)
        agent.kill()
    finally:
        ceph.delete_pool(pool)


def test_upgrade_refused_without_memory_for_two_copies(make_host: HostFactory) -> None:
    host = make_host("alpha", qemu_generation=1, vm_max_total_memory=200)
    vm = vm_name("m")
    agent = booted(host, vm)
    pid = agent.process().pid  # type: ignore[union-attr]
    host.update_settings(qemu_generation=2)
    out = host.fcq("upgrade", vm)
    assert out.returncode == 4, out
    assert "vm_max_total_memory" in out.stderr and "both" in out.stderr
    assert [p.pid for p in qemus(host, vm)] == [pid]
    assert host.agent(vm).status()["status"] == "running"


def _wait_for_new_qemu(host: Host, vm: str) -> None:
    """Until the new QEMU answers on its observer: it is about to receive the copy."""
    def receiving() -> bool:
        return any(probe_runstate(sock, vm) == "inmigrate"
                   for sock in side_files(host, vm, ".obs.sock"))
    wait_for(receiving, 30, "the upgrade's new QEMU")


@pytest.mark.parametrize("victim", ["new", "old"])
def test_a_qemu_killed_during_the_upgrade_leaves_one_running_copy(make_host: HostFactory,
                                                                  victim: str) -> None:
    host = make_host("alpha", qemu_generation=1)
    vm = vm_name(victim[0])
    agent = booted(host, vm)
    old_pid = agent.process().pid  # type: ignore[union-attr]
    host.update_settings(qemu_generation=2)
    with CopySampler(host, vm) as sampler:
        proc = host.fcq_async("upgrade", vm)
        _wait_for_new_qemu(host, vm)
        new = [p for p in qemus(host, vm) if p.pid != old_pid]
        target = new[0].pid if victim == "new" else old_pid
        os.kill(target, signal.SIGKILL)
        proc.communicate(timeout=120)
        agent = host.agent(vm)
        wait_guest(agent)
        time.sleep(0.5)
    assert max(sampler.counts) <= 1, sampler.counts
    running = qemus(host, vm)
    assert len(running) == 1, running
    status = agent.status()
    assert status["status"] == "running" and status["pid"] == running[0].pid
    if victim == "new":
        assert proc.returncode != 0 and status["pid"] == old_pid  # the guest never moved
    assert not side_files(host, vm, ".json")
    assert set(status["locks"].values()) == {"alpha"}


def test_an_interrupted_upgrade_is_settled_by_the_next_ensure(make_host: HostFactory) -> None:
    host = make_host("alpha", qemu_generation=1)
    vm = vm_name("s")
    agent = booted(host, vm)
    host.update_settings(qemu_generation=2)
    with CopySampler(host, vm) as sampler:
        proc = host.fcq_async("upgrade", vm)
        _wait_for_new_qemu(host, vm)
        # Once the new QEMU is on record (a QEMU killed with its starter in
        # the milliseconds before that is found by its pidfile, and removed,
        # but not booked: the same holds for any start).
        wait_for(lambda: [p for p in side_files(host, vm, ".json")
                          if not p.name.endswith(".seed.json")], 30, "the new QEMU's identity")
        proc.kill()  # fcq dies; both QEMUs live on, the copy goes on by itself
        proc.communicate(timeout=30)
        time.sleep(1)
        # Both copies are booked while both live: no other start overcommits.
        memory = json.loads(host.fcq("--json", "memory", check=True).stdout)
        assert memory["booked_mb"] == 2 * 128, memory
        result = host.agent(vm).ensure()
        agent = host.agent(vm)
        wait_guest(agent)
        time.sleep(0.5)
    assert max(sampler.counts) <= 1, sampler.counts
    assert result["status"] == "running"
    running = qemus(host, vm)
    assert len(running) == 1 and agent.status()["pid"] == running[0].pid
    assert not [p for p in (host.settings.run_dir / "u").iterdir()]
