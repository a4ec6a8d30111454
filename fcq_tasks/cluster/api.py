"""The orchestrator's Python API: enqueue work for the right host and wait.

    from fcq_tasks.cluster.api import Orchestrator
    orch = Orchestrator(load_host_settings("/etc/fcq/host.yaml"))
    job = orch.submit("start", "vm01")          # returns at once
    result = orch.wait(job, on_progress=print)  # or poll orch.state(job)

The VM's host is looked up in the host registry (the live host whose config
declares ``kvm_host`` = itself for that VM) unless the caller names one.
Work is sent only to a host whose worker is alive: a request for a host that
is down is refused at once instead of waiting silently in its queue.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu.pools
import redis
from celery.result import AsyncResult
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from kombu import Exchange, Queue

from fcq_tasks.cluster import grants, registry
from fcq_tasks.cluster.celeryapp import (
    CONTROLLER_QUEUE,
    CONTROLLER_TASKS,
    client_app,
    host_queue,
)
from fcq_tasks.cluster.results import (
    BROKER_ERRORS,
    CONTROLLER_SIGNER,
    follow,
    lost_result_store,
    redis_failure,
    renew_backend,
)
from fcq_tasks.cluster.results import verify as verify_result
from fcq_tasks.cluster.taskargs import kwargs_repr
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.errors import (
    BadRequest,
    FcqError,
    Refused,
    RemoteError,
    SystemFailure,
    TaskError,
    TaskRejected,
)

VM_OPERATIONS = ("start", "stop", "restart", "ensure", "kill", "force_unlock", "lock",
                 "unlock")

#: Imperative tasks: they act on the world as it was when they were sent, so
#: their messages carry expires_at (cluster.request_ttl from now) and a host
#: refuses them once it has passed (a redelivery after a worker crash comes
#: up to visibility_timeout late). They are the signed ones (cluster/grants.py):
#: a grant needs an expiry. ensure and sweeps converge to the config as it is
#: now: always safe, they never expire this way.
EXPIRING_TASKS = grants.SIGNED_TASKS


def record_max_age(registry_ttl: int) -> float:
    """How old a heartbeat's ``seen`` may be, by the reader's clock: its ttl plus skew."""
    return registry_ttl + 120.0


#: How many sent tasks an orchestrator remembers the host of (for wait()).
SENT_KEPT = 10000


class Orchestrator:
    """Submit VM operations to host queues and follow them. No I/O in here."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.app = client_app(settings)
        self._client: redis.Redis | None = None
        self._signing_key: Ed25519PrivateKey | None = None  # loaded at the first grant
        self.untrusted: list[str] = []  # hosts whose heartbeats did not verify, last read
        # task id → (host, task name) whose signature its result needs
        self._sent_to: dict[str, tuple[str, str]] = {}
        self._controller_bound = False  # the controller's queue declared (migrate)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = registry.connect(self.settings)
        return self._client

    def close(self) -> None:
        """Shut this orchestrator's connections down; safe to call twice.

        Why it matters: Celery subscribes the result consumer to every task this
        app sends and keeps every result a timed-out wait() asked for until the
        app is garbage-collected. When that happens after the cluster's Redis is
        gone, each AsyncResult.__del__ unsubscribes through the dead connection,
        and the consumer retries its reconnect 20 times, 1 s apart, in whatever
        thread the collector happens to run (a later test, the end of a run).
        So the subscriptions are forgotten first: nothing left can reach the
        network. Used again afterwards, the orchestrator reconnects lazily.

        Celery keeps one result backend per thread: this closes the calling
        thread's.
        """
        app: Any = self.app  # the private parts used here are not in Celery's stubs
        backend = app._backend_cache or getattr(app._local, "backend", None)
        if backend is not None:
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                # Emptied before the pending results are dropped below: their
                # __del__ unsubscribes only keys still listed here.
                consumer.subscribed_to.clear()
                consumer.stop()  # closes the pub/sub connection, under its lock
                consumer._pubsub = None  # a later consume_from() starts a fresh one
                consumer.drainer.stop()
            for pending in backend._pending_results:
                pending.clear()
            client = backend.__dict__.get("client")  # a cached_property: never create it
            if client is not None:
                client.connection_pool.disconnect()
        # Broker connections: kombu pools them per cluster URL for the whole
        # process, shared by every app of that cluster (other orchestrators, a
        # worker's own app). A pool closed under another user blocks its next
        # send forever (measured), so the pools are closed only when no other
        # live app holds them; otherwise they stay, idle (no thread, no retry).
        amqp = app.__dict__.get("amqp")
        producers = None if amqp is None else amqp._producer_pool
        pools_ours = [p for p in (producers, app._pool) if p is not None]
        others = [a for a in list(importlib.import_module("celery._state")._get_active_apps())
                  if a is not app]
        held = {id(a._pool) for a in others} | {
            id(a.__dict__["amqp"]._producer_pool) for a in others if "amqp" in a.__dict__}
        if pools_ours and not held & {id(p) for p in pools_ours}:
            for pool in pools_ours:
                pool.force_close_all()
            for group in (kombu.pools.producers, kombu.pools.connections):
                for key in [k for k, v in group.items() if any(v is p for p in pools_ours)]:
                    group.pop(key)  # the next user of this cluster gets a fresh pool
        if amqp is not None:
            amqp._producer_pool = None
        # What app.close() does, minus deregistering the app: reused after
        # this, it must still count as a holder of the pools it picks up again.
        app._pool = None
        if self._client is not None:
            # registry.connect() shares one client per URL in the process: drop
            # its idle connections only, never one another thread is using.
            self._client.connection_pool.disconnect(inuse_connections=False)
            self._client = None

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _registry(self) -> dict[str, dict[str, Any]]:
        """Live hosts whose heartbeats their own keys signed (registry.trusted).

        The names of the others (forged, unsigned, unknown to the
        inventory's records) are kept in ``self.untrusted`` for the caller
        to show.
        """
        try:
            records = registry.hosts(self.client)
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        self.untrusted = []
        c = self.settings.cluster
        return registry.trusted(records, c.hosts_dir, self.untrusted, c.accept_unsigned,
                                record_max_age(c.registry_ttl))

    def hosts(self) -> dict[str, dict[str, Any]]:
        return self._registry()

    def locate(self, vm: str) -> str:
        """The live host that should act on *vm*."""
        hosts = self._registry()
        declared = [h for h, rec in hosts.items() if rec["vms"].get(vm, {}).get("kvm_host") == h]
        if len(declared) == 1:
            return declared[0]
        knowing = [h for h, rec in hosts.items() if vm in rec["vms"]]
        if len(knowing) == 1:
            return knowing[0]
        if not knowing:
            raise BadRequest("vm", f"no live host has a config for {vm!r}")
        raise BadRequest("host", f"{vm!r} is known to hosts {', '.join(knowing)} and none "
                         "is its kvm_host: name one with --host")

    def _check_host(self, host: str) -> None:
        if not NAME_RE.match(host):
            raise BadRequest("host", f"{NAME_RULE} (got {host!r})")
        try:
            # One GET: a start must not scan every host's record on the way.
            record = registry.host(self.client, host)
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        c = self.settings.cluster
        if record is not None and not registry.trusted({host: record}, c.hosts_dir,
                                                       accept_unsigned=c.accept_unsigned,
                                                       max_age=record_max_age(c.registry_ttl)):
            raise Refused(f"host {host!r}: its heartbeat is not signed by the key in its "
                          f"record ({self.settings.cluster.hosts_dir}/{host}.yaml), or is "
                          "older than its ttl: not believed, nothing sent", host=host)
        if record is None:
            raise BadRequest("host", f"host {host!r} has no live worker (no heartbeat within "
                             f"{self.settings.cluster.registry_ttl} s)")

    def submit(self, operation: str, vm: str, host: str | None = None) -> str:
        """Enqueue *operation* on *vm*; return the task id."""
        if operation not in VM_OPERATIONS:
            raise BadRequest("operation", f"must be one of {', '.join(VM_OPERATIONS)}")
        if not NAME_RE.match(vm):
            raise BadRequest("vm", f"{NAME_RULE} (got {vm!r})")
        target = host or self.locate(vm)
        self._check_host(target)
        if operation == "force_unlock":
            # Never break a lock whose holder may be alive: refuse while any
            # other live host reports the VM's QEMU running. This is fast
            # feedback only; the task checks again (and the locks' owners)
            # when it runs, on the host that breaks the locks.
            running = [h for h, rec in self._registry().items()
                       if h != target and vm in rec["running"]]
            if running:
                raise Refused(f"{vm} runs on live host {running[0]}: stop it there before "
                              "breaking its locks", vm=vm, host=running[0])
        return self._send(f"fcq.{operation}", {"vm": vm, "host": target}, target,
                          operation, vm)

    def _vm_task(self, task: str, operation: str, vm: str, host: str | None,
                 **kwargs: Any) -> str:
        if not NAME_RE.match(vm):
            raise BadRequest("vm", f"{NAME_RULE} (got {vm!r})")
        target = host or self.locate(vm)
        self._check_host(target)
        return self._send(task, {"vm": vm, "host": target, **kwargs}, target, operation, vm)

    def plan(self, vm: str | None = None, host: str | None = None) -> str:
        """Ask a host what ensure would do now to *vm* (None: every VM of *host*); task id."""
        if vm is None:
            if host is None:
                raise BadRequest("host", "name a VM or a host")
            self._check_host(host)
            return self._send("fcq.plan", {"host": host}, host, "plan", "*")
        return self._vm_task("fcq.plan", "plan", vm, host)

    def snapshot(self, vm: str, name: str | None = None, host: str | None = None) -> str:
        """Snapshot *vm* (frozen if its guest can be); return the task id.

        Named here, not on the host (default ``auto-<UTC time>``): a message
        delivered twice then asks for the same snapshot, which is a no-op.
        """
        from fcq_tasks.storage.base import auto_snapshot_name, check_snapshot
        snap = auto_snapshot_name() if name is None else check_snapshot(vm, name)
        return self._vm_task("fcq.snapshot", "snapshot", vm, host, name=snap)

    def list_snapshots(self, vm: str, host: str | None = None) -> str:
        return self._vm_task("fcq.snapshots", "snapshots", vm, host)

    def remove_snapshot(self, vm: str, name: str, host: str | None = None) -> str:
        from fcq_tasks.storage.base import check_snapshot
        return self._vm_task("fcq.remove_snapshot", "remove-snapshot", vm, host,
                             name=check_snapshot(vm, name))

    def resize(self, vm: str, disk_gib: int, host: str | None = None) -> str:
        """Grow *vm*'s root disk to *disk_gib* GiB (refused on its host if that shrinks it)."""
        if isinstance(disk_gib, bool) or not isinstance(disk_gib, int) or disk_gib < 1:
            raise BadRequest("disk", f"must be a whole number of GiB, at least 1 "
                             f"(got {disk_gib!r})")
        return self._vm_task("fcq.resize", "resize", vm, host, disk=disk_gib)

    def upgrade(self, vm: str, host: str | None = None) -> str:
        """Move *vm* onto a fresh QEMU of its host's current generation, without a reboot."""
        return self._vm_task("fcq.upgrade", "upgrade", vm, host)

    def apply_config(self, path: Path, hosts: list[str] | None = None) -> dict[str, str]:
        """Push a VM file to its kvm_host (and to hosts that know it): host → task id.

        Each host writes it unless its own file has a higher ``version``.
        """
        from fcq_tasks.config.vmspec import read_vm_file
        # One read: refuse a broken file before anything is sent, and send
        # exactly the text that was checked.
        text, spec = read_vm_file(path)
        targets = set(hosts or [])
        if not hosts:
            if spec.kvm_host:
                targets.add(spec.kvm_host)
            targets.update(h for h, rec in self._registry().items() if spec.name in rec["vms"])
        if not targets:
            raise BadRequest("kvm_host", f"{spec.name} names no host and no host knows it: "
                             "name one with --host")
        for target in sorted(targets):
            self._check_host(target)
        # The file's version orders pushes (hosts read it from the text; it
        # is sent on its own too, for Flower). "version", the mtime, is only
        # for hosts older than that rule during a rolling upgrade: they still
        # compare modification times.
        kwargs = {"vm": spec.name, "config": text, "config_version": spec.version,
                  "version": spec.mtime}
        return {t: self._send("fcq.apply_config", {**kwargs, "host": t},
                              t, "apply-config", spec.name)
                for t in sorted(targets)}

    def migrate(self, vm: str, dst: str, src: str | None = None) -> str:
        """Live-migrate *vm* to host *dst*; return the chord's task id (finish_migration).

        chord(group(inmigrate@dst, outmigrate@src), finish_migration@controller),
        with migration_failed@controller as errback: whatever fails, both
        hosts sweep at once. Callback and errback run on the controller
        (``fcq controller``), never on a host: the half that ends last sends
        them, and no host writes another host's queue.
        """
        from celery import chord, group
        if not NAME_RE.match(vm):
            raise BadRequest("vm", f"{NAME_RULE} (got {vm!r})")
        self.signing_key()  # no key, no attempt: refused before anything is claimed
        self._check_host(dst)
        hosts = self._registry()
        running = [h for h, rec in hosts.items() if vm in rec["running"]]
        if not running:
            raise BadRequest("vm", f"{vm} runs on no live host: nothing to migrate")
        if src is not None and src not in running:
            raise Refused(f"{vm} does not run on {src} (it runs on {running[0]}): not "
                          "migrated", vm=vm, host=src)
        src = running[0] if src is None else src
        if src == dst:
            raise BadRequest("host", f"{vm} already runs on {dst}")
        if vm not in hosts[dst]["vms"]:
            raise BadRequest("host", f"{dst} has no config for {vm}: push it first "
                             "(fcq apply-config)")
        for side in (src, dst):
            # Refused before any half starts: on local storage the destination
            # half would start a QEMU for nothing.
            kind = hosts[side].get("storage")
            if kind != "rbd":
                raise Refused(f"{vm}: {side} keeps its VMs on {kind} storage: live migration "
                              "needs RBD on both hosts (docs/ceph.md); nothing was started",
                              vm=vm, host=side)
        if hosts[dst].get("drained"):
            # Fast feedback only: dst refuses it itself when its half runs.
            raise Refused(f"{vm}: host {dst} is drained for maintenance: it receives no VMs "
                          f"(fcq undrain {dst})", vm=vm, host=dst)
        self._declare_controller_queue()  # before anything is claimed
        attempt = uuid.uuid4().hex[:16]
        from fcq_tasks.host.migration import attempt_seconds, claim_attempt, key_ttl
        # One attempt per VM at a time: the claim expires after the longest
        # a migration may take (both halves may start up to the peer grace
        # apart), should both halves die without releasing it.
        memory_mb = int(hosts[src]["vms"].get(vm, {}).get("memory_mb", 1024))
        ttl = int(attempt_seconds(self.settings, memory_mb)
                  + 2 * self.settings.migration_peer_grace) + 60
        common: dict[str, Any] = {"vm": vm, "attempt": attempt}
        in_id, in_kwargs = self.signed("fcq.inmigrate", dst, {**common, "src": src,
                                                              "host": dst}, f"{attempt}-in")
        out_id, out_kwargs = self.signed("fcq.outmigrate", src, {**common, "dst": dst,
                                                                "host": src}, f"{attempt}-out")
        # Each half as sent, grant included (a signature, no secret): for
        # operators, and to tell a replay of a half from a new request.
        halves = {"inmigrate": in_kwargs, "outmigrate": out_kwargs}
        try:
            other = claim_attempt(self.client, vm, attempt, ttl)
            if other is None:
                self.client.set(f"fcq:mig:{vm}:{attempt}:request", json.dumps(halves),
                                ex=key_ttl(self.settings))
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        if other is not None:
            raise Refused(f"{vm}: migration {other} is already in flight "
                          "(fcq migrate --abort to stop it)", vm=vm, attempt=other)
        header = group(
            self.app.signature("fcq.inmigrate", kwargs=in_kwargs,
                               kwargsrepr=kwargs_repr(in_kwargs),
                               queue=host_queue(dst), task_id=in_id),
            self.app.signature("fcq.outmigrate", kwargs=out_kwargs,
                               kwargsrepr=kwargs_repr(out_kwargs),
                               queue=host_queue(src), task_id=out_id))
        # Wall clock: the callback, on another machine, measures the queueing from it.
        # declare=[]: a host sends them, and a host may not bind queues
        # (cluster/redisacl.py); the controller declares its queue itself.
        # The errback's result is read by nobody (ignore_result), so its
        # sender does not subscribe to it, which a host may not either.
        body = self.app.signature("fcq.finish_migration",
                                  kwargs={**common, "src": src, "dst": dst,
                                          "sent_at": time.time()},
                                  queue=CONTROLLER_QUEUE, declare=[])
        body.link_error(self.app.signature("fcq.migration_failed",
                                           kwargs={**common, "src": src, "dst": dst},
                                           queue=CONTROLLER_QUEUE, declare=[],
                                           ignore_result=True))
        body_id = str(uuid.uuid4())
        body.set(task_id=body_id)
        self._remember(body_id, CONTROLLER_SIGNER, "fcq.finish_migration")  # runs there
        try:
            result = chord(header)(body)
            registry.record_job(self.client, result.id, "migrate", vm, f"{src}>{dst}",
                                self.settings.cluster.result_expires, "fcq.finish_migration")
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        return str(result.id)

    def abort_migration(self, vm: str) -> str:
        """Ask vm's migration in flight to stop; both halves roll back to the source."""
        from fcq_tasks.host.migration import request_abort
        if not NAME_RE.match(vm):
            raise BadRequest("vm", f"{NAME_RULE} (got {vm!r})")
        from fcq_tasks.host.migration import key_ttl
        attempt = request_abort(self.client, vm, "fcq migrate --abort", key_ttl(self.settings))
        if attempt is None:
            raise BadRequest("vm", f"{vm} has no migration in flight")
        return attempt

    def ping(self, host: str) -> str:
        self._check_host(host)
        return self._send("fcq.ping", {}, host, "ping", "-")

    def sweep(self, host: str) -> str:
        self._check_host(host)
        return self._send("fcq.ensure_host", {"host": host}, host, "sweep", "*")

    def signed(self, task: str, host: str, kwargs: dict[str, Any],
               task_id: str | None = None) -> tuple[str, dict[str, Any]]:
        """(task id, kwargs) of an imperative request to *host*: expiring, with its grant.

        Any other task is returned as it is, with a fresh id.
        """
        task_id = task_id or str(uuid.uuid4())
        if task in EXPIRING_TASKS:
            # Wall clock on purpose: the host compares it with its own clock,
            # and hosts are NTP-synced; request_ttl (minutes) dwarfs any skew
            # NTP leaves, so keep it generous rather than tight.
            kwargs = {**kwargs, "expires_at": time.time() + self.settings.cluster.request_ttl}
        if task in grants.SIGNED_TASKS:
            kwargs["grant"] = grants.grant(self.signing_key(), task, task_id, host, kwargs)
        return task_id, kwargs

    def signing_key(self) -> Ed25519PrivateKey:
        """The orchestrator's key (cluster.orchestrator_key_file), read once."""
        if self._signing_key is None:
            self._signing_key = grants.load_signing_key(self.settings)
        return self._signing_key

    def _send(self, task: str, kwargs: dict[str, Any], host: str, operation: str,
              vm: str) -> str:
        task_id, kwargs = self.signed(task, host, kwargs)
        try:
            self._remember(task_id, host, task)
            result = self.app.send_task(task, kwargs=kwargs, queue=host_queue(host),
                                        kwargsrepr=kwargs_repr(kwargs), task_id=task_id)
            registry.record_job(self.client, result.id, operation, vm, host,
                                self.settings.cluster.result_expires, task)
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        except RuntimeError as err:
            # Subscribing to the new task's result found Redis gone and Celery
            # gave its result consumer up: rebuild it for the next call.
            if not lost_result_store(err):
                raise
            renew_backend(self.app)
            raise redis_failure(err.__cause__ or err) from err
        return str(result.id)

    def state(self, task_id: str) -> tuple[str, Any]:
        res: AsyncResult[Any] = AsyncResult(task_id, app=self.app)
        try:
            return res.state, res.info
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err

    def _declare_controller_queue(self) -> None:
        """Bind the controller's queue, as the controller does when it starts.

        The half that ends last sends the chord's callback there without
        declaring it (a host may not: cluster/redisacl.py); kombu drops a
        message for an exchange nothing is bound to. Bound here first, the
        callback waits in the queue even for a controller not started yet.
        """
        if self._controller_bound:
            return  # a binding stays in Redis: once per orchestrator is enough
        try:
            with self.app.connection_for_write() as conn:
                Queue(CONTROLLER_QUEUE, Exchange(CONTROLLER_QUEUE),
                      routing_key=CONTROLLER_QUEUE)(conn.default_channel).declare()
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        self._controller_bound = True

    def known_task(self, task_id: str) -> bool:
        """Whether *task_id* was sent through fcq (its job record) or has a state
        beyond PENDING (Celery's word for any id it never heard of)."""
        try:
            if self.client.exists(registry.JOB_KEY + task_id):
                return True
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        return self.state(task_id)[0] != "PENDING"

    def migration_progress(self, vm: str) -> tuple[str, Any] | None:
        """State of the source half of vm's migration in flight (its copy progress)."""
        from fcq_tasks.host.migration import current_key
        try:
            attempt = self.client.get(current_key(vm))
            return None if attempt is None else self.state(f"{attempt!s}-out")
        except (SystemFailure, *BROKER_ERRORS):
            return None  # progress is a nicety; the wait itself reports Redis trouble

    def wait(self, task_id: str, timeout: float | None = None,
             on_progress: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Wait for a task; return its result or raise the host's error as RemoteError.

        A result is returned only when the host the task went to signed it
        (results.verify); it comes without that signature.

        A Redis outage meanwhile is waited out (until *timeout*), and this
        orchestrator keeps working afterwards: see cluster/results.py.
        """
        if on_progress is not None:
            # Redis away: follow() waits for it
            with contextlib.suppress(SystemFailure, *BROKER_ERRORS):
                on_progress(*self.state(task_id))

        def on_message(meta: dict[str, Any]) -> None:
            if on_progress is not None and meta.get("status") not in ("SUCCESS", "FAILURE"):
                on_progress(str(meta.get("status")), meta.get("result"))

        # The Redis result backend pushes state changes (pub/sub), so PROGRESS
        # updates arrive as they are published; follow() also reads the state
        # itself now and then, and rides through Redis outages until timeout.
        res = follow(self.app, task_id, timeout, on_message)
        state, info = res.state, res.info
        if on_progress is not None:
            on_progress(state, info if state != "SUCCESS" else None)
        if state == "SUCCESS" and isinstance(info, dict):
            return self.believed(task_id, info)
        if state == "FAILURE":
            raise remote_error(info)
        # REVOKED (e.g. a sweep that expired in a queue) or anything unexpected.
        raise RemoteError({"error": "TaskNotDone", "message":
                           f"task {task_id} ended in state {state}: {info!r}"})

    def believed(self, task_id: str, info: dict[str, Any]) -> dict[str, Any]:
        """*info*, the successful result of *task_id*, once checked (without its signature).

        Raises RemoteError (UntrustedResult) unless the host the task was
        sent to signed it as the result of the task that was sent.
        """
        host, task = self._expected(task_id)
        why = verify_result(info, task_id, host, self.settings.cluster.hosts_dir, task,
                            self._controller_keys())
        if why is not None and not ("signature" not in info
                                    and self.settings.cluster.accept_unsigned):
            raise RemoteError({"error": "UntrustedResult", "message":
                               f"the result of task {task_id} is not believed: {why} "
                               "(a result written to Redis by someone else, or a host "
                               "without its key)", "task_id": task_id})
        return {k: v for k, v in info.items() if k != "signature"}

    def verified_state(self, task_id: str) -> tuple[str, Any]:
        """state(), with a SUCCESS believed only as wait() believes it (else FAILURE)."""
        state, info = self.state(task_id)
        if state == "SUCCESS" and isinstance(info, dict):
            try:
                return state, self.believed(task_id, info)
            except RemoteError as err:
                return "FAILURE", TaskRejected({"message": err.message, **err.fields})
        return state, info

    def _controller_keys(self) -> list[Ed25519PublicKey]:
        """The keys the controller's results may be signed with: the orchestrator keys
        these settings accept, and the public half of the one they hold."""
        keys = list(grants.public_keys(self.settings))
        if self.settings.cluster.orchestrator_key_file is not None:
            with contextlib.suppress(FcqError, OSError):
                keys.append(self.signing_key().public_key())
        return keys

    def _remember(self, task_id: str, host: str, task: str) -> None:
        self._sent_to[task_id] = (host, task)
        if len(self._sent_to) > SENT_KEPT:  # a long-lived orchestrator (fcq controller)
            del self._sent_to[next(iter(self._sent_to))]

    def _expected(self, task_id: str) -> tuple[str | None, str | None]:
        """(host, task name) whose signature the result of *task_id* needs, as far as known.

        Known for certain for what this orchestrator sent; for another
        process's task (``fcq wait ID``), from the job record in Redis
        (best effort: that record is as writable as the result).
        """
        if task_id in self._sent_to:
            return self._sent_to[task_id]
        try:
            raw = self.client.get(registry.JOB_KEY + task_id)
            job = json.loads(str(raw)) if raw else None
        except (*BROKER_ERRORS, ValueError):
            return None, None
        if not isinstance(job, dict):
            return None, None
        host, task = job.get("host"), job.get("task")
        if task in CONTROLLER_TASKS:
            return CONTROLLER_SIGNER, str(task)
        return (host if isinstance(host, str) else None,
                task if isinstance(task, str) else None)

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent submitted tasks with their current state."""
        try:
            rows = registry.recent_jobs(self.client, limit)
        except BROKER_ERRORS as err:
            raise redis_failure(err) from err
        for row in rows:
            # One result object per row: state, info and date_done from one read.
            res: AsyncResult[Any] = AsyncResult(row["id"], app=self.app)
            try:
                state, info = str(res.state), res.info  # str: fcq's own states too (PROGRESS)
                done = _utc_seconds(res.date_done) if state in ("SUCCESS", "FAILURE") else None
            except BROKER_ERRORS as err:
                raise redis_failure(err) from err
            row["state"] = state
            if done is not None and isinstance(row.get("submitted"), (int, float)):
                # From sending to the result: queueing included, as the operator waited.
                row["seconds"] = round(max(0.0, done - float(row["submitted"])), 3)
            if state == "PROGRESS" and isinstance(info, dict):
                row["step"] = info.get("step")
            elif state == "FAILURE":
                row["error"] = remote_error(info).message
        return rows


def _utc_seconds(value: Any) -> float | None:
    """Celery's date_done (a datetime, naive UTC or aware; or an ISO string) as epoch s."""
    import datetime
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return float(value.timestamp())


def remote_error(info: Any) -> FcqError:
    """The error a failed task raised, as an FcqError with the right exit code."""
    if isinstance(info, TaskError):
        return RemoteError(info.info)
    if isinstance(info, BaseException):
        return RemoteError({"error": type(info).__name__, "message": str(info)})
    return RemoteError({"error": "Unknown", "message": repr(info)})
