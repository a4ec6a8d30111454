"""The worker's metrics: every task counted in one place, the VMs by state, the endpoint.

Operations are counted from Celery's task signals, not inside each task:
``task_prerun`` and ``task_postrun`` frame every task of this worker
(bad requests refused before any VM is touched, busy retries, ignored
duplicate halves), in the thread that runs it. What a migration half or
a sweep reports (``total_ms``, ``downtime_ms``, ``transferred``, the
sweep's per-VM summary) is read from the task's result there too, so no
task body carries metrics code. The VM gauge is computed when scraped,
from the same cheap sources as the heartbeat (config files and the
process table, no QMP), so it is never staler than the scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import structlog
from celery.signals import task_postrun, task_prerun
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fcq_tasks import metrics
from fcq_tasks.cluster import registry
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import TaskError, TaskRejected
from fcq_tasks.metrics.endpoint import MetricsEndpoint

log = structlog.get_logger()

TASK_PREFIX = "fcq."

#: Celery's end states → the ``result`` label.
RESULTS = {"SUCCESS": "success", "RETRY": "retry", "IGNORED": "ignored",
           "REJECTED": "requeued"}

#: The labels of fcq_vms: where QEMU is, and what the config wants.
VM_STATES = ("running", "stopped")
VM_WANTED = ("running", "stopped", "elsewhere", "unknown")


def operation_of(task_name: str) -> str:
    """The ``operation`` label: the task's name without ``fcq.`` (start, ensure_host, …)."""
    return task_name.removeprefix(TASK_PREFIX)


def outcome_of(state: str, retval: object) -> tuple[str, str]:
    """(result, outcome) of one task run, for the labels; pure.

    success: the result's ``outcome`` when it names one, else ``changed``
    or ``unchanged`` by its actions. A refusal (a UserError: bad request,
    busy, memory limit, foreign lock) is ``rejected`` and a system failure
    ``failed``, both with the error's class as outcome; anything else that
    escaped a task is ``failed`` with the exception's class.
    """
    if state == "SUCCESS":
        if isinstance(retval, dict):
            named = retval.get("outcome")
            if isinstance(named, str) and named:
                return "success", named
            return "success", "changed" if did_something(retval.get("actions")) \
                else "unchanged"
        return "success", "unchanged"
    if state == "FAILURE":
        if isinstance(retval, TaskError):
            kind = "rejected" if isinstance(retval, TaskRejected) else "failed"
            return kind, str(retval.info.get("error", type(retval).__name__))
        return "failed", type(retval).__name__
    return RESULTS.get(state, state.lower()), state.lower()


def did_something(actions: object) -> bool:
    """Whether a list of actions done changed anything: ``["nothing"]`` did not."""
    return isinstance(actions, list) and any(a != "nothing" for a in actions)


def sweep_counts(result: dict[str, Any]) -> dict[str, int]:
    """VMs of one sweep result by what it did to them (fcq_sweep_last_vms)."""
    counts = dict.fromkeys(metrics.SWEEP_RESULTS, 0)
    for done in (result.get("vms") or {}).values():
        if did_something(done):
            counts["changed"] += 1
        elif done in ("skipped", "error"):
            counts[str(done)] += 1
        else:
            counts["unchanged"] += 1
    return counts


def record(task_name: str, state: str, retval: object, seconds: float) -> None:
    """Count one finished task of this worker."""
    operation = operation_of(task_name)
    result, outcome = outcome_of(state, retval)
    if operation == "ensure_host" and isinstance(retval, dict):
        outcome = "changed" if sweep_counts(retval)["changed"] else "unchanged"
    metrics.OPERATIONS.labels(operation=operation, result=result,
                              outcome=outcome).observe(seconds)
    if operation == "outmigrate" and state == "FAILURE":
        # The source half failed: the guest stays (or is back) here.
        metrics.MIGRATIONS.labels(outcome="failed").inc()
    if state != "SUCCESS" or not isinstance(retval, dict):
        return
    if operation == "ensure_host":
        counts = sweep_counts(retval)
        metrics.SWEEP_DURATION.observe(seconds)
        metrics.SWEEP_CHANGED.observe(counts["changed"])
        for key, count in counts.items():
            metrics.SWEEP_LAST.labels(result=key).set(count)
    elif operation == "outmigrate" and retval.get("total_ms") is not None:
        metrics.MIGRATION_DURATION.observe(float(retval["total_ms"]) / 1000)
        metrics.MIGRATION_DOWNTIME.observe(float(retval.get("downtime_ms") or 0) / 1000)
        metrics.MIGRATION_BYTES.inc(int(retval.get("transferred") or 0))
    elif operation == "inmigrate" and retval.get("status") == "running":
        metrics.MIGRATIONS.labels(outcome="migrated").inc()
    if operation in ("inmigrate", "outmigrate") and retval.get("rescue"):
        metrics.MIGRATION_RESCUES.labels(side=operation.removesuffix("migrate"),
                                         kind=str(retval["rescue"])).inc()


class TaskTimer:
    """Connects to the task signals; times each task from prerun to postrun."""

    def __init__(self) -> None:
        self._started: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def connect(self) -> None:
        task_prerun.connect(self._prerun, weak=False)
        task_postrun.connect(self._postrun, weak=False)

    @staticmethod
    def _key(task_id: str | None) -> tuple[str, int]:
        # With the thread: a redelivery of a task still running here runs
        # on another thread under the same id.
        return str(task_id), threading.get_ident()

    def _prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        with self._lock:
            self._started[self._key(task_id)] = time.monotonic()

    def _postrun(self, task_id: str | None = None, task: Any = None, retval: object = None,
                 state: str | None = None, **_: Any) -> None:
        with self._lock:
            started = self._started.pop(self._key(task_id), None)
        name = str(getattr(task, "name", ""))
        if started is None or not name.startswith(TASK_PREFIX):
            return
        try:
            record(name, str(state), retval, time.monotonic() - started)
        except Exception as err:  # a metric must never fail a task
            log.warning("metrics-record-failed", task=name, error=str(err))


def vm_states(record_: dict[str, Any], host: str) -> dict[tuple[str, str], int]:
    """(state, wanted) → VMs, from a host record of the registry; pure.

    state: ``running`` (its QEMU lives here) or ``stopped``. wanted, from
    its config: ``running`` (online, this host), ``stopped`` (offline),
    ``elsewhere`` (another host's), ``unknown`` (no config or a broken one).
    Every pair is there, 0 if no VM is in it: a series that vanished would
    read as "no data", not as "none".
    """
    counts = {(state, wanted): 0 for state in VM_STATES for wanted in VM_WANTED}
    running = set(record_.get("running", []))
    configs: dict[str, Any] = record_.get("vms", {})
    for name in running | set(configs):
        spec = configs.get(name)
        if not isinstance(spec, dict) or "error" in spec:
            wanted = "unknown"
        elif spec.get("kvm_host") not in (None, host):
            wanted = "elsewhere"
        else:
            wanted = "running" if spec.get("online") else "stopped"
        key = ("running" if name in running else "stopped", wanted)
        counts[key] += 1
    return counts


def vm_gauge(name: str, doc: str, labels: tuple[str, ...],
             counts: Iterable[tuple[tuple[str, ...], int]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, count in sorted(counts):
        family.add_metric(list(key), count)
    return family


class VMStates(Collector):
    """fcq_vms{state, wanted}: this host's VMs, counted when scraped."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        # Caught here, not left to the endpoint's 500: the counters and the
        # process metrics of this scrape do not depend on the VM directories.
        counts: dict[tuple[str, str], int] = {}
        failed = False
        try:
            counts = vm_states(registry.host_record(self.settings), self.settings.host)
        except Exception as err:
            log.warning("metrics-vms-unreadable", host=self.settings.host, error=str(err))
            failed = True
        unreadable = GaugeMetricFamily(
            "fcq_vms_unreadable", "1 when this scrape could not count the VMs (fcq_vms left out)")
        unreadable.add_metric([], int(failed))
        yield unreadable
        yield vm_gauge("fcq_vms", "VMs this host knows, by state and what their config wants",
                       ("state", "wanted"), counts.items())


def worker_registry(settings: HostSettings) -> CollectorRegistry:
    """What the worker serves: fcq's counters, its VMs and its process, each with host=."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.WithHost(metrics.REGISTRY, settings.host))
    reg.register(metrics.WithHost(VMStates(settings), settings.host))
    reg.register(metrics.WithHost(ProcessCollector(registry=None), settings.host))
    return reg


def worker_endpoint(settings: HostSettings) -> MetricsEndpoint | None:
    """The worker's endpoint as its settings say, not opened yet; None when switched off."""
    if settings.metrics_port == 0:
        return None
    return MetricsEndpoint(worker_registry(settings), settings.metrics_address,
                           settings.metrics_port, settings.metrics_auth_file, settings.source)
