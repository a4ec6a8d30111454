"""`fcq metrics`: the cluster's own endpoint, read from Redis when scraped.

What no single worker can say: which hosts are alive, how many tasks wait
in each host's queue (above all the queue of a host whose worker is down:
nobody else would report it), and every live host's VMs by state, from
the registry's heartbeats. A process of its own, not part of beat: it
answers while beat is on standby or down, and one can run beside each
Prometheus.

A queue is kombu's Redis list ``host.<name>``, plus one list per priority
step (``host.<name>\\x06\\x16<n>``) when a message carries a priority;
their lengths are summed. Messages delivered to a worker and not yet
acknowledged are not counted: they are running, not waiting. A host whose
queue empties after its heartbeat stopped stays listed with 0 as long as
this process runs, so a graph drops to zero instead of ending.

Which hosts have a queue is learnt from the heartbeats at every scrape and
from a SCAN for ``host.*`` keys every ``QUEUE_SCAN_EVERY`` seconds: a host
whose worker is down was almost always seen alive first, and that scan
finds the queues of hosts that were down before this process started.
Reading the heartbeats is itself a SCAN (``registry.hosts``, as the
orchestrator reads them), and a SCAN walks the whole keyspace whatever its
pattern: a scrape costs Redis O(keys), task results included
(docs/operations.md says so, with the scrape interval to use).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import QUEUE_PREFIX
from fcq_tasks.cluster.workermetrics import vm_gauge, vm_states
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import ConfigError
from fcq_tasks.metrics.endpoint import MetricsEndpoint

log = structlog.get_logger()

#: kombu's Redis transport: separator and steps of its priority sub-queues.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: Seconds between two scans of the keyspace for queues of unknown hosts.
QUEUE_SCAN_EVERY = 300.0


def queue_keys(host: str) -> list[str]:
    """The Redis lists that hold *host*'s waiting tasks (kombu's priority sub-queues)."""
    queue = QUEUE_PREFIX + host
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def host_of_queue_key(key: str) -> str | None:
    """``host.alpha`` or ``host.alpha\\x06\\x163`` → ``alpha``; anything else → None."""
    if not key.startswith(QUEUE_PREFIX):
        return None
    return key[len(QUEUE_PREFIX):].split(PRIORITY_SEP, 1)[0] or None


class ClusterState(Collector):
    """The cluster's gauges, read from Redis at every scrape."""

    def __init__(self, client: redis.Redis, hosts_dir: Path | None = None) -> None:
        self.client = client
        # Heartbeats are believed only when their hosts signed them (records
        # in hosts_dir); without one (a test's bare collector) all are read.
        self.hosts_dir = hosts_dir
        self.seen_hosts: set[str] = set()
        self._scanned: float | None = None  # monotonic time of the last queue scan
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("fcq_cluster_up", "1 when Redis answered this scrape")
        try:
            hosts, queues, unreadable = self._read()
        except (redis.RedisError, ValueError, KeyError, TypeError) as err:
            log.warning("cluster-metrics-unreadable", error=str(err))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        now = time.time()
        alive = GaugeMetricFamily("fcq_hosts_alive", "Hosts with a fresh, readable heartbeat")
        age = GaugeMetricFamily("fcq_host_heartbeat_age_seconds",
                                "Seconds since each live host's last heartbeat", labels=["host"])
        booked = GaugeMetricFamily("fcq_host_memory_booked_bytes",
                                   "Memory booked by each live host's running VMs",
                                   labels=["host"])
        limit = GaugeMetricFamily("fcq_host_memory_limit_bytes",
                                  "Each live host's vm_max_total_memory", labels=["host"])
        vms: dict[tuple[str, ...], int] = {}
        live = 0
        for name, rec in sorted(hosts.items()):
            # One malformed heartbeat (an older fcq, a hand-written key) costs
            # that host's samples, not the scrape: queues still come out.
            try:
                values = (max(0.0, now - float(rec.get("seen", now))),
                          int(rec.get("booked_mb", 0)) * 2**20,
                          int(rec.get("limit_mb", 0)) * 2**20,
                          vm_states(rec, name))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                log.warning("cluster-metrics-bad-heartbeat", host=name, error=str(err))
                unreadable.append(name)
                continue
            live += 1
            age.add_metric([name], values[0])
            booked.add_metric([name], values[1])
            limit.add_metric([name], values[2])
            for (state, wanted), count in values[3].items():
                vms[(name, state, wanted)] = count
        alive.add_metric([], live)
        yield alive
        bad = GaugeMetricFamily("fcq_host_records_unreadable",
                                "Heartbeat records this scrape could not read or whose "
                                "signature did not verify (left out)")
        bad.add_metric([], len(unreadable))
        yield bad
        yield from (age, booked, limit)
        yield vm_gauge("fcq_cluster_vms", "VMs of every live host, by state and what their "
                       "config wants (from the heartbeats)", ("host", "state", "wanted"),
                       vms.items())
        queue = GaugeMetricFamily("fcq_queue_length",
                                  "Tasks waiting in each host's queue (host.<name>)",
                                  labels=["host"])
        for name, length in sorted(queues.items()):
            queue.add_metric([name], length)
        yield queue

    def _read(self) -> tuple[dict[str, dict[str, Any]], dict[str, int], list[str]]:
        unreadable: list[str] = []
        hosts = registry.hosts(self.client, unreadable)
        if self.hosts_dir is not None:
            hosts = registry.trusted(hosts, self.hosts_dir, unreadable)
        found: set[str] = set()
        now = time.monotonic()
        if self._scanned is None or now - self._scanned >= QUEUE_SCAN_EVERY:
            found = {h for key in self.client.scan_iter(QUEUE_PREFIX + "*", count=1000)
                     if (h := host_of_queue_key(str(key))) is not None}
            self._scanned = now
        with self._lock:
            self.seen_hosts |= set(hosts) | found
            names = sorted(self.seen_hosts)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for key in queue_keys(name):
                pipe.llen(key)
        lengths = pipe.execute()
        steps = len(PRIORITY_STEPS)
        return hosts, {name: sum(int(n) for n in lengths[i * steps:(i + 1) * steps])
                       for i, name in enumerate(names)}, unreadable


def cluster_endpoint(settings: HostSettings) -> MetricsEndpoint:
    c = settings.cluster
    if c.metrics_port == 0:
        raise ConfigError(settings.source, "cluster.metrics_port",
                          "is 0 (off): `fcq metrics` needs a port to serve")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ClusterState(registry.connect(settings), settings.cluster.hosts_dir))
    return MetricsEndpoint(reg, c.metrics_address, c.metrics_port, c.metrics_auth_file,
                           settings.source, prefix="cluster.")


def run_cluster_metrics(settings: HostSettings) -> None:
    """Serve the cluster's metrics until SIGTERM or SIGINT."""
    endpoint = cluster_endpoint(settings)
    endpoint.open()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    endpoint.serve()
    log.info("cluster-metrics-ready", address=settings.cluster.metrics_address,
             port=endpoint.bound_port)
    try:
        stop.wait()
    finally:
        endpoint.close()
