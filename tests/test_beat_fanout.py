"""Beat's fan-out: every due sweep in one tick, through Redis pipelines, as Celery sends it.

Real redis-server; the scheduler runs in this process (as ``celery beat``
drives it, tick by tick) on a Celery app of its own, so that nothing here
reconfigures the module's app; the last test has a real worker execute
what it sent.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery

from fcq_beat import scheduler as beat
from fcq_beat.scheduler import SweepScheduler, sweep_entries
from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import celery_config, host_queue
from tests.cluster import Cluster, RedisServer, cluster_settings
from tests.conftest import new_host
from tests.helpers import wait_for

ClusterFactory = Any

#: What differs between two sends of the same sweep: ids, times, the delivery tag.
VOLATILE_HEADERS = {"id", "root_id", "expires"}
VOLATILE_PROPERTIES = {"correlation_id", "delivery_tag"}
VOLATILE_EVENT = {"uuid", "root_id", "expires", "clock", "timestamp"}
#: Seconds between two sweeps of a host: the tests move the clock, not sleep.
INTERVAL = 60


def beat_app(redis_server: RedisServer, interval: int = INTERVAL) -> Celery:
    host = new_host("beat", prefix="fcqt-", log_level="warning",
                    cluster=cluster_settings(redis_server, sweep_interval=interval,
                                             visibility_timeout=3600))
    app = Celery("fcq-beat-test", set_as_current=False)
    app.conf.update(celery_config(host.settings))
    app.conf.fcq_settings = host.settings
    return app


def heartbeat(client: Any, name: str, drained: Any = None) -> None:
    client.set(f"{registry.HOST_KEY}{name}", json.dumps({
        "host": name, "queue": host_queue(name), "seen": time.time(), "booked_mb": 0,
        "limit_mb": 4096, "running": [], "vms": {}, "drained": drained}), ex=300)


def queued(client: Any, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each host's queue, decoded, oldest first; the queues are emptied."""
    out = {n: [json.loads(m) for m in reversed(client.lrange(host_queue(n), 0, -1))]
           for n in names}
    client.delete(*[host_queue(n) for n in names])
    return out


def normalized(message: dict[str, Any]) -> dict[str, Any]:
    """A queued message without what differs between two sends; its body decoded."""
    props = message["properties"]
    assert props["body_encoding"] == "base64" and message["content-type"] == "application/json"
    body = json.loads(base64.b64decode(message["body"]))
    return {**message, "body": body,
            "headers": {k: v for k, v in message["headers"].items()
                        if k not in VOLATILE_HEADERS},
            "properties": {k: v for k, v in props.items() if k not in VOLATILE_PROPERTIES}}


def sent_events(pubsub: Any) -> list[dict[str, Any]]:
    """The task-sent events published so far, decoded, without ids and times."""
    out = []
    while (msg := pubsub.get_message(timeout=0.5)) is not None:
        if msg["type"] != "pmessage":
            continue
        envelope = json.loads(msg["data"])
        event = json.loads(base64.b64decode(envelope["body"]))
        if event["type"] == "task-sent":
            out.append({k: v for k, v in event.items() if k not in VOLATILE_EVENT})
    return out


def due(sched: SweepScheduler) -> None:
    """Every sweep due now, as one interval later (sleeping through it would race a
    loaded machine: a tick that takes longer than the interval sends twice, rightly)."""
    for entry in sched.schedule.values():
        assert entry.last_run_at is not None
        entry.last_run_at -= timedelta(seconds=INTERVAL)
    sched._entries_changed = True  # Celery's heap holds each entry's time: rebuilt
    producer: Any = sched.producer  # supports_batch_publish: kombu 5.7, newer than the stubs
    assert producer.supports_batch_publish  # else this tests Celery's path twice


def test_one_tick_sends_each_host_the_message_celery_sends(redis_server: RedisServer) -> None:
    """All due sweeps leave in one tick, one per host (a drained host too), and each
    queued message and task-sent event is what Celery's own beat send produces."""
    app = beat_app(redis_server)
    client = redis_server.client()
    names = [f"h{i:02d}" for i in range(12)]
    for name in names:
        heartbeat(client, name)
    heartbeat(client, "drained", drained={"since": time.time(), "by": "ops"})
    names.append("drained")
    pubsub = client.pubsub()
    pubsub.psubscribe("*celeryev*")
    sched = SweepScheduler(app=app, lazy=False)
    try:
        sched.refresh()
        assert set(sched.schedule) == {f"sweep-{n}" for n in names}
        assert sched.schedule["sweep-h00"].options == {
            "queue": "host.h00", "expires": 60.0, "ignore_result": True, "retry": False,
            "declare": ()}
        due(sched)
        sent = time.time()
        assert sched.tick() > 0  # nothing is due any more
        assert sched.tick() > 0  # and nothing is sent twice
        fast = queued(client, names)
        assert all(len(fast[n]) == 1 for n in names), {n: len(m) for n, m in fast.items()}
        fast_events = sent_events(pubsub)
        # The same entries as Celery's own beat sends them: one publish each,
        # retried, declaring the queue (what sweep_entries(pipelined=True) skips).
        plain = sweep_entries(names, INTERVAL)
        for key, options in plain.items():
            entry = sched.Entry(**dict(options, name=key, app=app))
            sched.apply_entry(entry, producer=sched.producer)
        celery = queued(client, names)
        celery_events = sent_events(pubsub)
    finally:
        sched.close()
        pubsub.close()
    for name in names:
        message = fast[name][0]
        assert normalized(message) == normalized(celery[name][0])
        headers = message["headers"]
        assert headers["task"] == "fcq.ensure_host" and headers["celery_beat_task"] is True
        assert headers["ignore_result"] is True
        assert message["properties"]["delivery_info"]["routing_key"] == host_queue(name)
        # Expires one interval after it was sent.
        expires = datetime.fromisoformat(headers["expires"]).timestamp()
        assert sent + INTERVAL < expires < time.time() + INTERVAL, headers["expires"]
        assert normalized(message)["body"][1] == {"host": name}
    assert len(fast_events) == len(celery_events) == len(names)
    key = "routing_key"
    assert sorted(fast_events, key=lambda e: e[key]) == sorted(celery_events,
                                                               key=lambda e: e[key])


def test_long_fan_out_goes_in_pipelines_and_checks_the_lock(redis_server: RedisServer,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """More due sweeps than one pipeline holds: several pipelines, the lock looked at
    between them, every host still gets exactly one sweep per interval."""
    monkeypatch.setattr(beat, "SWEEPS_PER_PIPELINE", 4)
    monkeypatch.setattr(beat, "LOCK_CHECK_EVERY", 0.0)
    app = beat_app(redis_server)
    client = redis_server.client()
    names = [f"h{i:02d}" for i in range(11)]
    for name in names:
        heartbeat(client, name)
    sched = SweepScheduler(app=app, lazy=False)
    try:
        sched.refresh()
        for _ in range(2):
            due(sched)
            ticks = [sched.tick() for _ in range(3)]  # 4 + 4 + 3
            assert ticks[:2] == [0.0, 0.0] and ticks[2] > 0, ticks
            assert sched.tick() > 0
            assert {n: len(m) for n, m in queued(client, names).items()} == dict.fromkeys(
                names, 1)
        # A beat that lost its lock stops between two pipelines.
        due(sched)
        assert sched.tick() == 0.0
        client.set(beat.LOCK_KEY, "another beat")
        assert sched.tick() == beat.MAX_SLEEP
        assert sum(len(m) for m in queued(client, names).values()) == 4
    finally:
        sched.close()


def test_registry_reads_many_hosts_in_chunks(redis_server: RedisServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats are read in MGET chunks; unreadable records are reported, not fatal."""
    monkeypatch.setattr(registry, "HOSTS_PER_MGET", 3)
    client = redis_server.client()
    names = [f"h{i:02d}" for i in range(8)]
    for name in names:
        heartbeat(client, name)
    client.set(f"{registry.HOST_KEY}junk", "not json")
    client.set("fcq:hostess", json.dumps({"host": "hostess"}))  # not a heartbeat key
    unreadable: list[str] = []
    assert sorted(registry.hosts(client, unreadable)) == names
    assert unreadable == [f"{registry.HOST_KEY}junk"]
    with pytest.raises(ValueError):
        registry.hosts(client)


def test_worker_runs_the_sweep_beat_pipelined(make_cluster: ClusterFactory) -> None:
    """A real worker consumes and runs the sweep sent through the pipeline, next to
    sweeps for hosts that have no worker."""
    c: Cluster = make_cluster(("alpha",), sweep_interval=1)
    c.worker("alpha")
    client = c.redis.client()
    for name in ("ghost1", "ghost2", "ghost3"):
        heartbeat(client, name)
    app = beat_app(c.redis)
    sched = SweepScheduler(app=app, lazy=False)
    log = c.hosts["alpha"].base / "fcq.log"
    try:
        sched.refresh()
        assert "sweep-alpha" in sched.schedule
        due(sched)
        assert sched.tick() > 0
        assert all(client.llen(host_queue(n)) == 1 for n in ("ghost1", "ghost2", "ghost3"))
        wait_for(lambda: log.exists() and '"sweep-done"' in log.read_text(), 120,
                 "alpha's worker to run the pipelined sweep")
    finally:
        sched.close()
