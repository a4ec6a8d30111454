"""Real cluster parts for tests: a redis-server, fcq worker/beat/flower processes.

Nothing here is faked: Redis is Debian's redis-server on a free loopback
port with a password and AOF on; workers are `fcq worker` processes killed
for real. Used by the fixtures in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from fcq_tasks.cluster import grants, redisacl
from fcq_tasks.cluster.api import Orchestrator
from fcq_tasks.host.hostkeys import orchestrator_keygen
from tests.conftest import Host, HostFactory
from tests.conftest import free_port as free_port  # its old home: tests import it from here

PASSWORD = "test-only-password"


class RedisServer:
    """redis-server on a free port, AOF on, data in a temp dir; restartable."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fcq-redis-"))
        self.port = free_port()
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD,
                           decode_responses=True)

    def url_for(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def add_user(self, role: str, host: str | None = None) -> tuple[str, Path]:
        """A Redis ACL user of *role* (redisacl.permissions), with a password file."""
        user = redisacl.username(role, host)
        password = uuid.uuid4().hex
        path = self.dir / f"password-{user}"
        path.write_text(password + "\n")
        path.chmod(0o600)
        # The very line `fcq config redis-acl` prints for an ACL file.
        rule = redisacl.acl_rule(role, password, host).split()
        assert rule[:2] == ["user", user]
        client: Any = self.client()  # redis-py's execute_command is untyped
        client.execute_command("ACL", "SETUSER", *rule[1:])
        return user, path

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--dir", str(self.dir), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "log")],
            stdout=subprocess.DEVNULL)
        self.wait_up()

    def wait_up(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        log = self.dir / "log"
        raise RuntimeError("redis-server did not come up: "
                           + (log.read_text(errors="replace")[-500:] if log.exists() else ""))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis flushes its AOF and exits
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    redis: RedisServer
    hosts: dict[str, Host]
    services: list[Service] = field(default_factory=list)
    orchestrators: list[Orchestrator] = field(default_factory=list)
    #: With Redis ACL users (make_cluster(acl=True)): the settings of the
    #: other roles, "orchestrator" (the CLI and the controller), "beat" and
    #: "reader" (Flower, fcq metrics), each with its own Redis user.
    roles: dict[str, Host] = field(default_factory=dict)

    def _host(self, name: str) -> Host:
        return self.hosts[name] if name in self.hosts else self.roles[name]

    def settings_file(self, host: str = "alpha") -> Path:
        return self._host(host).settings_file

    def orchestrator(self) -> Orchestrator:
        """An orchestrator for this cluster, closed by stop_all().

        An unclosed one keeps its result subscriptions until the garbage
        collector frees it, maybe in a later test after this Redis is gone:
        then its consumer retries a reconnect for 20 s in that test's thread.
        """
        side = self.roles.get("orchestrator") or self.hosts["alpha"]
        orch = Orchestrator(side.settings)
        self.orchestrators.append(orch)
        return orch

    def spawn(self, command: str, host: str = "alpha", *extra: str) -> Service:
        log = self._host(host).base / f"{command}-{len(self.services)}.log"
        env = {**os.environ, "FCQ_CONFIG": str(self.settings_file(host))}
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "fcq_tasks", command, *extra],
                                    env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        service = Service(f"{command}@{host}", proc, log)
        self.services.append(service)
        return service

    def worker(self, host: str) -> Service:
        """*host*'s worker, registered; and the cluster's controller, as in production
        (a migration's chord ends on it)."""
        self.controller()
        service = self.spawn("worker", host)
        self.wait_registered(host)
        return service

    def controller(self) -> Service:
        """The controller (from alpha's settings, which hold the orchestrator key),
        started if none runs."""
        for s in self.services:
            if s.name.startswith("controller@") and s.proc.poll() is None:
                return s
        return self.spawn("controller", "orchestrator" if self.roles else next(iter(self.hosts)))

    def wait_registered(self, host: str, timeout: float = 30) -> None:
        key = f"fcq:host:{host}"
        client = self.redis.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.exists(key):
                return
            time.sleep(0.1)
        raise AssertionError(f"worker for {host} did not register within {timeout} s")

    def kill9(self, service: Service) -> None:
        os.killpg(service.proc.pid, signal.SIGKILL)
        service.proc.wait(10)

    def stop_all(self) -> None:
        """Close the orchestrators (while Redis still runs), then stop the services."""
        try:
            for orch in self.orchestrators:
                orch.close()
        finally:
            self.orchestrators.clear()
            for s in self.services:
                if s.proc.poll() is None:
                    with_suppress_kill(s.proc)
            self.services.clear()

    def fcq(self, *args: str, host: str = "alpha", timeout: float = 180
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FCQ_CONFIG": str(self.settings_file(host))}
        return subprocess.run([sys.executable, "-m", "fcq_tasks", *args], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)


def with_suppress_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def send_signed(orch: Orchestrator, task: str, host: str, kwargs: dict[str, Any],
                task_id: str | None = None) -> str:
    """Send *task* with exactly *kwargs* (no expires_at added), granted by *orch*'s key.

    A hand-made request as the orchestrator side could make it: what a host
    checks beyond the grant is then tested by itself.
    """
    name = task if task.startswith("fcq.") else f"fcq.{task}"
    task_id = task_id or str(uuid.uuid4())
    signed = {**kwargs, "grant": grants.grant(orch.signing_key(), name, task_id, host, kwargs)}
    return str(orch.app.send_task(name, kwargs=signed, queue=f"host.{host}",
                                  task_id=task_id).id)


def orchestrator_key(redis_server: RedisServer) -> tuple[Path, str]:
    """The cluster's orchestrator key (made once per Redis): its file and public key."""
    made = orchestrator_keygen(redis_server.dir / "orchestrator.key")
    return Path(made["key_file"]), str(made["public_key"])


def cluster_settings(redis_server: RedisServer, **overrides: Any) -> dict[str, Any]:
    """Settings of a test cluster. Every host's settings name the orchestrator key
    too, so that a test can orchestrate from any host's settings file; tests of
    the trust model take it away (tests/test_signed_commands.py)."""
    key_file, public = orchestrator_key(redis_server)
    return {"broker_url": redis_server.url, "password_file": str(redis_server.password_file),
            "visibility_timeout": 10, "restore_interval": 1, "registry_ttl": 6,
            "sweep_interval": 3, "task_busy_wait": 15, "busy_retry_delay": 1,
            "result_expires": 3600, "hosts_dir": str(redis_server.dir / "hosts"),
            "orchestrator_keys": [public], "orchestrator_key_file": str(key_file),
            **overrides}


def migration_settings(visibility_timeout: int) -> dict[str, Any]:
    """Host migration settings that fit the visibility timeout (settings refuse others)."""
    ttl = 3 if visibility_timeout >= 60 else 1
    grace = 10 if visibility_timeout >= 60 else 2
    return {"migration_heartbeat_ttl": ttl, "migration_peer_grace": grace,
            "migration_timeout_max": visibility_timeout - grace - 5}


def make_cluster(make_host: HostFactory, redis_server: RedisServer, names: tuple[str, ...],
                 storage: Callable[[str], dict[str, Any]] | None = None, acl: bool = False,
                 **cluster_overrides: Any) -> Cluster:
    """Hosts *names* on one Redis; *storage* gives each host's storage settings.

    *acl*: every host, and every other role (Cluster.roles), talks to Redis
    as its own ACL user (cluster/redisacl.py) instead of the shared password.
    """
    cluster = cluster_settings(redis_server, **cluster_overrides)

    def as_user(role: str, host: str | None = None) -> dict[str, Any]:
        if not acl:
            return cluster
        user, password_file = redis_server.add_user(role, host)
        return {**cluster, "broker_url": redis_server.url_for(user),
                "password_file": str(password_file)}
    hosts = {n: make_host(n, cluster=as_user("host", n),
                          **migration_settings(int(cluster["visibility_timeout"])),
                          **(storage(n) if storage else {}))
             for n in names}
    roles = {role: make_host(role, cluster=as_user(role),
                             **migration_settings(int(cluster["visibility_timeout"])))
             for role in (("orchestrator", "beat", "reader") if acl else ())}
    return Cluster(redis_server, hosts, roles=roles)
