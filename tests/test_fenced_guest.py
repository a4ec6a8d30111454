"""A fenced guest that wakes up pauses at its first disk request and is killed by its host.

Host alpha hangs (its worker and its QEMU are SIGSTOPped) while its guest
writes to its disk; beta evacuates vm01 (fencing alpha's QEMU clients) and
runs it. Then alpha wakes up (SIGCONT): its RBD drives pause the guest on
the first refused request (runstate io-error), and alpha's fence watch,
which needs Ceph and not Redis, kills the QEMU. A sampler watches every
100 ms which hosts run vm01.

What cannot be promised: the woken guest's vCPUs run from the moment of
SIGCONT until its first disk request is refused, 10-20 ms here with a guest
that writes without pause (a guest that does not touch its disk runs until
the fence watch kills it, within ``fence_check_interval``). A sampler probe
that was waiting on the stopped QEMU is answered in that window, so the
overlap is asserted to end within one sample, not to be absent.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psutil
import yaml

from fcq_tasks.hazmat.guestagent import GuestAgent
from tests.cluster import Cluster
from tests.helpers import wait_for, wait_guest
from tests.invariants import GuestSampler

ClusterFactory = Any
VISIBILITY = 200
#: The guest writes to its xfs disk (/tmp on the tmp volume) without pause.
WRITER = "while :; do dd if=/dev/zero of=/tmp/w bs=4k count=16 conv=fsync 2>/dev/null; done"


def events(host: Any, event: str) -> list[dict[str, Any]]:
    path = host.settings.log_file
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if f'"{event}"' in line]


def hung_alpha_evacuated(make_cluster: ClusterFactory) -> tuple[Cluster, int, list[int]]:
    """vm01 ran on alpha, writing; alpha hung; beta runs vm01 now. (cluster, old pid, stopped)"""
    c: Cluster = make_cluster(visibility_timeout=VISIBILITY, storage="rbd")
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        h.update_settings(fence_check_interval=0.5)
        h.write_vm("vm01", kvm_host="alpha")
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    agent = alpha.agent("vm01")
    wait_guest(agent)
    with GuestAgent(str(agent.paths.ga), 5.0, "vm01") as ga:
        ga.execute("guest-exec", path="/bin/sh", arg=["-c", WRITER])
    old = alpha.qemu_processes()[0].pid
    worker = next(s for s in c.services if s.name == "worker@alpha")
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    os.kill(old, signal.SIGSTOP)
    stopped = [-worker.proc.pid, old]
    wait_for(lambda: "alpha" not in orch.hosts(), 30, "alpha's heartbeat to lapse")
    wait_for(lambda: not beta.agent("vm01").storage.other_watchers("vm01"), 60,
             "alpha's watches to lapse")
    wait_for(lambda: not beta.agent("vm01").storage.host_watchers("alpha"), 60,
             "alpha's host watch to lapse")
    out = c.fcq("--json", "evacuate", "alpha", host="beta", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_guest(beta.agent("vm01"))
    return c, old, stopped


def assert_overlap_ends_at_once(sampler: GuestSampler, woken: float) -> None:
    """No overlap before *woken* (monotonic); after it, at most the first sample."""
    twice = sampler.twice()
    assert all(s.t >= woken for s in twice), twice[0].describe()
    late = [s for s in twice if s.t > woken + 0.2]
    assert len(twice) <= 1 and not late, [s.describe() for s in twice]
    sampler.assert_gaps_below(2.0)
    assert any(s.t > woken + 0.2 and not s.hosts["alpha"].running for s in sampler.snapshot())


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_woken_fenced_guest_pauses_and_is_killed(make_cluster: ClusterFactory) -> None:
    """Never seen running next to its new copy; alpha's fence watch kills it, not a sweep."""
    c, old, stopped = hung_alpha_evacuated(make_cluster)
    alpha = c.hosts["alpha"]
    with GuestSampler(c, "vm01") as sampler:
        time.sleep(0.5)
        woken = time.monotonic()
        os.kill(old, signal.SIGCONT)  # the QEMU first, then the worker
        os.killpg(-stopped[0], signal.SIGCONT)
        wait_for(lambda: gone(old), 30, "alpha's fenced QEMU to be killed")
        time.sleep(0.5)
    assert_overlap_ends_at_once(sampler, woken)
    killed = events(alpha, "fenced-guest-killed")
    assert [k["vm"] for k in killed] == ["vm01"] and killed[0]["pid"] == old


def test_fenced_guest_is_killed_with_its_host_cut_from_redis(
        make_cluster: ClusterFactory) -> None:
    """alpha's worker comes back without Redis (a wrong broker port): its fence watch,
    which needs Ceph only, still kills the fenced QEMU."""
    c, old, _stopped = hung_alpha_evacuated(make_cluster)
    alpha = c.hosts["alpha"]
    worker = next(s for s in c.services if s.name == "worker@alpha")
    c.kill9(worker)
    c.services.remove(worker)
    broker = c.redis.url.rsplit(":", 1)[0] + ":1/0"  # nothing listens on port 1
    alpha.update_settings(cluster={**alpha_cluster(alpha), "broker_url": broker})
    with GuestSampler(c, "vm01") as sampler:
        time.sleep(0.5)
        woken = time.monotonic()
        os.kill(old, signal.SIGCONT)
        cut = c.spawn("worker", "alpha")  # never registers: no Redis
        wait_for(lambda: gone(old), 60, "alpha's fenced QEMU to be killed")
        assert cut.proc.poll() is None  # alive, still trying to reach Redis
    assert_overlap_ends_at_once(sampler, woken)
    assert not c.redis.client().exists("fcq:host:alpha")
    # Paused by its drives at the first refused request, before the kill.
    assert "io-error" in {s.hosts["alpha"].runstate for s in sampler.snapshot()}
    killed = events(alpha, "fenced-guest-killed")
    assert [k["vm"] for k in killed] == ["vm01"] and killed[0]["pid"] == old


def alpha_cluster(host: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(host.settings_file.read_text())
    return dict(raw["cluster"])
