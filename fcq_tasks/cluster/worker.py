"""`fcq worker`: this host's Celery worker, consuming only ``host.<name>``.

Threads pool: tasks wait on QEMU and sockets, not on the CPU, and one
process keeps memory small (a whole worker measured 57 MB). Celery's
``time_limit`` is ignored with threads and ``revoke(terminate=True)`` fails,
so every wait inside the agent has its own named timeout.
While the worker runs, a heartbeat thread publishes this host to the
registry so beat sweeps it and the orchestrator can find its VMs, and
(unless ``metrics_port`` is 0) a thread serves its ``/metrics``
(:mod:`fcq_tasks.cluster.workermetrics`); a port that cannot be bound is
logged (``metrics-endpoint-unavailable``) and the worker runs without it.
"""

from __future__ import annotations

import functools
import secrets
import socket
import sys
import threading
from typing import Any

import structlog
from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.consumer import Consumer
from kombu import Connection, Exchange, Queue

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import configure, host_queue
from fcq_tasks.cluster.redisacl import unacked_keys
from fcq_tasks.cluster.workermetrics import TaskTimer, worker_endpoint
from fcq_tasks.config.clustersettings import sanitized
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import ConfigError
from fcq_tasks.host.fencewatch import FenceWatch
from fcq_tasks.metrics.endpoint import ListenError, MetricsEndpoint

log = structlog.get_logger()

#: The longest a worker waits between two attempts to reach a lost broker.
RECONNECT_MAX = 5


class PromptConsumer(Consumer):
    """Celery's consumer, retrying a lost broker every RECONNECT_MAX s at most.

    Celery's own reconnect waits 2, 4, 6, … up to 30 s between attempts
    (kombu's defaults; Celery passes no intervals): a worker could take up to
    30 s to notice that Redis is back, half a minute of work standing still
    on every host after an outage. One attempt per host every few seconds
    costs a recovering Redis nothing.
    """

    def ensure_connected(self, conn: Connection) -> Connection:
        conn.ensure_connection = functools.partial(  # type: ignore[method-assign]
            conn.ensure_connection, interval_start=1, interval_step=1,
            interval_max=RECONNECT_MAX)
        return super().ensure_connected(conn)


class Heartbeat:
    """Publishes the host record every ttl/3 seconds until stopped."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fcq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = self.settings.cluster.registry_ttl / 3
        # Changes at every beat, never repeats across workers: what tells a
        # live record from one the wall clock kept (registry.beating), and
        # this worker's records from another process's (written_by_another).
        token, count = secrets.token_hex(4), 0
        while not self._stop.is_set():
            count += 1
            try:
                client = registry.connect(self.settings)
                if count > 1:
                    self._check_name(registry.host(client, self.settings.host))
                registry.publish_host(client, self.settings, registry.own_beat(
                    f"{token}:{count}"))
            except Exception as err:  # Redis away: keep trying, the worker reconnects too
                log.warning("heartbeat-failed", host=self.settings.host, error=str(err))
            self._stop.wait(interval)

    def _check_name(self, record: dict[str, Any] | None) -> None:
        """Say so, loudly, when another process writes heartbeats under this host's name.

        Locks and queues are by host name: two workers with one name (a
        cloned settings file) would be one host twice.
        """
        if registry.written_by_another(record):
            assert record is not None
            log.error("heartbeat-conflict", host=self.settings.host,
                      other_beat=str(record.get("beat")),
                      detail="another process writes this host's heartbeat: two workers "
                      "share one host name; stop one of them")

    def stop(self) -> None:
        self._stop.set()
        try:
            registry.withdraw_host(registry.connect(self.settings), self.settings.host)
        except Exception as err:  # shutting down anyway; the record expires by itself
            log.warning("withdraw-failed", host=self.settings.host, error=str(err))


def prepare_worker(settings: HostSettings) -> Celery:
    """The app, set up to be this host's worker: its queue, pool, heartbeat, metrics.

    Shared by ``fcq worker`` and the stock ``celery -A fcq_tasks worker``
    (fcq_tasks/celery.py): both run the same worker. Other stock commands
    (inspect, beat, flower) import it too, so the metrics endpoint binds
    only once a worker starts (``worker_init``), or earlier in
    :func:`run_worker`, where a refusal is printed like every settings error.
    """
    app = configure(settings)
    app.conf.fcq_settings = settings
    queue = host_queue(settings.host)
    # A plain `celery worker` consumes task_queues: only this host's queue,
    # never the default one (nothing is routed there).
    # Its own exchange, named after it, as Celery makes for a queue it
    # sends to (not the default exchange, whose one binding table every
    # host would have to write: cluster/redisacl.py).
    app.conf.task_queues = [Queue(queue, Exchange(queue), routing_key=queue)]
    app.conf.worker_pool = "threads"
    app.conf.worker_consumer = f"{__name__}:PromptConsumer"
    app.conf.worker_concurrency = settings.cluster.worker_concurrency
    # Its unacknowledged messages under keys of its own, which its Redis
    # user may touch (cluster/redisacl.py); a restart restores them.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         **unacked_keys(settings.host)}
    # Celery's remote control lets any Redis client stop this worker's
    # consumer or shut it down; fcq has its own ping and heartbeat.
    app.conf.worker_enable_remote_control = False
    heartbeat = Heartbeat(settings)
    # Needs Ceph only, not Redis: started before the broker is reached.
    watch = FenceWatch(settings, settings.fence_check_interval) \
        if settings.storage == "rbd" else None
    endpoint = worker_endpoint(settings)
    app.conf.fcq_metrics_endpoint = endpoint
    TaskTimer().connect()

    def on_init(**_: Any) -> None:
        refuse_second_worker(settings)
        if watch is not None:
            watch.start()
        # Tried already in run_worker (`fcq worker`): a port found taken
        # there is not logged a second time.
        if endpoint is None or endpoint.tried:
            return
        # Celery logs and swallows what a signal handler raises, and the
        # worker would run on without metrics nobody asked to lose: a
        # worker whose settings are wrong must not start at all.
        try:
            open_metrics(endpoint)
        except Exception as err:
            message = err.message if isinstance(err, ConfigError) else repr(err)
            log.error("metrics-endpoint-refused", error=message)
            print(f"fcq: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from err

    def on_ready(**_: Any) -> None:
        heartbeat.start()
        metrics = None
        if endpoint is not None and endpoint.is_open:  # not when its port was taken
            endpoint.serve()
            metrics = f"{settings.metrics_address}:{endpoint.bound_port}"
        log.info("worker-ready", host=settings.host, queue=host_queue(settings.host),
                 broker=sanitized(app.conf.broker_url), metrics=metrics)
        c = settings.cluster
        if not c.orchestrator_keys and not c.accept_unsigned:
            log.warning("no-orchestrator-keys", host=settings.host,
                        detail="cluster.orchestrator_keys is empty: every imperative request "
                        "(start, stop, migrate, ...) will be refused; sweeps still run")
        if c.accept_unsigned:
            log.warning("accepting-unsigned-requests", host=settings.host,
                        detail="cluster.accept_unsigned is true: rolling upgrade only")

    def on_shutdown(**_: Any) -> None:
        heartbeat.stop()
        if watch is not None:
            watch.stop()
        if endpoint is not None:
            endpoint.close()

    worker_init.connect(on_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    return app


def refuse_second_worker(settings: HostSettings) -> None:
    """Exit 2 when another live worker beats under this host's name.

    Locks and queues are by host name, so a second worker of one name (a
    settings file copied to another machine) would make two hosts one.
    A record left by a worker that died does not stop this one: it is
    watched for half a ttl (registry.beating), and only a record that keeps
    changing is a live worker. Redis away: not checked now; the heartbeat
    notices a clash later (``heartbeat-conflict``).
    """
    try:
        client = registry.connect(settings)
        record = registry.host(client, settings.host)
        live = record is not None and bool(registry.beating(
            client, {settings.host}, settings.cluster.registry_ttl))
    except Exception as err:
        log.warning("host-name-unchecked", host=settings.host, error=str(err))
        return
    if live:
        assert record is not None
        message = (f"host {settings.host!r} already has a live worker (its heartbeat keeps "
                   f"changing: beat {record.get('beat')!r}, queue {record.get('queue')!r}): "
                   "two workers with one host name would be one host twice; stop that one, "
                   "or give this one its own `host` in its settings")
        log.error("host-name-taken", host=settings.host, error=message)
        print(f"fcq: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def open_metrics(endpoint: MetricsEndpoint) -> None:
    """Open the worker's endpoint; a port that cannot be bound costs the metrics only.

    The endpoint is a side channel: a port some other program took must not
    keep a hypervisor's control plane down. Refusals for safety (an open
    address without auth, a readable or broken secret) are still raised:
    those are settings to fix, not a clash of the moment.
    """
    try:
        endpoint.open()
    except ListenError as err:
        log.error("metrics-endpoint-unavailable", error=err.message,
                  detail="the worker runs without /metrics")


def run_worker(settings: HostSettings, loglevel: str = "INFO") -> None:
    app = prepare_worker(settings)
    endpoint = app.conf.fcq_metrics_endpoint
    if endpoint is not None:
        open_metrics(endpoint)  # a ConfigError here reaches the command line, said plainly
    app.worker_main([
        "worker", "--queues", host_queue(settings.host),
        "--hostname", f"{settings.host}@{socket.gethostname()}",
        "--pool", "threads", "--concurrency", str(settings.cluster.worker_concurrency),
        "--without-mingle", "--without-gossip", "--task-events",
        "--loglevel", loglevel,
    ])
