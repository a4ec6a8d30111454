"""What a sweep remembers between looks, and every event that makes it look again.

A converged running VM costs a sweep one ``query-status``: its drives and
its guest agent's port come from the last full look (``<vm>.checked``),
and its config from the last parse of an unchanged file. These tests
check that each event that can change what was remembered makes the next
sweep act on the truth.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcq_tasks.config import vmspec
from fcq_tasks.config.vmspec import GiB, load_vm_spec
from fcq_tasks.errors import FcqError, UnknownVM
from fcq_tasks.hazmat.monitor import Monitor
from fcq_tasks.host import observing
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.handtools import human_monitor
from fcq_tasks.host.maintenance import mark_drained
from fcq_tasks.host.sweep import ensure_all
from tests.conftest import Host, HostFactory
from tests.helpers import qmp


@pytest.fixture
def idle(make_host: HostFactory) -> Host:
    """A host whose VMs have no guest OS (SeaBIOS idles): quick to start, no agent."""
    return make_host(direct_boot=None)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The monitor questions fcq asks, in order."""
    calls: list[str] = []
    for verb in ("runstate", "blocks", "guest_agent_open"):
        real = getattr(Monitor, verb)

        def spy(self: Monitor, *a: Any, _real: Any = real, _verb: str = verb,
                **k: Any) -> Any:
            calls.append(_verb)
            return _real(self, *a, **k)
        monkeypatch.setattr(Monitor, verb, spy)
    yield calls


def started(host: Host, name: str, **params: Any) -> VMAgent:
    host.write_vm(name, memory=32, nics=[], **params)
    agent = host.agent(name)
    assert agent.ensure()["actions"] == ["start"]
    return agent


def actions(host: Host, name: str) -> list[str]:
    result = ensure_all(host.settings)["vms"][name]
    assert "actions" in result, result
    return list(result["actions"])


def test_converged_vm_costs_one_query_status(idle: Host, asked: list[str]) -> None:
    agent = started(idle, "c1")
    assert actions(idle, "c1") == ["nothing"]  # the first sweep looks at everything
    assert "blocks" in asked and agent.paths.checked.exists()
    asked.clear()
    assert actions(idle, "c1") == ["nothing"]
    assert asked == ["runstate"]


def test_operator_requests_always_look_at_everything(idle: Host, asked: list[str]) -> None:
    agent = started(idle, "c2")
    actions(idle, "c2")
    asked.clear()
    assert agent.status()["status"] == "running"
    assert "blocks" in asked and "guest_agent_open" in asked


def test_throttle_behind_fcqs_back_is_put_back_after_the_full_check_interval(
        idle: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = started(idle, "c3", iops=200)
    assert actions(idle, "c3") == ["nothing"]
    qmp(agent, "block_set_io_throttle", device="root", iops=7, bps=0, bps_rd=0, bps_wr=0,
        iops_rd=0, iops_wr=0)
    # Within the interval the record stands in (an order behind fcq's back
    # is only seen at the next full look)...
    assert actions(idle, "c3") == ["nothing"]
    # ...which comes once it is older than FULL_CHECK_AFTER.
    monkeypatch.setattr(observing, "FULL_CHECK_AFTER", 0.0)
    assert actions(idle, "c3") == ["set-iops"]
    root = next(b for b in qmp(agent, "query-block") if b["device"] == "root")
    assert root["inserted"]["iops"] == 200


def test_config_change_is_acted_on_by_the_next_sweep(idle: Host, asked: list[str]) -> None:
    agent = started(idle, "c4", iops=200)
    actions(idle, "c4")
    assert agent.paths.checked.exists()
    idle.write_vm("c4", memory=32, nics=[], iops=300)  # in place, the same size
    asked.clear()
    assert actions(idle, "c4") == ["set-iops"]
    assert "blocks" in asked
    root = next(b for b in qmp(agent, "query-block") if b["device"] == "root")
    assert root["inserted"]["iops"] == 300
    idle.write_vm("c4", memory=32, nics=[], iops=300, disk=2)
    assert actions(idle, "c4") == ["grow-root"]
    root = next(b for b in qmp(agent, "query-block") if b["device"] == "root")
    assert root["inserted"]["image"]["virtual-size"] == 2 * GiB
    assert actions(idle, "c4") == ["nothing"]


def test_resize_from_another_process_is_seen_by_the_next_sweep(idle: Host) -> None:
    started(idle, "c5")
    actions(idle, "c5")
    # Another VMAgent stands for another process (fcq --local resize): it
    # shares no memory with the sweep, only the run directory.
    assert idle.agent("c5").resize(3)["outcome"] == "grown"
    assert actions(idle, "c5") == ["nothing"]  # neither a shrink refusal nor a second grow
    assert idle.agent("c5").status()["root_bytes"] == 3 * GiB


def test_a_new_qemu_is_looked_at_in_full(idle: Host, asked: list[str]) -> None:
    agent = started(idle, "c6")
    actions(idle, "c6")
    record = json.loads(agent.paths.checked.read_text())
    agent.kill()
    assert not agent.paths.checked.exists()  # removed with the other run files
    # A record of the old QEMU put back by hand does not stand in for the new one.
    assert agent.ensure()["actions"] == ["start"]
    agent.paths.checked.write_text(json.dumps({**record, "root": 1}))
    asked.clear()
    assert actions(idle, "c6") == ["nothing"]  # root 1 byte would have been a shrink refusal
    assert "blocks" in asked


def test_fcq_monitor_and_pause_forget_the_record(idle: Host) -> None:
    agent = started(idle, "c7")
    actions(idle, "c7")
    human_monitor(agent, "info status")
    assert not agent.paths.checked.exists()
    actions(idle, "c7")
    agent.pause()
    assert not agent.paths.checked.exists()


def test_vm_file_parse_is_remembered_only_for_an_unchanged_settled_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmspec, "SETTLED_AFTER", 0.3)
    path = tmp_path / "p1.cfg"

    def write(memory: int) -> None:
        path.write_text(f"name: p1\nparameters: {{id: 1, resource_group: t, online: true, "
                        f"disk: 1, memory: {memory}, cores: 1, nics: []}}\n")
    write(128)
    assert load_vm_spec(tmp_path, "p1").memory_mb == 128
    write(256)  # in place, the same size, at once: maybe within one time stamp tick
    assert load_vm_spec(tmp_path, "p1").memory_mb == 256
    time.sleep(0.4)
    first = load_vm_spec(tmp_path, "p1")
    assert load_vm_spec(tmp_path, "p1") is first  # remembered
    stamp = path.stat().st_mtime_ns
    write(512)  # in place, the same size, mtime put back: ctime still moves
    os.utime(path, ns=(stamp, stamp))
    assert load_vm_spec(tmp_path, "p1").memory_mb == 512
    path.write_text("name: p1\nparameters: [broken\n")
    time.sleep(0.4)
    for _ in range(2):  # an error is never remembered
        with pytest.raises(FcqError):
            load_vm_spec(tmp_path, "p1")
    path.unlink()
    with pytest.raises(UnknownVM):
        load_vm_spec(tmp_path, "p1")


def test_drain_after_the_sweep_began_still_stops_a_start(idle: Host) -> None:
    idle.write_vm("c8", memory=32, nics=[])
    agent = idle.agent("c8")
    agent.sweep_drained = False  # what the sweep read before its first VM
    mark_drained(idle.settings, "maintenance")  # fcq drain, while the sweep runs
    result = agent.ensure()
    assert "start" not in result["actions"] and result["status"] == "stopped", result
    assert idle.qemu_processes() == []
