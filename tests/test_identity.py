"""Process identity under a stepped wall clock, and a process that only looks like ours.

The clock is stepped for real (CLOCK_REALTIME, +3 s and back): what decides
whether a QEMU is ours must not move with it. No Redis or worker runs in
these tests, so nothing else here depends on the wall clock meanwhile.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from fcq_tasks.errors import Inconsistent
from fcq_tasks.host.plan import Run
from tests.conftest import Host
from tests.helpers import wait_for


def step_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + seconds)


def test_clock_step_does_not_make_a_running_qemu_look_crashed(host: Host) -> None:
    """After a 3 s step of the wall clock the QEMU is still ours: ensure does nothing,
    starts no second QEMU and keeps every lock (psutil's create time moves with it)."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.start()
    proc = agent.process()
    assert proc is not None
    before = proc.create_time()
    step_clock(3.0)
    try:
        assert abs(psutil.Process(proc.pid).create_time() - before) >= 2.5  # what fooled us
        assert agent.observe().run is Run.RUNNING
        result = agent.ensure()
        assert result["actions"] == ["nothing"]
    finally:
        step_clock(-3.0)
    assert [p.pid for p in host.qemu_processes()] == [proc.pid]
    assert set(agent.status()["locks"].values()) == {"alpha"}


def test_silent_monitor_grace_ignores_clock_steps(host: Host) -> None:
    """The 'silent since' mark is a monotonic reading: a step forward does not age it."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.start()
    proc = agent.process()
    assert proc is not None
    proc.suspend()  # SIGSTOP: the monitor stops answering
    try:
        assert agent.observe().run is Run.UNRESPONSIVE
        step_clock(3600.0)
        try:
            found = agent.observe()
        finally:
            step_clock(-3600.0)
        assert found.run is Run.UNRESPONSIVE and found.silent_for < 60
    finally:
        proc.resume()
    wait_for(lambda: agent.observe().run is Run.RUNNING, 30, "the monitor to answer again")


def test_process_naming_our_config_but_not_ours_is_left_alone(host: Host) -> None:
    """A live QEMU whose start time differs from the record is an impostor: never killed,
    never cleaned up, its locks kept, no second start; ensure and stop refuse."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.start()
    proc = agent.process()
    assert proc is not None
    record = json.loads(agent.paths.identity.read_text())
    record["start_ticks"] += 1
    agent.paths.identity.write_text(json.dumps(record))
    assert agent.observe().run is Run.IMPOSTOR
    with pytest.raises(Inconsistent, match="not the QEMU fcq started"):
        agent.ensure()
    with pytest.raises(Inconsistent):
        agent.stop()
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    assert [p.pid for p in host.qemu_processes()] == [proc.pid]
    assert {v.lock_owner for v in agent.storage.volumes("vm01")} \
        == {"alpha"}


def test_identity_from_an_older_fcq_is_adopted(host: Host) -> None:
    """A record with only a create time (written before start ticks) is upgraded, not
    mistaken for a stranger or a crash."""
    host.write_vm("vm01")
    agent = host.agent("vm01")
    agent.start()
    proc = agent.process()
    assert proc is not None
    record = json.loads(agent.paths.identity.read_text())
    legacy = {"pid": record["pid"], "create_time": proc.create_time() + 5,
              "memory_mb": record["memory_mb"], "argv": record["argv"]}
    agent.paths.identity.write_text(json.dumps(legacy))
    assert agent.ensure()["actions"] == ["nothing"]
    assert json.loads(agent.paths.identity.read_text())["start_ticks"] == record["start_ticks"]
