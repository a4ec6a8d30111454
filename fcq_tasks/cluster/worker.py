"""`fcq worker`: this host's Celery worker, consuming only ``host.<name>``.

Threads pool: tasks wait on QEMU and sockets, not on the CPU, and one
process keeps memory small (a whole worker measured 57 MB). Celery's
``time_limit`` is ignored with threads and ``revoke(terminate=True)`` fails,
so every wait inside the agent has its own named timeout.
While the worker runs, a heartbeat thread publishes this host to the
registry so beat sweeps it and the orchestrator can find its VMs.
"""

from __future__ import annotations

import functools
import socket
import threading
from typing import Any

import structlog
from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from celery.worker.consumer import Consumer
from kombu import Connection, Queue

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import configure, host_queue
from fcq_tasks.config.clustersettings import sanitized
from fcq_tasks.config.settings import HostSettings

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
        while not self._stop.is_set():
            try:
                registry.publish_host(registry.connect(self.settings), self.settings)
            except Exception as err:  # Redis away: keep trying, the worker reconnects too
                log.warning("heartbeat-failed", host=self.settings.host, error=str(err))
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        try:
            registry.withdraw_host(registry.connect(self.settings), self.settings.host)
        except Exception as err:  # shutting down anyway; the record expires by itself
            log.warning("withdraw-failed", host=self.settings.host, error=str(err))


def prepare_worker(settings: HostSettings) -> Celery:
    """The app, set up to be this host's worker: its queue, pool, heartbeat.

    Shared by ``fcq worker`` and the stock ``celery -A fcq_tasks worker``
    (fcq_tasks/celery.py): both run the same worker.
    """
    app = configure(settings)
    app.conf.fcq_settings = settings
    queue = host_queue(settings.host)
    # A plain `celery worker` consumes task_queues: only this host's queue,
    # never the default one (nothing is routed there).
    app.conf.task_queues = [Queue(queue, routing_key=queue)]
    app.conf.worker_pool = "threads"
    app.conf.worker_consumer = f"{__name__}:PromptConsumer"
    app.conf.worker_concurrency = settings.cluster.worker_concurrency
    heartbeat = Heartbeat(settings)

    def on_ready(**_: Any) -> None:
        heartbeat.start()
        log.info("worker-ready", host=settings.host, queue=host_queue(settings.host),
                 broker=sanitized(app.conf.broker_url))

    def on_shutdown(**_: Any) -> None:
        heartbeat.stop()

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    return app


def run_worker(settings: HostSettings, loglevel: str = "INFO") -> None:
    app = prepare_worker(settings)
    app.worker_main([
        "worker", "--queues", host_queue(settings.host),
        "--hostname", f"{settings.host}@{socket.gethostname()}",
        "--pool", "threads", "--concurrency", str(settings.cluster.worker_concurrency),
        "--without-mingle", "--without-gossip", "--task-events",
        "--loglevel", loglevel,
    ])
