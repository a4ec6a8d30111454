"""The Celery application, configured from the settings' ``cluster:`` section.

One module-level ``app`` is how Celery finds tasks; it is configured exactly
once per process by :func:`configure` (worker, beat, orchestrator), from the
frozen settings, never from environment writes. The choices here come from
measurements with Celery 5 and Redis 7 on the development machines:

* JSON only, in both directions: no pickles cross the broker.
* ``acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1: a task whose
  worker dies is delivered again, to a worker of the same host queue.
* The Redis ``visibility_timeout`` must exceed the longest task (a task
  still running when it passes is delivered again), and kombu's scan for
  unacknowledged tasks is made frequent (``restore_interval``, a
  throttle of 1) so that redelivery after ``kill -9`` takes seconds, not the
  ~105 s of the defaults.
* kombu's Redis transport with one fix (cluster/transport.py): without it a
  worker that loses Redis while a task runs exits instead of reconnecting.
* Sent and task events on, so Flower sees tasks queued for a host whose
  worker is down.
* Nothing is routed by default: sending a task without an explicit queue
  is refused (see :func:`refuse_unrouted`), so no message can land in a
  queue nobody consumes (a chord callback or errback without a queue goes
  to Celery's default queue, and there it never runs).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from fcq_tasks.cluster.results import CLIENT_RETRY_POLICY
from fcq_tasks.cluster.sentinel import result_backend_url
from fcq_tasks.cluster.transport import transport_for
from fcq_tasks.config.settings import HostSettings

#: The queue a host's worker consumes.
QUEUE_PREFIX = "host."

#: The controller's queue (cluster/controller.py): hosts' move requests and
#: the migrations' chord callbacks, so that no host writes another's queue.
CONTROLLER_QUEUE = "fcq.controller"

#: The controller's tasks (cluster/controller.py): run there and nowhere else.
CONTROLLER_TASKS = frozenset({"fcq.move_wanted", "fcq.finish_migration",
                              "fcq.migration_failed"})

#: Celery's default queue. Nobody consumes it; nothing may be sent there.
UNROUTED = "fcq.unrouted"

#: Seconds any socket to Redis (or a sentinel) may stay silent before the
#: client gives it up and reconnects (to the new primary, after a failover).
SOCKET_TIMEOUT = 10

app = Celery("fcq", include=["fcq_tasks.cluster.tasks", "fcq_tasks.cluster.daytwo",
                            "fcq_tasks.cluster.draintasks", "fcq_tasks.cluster.controller"])


def host_queue(host: str) -> str:
    return f"{QUEUE_PREFIX}{host}"


def celery_config(settings: HostSettings) -> dict[str, Any]:
    c = settings.cluster
    url = c.url_with_password()
    transport: dict[str, Any] = {
        "visibility_timeout": c.visibility_timeout,
        "unacked_restore_interval": c.restore_interval,
        "unacked_restore_throttle": 1,
        # celery#6348: a Redis that stops answering without closing its
        # connections (host frozen or cut off, as opposed to a crash or a
        # restart) leaves a client without socket timeouts waiting forever,
        # deaf to a Sentinel failover. Every socket gets a deadline.
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        # One Redis list per queue, named exactly after it (kombu's default
        # adds three priority lists per queue): what per-host ACL users
        # grant (cluster/redisacl.py). fcq sends no priorities.
        "priority_steps": [0],
    }
    backend_transport: dict[str, Any] = {"visibility_timeout": c.visibility_timeout}
    if c.sentinel_master is not None:
        # kombu and Celery's result backend both ask the sentinels for the
        # master by this name; the sentinels' own password (if any) travels
        # in sentinel_kwargs, the Redis servers' in the URL.
        # Retrying a command after a timeout is what moves a connection left
        # open to a frozen master over to the new one (cluster/sentinel.py);
        # the old master's copy of the command is lost with it anyway.
        sentinel: dict[str, Any] = {"master_name": c.sentinel_master, "retry_on_timeout": True}
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT,
                                           "socket_connect_timeout": SOCKET_TIMEOUT}
        sentinel_password = c.sentinel_password()
        if sentinel_password is not None:
            sentinel_kwargs["password"] = sentinel_password
        sentinel["sentinel_kwargs"] = sentinel_kwargs
        transport.update(sentinel)
        backend_transport.update(sentinel)
    tls: dict[str, Any] = {}
    if c.tls is not None:
        # kombu, given a rediss:// URL without options, does not verify the
        # server's certificate: fcq always passes them, verifying.
        tls = {"broker_use_ssl": c.tls, "redis_backend_use_ssl": c.tls}
    return {
        **tls,
        "broker_url": url,
        "broker_transport": transport_for(url),
        "result_backend": result_backend_url(url),
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": SOCKET_TIMEOUT,
        "redis_retry_on_timeout": c.sentinel_master is not None,
        "broker_connection_retry_on_startup": True,
        # Never give up on the broker (Celery's default: exit after 100
        # attempts): a worker or beat that exits during a long outage needs
        # someone to start it again; one that waits comes back by itself.
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_extended": True,
        "result_expires": c.result_expires,
        "task_default_queue": UNROUTED,
        "task_routes": (refuse_unrouted,),
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def configure(settings: HostSettings) -> Celery:
    """Configure the process's task app (worker, beat) for *settings* and return it."""
    app.conf.update(celery_config(settings))
    return app


def client_app(settings: HostSettings) -> Celery:
    """A Celery app of its own for an orchestrator: sends tasks by name, reads results.

    Its own instance, not the module's: a program may talk to several
    clusters, and Celery caches connections per app.
    """
    client = Celery("fcq-client", set_as_current=False)
    config = celery_config(settings)
    # Short reconnect retries for its result consumer: Orchestrator.wait()
    # rides through outages itself, with its own deadline (cluster/results.py).
    config["result_backend_transport_options"] = {
        **config["result_backend_transport_options"], "retry_policy": CLIENT_RETRY_POLICY}
    client.conf.update(config)
    return client


class UnroutedTask(RuntimeError):
    """A task was about to be sent without a queue."""


def refuse_unrouted(name: str, args: Any, kwargs: Any, options: dict[str, Any],
                    task: Any = None, **_: Any) -> dict[str, Any]:
    """Celery router: every task must name its queue; the default one has no consumer.

    Celery consults routers for every message (explicit options win over
    what they return), and, unlike a signal handler's, a router's exception
    reaches the sender.
    """
    queue = options.get("queue")
    if queue in (None, "", UNROUTED, "celery"):
        raise UnroutedTask(f"task {name} has no queue: fcq routes every task explicitly "
                           "(host.<name>); refusing to send it where nobody consumes it")
    return {}
