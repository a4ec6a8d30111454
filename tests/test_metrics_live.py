"""fcq's own metrics scraped from real workers and `fcq metrics` while work runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery.result import AsyncResult
from prometheus_client import CollectorRegistry

from fcq_tasks.errors import RemoteError
from fcq_tasks.host.oplock import operation_lock
from fcq_tasks.metrics.endpoint import MetricsEndpoint
from fcq_tasks.storage import VOLUMES, open_storage
from tests.cluster import Cluster, free_port, send_signed
from tests.conftest import HostFactory
from tests.helpers import (
    CREDS,
    Samples,
    Series,
    absent,
    events,
    fetch,
    scrape,
    scrape_until,
    series,
    value,
    wait_for,
    write_secret,
)
from tests.test_cluster import SLOW_CREATE_VM
from tests.test_migration import shared_pair

ClusterFactory = Any


# -- real workers -----------------------------------------------------------------

OPS = "fcq_operation_duration_seconds"


def op(operation: str, result: str, outcome: str, host: str = "alpha") -> Series:
    """The count series of one (operation, result, outcome) of *host*."""
    return series(f"{OPS}_count", host=host, operation=operation, result=result,
                  outcome=outcome)


def ops(samples: Samples, operation: str, result: str, outcome: str) -> float:
    name, labels = op(operation, result, outcome)
    return value(samples, name, **dict(labels))


def no_ops(samples: Samples, operation: str, result: str, outcome: str) -> bool:
    """Nothing counted yet for this triple (the family is there, the series not)."""
    name, labels = op(operation, result, outcome)
    return absent(samples, OPS, name, **dict(labels))


def test_worker_metrics_move_as_work_runs(make_cluster: ClusterFactory) -> None:
    """Starts, a refusal by memory, a bad request, a stop and a sweep move the right series."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    port = free_port()
    auth = write_secret(alpha.base / "metrics.auth", CREDS.decode() + "\n")
    # Room for one 128 MB guest, not two; creating a root volume takes 3 s.
    alpha.update_settings(metrics_port=port, metrics_auth_file=str(auth),
                          vm_max_total_memory=200, create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    alpha.write_vm("vm02", id=1001, nics=[{"srv": "02-00-00-00-00-02"}])
    c.worker("alpha")
    assert fetch(f"http://127.0.0.1:{port}/metrics", None)[0] == 401
    before = scrape(port, CREDS)
    assert value(before, "fcq_vms", host="alpha", state="stopped", wanted="running") == 2
    orch = c.orchestrator()

    first = orch.submit("start", "vm01")
    wait_for(lambda: orch.state(first)[0] == "PROGRESS", 30, "the start to be running")
    # Scraped while the start runs: answered, and the start not counted yet.
    running = scrape(port, CREDS)
    assert no_ops(running, "start", "success", "changed")
    orch.wait(first, timeout=120)
    with pytest.raises(RemoteError, match="vm_max_total_memory"):
        orch.wait(orch.submit("start", "vm02"), timeout=120)
    bad = send_signed(orch, "start", "alpha", {"vm": "Not A Name",
                                               "expires_at": time.time() + 300})
    AsyncResult(bad, app=orch.app).get(timeout=60, propagate=False)
    started = scrape_until(port, {op("start", "success", "changed"): 1,
                                  op("start", "rejected", "MemoryLimitExceeded"): 1,
                                  op("start", "rejected", "BadRequest"): 1}, CREDS)
    assert no_ops(before, "start", "success", "changed")
    assert ops(started, "start", "success", "changed") == 1
    assert ops(started, "start", "rejected", "MemoryLimitExceeded") == 1
    assert ops(started, "start", "rejected", "BadRequest") == 1
    assert value(started, "fcq_admission_refusals_total", host="alpha", reason="memory") == 1
    assert value(started, "fcq_vms", host="alpha", state="running", wanted="running") == 1
    assert value(started, "fcq_vms", host="alpha", state="stopped", wanted="running") == 1
    # At least the 3 s of creating its volume, and less than the longest
    # bucket: the duration was measured, not assumed.
    start_sum = value(started, "fcq_operation_duration_seconds_sum", host="alpha",
                      operation="start", result="success", outcome="changed")
    assert 3 <= start_sum < 900
    assert value(started, "fcq_operation_duration_seconds_bucket", host="alpha",
                 operation="start", result="success", outcome="changed", le="2.5") == 0

    orch.wait(orch.submit("stop", "vm01"), timeout=120)
    stopped = scrape_until(port, {op("stop", "success", "changed"): 1}, CREDS)
    assert ops(stopped, "stop", "success", "changed") == 1
    assert value(stopped, "fcq_vms", host="alpha", state="running", wanted="running") == 0
    assert value(stopped, "fcq_vms", host="alpha", state="stopped", wanted="running") == 2

    # The sweep starts vm01 again (online) and is refused memory for vm02.
    sweep = orch.app.send_task("fcq.ensure_host", kwargs={"host": "alpha"}, queue="host.alpha")
    assert sweep.get(timeout=120)["failed"] == 1
    swept = scrape_until(port, {op("ensure_host", "success", "changed"): 1,
                                series("fcq_sweep_duration_seconds_count", host="alpha"): 1},
                         CREDS)
    assert value(swept, "fcq_sweep_duration_seconds_count", host="alpha") == 1
    assert value(swept, "fcq_sweep_vms_changed_sum", host="alpha") == 1
    assert value(swept, "fcq_sweep_vms_changed_bucket", host="alpha", le="0.0") == 0
    assert value(swept, "fcq_sweep_vms_changed_bucket", host="alpha", le="1.0") == 1
    for result, count in (("changed", 1), ("error", 1), ("unchanged", 0), ("skipped", 0)):
        assert value(swept, "fcq_sweep_last_vms", host="alpha", result=result) == count
    assert ops(swept, "ensure_host", "success", "changed") == 1
    assert value(swept, "fcq_admission_refusals_total", host="alpha", reason="memory") == 2
    assert value(swept, "fcq_vms", host="alpha", state="running", wanted="running") == 1
    assert value(swept, "process_resident_memory_bytes", host="alpha") > 10 * 2**20


def test_worker_refuses_to_start_with_unsafe_metrics_settings(make_host: HostFactory) -> None:
    """Open beyond loopback without a password, a readable or binary secret: no worker."""
    alpha = make_host("alpha")
    raw = yaml.safe_load(alpha.settings_file.read_text())
    # Written as is: loading these settings is what must fail.
    alpha.settings_file.write_text(yaml.safe_dump({**raw, "metrics_address": "0.0.0.0"}))
    open_ = alpha.fcq("worker", local=False)
    assert open_.returncode == 2
    assert "metrics_auth_file: is required when metrics_address is not a loopback address" \
        in open_.stderr, open_.stderr
    loose = write_secret(alpha.base / "metrics.auth", "prom:x\n", 0o644)
    alpha.settings_file.write_text(yaml.safe_dump({**raw, "metrics_auth_file": str(loose)}))
    readable = alpha.fcq("worker", local=False)
    assert readable.returncode == 2 and "mode 0644" in readable.stderr, readable.stderr
    loose.write_bytes(b"prom:\xff\xfe\n")
    loose.chmod(0o600)
    binary = alpha.fcq("worker", local=False)
    assert binary.returncode == 2 and "is not UTF-8 text" in binary.stderr, binary.stderr


def test_worker_runs_without_metrics_when_its_port_is_taken(make_cluster: ClusterFactory) -> None:
    """A port someone else holds costs the metrics, logged as an error, not the worker."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    holder = MetricsEndpoint(CollectorRegistry(auto_describe=False), "127.0.0.1", 0, None, "t")
    holder.open()
    holder.serve()
    try:
        alpha.update_settings(metrics_port=holder.bound_port)
        c.worker("alpha")  # waits for its heartbeat: it started
        orch = c.orchestrator()
        assert orch.app.send_task("fcq.ping", queue="host.alpha").get(timeout=60)["host"] \
            == "alpha"
        assert events(alpha).count("metrics-endpoint-unavailable") == 1  # once, not per hook
        # The port still answers for its holder, an empty registry: not fcq's metrics.
        assert "fcq_operation_duration_seconds" not in \
            fetch(f"http://127.0.0.1:{holder.bound_port}/metrics", None)[1]
    finally:
        holder.close()


def test_worker_metrics_port_from_the_command_line(make_cluster: ClusterFactory) -> None:
    """--metrics-port overrides the settings (two workers, one file), under the same rule."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    raw = yaml.safe_load(alpha.settings_file.read_text())
    # Off in the file, so the file needs no auth; a port from the command line does.
    alpha.settings_file.write_text(yaml.safe_dump({**raw, "metrics_address": "0.0.0.0",
                                                   "metrics_port": 0}))
    port = free_port()
    refused = alpha.fcq("worker", "--metrics-port", str(port), local=False)
    assert refused.returncode == 2 and "--metrics-port: metrics_auth_file: is required" \
        in refused.stderr, refused.stderr
    alpha.settings_file.write_text(yaml.safe_dump(raw))
    c.spawn("worker", "alpha", "--metrics-port", str(port))
    c.wait_registered("alpha")
    samples = wait_for(lambda: fetch(f"http://127.0.0.1:{port}/metrics", None)[0] == 200
                       and scrape(port), 30, "the worker's metrics on the port given")
    assert value(samples, "fcq_vms", host="alpha", state="running", wanted="running") == 0
    assert fetch(f"http://127.0.0.1:{raw['metrics_port']}/metrics", None)[0] == 0


def test_cluster_metrics_show_the_queue_of_a_stopped_worker(make_cluster: ClusterFactory,
                                                            tmp_path: Path) -> None:
    """`fcq metrics`: behind its password; hosts alive, VMs by state; tasks queued for a
    stopped worker pile up and drain when it is back."""
    port = free_port()
    auth = write_secret(tmp_path / "cluster-metrics.auth", CREDS.decode() + "\n")
    c: Cluster = make_cluster(("alpha",), metrics_port=port, metrics_auth_file=str(auth))
    c.hosts["alpha"].write_vm("vm01")
    worker = c.worker("alpha")
    orch = c.orchestrator()
    # Host gamma was down before `fcq metrics` started: only its queue tells of it.
    orch.app.send_task("fcq.ping", queue="host.gamma")
    c.spawn("metrics")
    wait_for(lambda: fetch(f"http://127.0.0.1:{port}/metrics", None)[0] == 401, 30,
             "fcq metrics to answer")
    first = scrape(port, CREDS)
    assert value(first, "fcq_cluster_up") == 1 and value(first, "fcq_hosts_alive") == 1
    assert value(first, "fcq_queue_length", host="alpha") == 0
    assert value(first, "fcq_queue_length", host="gamma") == 1
    assert value(first, "fcq_cluster_vms", host="alpha", state="stopped", wanted="running") == 1
    os.killpg(worker.proc.pid, signal.SIGTERM)  # a clean stop: it withdraws its heartbeat
    worker.proc.wait(30)
    # Sent as beat sends (the orchestrator refuses a host without a heartbeat).
    pings = [orch.app.send_task("fcq.ping", queue="host.alpha") for _ in range(3)]
    queued = scrape(port, CREDS)
    assert value(queued, "fcq_hosts_alive") == 0
    assert value(queued, "fcq_queue_length", host="alpha") == 3
    # No heartbeat, no VMs to tell: alpha's series are gone, the family stays.
    assert absent(queued, "fcq_cluster_vms", "fcq_cluster_vms", host="alpha",
                  state="stopped", wanted="running")
    c.worker("alpha")
    for ping in pings:
        assert ping.get(timeout=60)["host"] == "alpha"
    drained = scrape(port, CREDS)
    assert value(drained, "fcq_queue_length", host="alpha") == 0
    assert value(drained, "fcq_hosts_alive") == 1


def test_malformed_heartbeats_cost_their_hosts_samples_only(make_cluster: ClusterFactory,
                                                            tmp_path: Path) -> None:
    """A heartbeat that is not JSON, one with a broken field (and no signature): those
    two hosts are left out and counted; the good host and its queue still come out, and
    so do the worker's counters when its VM directory cannot be read."""
    c: Cluster = make_cluster(("alpha",), metrics_port=free_port())
    alpha = c.hosts["alpha"]
    c.worker("alpha")
    client = c.redis.client()
    client.set("fcq:host:junk", "not json", ex=300)
    client.set("fcq:host:delta", json.dumps({"host": "delta", "seen": "soon"}), ex=300)
    port = alpha.settings.cluster.metrics_port
    c.spawn("metrics")
    wait_for(lambda: fetch(f"http://127.0.0.1:{port}/metrics", None)[0] == 200, 30,
             "fcq metrics to answer")
    seen = scrape(port)
    assert value(seen, "fcq_cluster_up") == 1
    assert value(seen, "fcq_host_records_unreadable") == 2
    assert value(seen, "fcq_hosts_alive") == 1
    assert value(seen, "fcq_host_heartbeat_age_seconds", host="alpha") >= 0
    assert absent(seen, "fcq_host_heartbeat_age_seconds", "fcq_host_heartbeat_age_seconds",
                  host="delta")
    assert value(seen, "fcq_queue_length", host="alpha") == 0
    # delta's record is not signed by a host the inventory knows: not a host
    # at all for the metrics (docs/security.md), so no queue of its own.
    assert absent(seen, "fcq_queue_length", "fcq_queue_length", host="delta")

    # The worker's side: its VM directory replaced by a file (listing it fails).
    worker_port = alpha.settings.metrics_port
    config_dir = alpha.settings.vm_config_dir
    aside = config_dir.with_name(config_dir.name + ".aside")
    config_dir.rename(aside)
    config_dir.write_text("not a directory\n")
    try:
        broken = scrape(worker_port)
        assert value(broken, "fcq_vms_unreadable", host="alpha") == 1
        assert absent(broken, "fcq_vms", "fcq_vms", host="alpha", state="stopped",
                      wanted="running")
        assert value(broken, "process_resident_memory_bytes", host="alpha") > 0
        assert "fcq_operation_duration_seconds" in broken.families
    finally:
        config_dir.unlink()
        aside.rename(config_dir)
    healed = scrape(worker_port)
    assert value(healed, "fcq_vms_unreadable", host="alpha") == 0
    assert value(healed, "fcq_vms", host="alpha", state="stopped", wanted="running") == 0


def test_lock_conflicts_are_counted(make_cluster: ClusterFactory) -> None:
    """A VM held busy: each try is a conflict, the retry and the refusal are counted; a
    volume locked by another host is a volume conflict."""
    c: Cluster = make_cluster(("alpha",), task_busy_wait=0.5, busy_retries=1,
                              busy_retry_delay=1)
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01")
    c.worker("alpha")
    port = alpha.settings.metrics_port
    orch = c.orchestrator()
    # The test holds vm01's operation lock, as a long operation of another process would.
    with operation_lock(alpha.settings.run_dir, "vm01"), \
            pytest.raises(RemoteError, match="busy"):
        orch.wait(orch.submit("stop", "vm01"), timeout=60)
    busy = scrape_until(port, {op("stop", "retry", "retry"): 1,
                               op("stop", "rejected", "VMBusy"): 1})
    assert value(busy, "fcq_lock_conflicts_total", host="alpha", lock="operation") == 2
    assert ops(busy, "stop", "retry", "retry") == 1
    assert ops(busy, "stop", "rejected", "VMBusy") == 1
    # Exported at 0 from the start (known label values are), not merely missing.
    assert value(busy, "fcq_lock_conflicts_total", host="alpha", lock="volume") == 0
    # Host gamma (the same lock directory, as shared storage would be) holds vm02's root.
    alpha.write_vm("vm02", id=1001, nics=[{"srv": "02-00-00-00-00-02"}])
    assert open_storage(dataclasses.replace(alpha.settings, host="gamma")).lock("vm02", "root")
    with pytest.raises(RemoteError, match="locked by host gamma"):
        orch.wait(orch.submit("start", "vm02", host="alpha"), timeout=60)
    locked = scrape_until(port, {op("start", "rejected", "LockedByOtherHost"): 1})
    assert value(locked, "fcq_lock_conflicts_total", host="alpha", lock="volume") == 1
    assert ops(locked, "start", "rejected", "LockedByOtherHost") == 1


def test_migration_and_fencing_metrics(make_cluster: ClusterFactory) -> None:
    """A live migration: duration, downtime and bytes on the source, the outcome on the
    destination; then beta dies and alpha's force-unlock fences it."""
    c = shared_pair(make_cluster)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    orch = c.orchestrator()
    result = orch.wait(orch.migrate("vm01", "beta"), timeout=180)
    assert result["outcome"] == "migrated"
    src = scrape_until(alpha.settings.metrics_port, {
        series("fcq_migration_duration_seconds_count", host="alpha"): 1,
        op("outmigrate", "success", "handed-over"): 1})
    dst = scrape_until(beta.settings.metrics_port, {
        op("inmigrate", "success", "resumed", host="beta"): 1,
        series("fcq_migrations_total", host="beta", outcome="migrated"): 1})
    assert value(src, "fcq_migration_duration_seconds_count", host="alpha") == 1
    assert value(src, "fcq_migration_duration_seconds_sum", host="alpha") == \
        pytest.approx(result["total_ms"] / 1000)
    assert value(src, "fcq_migration_downtime_seconds_sum", host="alpha") == \
        pytest.approx(result["downtime_ms"] / 1000)
    assert value(src, "fcq_migration_transferred_bytes_total", host="alpha") == \
        result["transferred"] > 0
    assert value(src, "fcq_operation_duration_seconds_count", host="alpha",
                 operation="outmigrate", result="success", outcome="handed-over") == 1
    assert value(dst, "fcq_operation_duration_seconds_count", host="beta",
                 operation="inmigrate", result="success", outcome="resumed") == 1
    assert value(dst, "fcq_migrations_total", host="beta", outcome="migrated") == 1
    assert value(dst, "fcq_migration_duration_seconds_count", host="beta") == 0
    assert value(dst, "fcq_vms", host="beta", state="running", wanted="running") == 1

    # beta dies; once its heartbeat is gone, alpha may break its locks, fencing it first.
    c.kill9(next(s for s in c.services if s.name == "worker@beta"))
    wait_for(lambda: "beta" not in orch.hosts(), 30, "beta's heartbeat to expire")
    broken = orch.wait(orch.submit("force_unlock", "vm01", host="alpha"), timeout=60)
    assert set(broken["broken"]) == set(VOLUMES)
    fenced = scrape(alpha.settings.metrics_port)
    assert value(fenced, "fcq_fencing_actions_total", host="alpha",
                 action="break-lock") == len(VOLUMES)
    # At least beta's QEMU (the images' writer) and beta's worker (the lock holder).
    assert value(fenced, "fcq_fencing_actions_total", host="alpha", action="blocklist") >= 2
