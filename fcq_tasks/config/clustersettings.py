"""Cluster settings: the ``cluster:`` section of the settings file.

Every host, beat and the orchestrator read the same section: where Redis is,
how long things may take, how often beat sweeps. Secrets stay out of it:
the Redis password and Flower's credentials are read from files named here
(mode 0600), so they never appear in the settings, in task arguments, or in
logs (URLs are logged sanitised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from fcq_tasks.config import validate as v
from fcq_tasks.errors import ConfigError

CLUSTER_DEFAULTS: dict[str, object] = {
    "broker_url": "redis://127.0.0.1:6379/0",
    "password_file": None,
    "result_expires": 86400,
    "visibility_timeout": 1800,
    "restore_interval": 5,
    "sweep_interval": 60,
    "worker_concurrency": 8,
    "task_busy_wait": 10,
    "busy_retry_delay": 5,
    "busy_retries": 12,
    "registry_ttl": 30,
    # The busy-retry chain of the defaults is 10 + 12 × (5 + 10) = 190 s;
    # 900 s leaves ~12 minutes more for a queue backlog and clock skew, and
    # is still half the default visibility_timeout, so a task redelivered
    # after a worker crash always arrives expired.
    "request_ttl": 900,
    "flower_address": "127.0.0.1",
    "flower_port": 5555,
    "flower_auth_file": None,
    # `fcq metrics`, the cluster's own endpoint (docs/operations.md).
    "metrics_address": "127.0.0.1",
    "metrics_port": 9742,
    "metrics_auth_file": None,
}


@dataclass(frozen=True)
class ClusterSettings:
    broker_url: str                  # without password; see url_with_password()
    password_file: Path | None
    result_expires: int              # s a task result is kept
    visibility_timeout: int          # s before an unacknowledged task is delivered again
    restore_interval: int            # s between scans for such tasks
    sweep_interval: int              # s between two ensure sweeps of a host
    worker_concurrency: int          # threads per worker
    task_busy_wait: float            # s a task waits for a busy VM before retrying later
    busy_retry_delay: int            # s until that retry
    busy_retries: int                # retries before the task fails as busy
    registry_ttl: int                # s a host counts as alive after its last heartbeat
    request_ttl: int                 # s an imperative request (start, stop, …) stays valid
    flower_address: str
    flower_port: int
    flower_auth_file: Path | None
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9742
    metrics_auth_file: Path | None = None

    @property
    def busy_retry_chain(self) -> float:
        """Seconds from a task's first try to the end of its last wait for a busy VM."""
        return self.task_busy_wait + self.busy_retries * (self.busy_retry_delay
                                                          + self.task_busy_wait)

    def url_with_password(self) -> str:
        """The broker URL with the password from password_file filled in."""
        if self.password_file is None:
            return self.broker_url
        try:
            password = self.password_file.read_text().strip()
        except OSError as err:
            raise ConfigError(str(self.password_file), "cluster.password_file",
                              f"cannot be read: {err.strerror}") from err
        parts = urlsplit(self.broker_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc))


def parse_cluster_settings(f: str, value: object) -> ClusterSettings:
    raw: dict[str, object] = dict(CLUSTER_DEFAULTS)
    if value is not None:
        given = v.check_mapping(f, "cluster", value)
        bad = v.unknown_keys(given, frozenset(CLUSTER_DEFAULTS), "cluster")
        if bad:
            raise ConfigError(f, bad[0], "unknown setting; known: "
                              + ", ".join(sorted(CLUSTER_DEFAULTS)))
        raw.update(given)
    url = v.check_str(f, "cluster.broker_url", raw["broker_url"])
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps"):
        raise ConfigError(f, "cluster.broker_url",
                          "must be a redis://, rediss://, sentinel:// or amqp:// URL")
    if parts.password and raw["password_file"] is not None:
        raise ConfigError(f, "cluster.broker_url",
                          "has a password and password_file is set too: keep only the file")

    def opt_path(key: str) -> Path | None:
        val = raw[key]
        return None if val is None else Path(v.check_abs_path(f, f"cluster.{key}", val))

    def num(key: str, lo: int, hi: int) -> int:
        return v.check_int(f, f"cluster.{key}", raw[key], lo, hi)

    metrics_address, metrics_port, metrics_auth = v.check_endpoint(
        f, "cluster.", raw["metrics_address"], raw["metrics_port"], raw["metrics_auth_file"])
    settings = ClusterSettings(
        broker_url=url,
        password_file=opt_path("password_file"),
        result_expires=num("result_expires", 60, 30 * 86400),
        visibility_timeout=num("visibility_timeout", 5, 86400),
        restore_interval=num("restore_interval", 1, 3600),
        sweep_interval=num("sweep_interval", 1, 86400),
        worker_concurrency=num("worker_concurrency", 1, 256),
        task_busy_wait=v.check_number(f, "cluster.task_busy_wait", raw["task_busy_wait"], 0, 3600),
        busy_retry_delay=num("busy_retry_delay", 1, 3600),
        busy_retries=num("busy_retries", 0, 1000),
        registry_ttl=num("registry_ttl", 3, 3600),
        request_ttl=num("request_ttl", 1, 7 * 86400),
        flower_address=v.check_str(f, "cluster.flower_address", raw["flower_address"]),
        flower_port=num("flower_port", 1, 65535),
        flower_auth_file=opt_path("flower_auth_file"),
        metrics_address=metrics_address,
        metrics_port=metrics_port,
        metrics_auth_file=None if metrics_auth is None else Path(metrics_auth),
    )
    # Busy retries resend the request with its original expires_at: a ttl
    # shorter than the chain would turn "busy, try again" into "expired".
    chain = settings.busy_retry_chain
    if settings.request_ttl < chain:
        raise ConfigError(f, "cluster.request_ttl",
                          f"must be at least the busy-retry chain, cluster.task_busy_wait + "
                          f"cluster.busy_retries × (cluster.busy_retry_delay + "
                          f"cluster.task_busy_wait) = {chain:g} s (got {settings.request_ttl}): "
                          "raise request_ttl or shorten the chain")
    return settings


def sanitized(url: str) -> str:
    """*url* with any password replaced, for logs and output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


