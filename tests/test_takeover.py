"""A takeover that stops halfway is finished by the next attempt or the next ensure.

Host alpha dies (its worker and its QEMU are SIGKILLed); beta takes vm01
over as `fcq evacuate` does: beta's config first, then root's lock, swap's
and tmp's, each fenced and broken, then the start. The test runs those steps
with beta's own settings and cephx identity and stops after each boundary,
as a takeover whose worker died there would; then beta's real worker (an
ensure through its queue, what beat's sweep does) or a new `fcq evacuate`
finishes the job. A sampler checks every 100 ms that vm01 never runs on two
hosts; the logs show one break per volume and one start.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import yaml

from fcq_tasks.config.vmspec import spec_path, update_vm_file
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.storage import VOLUMES
from tests.cluster import Cluster
from tests.helpers import wait_for, wait_guest
from tests.invariants import GuestSampler

ClusterFactory = Any
VISIBILITY = 200


def events(host: Any, event: str) -> list[dict[str, Any]]:
    text = host.settings.log_file.read_text() if host.settings.log_file.exists() else ""
    out = []
    for line in text.splitlines():
        if f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event and record.get("vm") == "vm01":
                out.append(record)
    return out


def vm01_on_alpha(make_cluster: ClusterFactory, host_watch_timeout: int | None = None
                  ) -> Cluster:
    """Workers for alpha and beta on RBD, both configs placing vm01 on alpha, where it runs."""
    c: Cluster = make_cluster(visibility_timeout=VISIBILITY, storage="rbd")
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        if host_watch_timeout is not None:
            raw = yaml.safe_load(h.settings_file.read_text())
            h.update_settings(ceph={**raw["ceph"], "host_watch_timeout": host_watch_timeout})
        h.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_guest(alpha.agent("vm01"))
    return c


def alpha_dies(make_cluster: ClusterFactory) -> Cluster:
    """vm01 ran on alpha; alpha's worker and QEMU are killed; its heartbeat has lapsed."""
    c = vm01_on_alpha(make_cluster)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    orch = c.orchestrator()
    worker = next(s for s in c.services if s.name == "worker@alpha")
    c.kill9(worker)
    for proc in alpha.qemu_processes():
        os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to lapse")
    # The dead QEMU's watches lapse too (5 s on the test cluster).
    wait_for(lambda: not beta.agent("vm01").storage.other_watchers("vm01"), 60,
             "alpha's watches to lapse")
    wait_for(lambda: not beta.agent("vm01").storage.host_watchers("alpha"), 60,
             "alpha's host watch to lapse")
    return c


def takeover_until(beta: VMAgent, broken: int) -> dict[str, str | None]:
    """What beta's evacuation does, in its order, stopped after *broken* volumes."""
    update_vm_file(spec_path(beta.settings.vm_config_dir, "vm01"), {"kvm_host": "beta"},
                   bump_version=True)
    return {volume: beta.storage.force_unlock("vm01", volume, only_from="alpha")
            for volume in VOLUMES[:broken]}


@pytest.mark.parametrize(("broken", "finisher"), [
    (1, "ensure"),      # after root's break
    (2, "ensure"),      # after swap's
    (3, "ensure"),      # after tmp's, before the start
    (0, "evacuate"),    # after the config, before any break
    (1, "evacuate"),
    (2, "evacuate"),
])
def test_interrupted_takeover_is_finished(make_cluster: ClusterFactory, broken: int,
                                          finisher: str) -> None:
    """One break per volume, one start, vm01 running on beta only; no hand edits."""
    c = alpha_dies(make_cluster)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    with GuestSampler(c, "vm01") as sampler:
        first = takeover_until(beta.agent("vm01"), broken)
        assert set(first.values()) <= {"alpha"}
        if finisher == "ensure":
            out = c.fcq("--json", "ensure", "vm01", "--host", "beta", timeout=300)
            assert out.returncode == 0, out.stderr
            # Every lock broken already: a plain start; else the rest first.
            expected = ["start"] if broken == len(VOLUMES) else ["take-over", "start"]
            assert json.loads(out.stdout)["actions"] == expected, out.stdout
        else:
            out = c.fcq("--json", "evacuate", "alpha", host="beta", timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            row = json.loads(out.stdout)["vms"][0]
            assert (row["vm"], row["outcome"], row["to"]) == ("vm01", "evacuated", "beta")
        wait_guest(beta.agent("vm01"))
    sampler.assert_never_twice()
    # Each volume's lock broken exactly once, over both attempts.
    later = {e["volume"] for e in events(beta, "lock-broken")}
    assert sorted([*first, *later]) == sorted(VOLUMES)
    assert len(events(beta, "qemu-start")) == 1
    assert set(beta.agent("vm01").status()["locks"].values()) == {"beta"}
    assert not alpha.qemu_processes() and len(beta.qemu_processes()) == 1


def test_dead_host_coming_back_mid_takeover_neither_starts_nor_blocks(
        make_cluster: ClusterFactory) -> None:
    """alpha's worker returns while root is broken and swap, tmp are still its own: it
    refuses to start vm01 and releases what it holds; beta's ensure then runs it."""
    c = alpha_dies(make_cluster)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    with GuestSampler(c, "vm01") as sampler:
        takeover_until(beta.agent("vm01"), 1)
        c.worker("alpha")
        c.wait_registered("alpha")
        back = c.fcq("--json", "ensure", "vm01", "--host", "alpha", timeout=120)
        assert back.returncode == 4 and "beta" in back.stdout + back.stderr, back.stderr
        assert not alpha.qemu_processes()
        out = c.fcq("--json", "ensure", "vm01", "--host", "beta", timeout=300)
        assert out.returncode == 0, out.stderr
        wait_guest(beta.agent("vm01"))
        again = c.fcq("--json", "ensure", "vm01", "--host", "alpha", timeout=120)
        assert not alpha.qemu_processes(), again.stdout
    sampler.assert_never_twice()
    assert set(beta.agent("vm01").status()["locks"].values()) == {"beta"}
    assert len(events(beta, "qemu-start")) == 1


def test_interrupted_kill_is_finished_by_the_next_ensure(make_cluster: ClusterFactory) -> None:
    """A kill whose unlocks stopped after root's: the next ensure releases the rest and
    starts vm01 again, on the same host, once."""
    c: Cluster = make_cluster(visibility_timeout=VISIBILITY, storage="rbd")
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    agent = alpha.agent("vm01")
    wait_guest(agent)
    with GuestSampler(c, "vm01") as sampler:
        agent.kill_qemu()             # what kill does first,
        agent.storage.unlock("vm01", "root")   # then its unlocks, cut after root's
        assert agent.status()["locks"] == {"root": None, "swap": "alpha", "tmp": "alpha"}
        out = c.fcq("--json", "ensure", "vm01", "--host", "alpha", timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "running"
        wait_guest(agent)
    sampler.assert_never_twice()
    assert set(agent.status()["locks"].values()) == {"alpha"}
    assert len(events(alpha, "qemu-start")) == 2


def test_evacuating_a_hung_host_waits_for_its_margins(make_cluster: ClusterFactory) -> None:
    """alpha's worker and QEMU SIGSTOPped at once: its heartbeat lapses after
    registry_ttl (6 s here), but evacuate is refused while alpha's host watch
    lasts (ceph.host_watch_timeout, 20 s here), naming it; then it goes ahead."""
    c = vm01_on_alpha(make_cluster, host_watch_timeout=20)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    orch = c.orchestrator()
    worker = next(s for s in c.services if s.name == "worker@alpha")
    [qemu] = alpha.qemu_processes()
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    os.kill(qemu.pid, signal.SIGSTOP)
    hung = time.monotonic()
    try:
        wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to lapse")
        early = c.fcq("evacuate", "alpha", host="beta", timeout=300)
        assert early.returncode == 4, early.stdout + early.stderr
        assert "still talks to Ceph" in early.stderr and "fcq.host.alpha" in early.stderr
        assert not beta.qemu_processes()
        while True:
            out = c.fcq("--json", "evacuate", "alpha", host="beta", timeout=300)
            if out.returncode == 0:
                break
            assert "still talks to Ceph" in out.stdout, out.stdout + out.stderr
            assert time.monotonic() - hung < 60, "the host watch never lapsed"
        # Not before the margin: the watch lapses host_watch_timeout after
        # the last ping the OSDs had, and the client pings every 5 s
        # (objecter_tick_interval), so at least 15 s after the hang here.
        assert time.monotonic() - hung >= 15
        wait_guest(beta.agent("vm01"))
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
        os.killpg(worker.proc.pid, signal.SIGCONT)
