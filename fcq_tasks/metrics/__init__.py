"""fcq's own metrics: every counter, gauge and histogram a process of fcq exports.

This module sits at the bottom of the layers, beside ``errors``: host,
storage and cluster code count what happens where it happens (a lock
conflict in the operation lock, a refusal in admission, a fenced client in
fencing) without knowing whether anyone exports it. Only the worker and
``fcq metrics`` serve them (:mod:`fcq_tasks.metrics.endpoint`); in a CLI
process the counts are simply never read.

The metric objects are module-level on purpose, the one exception to "no
module-level mutable state": a Prometheus counter counts for its process,
and threading a registry through every layer for a side effect would
cost more clarity than it buys. They live in :data:`REGISTRY`, fcq's own,
not prometheus_client's default one, so nothing a library registers there
(Flower's metrics) leaks into fcq's endpoints.

No sample carries a ``host`` label here: one worker is one host, and its
endpoint adds ``host=<name>`` to every sample (:class:`WithHost`), so the
code that counts needs no settings. Labels stay low-cardinality: no VM
names, no task ids, no error messages. docs/operations.md lists every name.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

#: Seconds: from a ping (ms) to a slow start under TCG or a migration (minutes).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
#: Guest downtime of a live migration, seconds (the default limit is 0.3 s).
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5)
#: VMs one sweep changed: most sweeps change none.
CHANGED_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200)

OPERATIONS = Histogram(
    "fcq_operation_duration_seconds",
    "fcq tasks run by this worker, by task, result and outcome, with their duration",
    ("operation", "result", "outcome"), buckets=DURATION_BUCKETS, registry=REGISTRY)

MIGRATION_DURATION = Histogram(
    "fcq_migration_duration_seconds",
    "Live migrations sent from this host: memory copy start to completion (source half)",
    buckets=DURATION_BUCKETS, registry=REGISTRY)
MIGRATION_DOWNTIME = Histogram(
    "fcq_migration_downtime_seconds",
    "Live migrations sent from this host: the guest's downtime as QEMU measured it",
    buckets=DOWNTIME_BUCKETS, registry=REGISTRY)
MIGRATION_BYTES = Counter(
    "fcq_migration_transferred_bytes",
    "Bytes of guest memory sent by live migrations from this host",
    registry=REGISTRY)
MIGRATIONS = Counter(
    "fcq_migrations",
    "Whole live migrations: migrated where the guest now runs (the destination's half "
    "succeeded), failed where it stayed (the source's half failed)",
    ("outcome",), registry=REGISTRY)
MIGRATION_RESCUES = Counter(
    "fcq_migration_rescues",
    "Migration halves that ended by a rescue instead of the normal handover",
    ("side", "kind"), registry=REGISTRY)

SWEEP_DURATION = Histogram(
    "fcq_sweep_duration_seconds", "Ensure sweeps of this host (fcq.ensure_host), duration",
    buckets=DURATION_BUCKETS, registry=REGISTRY)
SWEEP_CHANGED = Histogram(
    "fcq_sweep_vms_changed", "VMs one ensure sweep changed (did at least one action on)",
    buckets=CHANGED_BUCKETS, registry=REGISTRY)
SWEEP_LAST = Gauge(
    "fcq_sweep_last_vms", "VMs of the last ensure sweep, by what the sweep did to them",
    ("result",), registry=REGISTRY)

LOCK_CONFLICTS = Counter(
    "fcq_lock_conflicts",
    "Locks found held by someone else: a VM's operation lock (busy) or a volume lock",
    ("lock",), registry=REGISTRY)
FENCING = Counter(
    "fcq_fencing_actions",
    "Fencing: clients blocklisted, locks broken, locks taken over in a rescue",
    ("action",), registry=REGISTRY)
ADMISSION_REFUSALS = Counter(
    "fcq_admission_refusals",
    "Starts refused by memory admission (vm_max_total_memory) or its lock",
    ("reason",), registry=REGISTRY)

#: What a sweep may do to a VM (fcq_sweep_last_vms' result label).
SWEEP_RESULTS = ("changed", "unchanged", "skipped", "error")

# Every label value known in advance is exported from the start, at 0: a
# series that first appears at 1 hides its first increase from rate() and
# increase(), and a missing series reads as "no data", not as "none".
for _outcome in ("migrated", "failed"):
    MIGRATIONS.labels(outcome=_outcome)
for _lock in ("operation", "volume"):
    LOCK_CONFLICTS.labels(lock=_lock)
for _action in ("blocklist", "break-lock", "take-over"):
    FENCING.labels(action=_action)
for _reason in ("memory", "lock-timeout"):
    ADMISSION_REFUSALS.labels(reason=_reason)


def lock_conflict(lock: str) -> None:
    """*lock*: ``operation`` (the VM is busy) or ``volume`` (another host holds a disk)."""
    LOCK_CONFLICTS.labels(lock=lock).inc()


def fencing(action: str, count: int = 1) -> None:
    """*action*: ``blocklist``, ``break-lock``, ``take-over`` or ``fenced-guest-killed``."""
    if count:
        FENCING.labels(action=action).inc(count)


def admission_refused(reason: str) -> None:
    """*reason*: ``memory`` (the limit) or ``lock-timeout`` (another start held it)."""
    ADMISSION_REFUSALS.labels(reason=reason).inc()


class WithHost(Collector):
    """Every sample of *inner*, with ``host=<name>`` added: one process, one host."""

    def __init__(self, inner: Collector, host: str) -> None:
        self.inner = inner
        self.host = host

    def collect(self) -> Iterable[Metric]:
        for metric in self.inner.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [s._replace(labels={"host": self.host, **s.labels})
                                for s in metric.samples]
            yield labelled
