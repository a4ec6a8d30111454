"""What the cluster knows about itself, kept in Redis next to the queues.

* ``fcq:host:<name>``: a worker's heartbeat (expires after ``registry_ttl``):
  its queue, memory booked and limit, and the VMs its config directory
  declares (name → kvm_host, online, memory). Beat sweeps the hosts listed
  here; the orchestrator finds the host of a VM here.
* ``fcq:jobs`` / ``fcq:job:<id>``: the tasks the orchestrator submitted, for
  ``fcq jobs`` (task states themselves live in Celery's result backend).
* ``fcq:beat``: the lock that keeps beat single (see fcq_beat).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from pathlib import Path
from typing import Any, cast

import redis
import structlog
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from fcq_tasks import trust
from fcq_tasks.cluster.sentinel import MasterConnection
from fcq_tasks.config import peers
from fcq_tasks.config.peers import Peer
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import ConfigError, FcqError

log = structlog.get_logger()

HOST_KEY = "fcq:host:"
#: How often beating() reads the records it watches.
BEAT_POLL = 0.25
JOBS_KEY = "fcq:jobs"
JOB_KEY = "fcq:job:"
#: How many submitted jobs `fcq jobs` can look back on.
JOBS_KEPT = 1000
#: Heartbeats read by one MGET (a reply of a few hundred KB at most).
HOSTS_PER_MGET = 500


def connect(settings: HostSettings) -> redis.Redis:
    """A client for the cluster's Redis, one per URL and process (it pools connections).

    With Redis Sentinel, a client of the current master: redis-py asks the
    sentinels for it on every new connection, so after a failover the next
    command (redis-py retries it) reaches the new master.
    """
    c = settings.cluster
    if c.sentinel_master is not None:
        return _sentinel_client(tuple(c.sentinels), c.sentinel_master, c.db, c.password(),
                                c.sentinel_password())
    return _client(c.url_with_password(), tuple(sorted((c.tls or {}).items())))


#: Seconds any registry command may take (a Redis that stopped answering).
TIMEOUT = 10


@functools.lru_cache(maxsize=8)
def _client(url: str, tls: tuple[tuple[str, Any], ...] = ()) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
                                decode_responses=True, **dict(tls))


@functools.lru_cache(maxsize=8)
def _sentinel_client(sentinels: tuple[tuple[str, int], ...], master: str, db: int,
                     password: str | None, sentinel_password: str | None) -> redis.Redis:
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": TIMEOUT,
                                       "socket_connect_timeout": TIMEOUT}
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(list(sentinels), sentinel_kwargs=sentinel_kwargs)
    # A master that froze (celery#6348's case) leaves idle pooled
    # connections that only time out when used: retry such a command on a
    # fresh connection, which asks the sentinels for the master again.
    # Retrying after a timeout is safe here: a command the old master may
    # have received is gone anyway (the new master never had it, and the
    # old one resyncs from it when it returns as a replica).
    client: redis.Redis = sentinel.master_for(
        master, db=db, password=password, socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT, decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
        retry_on_error=[redis.TimeoutError, redis.ConnectionError],
        connection_class=MasterConnection)
    return client


def host_record(settings: HostSettings) -> dict[str, Any]:
    """This host's heartbeat: cheap (config files and the process table, no QMP)."""
    # Imported here: only a worker writes its record, and an orchestrator
    # (the fcq command) must not pay for the host side's modules.
    from fcq_tasks.config.vmspec import load_vm_spec
    from fcq_tasks.hazmat.qemu import read_identity_files
    from fcq_tasks.host import maintenance
    from fcq_tasks.host.admission import booked_memory
    from fcq_tasks.host.sweep import configured_vms
    vms: dict[str, Any] = {}
    for name in configured_vms(settings):
        try:
            spec = load_vm_spec(settings.vm_config_dir, name)
            vms[name] = {"kvm_host": spec.kvm_host, "online": spec.online,
                         "memory_mb": spec.memory_mb}
        except (ConfigError, FcqError) as err:
            vms[name] = {"error": err.message}
    idents = read_identity_files(settings.run_dir)
    booked = booked_memory(settings.run_dir, settings.qmp_timeout, identities=idents)
    running = sorted(n for n in booked if not n.endswith("+upgrade"))  # not a second VM
    return {"host": settings.host, "queue": f"host.{settings.host}", "seen": time.time(),
            "booked_mb": sum(booked.values()), "limit_mb": settings.vm_max_total_memory,
            "running": running, "vms": vms, "qemu_generation": settings.qemu_generation,
            "generations": {n: int(idents.get(n, {}).get("generation") or 0)
                            for n in running},
            # What placement needs (fcq drain, fcq evacuate): whether the host
            # takes VMs, how many migrations at once, and whether its storage
            # can fence a dead host's writers.
            "drained": maintenance.drained(settings), "max_migrations": settings.max_migrations,
            "storage": settings.storage}


#: What a host's signature on its heartbeat is for (trust.sign_document).
HEARTBEAT_PURPOSE = "fcq-heartbeat"


def publish_host(client: redis.Redis, settings: HostSettings, beat: str = "") -> None:
    """Write this host's record, signed with its key; *beat* changes at every heartbeat."""
    record = {**host_record(settings), "beat": beat}
    try:
        key = trust.cached_private_key(settings.host_key_file)
    except (OSError, ConfigError) as err:
        # Published anyway, unsigned: readers that check (the orchestrator,
        # placement) ignore it and say why; safety checks still see the
        # host alive, which is the safe side.
        log.warning("heartbeat-unsigned", host=settings.host,
                    error=getattr(err, "message", str(err)))
    else:
        record["sig"] = trust.sign_document(key, HEARTBEAT_PURPOSE, record)
    client.set(HOST_KEY + settings.host, json.dumps(record), ex=settings.cluster.registry_ttl)


def verified(record: dict[str, Any], hosts_dir: Path) -> Peer | None:
    """The writer's host record if *record* is a heartbeat its host signed, else None.

    Redis is writable by every host: a record says who wrote it only
    through its signature, checked against the writer's record in
    *hosts_dir* (from the inventory, never from Redis).
    """
    name = record.get("host")
    if not isinstance(name, str):
        return None
    try:
        peer = peers.cached_peer(hosts_dir, name)
    except (ConfigError, ValueError):
        return None
    body = {k: v for k, v in record.items() if k != "sig"}
    return peer if trust.verify_document(peer.public_key, HEARTBEAT_PURPOSE, body,
                                         record.get("sig")) else None


def trusted(records: dict[str, dict[str, Any]], hosts_dir: Path,
            ignored: list[str] | None = None, accept_unsigned: bool = False,
            max_age: float | None = None) -> dict[str, dict[str, Any]]:
    """The records of *records* their hosts signed, capacity capped by the inventory.

    What placement and the orchestrator act on. The names of the others go
    to *ignored* (a forged, unsigned or unknown host's record). Not for
    safety checks: there, any record counts as a sign of life.
    *accept_unsigned* (cluster.accept_unsigned, a rolling upgrade): a record
    without any signature, from a host older than signing, is kept too.
    *max_age*: a record whose ``seen`` is older (its writer's wall clock) is
    left out too: a genuine record written again by someone else later (a
    replay, keeping a dead host alive) is signed, but old.
    """
    out = {}
    now = time.time()
    for name, record in records.items():
        seen = record.get("seen")
        if max_age is not None and (not isinstance(seen, (int, float))
                                    or now - seen > max_age):
            if ignored is not None:
                ignored.append(name)
            continue
        peer = verified(record, hosts_dir)
        if peer is None and accept_unsigned and "sig" not in record:
            out[name] = record
            continue
        if peer is None:
            if ignored is not None:
                ignored.append(name)
            continue
        if peer.memory_mb is not None:
            record = {**record, "limit_mb": min(int(record.get("limit_mb", 0)),
                                                peer.memory_mb)}
        out[name] = record
    return out


#: Every beat this process writes starts with it: what tells this worker's
#: records from those of another process writing under the same host name.
PROCESS_TOKEN = secrets.token_hex(4)


def own_beat(suffix: str) -> str:
    return f"{PROCESS_TOKEN}:{suffix}"


def written_by_another(record: dict[str, Any] | None) -> bool:
    """Whether *record* (this host's, as read now) was written by another process."""
    return record is not None and not str(record.get("beat", "")).startswith(
        PROCESS_TOKEN + ":")


def beating(client: redis.Redis, names: set[str], registry_ttl: float) -> set[str]:
    """Those of *names* whose worker beats now, watched for half a ttl (1.5 beats).

    A record's presence alone is not life: Redis expires keys by the wall
    clock, so after the clock was stepped forward and back a dead host's
    last record lives on for as long as the step (an hour, say), and a
    step the other way drops a live host's record early. Before fcq
    breaks a lock on the strength of "that host is dead", it therefore
    watches the records: a host counts as alive if its ``beat`` changed
    meanwhile or its record appeared; one whose record stayed the same, or
    stayed away, is dead. Costs ``registry_ttl / 2`` seconds of waiting.
    """
    def read() -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in sorted(names):
            record = host(client, name)
            out[name] = None if record is None else str(record.get("beat", ""))
        return out
    first = read()
    alive: set[str] = set()
    deadline = time.monotonic() + registry_ttl / 2
    while True:
        for name, beat in read().items():
            if beat is not None and (first[name] is None or beat != first[name]):
                alive.add(name)
        if alive == names or time.monotonic() >= deadline:
            return alive
        time.sleep(min(BEAT_POLL, max(0.0, deadline - time.monotonic())))


def withdraw_host(client: redis.Redis, host: str) -> None:
    client.delete(HOST_KEY + host)


def host(client: redis.Redis, name: str) -> dict[str, Any] | None:
    """The last heartbeat of host *name* if it is alive within its ttl (one GET, no scan)."""
    raw = client.get(HOST_KEY + name)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("host") == name else None


def hosts(client: redis.Redis, unreadable: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """name → last heartbeat of every host alive within its ttl.

    A record that is not a heartbeat (not JSON, no ``host``) raises, unless
    *unreadable* is given: then its key is appended there and it is skipped.
    """
    out = {}
    # SCAN may return a key twice; one GET per key was one round trip per
    # host (measured: 0.2 s of beat's refresh at 1,000 hosts), MGET reads
    # HOSTS_PER_MGET at once. A key that expired since the SCAN reads None.
    keys = sorted(set(client.scan_iter(HOST_KEY + "*", count=1000)))
    for start in range(0, len(keys), HOSTS_PER_MGET):
        chunk = keys[start:start + HOSTS_PER_MGET]
        raws = cast(list[str | None], client.mget(chunk))
        for key, raw in zip(chunk, raws, strict=True):
            if not raw:
                continue
            try:
                record = json.loads(raw)
                out[str(record["host"])] = record
            except (ValueError, KeyError, TypeError):
                if unreadable is None:
                    raise
                unreadable.append(str(key))
    return out


def record_job(client: redis.Redis, task_id: str, op: str, vm: str, host: str,
               expires: int, task: str | None = None) -> None:
    """*task*: the task's name, whose result is expected (Orchestrator.believed)."""
    now = time.time()
    pipe = client.pipeline()
    pipe.set(JOB_KEY + task_id, json.dumps({"id": task_id, "op": op, "vm": vm, "host": host,
                                            "task": task, "submitted": now}), ex=expires)
    pipe.zadd(JOBS_KEY, {task_id: now})
    pipe.zremrangebyrank(JOBS_KEY, 0, -JOBS_KEPT - 1)
    pipe.execute()


def recent_jobs(client: redis.Redis, limit: int) -> list[dict[str, Any]]:
    ids = cast(list[str], client.zrevrange(JOBS_KEY, 0, limit - 1))
    if not ids:
        return []
    raws = cast(list[str | None], client.mget([JOB_KEY + i for i in ids]))
    return [json.loads(r) for r in raws if r]
