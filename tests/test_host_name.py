"""One host name, one worker: a second worker of the same name refuses to start,
and a worker notices another process writing its heartbeat."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.cluster import Cluster
from tests.helpers import events, wait_for

ClusterFactory = Any


def test_second_worker_with_the_same_name_refuses_to_start(
        make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(("alpha",))
    first = c.worker("alpha")
    second = c.spawn("worker", "alpha", "--metrics-port", "0")
    assert second.proc.wait(60) == 2
    log = second.log.read_text()
    assert "host 'alpha' already has a live worker" in log, log[-2000:]
    assert first.proc.poll() is None
    orch = c.orchestrator()
    assert orch.wait(orch.ping("alpha"), timeout=30)["host"] == "alpha"


def test_a_worker_whose_predecessor_died_starts(make_cluster: ClusterFactory) -> None:
    """kill -9 leaves the record behind; it stops changing, so it is no live worker."""
    c: Cluster = make_cluster(("alpha",))
    c.kill9(c.worker("alpha"))
    assert c.redis.client().exists("fcq:host:alpha")
    t = time.monotonic()
    c.worker("alpha")
    assert time.monotonic() - t < 20
    assert "heartbeat-conflict" not in events(c.hosts["alpha"])


def test_a_foreign_heartbeat_is_noticed(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(("alpha",))
    c.worker("alpha")
    client = c.redis.client()
    record = json.loads(str(client.get("fcq:host:alpha")))
    client.set("fcq:host:alpha", json.dumps({**record, "beat": "elsewhere:1"}), ex=60)
    wait_for(lambda: "heartbeat-conflict" in events(c.hosts["alpha"]), 30,
             "alpha to notice the other writer")
