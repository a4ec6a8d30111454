"""The sweep's held monitor connections (hazmat/heldmonitors.py), on real QEMUs.

A converged VM's run state is asked on a connection the worker keeps open
to the VM's sweep monitor. These tests check that it is only ever a faster
way to the same answer: a paused, hung, replaced or socket-less QEMU is
judged as it was without it, and nothing is asked of an old QEMU.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fcq_tasks.hazmat import heldmonitors
from fcq_tasks.hazmat.heldmonitors import HeldMonitors
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.sweep import ensure_all
from tests.conftest import Host, HostFactory
from tests.helpers import qmp


@pytest.fixture
def idle(make_host: HostFactory) -> Host:
    """VMs without a guest OS (SeaBIOS idles), and a short QMP timeout for the hung case."""
    return make_host(direct_boot=None, qmp_timeout=2.0)


@pytest.fixture
def held() -> Iterator[HeldMonitors]:
    monitors = HeldMonitors()
    yield monitors
    monitors.close()


def started(host: Host, name: str) -> VMAgent:
    host.write_vm(name, memory=32, nics=[])
    agent = host.agent(name)
    assert agent.ensure()["actions"] == ["start"]
    return agent


def sweep(host: Host, held: HeldMonitors, name: str) -> dict[str, Any]:
    result: dict[str, Any] = ensure_all(host.settings, held)["vms"][name]
    return result


def instance(agent: VMAgent) -> tuple[int, int]:
    ident = agent.qemu.identity()
    assert ident is not None and ident.start_ticks is not None
    return ident.pid, ident.start_ticks


def connected_to(agent: VMAgent) -> int:
    """How many clients QEMU's sweep monitor has (its accepted unix sockets)."""
    proc = agent.process()
    assert proc is not None
    path = str(agent.paths.sweep)
    # An accepted unix socket carries its listener's path: minus the listener.
    return [str(c.laddr) for c in proc.net_connections(kind="unix")].count(path) - 1


def test_a_converged_vm_is_asked_on_the_held_connection(idle: Host, held: HeldMonitors,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    agent = started(idle, "h1")
    assert agent.paths.sweep.exists()
    assert sweep(idle, held, "h1")["actions"] == ["nothing"]  # the first sweep looks in full
    assert sweep(idle, held, "h1")["actions"] == ["nothing"]
    assert held.held() == {"h1": instance(agent)}
    assert connected_to(agent) == 1
    # From now on fcq's own monitor is not needed for it: a sweep answers
    # even while another client holds qmp.sock (one client at a time).
    with socket.socket(socket.AF_UNIX) as blocker:
        blocker.connect(str(agent.paths.qmp))
        t0 = time.monotonic()
        result = sweep(idle, held, "h1")
        assert result["actions"] == ["nothing"] and result["status"] == "running"
        assert time.monotonic() - t0 < idle.settings.qmp_timeout
    assert connected_to(agent) == 1  # still the one connection: nothing reopened


def test_a_vm_paused_behind_fcqs_back_is_not_taken_for_running(idle: Host,
                                                               held: HeldMonitors) -> None:
    agent = started(idle, "h2")
    sweep(idle, held, "h2")
    sweep(idle, held, "h2")
    assert "h2" in held.held()
    qmp(agent, "stop")
    result = sweep(idle, held, "h2")
    assert result["found"] == "paused", result


def test_a_new_qemu_is_never_asked_on_the_old_connection(idle: Host,
                                                         held: HeldMonitors) -> None:
    agent = started(idle, "h3")
    sweep(idle, held, "h3")
    sweep(idle, held, "h3")
    old = instance(agent)
    assert held.held() == {"h3": old}
    proc = agent.process()
    assert proc is not None
    proc.kill()
    proc.wait(10)
    result = sweep(idle, held, "h3")  # finds it crashed and starts it again
    assert result["found"] == "crashed" and "start" in result["actions"], result
    sweep(idle, held, "h3")  # the new QEMU's first sweep: a full look
    assert sweep(idle, held, "h3")["status"] == "running"
    new = instance(agent)
    assert new != old and held.held() == {"h3": new}


def test_a_hung_qemu_is_judged_unresponsive_as_before(idle: Host, held: HeldMonitors) -> None:
    agent = started(idle, "h4")
    sweep(idle, held, "h4")
    sweep(idle, held, "h4")
    assert "h4" in held.held()
    proc = agent.process()
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        result = sweep(idle, held, "h4")
        assert result["found"] == "unresponsive", result
        assert held.held() == {}
        # The next sweep does not wait on the held path again (RETRY_AFTER).
        t0 = time.monotonic()
        assert sweep(idle, held, "h4")["found"] == "unresponsive"
        assert time.monotonic() - t0 < idle.settings.qmp_timeout + \
            0.8 * heldmonitors.CONNECT_TIMEOUT
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert sweep(idle, held, "h4")["status"] == "running"


def test_a_qemu_without_the_sweep_monitor_is_asked_on_fcqs_own(idle: Host,
                                                                held: HeldMonitors) -> None:
    agent = started(idle, "h5")
    agent.paths.sweep.unlink()  # as a QEMU started by an older fcq, or a custom template
    sweep(idle, held, "h5")
    result = sweep(idle, held, "h5")
    assert result["actions"] == ["nothing"] and result["status"] == "running"
    assert held.held() == {}


def test_a_sweep_monitor_taken_by_another_process_costs_one_connect_timeout(
        idle: Host, held: HeldMonitors) -> None:
    agent = started(idle, "h6")
    sweep(idle, held, "h6")
    with socket.socket(socket.AF_UNIX) as other:  # a second worker, say
        other.connect(str(agent.paths.sweep))
        other.recv(4096)  # QEMU's greeting: the monitor is this client's now
        t0 = time.monotonic()
        result = sweep(idle, held, "h6")
        assert result["actions"] == ["nothing"] and result["status"] == "running"
        assert time.monotonic() - t0 < heldmonitors.CONNECT_TIMEOUT + 1.5
        assert held.held() == {}
        t0 = time.monotonic()
        sweep(idle, held, "h6")
        assert time.monotonic() - t0 < 1.0  # not tried again meanwhile
    assert held.held() == {}


def test_a_removed_vm_is_forgotten(idle: Host, held: HeldMonitors) -> None:
    agent = started(idle, "h7")
    sweep(idle, held, "h7")
    sweep(idle, held, "h7")
    assert "h7" in held.held()
    assert agent.stop()["status"] == "stopped"
    (idle.settings.vm_config_dir / "h7.cfg").unlink()
    ensure_all(idle.settings, held)
    assert held.held() == {}
