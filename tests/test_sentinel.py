"""fcq through Redis Sentinel, and a failover under work: real Redis, sentinels, workers.

A primary, one replica and three sentinels on this machine (tests/sentinel.py);
two fcq hosts, beat's registry and the orchestrator all find the primary
through the sentinels. The primary is frozen with SIGSTOP, the hardest way
for clients to lose it: no connection is closed or refused, sockets just go
quiet (celery#6348: Celery then never fails over unless its sockets time
out), and the sentinels promote the replica after down-after (1 s here).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fcq_tasks.config.clustersettings import parse_cluster_settings
from fcq_tasks.errors import ConfigError
from tests.cluster import Cluster, make_cluster
from tests.conftest import HostFactory
from tests.helpers import wait_for
from tests.sentinel import MASTER, SentinelSet
from tests.test_broker_outage import start_ticks, vm_file
from tests.test_cluster import SLOW_CREATE_VM


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    group = SentinelSet().start()
    yield group
    group.stop()


@pytest.mark.parametrize(("cluster", "field", "rule"), [
    ({"broker_url": "sentinel://127.0.0.1:26379"}, "cluster.sentinel_master", "must be set"),
    ({"broker_url": "redis://127.0.0.1:6379/0", "sentinel_master": "fcq"},
     "cluster.broker_url", "must list the sentinels only"),
    ({"broker_url": "sentinel://h1:26379;redis://h2:6379", "sentinel_master": "fcq"},
     "cluster.broker_url", "must list the sentinels only"),
    ({"broker_url": "sentinel://h1:26379/0;sentinel://h2:26379/1", "sentinel_master": "fcq"},
     "cluster.broker_url", "same database"),
    ({"broker_url": "sentinel://h1:99999", "sentinel_master": "fcq"},
     "cluster.broker_url", "sentinel 'h1:99999'"),
    ({"broker_url": "sentinel://h1:26379", "sentinel_master": "my master"},
     "cluster.sentinel_master", "letters, digits"),
    ({"broker_url": "redis://h:6379/0", "sentinel_password_file": "/etc/fcq/s"},
     "cluster.sentinel_password_file", "only for Redis Sentinel"),
    ({"broker_url": "redis://a:6379/0;redis://b:6379/0"}, "cluster.broker_url",
     "only sentinels can be listed"),
    ({"broker_url": "sentinel://:pw@h1:26379", "sentinel_master": "fcq",
      "password_file": "/etc/fcq/p"}, "cluster.broker_url", "keep only the file"),
])
def test_sentinel_settings_refused(cluster: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cluster_settings("host.yaml", cluster)
    assert err.value.field == field and rule in err.value.message


def test_sentinel_settings_urls(tmp_path: Any) -> None:
    """The password goes into every sentinel:// part, the sentinels' into nothing logged."""
    (tmp_path / "p").write_text("s3cret\n")
    (tmp_path / "p").chmod(0o600)
    c = parse_cluster_settings("host.yaml", {
        "broker_url": "sentinel://h1:26379/2;sentinel://h2/2", "sentinel_master": "fcq",
        "password_file": str(tmp_path / "p")})
    assert c.sentinels == [("h1", 26379), ("h2", 26379)] and c.db == 2
    assert c.url_with_password() == "sentinel://:s3cret@h1:26379/2;sentinel://:s3cret@h2/2"
    from fcq_tasks.config.clustersettings import sanitized
    assert "s3cret" not in sanitized(c.url_with_password())


def test_failover_under_work(make_host: HostFactory, sentinels: SentinelSet) -> None:
    """Primary frozen mid-task: the task completes, workers follow the new primary."""
    c: Cluster = make_cluster(make_host, sentinels, ("alpha", "beta"),  # type: ignore[arg-type]
                              sentinel_master=MASTER,
                              sentinel_password_file=str(sentinels.sentinel_password_file))
    try:
        run_failover(c, sentinels)
    finally:
        c.stop_all()


def run_failover(c: Cluster, sentinels: SentinelSet) -> None:
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    beta.update_settings(create_vm=SLOW_CREATE_VM)
    alpha.write_vm("vm01")
    c.worker("alpha")
    worker_beta = c.worker("beta")
    orch = c.orchestrator()
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"
    vm01 = alpha.agent("vm01").status()["pid"]
    ticks = start_ticks(vm01)
    old = sentinels.master_port()

    # Work running when the primary goes: beta creates vm02's volume (3 s).
    in_flight = orch.apply_config(vm_file(beta.base, "vm02", "beta", 2), hosts=["beta"])["beta"]
    wait_for(lambda: orch.state(in_flight)[0] == "PROGRESS", 30, "vm02's start to run")
    waited: dict[str, Any] = {}

    def wait_through() -> None:
        try:
            waited["result"] = orch.wait(in_flight, timeout=120)
        except Exception as err:  # reported below
            waited["error"] = err
    waiter = threading.Thread(target=wait_through, name="waiter")
    waiter.start()
    log_offset = worker_beta.log.stat().st_size
    sentinels.signal(old, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        wait_for(lambda: {sentinels.master_port(p) for p in sentinels.sentinel_ports}
                 == {sentinels.redis_ports[1]}, 30, "every sentinel to name the new primary")
        t_promoted = time.monotonic() - t_stop
        new = sentinels.client()
        for host in ("alpha", "beta"):
            key = f"fcq:host:{host}"
            wait_for(lambda: new.exists(key), 60,  # noqa: B023  # called at once
                     f"{host}'s heartbeat on the new primary")
        t_heartbeats = time.monotonic() - t_stop
        for host in ("alpha", "beta"):
            assert orch.wait(orch.ping(host), timeout=60)["host"] == host
        t_ping = time.monotonic() - t_stop
        waiter.join(150)
        t_done = time.monotonic() - t_stop
    finally:
        sentinels.signal(old, signal.SIGCONT)  # it rejoins as a replica of the new primary
    print(f"\nfailover (s after SIGSTOP): promoted {t_promoted:.1f}, heartbeats "
          f"{t_heartbeats:.1f}, pings {t_ping:.1f}, in-flight task done {t_done:.1f}")
    assert "error" not in waited, waited.get("error")
    assert waited["result"]["vm"] == "vm02"
    wait_for(lambda: beta.agent("vm02").status()["status"] == "running", 60, "vm02 to run")
    assert len(beta.qemu_processes()) == 1  # started once
    after = start_ticks(vm01)
    assert after is not None and ticks is not None
    assert after[1] == ticks[1] and after[0] not in ("Z", "X", "T")  # vm01 never noticed
    log = worker_beta.log.read_bytes()[log_offset:].decode(errors="replace")
    assert "Unrecoverable error" not in log
    # A new task after the failover, through the same orchestrator.
    assert orch.wait(orch.submit("stop", "vm01"), timeout=120)["status"] == "stopped"
    assert alpha.qemu_processes() == []
