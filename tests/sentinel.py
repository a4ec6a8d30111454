"""A real Redis Sentinel setup on this machine: primary, replica, three sentinels.

Debian's redis-server runs as a sentinel with ``--sentinel``. Every process
listens on a free loopback port; the Redis servers share one password (the
cluster's password_file) and the sentinels have their own, so both paths
of fcq's configuration are used. Sentinels decide quickly here
(down-after 1 s, failover timeout 5 s) so a failover takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import Sentinel

from tests.cluster import PASSWORD, free_port

MASTER = "fcq"
SENTINEL_PASSWORD = "test-only-sentinel-password"


class SentinelSet:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fcq-sentinel-"))
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.sentinel_password_file = self.dir / "sentinel-password"
        self.sentinel_password_file.write_text(SENTINEL_PASSWORD + "\n")
        for f in (self.password_file, self.sentinel_password_file):
            f.chmod(0o600)
        self.redis_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def _spawn(self, port: int, args: list[str]) -> None:
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def _redis(self, port: int, *extra: str) -> None:
        data = self.dir / str(port)
        data.mkdir(exist_ok=True)
        self._spawn(port, ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                           "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                           "--dir", str(data), "--appendonly", "yes", "--save", "",
                           "--logfile", str(data / "log"), *extra])

    def _sentinel(self, port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"  # sentinels rewrite their file
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {self.dir}",
            f"logfile {self.dir}/sentinel-{port}.log",
            f"requirepass {SENTINEL_PASSWORD}",
            f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.redis_ports[0]} 2",
            f"sentinel auth-pass {MASTER} {PASSWORD}",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 5000",
            f"sentinel parallel-syncs {MASTER} 1", ""]))
        self._spawn(port, ["redis-server", str(conf), "--sentinel"])

    def start(self) -> SentinelSet:
        primary, replica = self.redis_ports
        self._redis(primary)
        self._redis(replica, "--replicaof", "127.0.0.1", str(primary))
        for port in self.sentinel_ports:
            self._sentinel(port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.ready():
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"the sentinels did not settle within 30 s (see {self.dir})")

    def ready(self) -> bool:
        """Each sentinel knows the primary, its replica (in sync) and the other two."""
        for port in self.sentinel_ports:
            s: Any = self.sentinel(port)  # redis-py types sentinel replies loosely
            if s.sentinel_get_master_addr_by_name(MASTER) is None:
                return False
            if len(s.sentinel_sentinels(MASTER)) != 2:
                return False
            replicas = s.sentinel_slaves(MASTER)
            if len(replicas) != 1 or replicas[0]["flags"] != "slave":
                return False
        info: Any = self.client().info("replication")
        return bool(info["connected_slaves"] == 1)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=SENTINEL_PASSWORD,
                           decode_responses=True, socket_timeout=5)

    def master_port(self, sentinel: int | None = None) -> int:
        """The primary's port as a sentinel (default: the first) reports it now."""
        s: Any = self.sentinel(sentinel or self.sentinel_ports[0])
        return int(s.sentinel_get_master_addr_by_name(MASTER)[1])

    def client(self) -> redis.Redis:
        """A client of the current primary (found through the sentinels)."""
        sentinels = Sentinel(
            [("127.0.0.1", p) for p in self.sentinel_ports],
            sentinel_kwargs={"password": SENTINEL_PASSWORD, "socket_timeout": 5})
        client: redis.Redis = sentinels.master_for(
            MASTER, password=PASSWORD, decode_responses=True, socket_timeout=5)
        return client

    def signal(self, port: int, sig: signal.Signals) -> None:
        os.kill(self.procs[port].pid, sig)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)  # a stopped process cannot exit
                    proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
