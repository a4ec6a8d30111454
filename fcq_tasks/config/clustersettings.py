"""Cluster settings: the ``cluster:`` section of the settings file.

Every host, beat and the orchestrator read the same section: where Redis is,
how long things may take, how often beat sweeps. Secrets stay out of it:
the Redis password and Flower's credentials are read from files named here
(mode 0600), so they never appear in the settings, in task arguments, or in
logs (URLs are logged sanitised).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from fcq_tasks import trust
from fcq_tasks.config import validate as v
from fcq_tasks.errors import ConfigError

#: Redis Sentinel's default port, for a sentinel:// part that names none.
SENTINEL_PORT = 26379
MASTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

CLUSTER_DEFAULTS: dict[str, object] = {
    "broker_url": "redis://127.0.0.1:6379/0",
    "password_file": None,
    # Redis Sentinel: broker_url lists the sentinels
    # (sentinel://h1:26379;sentinel://h2:26379/0) and this names the master
    # they watch; password_file is then the Redis servers' password, and
    # sentinel_password_file the sentinels' own (if they require one).
    "sentinel_master": None,
    "sentinel_password_file": None,
    # TLS to Redis (a rediss:// broker_url): the CA that signed Redis's
    # certificate (default: the system's), and this client's own
    # certificate and key when Redis asks for one (tls-auth-clients).
    "tls_ca_file": None,
    "tls_cert_file": None,
    "tls_key_file": None,
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
    # Every host's record (migration address, public key): <hosts_dir>/<host>.yaml.
    "hosts_dir": "/etc/fcq/hosts",
    # Signed commands (cluster/grants.py, docs/security.md). Every host lists
    # the public keys whose grants it accepts (two while a key is rotated);
    # only the orchestrator side's settings name the private key.
    "orchestrator_keys": [],
    "orchestrator_key_file": None,
    # A rolling upgrade from an fcq that did not sign: hosts accept requests
    # without a grant (logged) while this is true. Never leave it on.
    "accept_unsigned": False,
}


@dataclass(frozen=True)
class ClusterSettings:
    broker_url: str                  # without password; see url_with_password()
    password_file: Path | None
    sentinel_master: str | None      # set exactly when broker_url lists sentinels
    sentinel_password_file: Path | None
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
    hosts_dir: Path = Path("/etc/fcq/hosts")  # host records (config/peers.py)
    orchestrator_keys: tuple[str, ...] = ()   # base64 Ed25519 public keys that may grant
    orchestrator_key_file: Path | None = None  # the private key: orchestrator side only
    accept_unsigned: bool = False             # rolling upgrade only: requests without grants
    tls_ca_file: Path | None = None           # rediss://: the CA of Redis's certificate
    tls_cert_file: Path | None = None         # rediss://: this client's certificate ...
    tls_key_file: Path | None = None          # ... and its key

    @property
    def tls(self) -> dict[str, Any] | None:
        """TLS options for redis-py, kombu and Celery's backend (rediss:// only), else None.

        The server's certificate is always verified: kombu's own default
        for a rediss:// URL without options is not to verify it.
        """
        if urlsplit(self.broker_url).scheme != "rediss":
            return None
        opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for key, path in (("ssl_ca_certs", self.tls_ca_file),
                          ("ssl_certfile", self.tls_cert_file),
                          ("ssl_keyfile", self.tls_key_file)):
            if path is not None:
                opts[key] = str(path)
        return opts

    @property
    def busy_retry_chain(self) -> float:
        """Seconds from a task's first try to the end of its last wait for a busy VM."""
        return self.task_busy_wait + self.busy_retries * (self.busy_retry_delay
                                                          + self.task_busy_wait)

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel broker_url lists; empty without Sentinel."""
        if self.sentinel_master is None:
            return []
        out = []
        for part in self.broker_url.split(";"):
            parts = urlsplit(part)
            out.append((parts.hostname or "127.0.0.1", parts.port or SENTINEL_PORT))
        return out

    @property
    def db(self) -> int:
        """The Redis database number the URL names (0 if none)."""
        path = urlsplit(self.broker_url.split(";")[0]).path.strip("/")
        return int(path) if path else 0

    def password(self) -> str | None:
        """The Redis servers' password, from password_file (None without one)."""
        return read_secret(self.password_file, "cluster.password_file")

    def sentinel_password(self) -> str | None:
        return read_secret(self.sentinel_password_file, "cluster.sentinel_password_file")

    def url_with_password(self) -> str:
        """The broker URL with the password from password_file filled in.

        A Sentinel URL gets it in each of its sentinel://… parts: kombu and
        Celery's result backend take the Redis servers' password from there.
        """
        password = self.password()
        if password is None:
            return self.broker_url
        return ";".join(_with_password(part, password) for part in self.broker_url.split(";"))


def read_secret(path: Path | None, field: str) -> str | None:
    """A secret file's text; refused when group or others may read it."""
    if path is None:
        return None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(str(path), field, f"cannot be read: {err.strerror}") from err
    check_secret_mode(path, field, mode)
    return text


def check_secret_mode(path: Path, field: str, mode: int) -> None:
    if mode & 0o077:
        raise ConfigError(str(path), field, f"has mode {mode:04o}: a secret must not be "
                          "readable by group or others (chmod 0600)")


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
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
    master = raw["sentinel_master"]
    check_broker_url(f, url, master is not None)
    if master is not None:
        master = v.check_str(f, "cluster.sentinel_master", master)
        if not MASTER_RE.match(master):
            raise ConfigError(f, "cluster.sentinel_master", "must be the master's name as the "
                              "sentinels know it: letters, digits, '.', '_', '-' "
                              f"(got {master!r})")
    elif raw["sentinel_password_file"] is not None:
        raise ConfigError(f, "cluster.sentinel_password_file",
                          "is only for Redis Sentinel: set cluster.sentinel_master and list "
                          "the sentinels in cluster.broker_url")
    if raw["password_file"] is not None and any(
            urlsplit(p).password for p in url.split(";")):
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
        sentinel_master=master,
        sentinel_password_file=opt_path("sentinel_password_file"),
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
        hosts_dir=Path(v.check_abs_path(f, "cluster.hosts_dir", raw["hosts_dir"])),
        orchestrator_keys=_public_keys(f, raw["orchestrator_keys"]),
        orchestrator_key_file=opt_path("orchestrator_key_file"),
        accept_unsigned=v.check_bool(f, "cluster.accept_unsigned", raw["accept_unsigned"]),
        tls_ca_file=opt_path("tls_ca_file"),
        tls_cert_file=opt_path("tls_cert_file"),
        tls_key_file=opt_path("tls_key_file"),
    )
    tls_keys = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")
                if raw[k] is not None]
    if tls_keys and urlsplit(url).scheme != "rediss":
        raise ConfigError(f, f"cluster.{tls_keys[0]}", "is for TLS to Redis: only with a "
                          "rediss:// cluster.broker_url")
    if (raw["tls_cert_file"] is None) != (raw["tls_key_file"] is None):
        raise ConfigError(f, "cluster.tls_cert_file", "and cluster.tls_key_file go together "
                          "(a client certificate and its key)")
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


def _public_keys(f: str, value: object) -> tuple[str, ...]:
    """cluster.orchestrator_keys: a list of Ed25519 public keys, each checked now."""
    if not isinstance(value, list) or len(value) > 8:
        raise ConfigError(f, "cluster.orchestrator_keys", "must be a list of at most 8 "
                          "Ed25519 public keys, base64 (fcq --local keygen --orchestrator "
                          "prints one)")
    for i, text in enumerate(value):
        trust.parse_public_key(f, f"cluster.orchestrator_keys[{i}]", text)
    return tuple(value)


def check_broker_url(f: str, url: str, sentinel: bool) -> None:
    """broker_url's scheme, and for Sentinel the list of sentinels, or a ConfigError."""
    field = "cluster.broker_url"
    parts = [urlsplit(p) for p in url.split(";")]
    schemes = {p.scheme for p in parts}
    if not schemes <= {"redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps"}:
        raise ConfigError(f, field, "must be a redis://, rediss://, sentinel:// or amqp:// URL")
    if "sentinel" in schemes or sentinel:
        if schemes != {"sentinel"}:
            raise ConfigError(f, field, "with cluster.sentinel_master set, must list the "
                              "sentinels only: sentinel://HOST:PORT;sentinel://HOST:PORT[/DB]"
                              if sentinel else "lists sentinels: name the master they "
                              "watch in cluster.sentinel_master")
        if not sentinel:
            raise ConfigError(f, "cluster.sentinel_master", "must be set when "
                              "cluster.broker_url lists sentinels (the name of the master "
                              "they watch)")
        dbs = set()
        for p in parts:
            try:
                p.port  # noqa: B018  # raises on a bad port
            except ValueError as err:
                raise ConfigError(f, field, f"sentinel {p.netloc!r}: {err}") from err
            if not p.hostname:
                raise ConfigError(f, field, f"every sentinel:// part needs a host "
                                  f"(got {urlsplit(url).geturl()!r})")
            db = p.path.strip("/")
            if db and not db.isdigit():
                raise ConfigError(f, field, f"the database must be a number (got {db!r})")
            dbs.add(int(db) if db else 0)
        if len(dbs) > 1:
            raise ConfigError(f, field, "every sentinel:// part must name the same database "
                              "(one without a database means 0)")
    elif len(parts) > 1:
        raise ConfigError(f, field, "lists several URLs: only sentinels can be listed "
                          "(sentinel://…;sentinel://…)")


def sanitized(url: str) -> str:
    """*url* with any password replaced, for logs and output (each part of a Sentinel URL)."""
    return ";".join(_sanitized(part) for part in url.split(";"))


def _sanitized(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
