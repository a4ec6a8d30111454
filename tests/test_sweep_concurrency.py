"""A sweep looks at VMs side by side but acts on one at a time (sweep_concurrency)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fcq_tasks.host.observing import Looks
from fcq_tasks.host.steps import VMSteps
from fcq_tasks.host.sweep import ensure_all
from tests.conftest import Host, HostFactory


class Peak:
    """How many calls run at once, at most (each held *linger* s to make overlap visible)."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self.now = 0
        self.most = 0
        self._lock = threading.Lock()

    def wrap(self, real: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(self.linger)
                return real(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1
        return counted


@pytest.fixture
def idle(make_host: HostFactory) -> Host:
    return make_host(direct_boot=None, sweep_concurrency=4)


def test_looks_overlap_and_starts_do_not(idle: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"sc{i}" for i in range(6)]
    for name in names:
        idle.write_vm(name, memory=32, nics=[])
    looks, starts = Peak(0.05), Peak(0.05)
    monkeypatch.setattr(Looks, "observe", looks.wrap(Looks.observe))
    monkeypatch.setattr(VMSteps, "start_qemu", starts.wrap(VMSteps.start_qemu))
    result = ensure_all(idle.settings)
    assert result["failed"] == 0
    assert {n: r["actions"] for n, r in result["vms"].items()} == {n: ["start"] for n in names}
    assert starts.most == 1, "the sweep started two VMs at once"
    assert looks.most > 1, "the sweep looked at one VM at a time"
    assert len(idle.qemu_processes()) == len(names)


def test_one_at_a_time_when_asked(make_host: HostFactory,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    host = make_host(direct_boot=None, sweep_concurrency=1)
    for i in range(3):
        host.write_vm(f"so{i}", memory=32, nics=[])
    looks = Peak(0.02)
    monkeypatch.setattr(Looks, "observe", looks.wrap(Looks.observe))
    assert ensure_all(host.settings)["failed"] == 0
    assert looks.most == 1


def test_a_crash_in_one_vms_look_spares_the_others(idle: Host,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        idle.write_vm(f"sx{i}", memory=32, nics=[])
    real = Looks.observe

    def observe(self: Looks, reuse: bool = False) -> Any:
        if self.name == "sx2":
            raise RuntimeError("a bug in one VM's path")
        return real(self, reuse)
    monkeypatch.setattr(Looks, "observe", observe)
    result = ensure_all(idle.settings)
    assert result["failed"] == 1 and result["vms"]["sx2"]["outcome"] == "error"
    assert all(result["vms"][f"sx{i}"]["actions"] == ["start"] for i in (0, 1, 3))
