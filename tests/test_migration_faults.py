"""Migration under hangs, replays and late messages: real processes, SIGSTOP/SIGCONT.

Each test stops (or kills) a real worker at one handover point while a
sampler reads every QEMU's run state through its observer monitor every
100 ms, and afterwards, one sweep later, checks: never two running copies
at any sampled moment, exactly one running copy, locks and every host's
config agreeing, no migration key or slot left behind.

The VM's disks are RBD images on the throwaway Ceph cluster: no image file
lock keeps a second QEMU out, only fcq's locks do, and the destination's
QEMU opens the images while the source's still runs, as in production.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from fcq_tasks.errors import FcqError
from fcq_tasks.hazmat.qmp import QmpSession
from fcq_tasks.host.migration.slots import slots_in_use
from fcq_tasks.storage import VOLUMES
from tests.ceph import CephCluster
from tests.cluster import Cluster, Service
from tests.helpers import guest_answers, scrape_until, series, value, wait_for
from tests.invariants import GuestSampler, observer_socket
from tests.test_migration import SLOW, ClusterFactory, converged, shared_pair, where


def worker(c: Cluster, host: str) -> Service:
    return next(s for s in reversed(c.services) if s.name == f"worker@{host}"
                and s.proc.poll() is None)


def stop(service: Service) -> None:
    os.killpg(service.proc.pid, signal.SIGSTOP)


def cont(service: Service) -> None:
    os.killpg(service.proc.pid, signal.SIGCONT)


def attempt_of(c: Cluster, vm: str = "vm01") -> str:
    client = c.redis.client()
    attempt = wait_for(lambda: client.get(f"fcq:mig:{vm}:current"), 30, "the attempt id")
    return str(attempt)


def addr_published(c: Cluster, attempt: str) -> bool:
    return bool(c.redis.client().exists(f"fcq:mig:vm01:{attempt}:addr"))


def source_copying(c: Cluster) -> bool:
    """alpha's QEMU is sending the guest (asked through its observer monitor)."""
    try:
        with QmpSession(str(observer_socket(c.hosts["alpha"], "vm01")), 2, "vm01") as q:
            return q.execute("query-migrate").get("status") in ("active", "completed")
    except FcqError:
        return False


def locks_handed_to_beta(c: Cluster) -> bool:
    vols = c.hosts["beta"].agent("vm01").storage.volumes("vm01")
    return all(v.lock_owner == "beta" and v.handed_from == "alpha" for v in vols)


def assert_settled(c: Cluster, expect: str | None = None) -> str:
    """One sweep of every host later: one running copy, everything agreeing, nothing left."""
    host = str(wait_for(lambda: converged(c), 150, "one running copy"))
    if expect is not None:
        assert host == expect
    for h in c.hosts.values():
        cfg = (h.settings.vm_config_dir / "vm01.cfg").read_text()
        assert f"kvm_host: {host}" in cfg, (h.name, cfg)
        assert slots_in_use(h.settings.run_dir, h.settings.max_migrations) == 0
    client = c.redis.client()
    wait_for(lambda: client.get("fcq:mig:vm01:current") is None, 60,
             "the attempt to be released")
    assert guest_answers(c.hosts[host].agent("vm01"))
    return host


def test_destination_stopped_between_handover_and_cont(make_cluster: ClusterFactory) -> None:
    """SIGSTOP of beta's worker after the copy and the locks reached it, before `cont`:
    nobody else runs the guest meanwhile; after SIGCONT beta resumes the copy (no reboot)."""
    c = shared_pair(make_cluster)
    orch = c.orchestrator()
    beta_pid_before = {p.pid for p in c.hosts["beta"].qemu_processes()}
    assert not beta_pid_before
    with GuestSampler(c, "vm01") as sampler:
        task_id = orch.migrate("vm01", "beta")
        attempt = attempt_of(c)
        wait_for(lambda: addr_published(c, attempt), 60, "beta's address", interval=0.01)
        stop(worker(c, "beta"))  # frozen before it can see the handover
        try:
            wait_for(lambda: locks_handed_to_beta(c), 60, "alpha to hand the locks over")
            time.sleep(2)
            assert where(c) == {"alpha": 0, "beta": 1}  # only beta's paused copy is left
        finally:
            cont(worker(c, "beta"))
        result = orch.wait(task_id, timeout=120)
        assert result["to"] == "beta"
    sampler.assert_never_twice()
    incoming = c.hosts["beta"].qemu_processes()
    assert len(incoming) == 1 and "-incoming" in incoming[0].cmdline()  # moved, not rebooted
    assert_settled(c, "beta")


def test_destination_killed_after_handover_resumes_without_reboot(
        make_cluster: ClusterFactory) -> None:
    """beta's worker is frozen with the copy and the locks, then killed: beta's next
    ensure resumes the received copy instead of booting the guest again."""
    c = shared_pair(make_cluster)
    orch = c.orchestrator()
    with GuestSampler(c, "vm01") as sampler:
        orch.migrate("vm01", "beta")
        attempt = attempt_of(c)
        wait_for(lambda: addr_published(c, attempt), 60, "beta's address", interval=0.01)
        beta = worker(c, "beta")
        stop(beta)
        wait_for(lambda: locks_handed_to_beta(c), 60, "alpha to hand the locks over")
        c.kill9(beta)
        c.worker("beta")
        host = assert_settled(c, "beta")
    sampler.assert_never_twice()
    proc = c.hosts[host].qemu_processes()[0]
    assert "-incoming" in proc.cmdline()  # the received copy, resumed


def test_source_stopped_mid_copy_resumed_after_peer_gave_up(
        make_cluster: ClusterFactory) -> None:
    """SIGSTOP of alpha's worker during the copy, SIGCONT after beta gave up: the guest
    never runs twice, and one sweep later it runs on exactly one host."""
    c = shared_pair(make_cluster, **SLOW)
    orch = c.orchestrator()
    with GuestSampler(c, "vm01") as sampler:
        orch.migrate("vm01", "beta")
        attempt = attempt_of(c)
        wait_for(lambda: addr_published(c, attempt), 60, "beta's address")
        time.sleep(1)
        alpha = worker(c, "alpha")
        stop(alpha)
        client = c.redis.client()
        wait_for(lambda: client.get(f"fcq:mig:vm01:{attempt}:abort"), 60,
                 "beta to give up on the silent source")
        wait_for(lambda: where(c)["beta"] == 0, 30, "beta's copy to go")
        cont(alpha)
        assert_settled(c, "alpha")
    sampler.assert_never_twice()


def test_source_stopped_after_copy_completed_is_fenced_and_rescued(
        make_cluster: ClusterFactory, ceph: CephCluster) -> None:
    """SIGSTOP of alpha's worker while its QEMU finishes the copy alone: beta fences
    alpha's clients, takes the locks on its behalf and resumes its complete copy (no
    reboot); after SIGCONT alpha's leftover copy goes and everything agrees on beta."""
    c = shared_pair(make_cluster)
    orch = c.orchestrator()
    fenced_before = set(ceph.blocklist())
    with GuestSampler(c, "vm01") as sampler:
        orch.migrate("vm01", "beta")
        wait_for(lambda: source_copying(c), 60, "alpha's QEMU to send", interval=0.01)
        alpha = worker(c, "alpha")
        stop(alpha)
        try:
            sampler.wait_for(lambda s: s.running == ("beta",), 90, "the guest to run on beta")
        finally:
            cont(alpha)
        assert_settled(c, "beta")
    sampler.assert_never_twice()
    proc = c.hosts["beta"].qemu_processes()[0]
    assert "-incoming" in proc.cmdline()  # the received copy, resumed: no reboot
    assert set(ceph.blocklist()) - fenced_before  # alpha's clients were fenced
    # beta's metrics tell the rescue apart from a handover, and count the fencing.
    # Polled: the rescue is counted at task_postrun, after the result is stored.
    counted = scrape_until(c.hosts["beta"].settings.metrics_port, {series(
        "fcq_migration_rescues_total", host="beta", side="in", kind="fenced-source"): 1})
    assert value(counted, "fcq_migration_rescues_total", host="beta", side="in",
                 kind="fenced-source") == 1
    assert value(counted, "fcq_fencing_actions_total", host="beta",
                 action="take-over") == len(VOLUMES)
    assert value(counted, "fcq_fencing_actions_total", host="beta", action="blocklist") >= 1


def test_source_worker_killed_after_copy_completed_is_rescued(
        make_cluster: ClusterFactory) -> None:
    """kill -9 of alpha's worker during the copy: its QEMU completes alone, beta rescues
    the received copy; alpha's restarted worker kills its leftover and follows."""
    c = shared_pair(make_cluster)
    orch = c.orchestrator()
    with GuestSampler(c, "vm01") as sampler:
        orch.migrate("vm01", "beta")
        wait_for(lambda: source_copying(c), 60, "alpha's QEMU to send", interval=0.01)
        c.kill9(worker(c, "alpha"))
        sampler.wait_for(lambda s: s.running == ("beta",), 90, "the guest to run on beta")
        c.worker("alpha")
        assert_settled(c, "beta")
    sampler.assert_never_twice()
    assert "-incoming" in c.hosts["beta"].qemu_processes()[0].cmdline()


def test_destination_stopped_after_cont(make_cluster: ClusterFactory) -> None:
    """SIGSTOP of beta's worker right after it resumed the guest: nothing kills the
    guest that moved; after SIGCONT everything agrees on beta."""
    c = shared_pair(make_cluster)
    orch = c.orchestrator()
    with GuestSampler(c, "vm01") as sampler:
        task_id = orch.migrate("vm01", "beta")
        attempt = attempt_of(c)
        client = c.redis.client()
        wait_for(lambda: client.get(f"fcq:mig:vm01:{attempt}:dst-running"), 60, "the resume",
                 interval=0.02)
        beta = worker(c, "beta")
        stop(beta)
        time.sleep(5)
        cont(beta)
        orch.wait(task_id, timeout=120)
        assert_settled(c, "beta")
    sampler.assert_never_twice()


def request_of(c: Cluster, attempt: str) -> dict[str, Any]:
    raw = c.redis.client().get(f"fcq:mig:vm01:{attempt}:request")
    assert raw, "the orchestrator records each half's arguments"
    data: dict[str, Any] = json.loads(raw)
    return data


def test_half_delivered_twice_and_replayed_later(make_cluster: ClusterFactory) -> None:
    """A second delivery of each half while the attempt runs is ignored (no second
    QEMU, no failed chord); replays after the attempt ended change nothing."""
    c = shared_pair(make_cluster, **SLOW)
    orch = c.orchestrator()
    app = orch.app
    with GuestSampler(c, "vm01") as sampler:
        task_id = orch.migrate("vm01", "beta")
        attempt = attempt_of(c)
        wait_for(lambda: addr_published(c, attempt), 60, "beta's address")
        req = request_of(c, attempt)
        dup_in = app.send_task("fcq.inmigrate", kwargs=req["inmigrate"], queue="host.beta",
                                task_id=f"{attempt}-in")
        dup_out = app.send_task("fcq.outmigrate", kwargs=req["outmigrate"], queue="host.alpha",
                                task_id=f"{attempt}-out")
        time.sleep(3)
        assert where(c) == {"alpha": 1, "beta": 1}  # still one incoming copy only
        # Ignored, no result of their own: the ids show the first run's states.
        assert {dup_in.state, dup_out.state} <= {"PENDING", "PROGRESS"}
        c.fcq("migrate", "--abort", "vm01")  # end the slow copy
        with pytest.raises(Exception, match="abort"):
            orch.wait(task_id, timeout=120)
        assert_settled(c, "alpha")
        # The same halves, replayed after their attempt ended: nothing moves,
        # and the first run's results stay (a replay is ignored, no result).
        before = (app.AsyncResult(f"{attempt}-in").state,
                  app.AsyncResult(f"{attempt}-out").state)
        late_in = app.send_task("fcq.inmigrate", kwargs=req["inmigrate"], queue="host.beta",
                                task_id=f"{attempt}-in")
        late_out = app.send_task("fcq.outmigrate", kwargs=req["outmigrate"], queue="host.alpha",
                                task_id=f"{attempt}-out")
        time.sleep(5)
        assert where(c) == {"alpha": 1, "beta": 0}
        assert (late_in.state, late_out.state) == before
    sampler.assert_never_twice()
    assert_settled(c, "alpha")


def test_worker_killed_holding_a_slot_frees_it(make_cluster: ClusterFactory) -> None:
    """kill -9 of a worker mid-migration gives its slot back (the kernel drops the flock):
    the next migration from that host is not refused."""
    c = shared_pair(make_cluster, **SLOW)
    orch = c.orchestrator()
    orch.migrate("vm01", "beta")
    attempt = attempt_of(c)
    wait_for(lambda: addr_published(c, attempt), 60, "beta's address")
    alpha = c.hosts["alpha"]
    assert slots_in_use(alpha.settings.run_dir, 1) == 1
    c.kill9(worker(c, "alpha"))
    assert slots_in_use(alpha.settings.run_dir, 1) == 0
    c.worker("alpha")
    assert_settled(c, "alpha")
    c.hosts["alpha"].update_settings(migration_bandwidth_mbps=0)
    for s in list(c.services):
        if s.name == "worker@alpha" and s.proc.poll() is None:
            c.kill9(s)
    c.worker("alpha")
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 in the registry")
    result = orch.wait(orch.migrate("vm01", "beta"), timeout=120)
    assert result["to"] == "beta"
    assert_settled(c, "beta")
