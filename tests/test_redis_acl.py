"""Redis ACL users per role (cluster/redisacl.py), with real processes.

The cluster runs as it would in production: each host's worker as its own
Redis user, the orchestrator and the controller as ``fcq-orchestrator``,
beat as ``fcq-beat``. Everything fcq does (start, a live migration with its
chord, sweeps, a failed migration's errback) works under those users, and
Redis's own ACL log stays empty. Then an attacker with alpha's password
tries what the shared password allowed: read or steal beta's queue, bind a
queue to beta's messages, flush, reconfigure, list keys, subscribe.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import redis
import yaml

from fcq_tasks.cluster import redisacl
from fcq_tasks.errors import FcqError
from tests.cluster import Cluster, free_port
from tests.helpers import CREDS, fetch, scrape, value, wait_for, wait_guest, write_secret

ClusterFactory = Any


def acl_log(c: Cluster) -> list[dict[str, Any]]:
    client: Any = c.redis.client()  # redis-py's execute_command is untyped
    raw: Any = client.execute_command("ACL", "LOG")
    entries = []
    for entry in raw:
        if isinstance(entry, dict):
            entries.append(entry)
        else:  # RESP2: a flat list of key, value, ...
            entries.append(dict(zip(entry[::2], entry[1::2], strict=False)))
    return entries


def as_host(c: Cluster, host: str) -> redis.Redis:
    """A Redis client with *host*'s own credentials (what root on it has)."""
    settings = c.hosts[host].settings.cluster
    password = settings.password()
    return redis.Redis(host="127.0.0.1", port=c.redis.port, username=f"fcq-host-{host}",
                       password=password, decode_responses=True)


def events(host: Any) -> list[str]:
    path = host.settings.log_file
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] \
        if path.exists() else []


def test_everything_runs_under_per_role_users(make_cluster: ClusterFactory) -> None:
    """start; a pushed config that moves the VM (the host asks the controller,
    beat's sweeps drive it, the chord ends on the controller); a migration
    back; one the destination refuses (the errback, on the controller, has
    both hosts sweep): all under per-role users, and Redis refused nothing."""
    c: Cluster = make_cluster(storage="rbd", acl=True, visibility_timeout=60)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha", memory=256)
    c.worker("alpha")
    c.worker("beta")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_guest(alpha.agent("vm01"))
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 in the registry")

    pushed = alpha.base / "pushed" / "vm01.cfg"
    pushed.parent.mkdir()
    pushed.write_text((alpha.settings.vm_config_dir / "vm01.cfg").read_text()
                      .replace("kvm_host: alpha", "kvm_host: beta"))
    cli = c.fcq("apply-config", str(pushed), host="orchestrator")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    c.spawn("beat", "beat")
    wait_for(lambda: len(beta.qemu_processes()) == 1 and not alpha.qemu_processes(), 120,
             "vm01 to move to beta")
    assert "move-requested" in events(alpha)
    wait_guest(beta.agent("vm01"))
    wait_for(lambda: "vm01" in orch.hosts()["beta"]["running"], 30, "vm01 on beta")

    moved = orch.wait(orch.migrate("vm01", "alpha"), timeout=240)
    assert moved["outcome"] == "migrated" and moved["to"] == "alpha"
    wait_guest(alpha.agent("vm01"))

    # A migration beta refuses (memory): the errback has both hosts sweep.
    for s in [s for s in c.services if s.name == "worker@beta"]:
        c.kill9(s)
        c.services.remove(s)
    beta.update_settings(vm_max_total_memory=128)
    c.worker("beta")
    wait_for(lambda: "vm01" in orch.hosts()["alpha"]["running"], 30, "vm01 on alpha")
    with pytest.raises(FcqError):
        orch.wait(orch.migrate("vm01", "beta"), timeout=120)
    controller = next(s for s in c.services if s.name.startswith("controller@"))
    wait_for(lambda: "migration-failed" in controller.log.read_text(), 60,
             "the errback on the controller")
    assert len(alpha.qemu_processes()) == 1 and not beta.qemu_processes()
    assert acl_log(c) == [], json.dumps(acl_log(c), default=str)[:2000]


def test_a_hosts_user_cannot_touch_other_hosts(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(acl=True)
    c.hosts["beta"].write_vm("vm01", kvm_host="beta")
    orch = c.orchestrator()
    # A request waits in beta's queue (beta's worker is not running).
    c.worker("alpha")
    c.redis.client().lpush("host.beta", "a request beta must get")
    evil = as_host(c, "alpha")
    raw: Any = evil  # redis-py's execute_command is untyped
    for attempt in (lambda: evil.lrange("host.beta", 0, -1),
                    lambda: evil.rpop("host.beta"),
                    lambda: evil.lpush("host.beta", "forged"),
                    lambda: evil.sadd("_kombu.binding.host.beta", "x"),
                    lambda: evil.hgetall(redisacl.unacked_keys("beta")["unacked_key"]),
                    lambda: evil.set("fcq:host:beta", "{}"),
                    lambda: evil.delete("fcq:host:beta"),
                    lambda: evil.flushall(),
                    lambda: evil.config_get("*"),
                    lambda: evil.keys("*"),
                    lambda: raw.execute_command("INFO"),
                    lambda: raw.execute_command("CLIENT", "LIST"),
                    lambda: raw.execute_command("SHUTDOWN", "NOSAVE"),
                    lambda: raw.execute_command("EVAL", "return redis.call('flushall')", "0"),
                    lambda: evil.delete("fcq.controller"),
                    lambda: evil.ltrim("fcq.controller", 0, 0),
                    lambda: evil.set("fcq.controller", "x"),
                    lambda: raw.execute_command("CLIENT", "TRACKING", "ON", "BCAST"),
                    lambda: evil.move("fcq:host:alpha", 3),
                    lambda: raw.execute_command("SCRIPT", "FLUSH"),
                    lambda: raw.execute_command("ACL", "LIST"),
                    lambda: evil.lpush("fcq:jobs", "x"),
                    lambda: evil.get("fcq:beat")):
        with pytest.raises(redis.exceptions.ResponseError,
                           match=r"(?i)permission|can.t run this command"):
            attempt()
    for channel in ("*", "__keyspace@0__:host.beta"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            sub = evil.pubsub()
            (sub.psubscribe if channel == "*" else sub.subscribe)(channel)
            sub.get_message(timeout=1)
    # Its own: its heartbeat, and the controller's queue (send only).
    assert evil.get("fcq:host:alpha")
    assert evil.lpush("fcq.controller", "a request the controller checks") >= 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        evil.lrange("fcq.controller", 0, -1)
    assert c.redis.client().lrange("host.beta", 0, -1) == ["a request beta must get"]
    assert orch.hosts()["alpha"]


def test_the_printed_lines_load_as_an_acl_file(tmp_path: Any) -> None:
    """What `fcq config redis-acl` prints is what redis-server loads (aclfile)."""
    password = tmp_path / "password"
    password.write_text("alpha-only-secret\n")
    password.chmod(0o600)
    lines = []
    for args in (["host", "--host", "alpha"], ["orchestrator"], ["beat"], ["reader"]):
        out = subprocess.run([sys.executable, "-m", "fcq_tasks", "config", "redis-acl", *args,
                              "--password-file", str(password)],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert "alpha-only-secret" not in out.stdout  # its SHA-256 only
        lines.append(out.stdout.strip())
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("\n".join(["user default on nopass ~* &* +@all", *lines]) + "\n")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--aclfile", str(aclfile)],
                              stdout=subprocess.DEVNULL)
    try:
        alpha = redis.Redis(port=port, username="fcq-host-alpha", password="alpha-only-secret")
        wait_for(lambda: _pings(alpha), 10, "redis-server with the ACL file")
        assert alpha.lpush("host.alpha", "x") == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            alpha.lpush("host.beta", "x")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, username="fcq-host-alpha", password="wrong").ping()
        users = redis.Redis(port=port).acl_users()
        assert sorted(str(u) for u in users) == ["default", "fcq-beat", "fcq-host-alpha",
                                                 "fcq-orchestrator", "fcq-reader"]
    finally:
        server.terminate()
        server.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_flower_and_metrics_run_as_the_reader(make_cluster: ClusterFactory,
                                              tmp_path: Any) -> None:
    """Flower lists a task from the events it hears and `fcq metrics` shows queues and
    hosts, both as fcq-reader; that user cannot write a key."""
    c: Cluster = make_cluster(("alpha",), acl=True)
    reader = c.roles["reader"]
    flower_port, metrics_port = free_port(), free_port()
    flower_auth = write_secret(tmp_path / "flower.auth", "ops:secret-flower\n")
    metrics_auth = write_secret(tmp_path / "metrics.auth", CREDS.decode() + "\n")
    doc = yaml.safe_load(reader.settings_file.read_text())
    doc["cluster"].update({"flower_port": flower_port, "flower_auth_file": str(flower_auth),
                           "metrics_port": metrics_port, "metrics_auth_file": str(metrics_auth)})
    reader.settings_file.write_text(yaml.safe_dump(doc))
    c.hosts["alpha"].write_vm("vm01")
    c.worker("alpha")
    c.spawn("flower", "reader")
    c.spawn("metrics", "reader")
    orch = c.orchestrator()

    def flower_tasks() -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{flower_port}/api/tasks")
        token = base64.b64encode(b"ops:secret-flower").decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except OSError:
            return {}

    def ping_listed() -> bool:
        ping = orch.ping("alpha")
        orch.wait(ping, timeout=30)
        return wait_for_quietly(lambda: (flower_tasks().get(ping) or {}).get("state")
                                == "SUCCESS", 3)
    wait_for(ping_listed, 90, "Flower (as fcq-reader) to list a task")
    wait_for(lambda: fetch(f"http://127.0.0.1:{metrics_port}/metrics", CREDS)[0] == 200, 30,
             "fcq metrics to answer")
    samples = scrape(metrics_port, CREDS)
    assert value(samples, "fcq_cluster_up") == 1 and value(samples, "fcq_hosts_alive") == 1
    assert value(samples, "fcq_queue_length", host="alpha") == 0
    assert acl_log(c) == [], json.dumps(acl_log(c), default=str)[:2000]
    as_reader = redis.Redis(port=c.redis.port, username="fcq-reader",
                            password=reader.settings.cluster.password())
    assert as_reader.get("fcq:host:alpha")
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_reader.lpush("host.alpha", "forged")


def wait_for_quietly(predicate: Any, timeout: float) -> bool:
    try:
        return bool(wait_for(predicate, timeout, "-"))
    except AssertionError:
        return False


@pytest.mark.parametrize("password, says", [
    ("not-the-password", "Redis refused the credentials"),
    (None, "Redis requires a password: set cluster.password_file"),
])
def test_redis_errors_say_what_is_wrong(make_host: Any, redis_server: Any, tmp_path: Any,
                                        password: str | None, says: str) -> None:
    """A wrong or missing password is not reported as "Redis unreachable"."""
    cluster: dict[str, Any] = {"broker_url": redis_server.url,
                               "hosts_dir": str(tmp_path / "hosts")}
    if password is not None:
        cluster["password_file"] = str(write_secret(tmp_path / "pw", password + "\n"))
    host = make_host("alpha", cluster=cluster)
    out = subprocess.run([sys.executable, "-m", "fcq_tasks", "-c", str(host.settings_file),
                          "hosts"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and says in out.stderr, out.stderr
    assert "unreachable" not in out.stderr
