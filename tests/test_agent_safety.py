"""Safety rules against real QEMU: memory admission, operation lock, locks, disks."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import pytest

from fcq_tasks.config.vmspec import GiB
from fcq_tasks.errors import (
    Inconsistent,
    LockedByOtherHost,
    MemoryLimitExceeded,
    Refused,
    ShrinkRefused,
    VMBusy,
)
from fcq_tasks.storage import LocalStorage
from tests.conftest import Host, HostFactory
from tests.helpers import qmp

#: A create-vm command that takes 2 s, so an operation is reliably in flight.
SLOW_CREATE_VM = [sys.executable, "-c",
                  "import sys, time; time.sleep(2); open(sys.argv[1], 'wb').truncate("
                  "int(sys.argv[2]))", "{path}", "{size_bytes}"]


def test_memory_limit_refuses_start_and_changes_nothing(make_host: HostFactory) -> None:
    """A start that would book more than vm_max_total_memory fails and starts nothing."""
    host = make_host(vm_max_total_memory=200)
    host.write_vm("vm01", memory=128)
    host.write_vm("vm02", memory=128)
    host.agent("vm01").ensure()
    vm02 = host.agent("vm02")
    with pytest.raises(MemoryLimitExceeded) as info:
        vm02.ensure()
    assert info.value.fields == {"vm": "vm02", "wanted_mb": 128, "booked_mb": 128,
                                 "limit_mb": 200}
    assert vm02.status()["status"] == "stopped"
    assert all(v.lock_owner is None for v in vm02.storage.volumes("vm02"))
    assert len(host.qemu_processes()) == 1
    # Once vm01 is gone the memory is free again.
    host.agent("vm01").kill()
    assert vm02.ensure()["status"] == "running"


def test_concurrent_ensures_one_acts_one_busy(make_host: HostFactory) -> None:
    """Two `fcq ensure` processes on one VM: one starts it, the other exits 3 (busy)."""
    host = make_host(create_vm=SLOW_CREATE_VM)
    host.write_vm("vm01")
    first = host.fcq_async("ensure", "vm01")
    host.wait_for_oplock_holder("vm01")
    second = host.fcq("ensure", "vm01")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "did start" in out
    assert second.returncode == 3 and "busy" in second.stderr
    assert len(host.qemu_processes()) == 1


def test_concurrent_threads_collapse(make_host: HostFactory) -> None:
    """Two threads of one process (as in the Celery threads pool) never interleave."""
    host = make_host(create_vm=SLOW_CREATE_VM)
    host.write_vm("vm01")
    outcomes: list[Any] = []

    def run() -> None:
        try:
            outcomes.append(host.agent("vm01").ensure()["actions"])
        except VMBusy as err:
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    time.sleep(0.5)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, outcomes)) == ["VMBusy", "['start']"]
    assert len(host.qemu_processes()) == 1


def test_operation_wait_lets_second_operation_follow(make_host: HostFactory) -> None:
    """With operation_wait set, the second ensure waits its turn and then finds nothing to do."""
    host = make_host(create_vm=SLOW_CREATE_VM, operation_wait=30)
    host.write_vm("vm01")
    first = host.fcq_async("ensure", "vm01")
    host.wait_for_oplock_holder("vm01")
    second = host.fcq("ensure", "vm01")
    first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0
    assert "did nothing" in second.stdout


def test_root_grows_online(host: Host) -> None:
    """A bigger disk in the config grows the running VM's root; QEMU sees the new size."""
    host.write_vm("vm01", disk=1)
    agent = host.agent("vm01")
    agent.ensure()
    host.write_vm("vm01", disk=2)
    result = agent.ensure()
    assert result["actions"] == ["grow-root"]
    root = next(b for b in qmp(agent, "query-block") if b["device"] == "root")
    assert root["inserted"]["image"]["virtual-size"] == 2 * GiB
    assert agent.status()["root_bytes"] == 2 * GiB


def test_root_grows_while_stopped(host: Host) -> None:
    """A stopped VM's root grows before QEMU starts."""
    host.write_vm("vm01", disk=1)
    agent = host.agent("vm01")
    agent.ensure()
    agent.kill()
    host.write_vm("vm01", disk=3)
    agent.ensure()
    assert agent.status()["root_bytes"] == 3 * GiB


def test_shrink_refused(host: Host) -> None:
    """A smaller disk in the config is refused with exit code 4; disk and VM untouched."""
    host.write_vm("vm01", disk=2)
    agent = host.agent("vm01")
    agent.ensure()
    host.write_vm("vm01", disk=1)
    with pytest.raises(ShrinkRefused) as info:
        agent.ensure()
    assert info.value.fields["current_bytes"] == 2 * GiB
    assert agent.status()["root_bytes"] == 2 * GiB
    assert agent.status()["status"] == "running"
    cli = host.fcq("ensure", "vm01")
    assert cli.returncode == 4 and "never shrink" in cli.stderr


def test_start_refused_while_another_host_holds_locks(make_host: HostFactory) -> None:
    """alpha never starts a VM whose volume lock names beta, and takes no lock itself."""
    alpha = make_host("alpha")
    beta = make_host("beta", state_dir=str(alpha.settings.state_dir))
    alpha.write_vm("vm01")
    LocalStorage(beta.settings).lock("vm01", "root")
    agent = alpha.agent("vm01")
    with pytest.raises(LockedByOtherHost) as info:
        agent.ensure()
    assert info.value.owner == "beta"
    assert alpha.qemu_processes() == []
    assert {v.name: v.lock_owner for v in agent.storage.volumes("vm01")} == {
        "root": "beta", "swap": None, "tmp": None}


def test_split_brain_pauses_guest(make_host: HostFactory) -> None:
    """Running here while another host holds the lock: the guest is paused and reported."""
    alpha = make_host("alpha")
    beta = make_host("beta", state_dir=str(alpha.settings.state_dir))
    alpha.write_vm("vm01")
    agent = alpha.agent("vm01")
    agent.ensure()
    storage = LocalStorage(beta.settings)
    storage.force_unlock("vm01", "root")
    storage.lock("vm01", "root")
    with pytest.raises(Inconsistent, match="split brain"):
        agent.ensure()
    assert qmp(agent, "query-status")["status"] == "paused"
    # A second sweep keeps it paused and keeps reporting; it never resumes it.
    with pytest.raises(Inconsistent):
        agent.ensure()
    assert qmp(agent, "query-status")["status"] == "paused"


def test_config_for_other_host_reports_outmigration(make_host: HostFactory) -> None:
    """kvm_host changed to another host while running here: reported, VM keeps running."""
    host = make_host("alpha")
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    host.write_vm("vm01", kvm_host="beta")
    result = agent.ensure()
    assert result["actions"] == ["outmigrate"] and result["status"] == "running"


def test_start_refused_for_vm_of_other_host(host: Host) -> None:
    """`start` will not run a VM whose config names another host."""
    host.write_vm("vm01", kvm_host="beta")
    with pytest.raises(Refused, match="host beta"):
        host.agent("vm01").start()
    assert host.qemu_processes() == []


def test_force_unlock(make_host: HostFactory) -> None:
    """force-unlock breaks another host's stale locks, but not while the VM runs here."""
    alpha = make_host("alpha")
    beta = make_host("beta", state_dir=str(alpha.settings.state_dir))
    alpha.write_vm("vm01")
    LocalStorage(beta.settings).lock("vm01", "root")
    agent = alpha.agent("vm01")
    assert agent.force_unlock()["broken"] == {"root": "beta"}
    agent.ensure()
    with pytest.raises(Refused, match="stop it before"):
        agent.force_unlock()
    assert agent.status()["locks"]["root"] == "alpha"


def test_sweep_isolates_failures(host: Host) -> None:
    """ensure --all converges good VMs even when another VM's config is broken."""
    host.write_vm("vm01")
    bad = host.write_vm("vm02")
    bad.write_text(bad.read_text().replace("memory: 128", "memory: lots"))
    cli = host.fcq("--json", "ensure", "--all")
    assert cli.returncode == 2  # the worst VM's code: a config error
    assert "vm02" in cli.stdout and "parameters.memory" in cli.stdout
    assert host.agent("vm01").status()["status"] == "running"




def test_restart_refused_before_anything_stops(host: Host) -> None:
    """restart of a VM whose config moved to another host refuses without stopping it."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    pid = agent.status()["pid"]
    host.write_vm("vm01", kvm_host="beta")
    with pytest.raises(Refused):
        agent.restart()
    assert agent.status()["pid"] == pid and agent.status()["status"] == "running"


def test_qemu_known_only_by_pidfile_is_adopted(host: Host) -> None:
    """A worker that died before recording QEMU's identity: ensure adopts the process,
    so its memory is booked and it counts as running here."""
    host.write_vm("vm01", memory=128)
    agent = host.agent("vm01")
    agent.ensure()
    pid = agent.status()["pid"]
    agent.paths.identity.unlink()
    result = agent.ensure()
    assert result["actions"] == ["nothing"]
    ident = agent.qemu.identity()
    assert ident is not None and (ident.pid, ident.memory_mb) == (pid, 128)
    assert host.fcq("--json", "memory", check=True).stdout.count('"vm01": 128') == 1


def test_sweep_exit_code_is_the_worst_refusal(host: Host) -> None:
    """A sweep whose only problem is a refused shrink exits 4 (refused), not 1."""
    host.write_vm("vm01", disk=2)
    host.agent("vm01").ensure()
    host.write_vm("vm01", disk=1)
    cli = host.fcq("ensure", "--all")
    assert cli.returncode == 4, cli.stdout + cli.stderr


def test_name_with_trailing_newline_is_refused(host: Host) -> None:
    """'vm01\\n' is not vm01: validation anchors at the very end."""
    host.write_vm("vm01")
    cli = host.fcq("start", "vm01\n")
    assert cli.returncode == 2
    assert sorted(p.name for p in host.settings.run_dir.iterdir()) == []


def test_sweep_skips_vm_with_operation_in_flight(make_host: HostFactory) -> None:
    """The sweep does not wait for a busy VM: it reports it skipped and goes on."""
    host = make_host(create_vm=SLOW_CREATE_VM)
    host.write_vm("vm01")
    host.write_vm("vm02")
    busy = host.fcq_async("start", "vm01")
    host.wait_for_oplock_holder("vm01")
    sweep = host.fcq("--json", "ensure", "--all")
    busy.communicate(timeout=60)
    rows = {r["vm"]: r for r in json.loads(sweep.stdout)}
    assert rows["vm01"]["outcome"] == "skipped"
    assert rows["vm02"]["status"] == "running"


def grown_then_asked_smaller(host: Host) -> None:
    """vm01's root is 3 GiB (started once, stopped); its file now says 2."""
    host.write_vm("vm01", disk=3)
    agent = host.agent("vm01")
    agent.ensure()
    agent.stop()
    host.write_vm("vm01", disk=2)


@pytest.mark.parametrize("refusal", ["shrink", "memory", "elsewhere", "drained"])
def test_a_refused_start_starts_nothing(make_host: HostFactory, refusal: str) -> None:
    """Every refusal a start can meet is decided before QEMU starts: the error, and
    no process, no lock, no run file (the CLI must never say "refused" while the
    VM runs)."""
    host = make_host(vm_max_total_memory=64 if refusal == "memory" else 4096)
    if refusal == "shrink":
        grown_then_asked_smaller(host)
    else:
        host.write_vm("vm01", kvm_host="beta" if refusal == "elsewhere" else "alpha")
    if refusal == "drained":
        from fcq_tasks.host.maintenance import mark_drained
        mark_drained(host.settings, "maintenance")
    agent = host.agent("vm01")
    for attempt in (agent.start, agent.ensure):
        if refusal == "elsewhere" and attempt == agent.ensure:
            continue  # ensure leaves a VM declared for another host alone, by design
        if refusal == "drained" and attempt == agent.ensure:
            continue  # ensure on a drained host starts nothing and says so, no error
        with pytest.raises(Refused):
            attempt()
        assert host.qemu_processes() == []
        assert all(v.lock_owner is None for v in agent.storage.volumes("vm01"))
        assert agent.paths.leftovers() == []
    if refusal == "shrink":
        assert agent.status()["root_bytes"] == 3 * GiB  # and nothing shrank
