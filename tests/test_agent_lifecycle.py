"""Start, stop, kill and ensure against real QEMU running the tiny guest."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import psutil
import pytest
from structlog.testing import capture_logs

from fcq_tasks.errors import QemuError
from tests.conftest import Host, HostFactory
from tests.helpers import qmp, wait_for, wait_guest


def test_start_runs_guest_from_yaml(host: Host) -> None:
    """ensure on a fresh VM creates its volumes, locks them, starts QEMU; the guest boots."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    with capture_logs() as logs:
        result = agent.ensure()
    assert (result["found"], result["actions"], result["status"]) == ("stopped", ["start"],
                                                                       "running")
    assert qmp(agent, "query-status")["status"] == "running"
    wait_guest(agent)
    assert {v.name: v.lock_owner for v in agent.storage.volumes("vm01")} == {
        "root": "alpha", "swap": "alpha", "tmp": "alpha"}
    for sock in (agent.paths.qmp, agent.paths.ga):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    start = next(e for e in logs if e["event"] == "qemu-start")
    assert start["vm"] == "vm01" and str(agent.paths.config) in start["argv"]
    # /dev/kvm on these machines is a software hypervisor, not usable KVM.
    assert start["accel"] == "tcg"
    assert all(e.get("vm") == "vm01" for e in logs)


def test_ensure_twice_does_nothing_the_second_time(host: Host) -> None:
    """ensure is idempotent: a converged VM gets no action and keeps its process."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    pid = agent.status()["pid"]
    again = agent.ensure()
    assert again["actions"] == ["nothing"] and agent.status()["pid"] == pid


def test_graceful_stop_via_acpi(host: Host) -> None:
    """stop powers the guest off through ACPI (no quit, no kill) and releases every lock."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    wait_guest(agent)
    pid = agent.status()["pid"]
    with capture_logs() as logs:
        result = agent.stop()
    assert result["status"] == "stopped"
    assert [e.get("how") for e in logs if e["event"] == "stopped"] == ["acpi"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert all(v.lock_owner is None for v in agent.storage.volumes("vm01"))
    assert agent.paths.leftovers() == []


def test_stop_falls_back_to_quit_when_guest_ignores_acpi(make_host: HostFactory) -> None:
    """A guest that has not booted far enough to hear ACPI is stopped by quit after the grace."""
    host = make_host(shutdown_grace=0.5)
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    with capture_logs() as logs:
        agent.stop()  # at once: the guest's acpid is not running yet
    assert [e.get("how") for e in logs if e["event"] == "stopped"] == ["quit"]
    assert host.qemu_processes() == []


def test_kill(host: Host) -> None:
    """kill ends QEMU at once and releases its locks."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    result = agent.kill()
    assert result["actions"] == ["kill", "clean-up"] and result["status"] == "stopped"
    assert host.qemu_processes() == []
    assert all(v.lock_owner is None for v in agent.storage.volumes("vm01"))


def test_ensure_restarts_qemu_killed_behind_our_back(host: Host) -> None:
    """kill -9 of QEMU shows as crashed; the next ensure cleans up and starts it again."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    old = agent.status()["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: agent.status()["status"] == "crashed", 10, "crashed state")
    result = agent.ensure()
    assert result["actions"] == ["clean-up", "start"] and result["status"] == "running"
    assert agent.status()["pid"] != old
    wait_guest(agent)


def test_recycled_pid_is_never_killed(host: Host) -> None:
    """A stale pidfile naming some other live process: fcq treats the VM as crashed,
    starts a real QEMU, and the stranger keeps running."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        agent.paths.pidfile.write_text(f"{stranger.pid}\n")
        agent.paths.identity.write_text(
            f'{{"pid": {stranger.pid}, "create_time": {psutil.Process(stranger.pid).create_time()},'
            ' "memory_mb": 128, "argv": []}')
        assert agent.status()["status"] == "crashed"
        agent.kill()
        result = agent.ensure()
        assert result["status"] == "running"
        assert agent.status()["pid"] != stranger.pid
        assert stranger.poll() is None, "the unrelated process was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_unresponsive_monitor_is_killed_after_grace(make_host: HostFactory) -> None:
    """A QEMU whose QMP stays silent (SIGSTOPped here) is left alone at first, then,
    once silent longer than kill_silent_after, killed and started again."""
    host = make_host(qmp_timeout=1, kill_silent_after=3)
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    old = agent.status()["pid"]
    os.kill(old, signal.SIGSTOP)
    first = agent.ensure()
    assert (first["found"], first["actions"]) == ("unresponsive", ["nothing"])
    assert agent.status()["pid"] == old
    time.sleep(3)
    result = agent.ensure()
    assert result["found"] == "unresponsive"
    assert result["actions"] == ["kill", "clean-up", "start"]
    assert agent.status()["pid"] != old and agent.status()["status"] == "running"


def test_failed_start_leaves_no_process_no_lock_no_run_files(make_host: HostFactory) -> None:
    """QEMU refusing its config leaves nothing half-started: no process, locks, pidfile."""
    host = make_host(qemu_binary="/bin/false")
    host.write_vm("vm01")
    agent = host.agent("vm01")
    with pytest.raises(QemuError, match="exited with 1"):
        agent.ensure()
    assert all(v.lock_owner is None for v in agent.storage.volumes("vm01"))
    assert agent.paths.leftovers() == []
    assert host.qemu_processes() == []


def test_offline_config_stops_running_vm(host: Host) -> None:
    """Flipping online to false and ensuring stops the VM and frees its locks."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    wait_guest(agent)
    host.write_vm("vm01", online=False)
    t0 = time.monotonic()
    result = agent.ensure()
    assert result["actions"] == ["stop", "clean-up"] and result["status"] == "stopped"
    assert time.monotonic() - t0 < 15, "ACPI should have stopped it well within the grace"
    assert all(v.lock_owner is None for v in agent.storage.volumes("vm01"))


def test_stop_right_after_start_still_goes_through_acpi(host: Host) -> None:
    """A power-button press made while the guest boots is lost; fcq presses again."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.ensure()
    with capture_logs() as logs:
        agent.stop()  # the guest's acpid is not running yet: the first press is lost
    assert [e.get("how") for e in logs if e["event"] == "stopped"] == ["acpi"]
