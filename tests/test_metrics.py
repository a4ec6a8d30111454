"""fcq's own metrics: the rules as tables, then scraped from real workers while work runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fcq_tasks.cluster.clustermetrics import host_of_queue_key, queue_keys
from fcq_tasks.cluster.workermetrics import outcome_of, sweep_counts, vm_states
from fcq_tasks.config.settings import load_host_settings
from fcq_tasks.errors import ConfigError, RemoteError, TaskFailed, TaskRejected
from fcq_tasks.host.oplock import operation_lock
from fcq_tasks.metrics import REGISTRY
from fcq_tasks.metrics.endpoint import MetricsEndpoint, authorized, read_credentials
from fcq_tasks.storage import VOLUMES, open_storage
from tests.cluster import Cluster, free_port
from tests.conftest import HostFactory
from tests.helpers import (
    Samples,
    Series,
    absent,
    basic,
    events,
    fetch,
    scrape,
    scrape_until,
    series,
    value,
    wait_for,
)
from tests.test_cluster import SLOW_CREATE_VM
from tests.test_migration import shared_pair

ClusterFactory = Any

CREDS = b"prom:scrape-secret"


# -- the rules, as tables -----------------------------------------------------

@pytest.mark.parametrize(("state", "retval", "expected"), [
    ("SUCCESS", {"actions": ["start"], "status": "running"}, ("success", "changed")),
    ("SUCCESS", {"actions": [], "status": "running"}, ("success", "unchanged")),
    ("SUCCESS", {"outcome": "taken", "actions": ["snapshot"]}, ("success", "taken")),
    ("SUCCESS", None, ("success", "unchanged")),
    ("FAILURE", TaskRejected({"error": "MemoryLimitExceeded"}),
     ("rejected", "MemoryLimitExceeded")),
    ("FAILURE", TaskRejected({"error": "BadRequest"}), ("rejected", "BadRequest")),
    ("FAILURE", TaskFailed({"error": "QmpError"}), ("failed", "QmpError")),
    ("FAILURE", KeyError("bug"), ("failed", "KeyError")),
    ("RETRY", None, ("retry", "retry")),
    ("IGNORED", None, ("ignored", "ignored")),
])
def test_outcome_rows(state: str, retval: object, expected: tuple[str, str]) -> None:
    """Each end of a task maps to one (result, outcome) pair: refusals by their error class."""
    assert outcome_of(state, retval) == expected


def test_sweep_counts_what_the_sweep_did() -> None:
    """A sweep's summary counts as changed (actions), unchanged, skipped (busy) or error."""
    summary = {"vms": {"a": ["start"], "b": ["stop", "clean-up"], "c": None, "d": [],
                       "e": "skipped", "f": "error"}}
    assert sweep_counts(summary) == {"changed": 2, "unchanged": 2, "skipped": 1, "error": 1}


def test_vm_states_from_a_host_record() -> None:
    """Every (state, wanted) pair is listed, zeros included; orphans count as wanted unknown."""
    record = {"running": ["vm01", "orphan"],
              "vms": {"vm01": {"kvm_host": "alpha", "online": True},
                      "vm02": {"kvm_host": "alpha", "online": True},
                      "vm03": {"kvm_host": "alpha", "online": False},
                      "vm04": {"kvm_host": "beta", "online": True},
                      "vm05": {"error": "bad file"}}}
    counts = vm_states(record, "alpha")
    assert len(counts) == 8 and sum(counts.values()) == 6
    assert {k: n for k, n in counts.items() if n} == {
        ("running", "running"): 1, ("stopped", "running"): 1, ("stopped", "stopped"): 1,
        ("stopped", "elsewhere"): 1, ("stopped", "unknown"): 1, ("running", "unknown"): 1}


def test_queue_keys_cover_kombus_priority_lists() -> None:
    """A host's queue is its list plus kombu's priority sub-lists; each key names its host."""
    keys = queue_keys("alpha")
    assert keys == ["host.alpha", "host.alpha\x06\x163", "host.alpha\x06\x166",
                    "host.alpha\x06\x169"]
    assert [host_of_queue_key(k) for k in keys] == ["alpha"] * 4
    assert host_of_queue_key("fcq:host:alpha") is None and host_of_queue_key("host.") is None


def test_basic_auth_check() -> None:
    """Only a listed user with its password passes; malformed headers do not."""
    creds = {"prom": "scrape-secret"}
    assert authorized(basic(CREDS), creds)
    for header in (None, "", basic(b"prom:wrong"), basic(b"other:scrape-secret"),
                   basic(b"prom"), "Basic !!!", "Bearer x", basic(b"prom:scrape-secret:x"),
                   basic(b"prom:scrape-secre"), basic(b"prom:scrape-secretX"),
                   basic(b"prom:\xff"), basic(b":scrape-secret")):
        assert not authorized(header, creds), header
    # Several users: each with its own password only; a colon in a password is its own.
    many = {"prom": "scrape-secret", "ops": "a:b"}
    assert authorized(basic(b"ops:a:b"), many) and authorized(basic(CREDS), many)
    assert not authorized(basic(b"ops:scrape-secret"), many)
    assert not authorized(basic(b"prom:a:b"), many)


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def settings_error(tmp_path: Path, **raw: Any) -> ConfigError:
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_host_settings(path)
    return err.value


def test_settings_demand_auth_beyond_loopback(tmp_path: Path) -> None:
    """A worker's or the cluster's endpoint off loopback needs an auth file; ports are checked."""
    err = settings_error(tmp_path, metrics_address="0.0.0.0")
    assert err.field == "metrics_auth_file" and "not a loopback address" in err.rule
    err = settings_error(tmp_path, cluster={"metrics_address": "10.0.0.5"})
    assert err.field == "cluster.metrics_auth_file"
    err = settings_error(tmp_path, metrics_port=70000)
    assert err.field == "metrics_port" and "between 0 and 65535" in err.rule
    # Loopback (and port 0, no endpoint) need none; with a file any address is fine.
    for raw in ({"metrics_address": "::1"}, {"metrics_address": "localhost"},
                {"metrics_address": "0.0.0.0", "metrics_port": 0},
                {"metrics_address": "0.0.0.0", "metrics_auth_file": "/etc/fcq/m"}):
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump(raw))
        load_host_settings(path)


def test_endpoint_refuses_readable_or_empty_auth_files(tmp_path: Path) -> None:
    """A secret others can read, or a file without user:password, stops the endpoint opening."""
    loose = write_secret(tmp_path / "loose", "prom:x\n", 0o644)
    with pytest.raises(ConfigError) as err:
        read_credentials("host.yaml", "metrics_auth_file", loose)
    assert err.value.field == "metrics_auth_file" and "mode 0644" in err.value.rule
    for text in ("\n", "just-a-password\n", ":nouser\n"):
        with pytest.raises(ConfigError, match="user:password"):
            read_credentials("host.yaml", "metrics_auth_file",
                             write_secret(tmp_path / "bad", text))
    assert read_credentials("f", "m", write_secret(tmp_path / "ok", "a:b\n\nc:d:e\n")) == {
        "a": "b", "c": "d:e"}


def test_endpoint_answers_only_metrics_and_only_with_credentials(tmp_path: Path) -> None:
    """401 without or with wrong credentials, 404 off /metrics, the text format with them."""
    auth = write_secret(tmp_path / "auth", CREDS.decode() + "\n")
    endpoint = MetricsEndpoint(REGISTRY, "127.0.0.1", 0, auth, "test")
    endpoint.open()
    endpoint.serve()
    try:
        url = f"http://127.0.0.1:{endpoint.bound_port}"
        assert fetch(url + "/metrics", None)[0] == 401
        assert fetch(url + "/metrics", b"prom:wrong")[0] == 401
        assert fetch(url + "/", CREDS)[0] == 404
        status, body = fetch(url + "/metrics", CREDS)
        assert status == 200 and "# TYPE fcq_operation_duration_seconds histogram" in body
    finally:
        endpoint.close()


def closed(sock: socket.socket) -> bool:
    """Whether the server closed *sock* (end of stream or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_endpoint_serves_four_at_once_and_closes_the_fifth() -> None:
    """Four idle clients take every slot: a fifth is closed at once; freed, it answers."""
    endpoint = MetricsEndpoint(REGISTRY, "127.0.0.1", 0, None, "test")
    endpoint.open()
    endpoint.serve()
    idle = [socket.create_connection(("127.0.0.1", endpoint.bound_port)) for _ in range(4)]
    try:
        time.sleep(0.5)  # the server thread accepts them in order, each takes a slot
        with socket.create_connection(("127.0.0.1", endpoint.bound_port)) as fifth:
            fifth.settimeout(3)  # a timeout here: left waiting for a slot, the failure
            assert closed(fifth)
    finally:
        for sock in idle:
            sock.close()
    try:
        url = f"http://127.0.0.1:{endpoint.bound_port}/metrics"
        wait_for(lambda: fetch(url, None)[0] == 200, 10, "a slot to be free again")
    finally:
        endpoint.close()


def test_endpoint_cuts_a_slow_client_at_its_deadline() -> None:
    """A client trickling a byte a second (under the per-read timeout) is cut at the deadline."""
    endpoint = MetricsEndpoint(REGISTRY, "127.0.0.1", 0, None, "test", deadline=2.0)
    endpoint.open()
    endpoint.serve()
    try:
        with socket.create_connection(("127.0.0.1", endpoint.bound_port)) as slow:
            began = time.monotonic()
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")
            slow.settimeout(1.0)
            cut = None
            while cut is None and time.monotonic() - began < 12:
                try:
                    slow.sendall(b"X")
                    if slow.recv(1) == b"":
                        cut = time.monotonic() - began
                except TimeoutError:
                    continue  # still open: one more byte
                except OSError:
                    cut = time.monotonic() - began
        assert cut is not None and 1.5 <= cut < 5, cut
    finally:
        endpoint.close()


class Unreadable(Collector):
    """A collector whose source is gone (a run directory unmounted under it)."""

    def collect(self) -> Iterable[Metric]:
        raise OSError("run directory gone")


def test_endpoint_answers_500_when_a_collector_fails() -> None:
    """A failing collector costs that scrape a 500 with the reason, not the endpoint."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Unreadable())
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0, None, "test")
    endpoint.open()
    endpoint.serve()
    try:
        url = f"http://127.0.0.1:{endpoint.bound_port}/metrics"
        for _ in range(2):  # and it still answers afterwards
            assert fetch(url, None)[0] == 500
    finally:
        endpoint.close()


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
    bad = orch.app.send_task("fcq.start", kwargs={"vm": "Not A Name"}, queue="host.alpha")
    bad.get(timeout=60, propagate=False)
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
        assert "metrics-endpoint-unavailable" in events(alpha)
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
    """A heartbeat that is not JSON, one with a broken field: those two hosts are left out
    and counted; the good host and every queue still come out, and so do the worker's
    counters when its VM directory cannot be read."""
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
    assert value(seen, "fcq_queue_length", host="delta") == 0

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
