"""fcq's own metrics: the rules as tables, and the endpoint on its own (real sockets).

Scraped from real workers: tests/test_metrics_live.py.
"""

from __future__ import annotations

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
from fcq_tasks.errors import ConfigError, TaskFailed, TaskRejected
from fcq_tasks.metrics import REGISTRY
from fcq_tasks.metrics.endpoint import MetricsEndpoint, authorized, read_credentials
from tests.helpers import CREDS, basic, fetch, wait_for, write_secret

# -- the rules, as tables -----------------------------------------------------

@pytest.mark.parametrize(("state", "retval", "expected"), [
    ("SUCCESS", {"actions": ["start"], "status": "running"}, ("success", "changed")),
    ("SUCCESS", {"actions": [], "status": "running"}, ("success", "unchanged")),
    # What ensure returns for a VM that is as configured: the planner's NOTHING.
    ("SUCCESS", {"actions": ["nothing"], "status": "running"}, ("success", "unchanged")),
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
                       "e": "skipped", "f": "error", "g": ["nothing"], "h": ["nothing"]}}
    assert sweep_counts(summary) == {"changed": 2, "unchanged": 4, "skipped": 1, "error": 1}


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
