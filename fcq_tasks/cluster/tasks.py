"""The Celery tasks: thin, idempotent, delegating to the agent.

Every task takes keyword arguments only (extra keys are tolerated, so old
and new orchestrators can talk to each other during a rolling upgrade),
validates them before anything happens, and returns a JSON-safe result
``{vm, host, operation, actions, status, ...}``. Expected refusals (bad
request, busy, memory limit, shrink, foreign lock) raise :class:`TaskRejected`,
which is in ``Task.throws``: logged without a traceback. System failures
raise :class:`TaskFailed` and keep their traceback.

A task on a VM that is busy with another operation waits
``task_busy_wait`` seconds, then is retried later (``busy_retries`` ×
``busy_retry_delay``): never dropped, never interleaved.

Imperative requests (every signed one: start, stop, apply_config, the
migration halves, ...; cluster/grants.py) carry ``expires_at`` and are
refused once it has passed: a message redelivered after a worker crash
arrives up to ``visibility_timeout`` late, and must not act on a world that
has moved on. ensure and the sweep converge to the config as it is now, so
they never expire this way.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import Task
from celery.exceptions import Ignore, Retry
from celery.signals import worker_shutdown

from fcq_tasks import trust
from fcq_tasks.cluster import grants, registry
from fcq_tasks.cluster.celeryapp import CONTROLLER_TASKS, app, host_queue
from fcq_tasks.cluster.results import CONTROLLER_SIGNER, RESULT_PURPOSE
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.config.vmspec import (
    VMSpec,
    load_vm_spec,
    parse_vm_text,
    spec_path,
    vm_file_version,
)
from fcq_tasks.errors import (
    BadRequest,
    ConfigError,
    FcqError,
    LockedByOtherHost,
    Refused,
    TaskError,
    TaskFailed,
    TaskRejected,
    UserError,
    VMBusy,
)
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.heldmonitors import HeldMonitors
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.sweep import ensure_all

log = structlog.get_logger()



#: Ids of the signed requests this worker runs now (a duplicate waits for none).
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()

#: The two halves of a live migration (their chord counts each result once).
MIGRATION_HALVES = frozenset({"fcq.inmigrate", "fcq.outmigrate"})


def current_settings() -> HostSettings:
    settings = app.conf.get("fcq_settings")
    if settings is None:
        raise RuntimeError("this process has no fcq settings: start it with `fcq worker`")
    assert isinstance(settings, HostSettings)
    return settings


def heartbeat(settings: HostSettings) -> None:
    """Publish this host's record now, so `fcq ls` shows the change at once."""
    try:
        # A beat of its own: a task just ran, so this worker is alive.
        registry.publish_host(registry.connect(settings), settings,
                              registry.own_beat(f"task:{secrets.token_hex(4)}"))
    except Exception as err:  # the task's work is done; a missed heartbeat is not fatal
        log.warning("heartbeat-failed", error=str(err))


def check_vm(vm: object) -> str:
    if not isinstance(vm, str) or not NAME_RE.match(vm):
        raise BadRequest("vm", f"{NAME_RULE} (got {vm!r})")
    return vm


class FcqTask(Task):  # type: ignore[type-arg]
    """Base of fcq's tasks: JSON results, user errors without tracebacks."""

    throws = (TaskRejected,)
    acks_late = True
    reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task, after its grant verified if it is imperative (cluster/grants.py).

        Before anything else, so a forged or replayed request changes
        nothing. Once a request has run to a result or to one of fcq's own
        errors, its id is spent and that outcome kept with it: the same
        message again (a replay, or the broker's redelivery of a message
        whose result and acknowledgement were lost with Redis) gets that
        outcome again and does nothing.
        """
        self._refuse_other_role()
        if self.name not in grants.SIGNED_TASKS:
            return self._signed_result(super().__call__(*args, **kwargs))
        settings = current_settings()
        task_id = self.request.id
        try:
            signed = grants.check(settings, self.name, task_id, kwargs)
            if signed:
                what = kwargs.get("vm") if isinstance(kwargs.get("vm"), str) else settings.host
                check_expiry(str(what), self.name.removeprefix("fcq.").replace("_", "-"),
                             kwargs["expires_at"])
        except grants.Replayed as err:
            return self._answer_replay(settings, str(task_id), err)
        except FcqError as err:
            log.warning("request-refused", task=self.name, task_id=task_id,
                        error=err.message)
            raise self.fail(err) from err
        if not signed:
            return self._signed_result(super().__call__(*args, **kwargs))
        assert isinstance(task_id, str)  # grants.check refuses anything else
        due = kwargs["expires_at"]
        with _in_flight_lock:
            duplicate = task_id in _in_flight
            _in_flight.add(task_id)
        if duplicate:
            # A copy of a request this worker runs right now (pushed twice
            # into the queue): it must not run a second time beside it.
            log.warning("request-duplicate-ignored", task=self.name, task_id=task_id)
            raise Ignore(f"{self.name} request {task_id} is running here already")
        try:
            result = super().__call__(*args, **kwargs)
            # Spent before it stops counting as in flight: no gap for a copy.
            grants.mark_spent(settings, task_id, due, grants.Outcome("result", result))
        except Retry:
            raise
        except TaskError as err:
            grants.mark_spent(settings, task_id, due, grants.Outcome(
                "rejected" if isinstance(err, TaskRejected) else "failed", err.info))
            raise
        # Anything else (Redis gone mid-task, a bug, Ignore): the request did
        # not end cleanly, and its redelivery may run it again, as before
        # signed commands: tasks are idempotent, and it still expires.
        finally:
            with _in_flight_lock:
                _in_flight.discard(task_id)
        return self._signed_result(result)

    def _refuse_other_role(self) -> None:
        """Each process runs its own role's tasks only (a host never the controller's)."""
        role = app.conf.get("fcq_role", "host")
        if (role == "controller") != (self.name in CONTROLLER_TASKS):
            err = Refused(f"{self.name} does not run on a {role} (fcq_tasks/cluster/"
                          f"celeryapp.py: CONTROLLER_TASKS); nothing was done", task=self.name)
            log.warning("request-refused", task=self.name, task_id=self.request.id,
                        error=err.message)
            raise self.fail(err)

    def _answer_replay(self, settings: HostSettings, task_id: str,
                       err: grants.Replayed) -> Any:
        """The first run's outcome again, for a request that already ran here."""
        earlier = grants.earlier_outcome(settings, task_id)
        # A migration half keeps its place in the chord: never a second result.
        if earlier is None or earlier.kind == "ignored" or self.name in MIGRATION_HALVES:
            log.warning("request-replay-ignored", task=self.name, task_id=task_id,
                        error=err.message)
            raise Ignore(err.message) from err
        log.warning("request-replay-answered", task=self.name, task_id=task_id,
                    outcome=earlier.kind, detail="the first run's outcome, nothing done")
        if earlier.kind == "rejected":
            raise TaskRejected(earlier.value) from err
        if earlier.kind == "failed":
            raise TaskFailed(earlier.value) from err
        return self._signed_result(earlier.value)

    def _signed_result(self, result: Any) -> Any:
        """*result* with this host's signature over it and the task id (results.verify).

        Redis is writable by every host; the orchestrator believes a result
        only when the host it sent the task to signed it.
        """
        settings = app.conf.get("fcq_settings")
        if not isinstance(result, dict) or not isinstance(settings, HostSettings) \
                or not self.request.id:
            return result
        try:
            if app.conf.get("fcq_role") == "controller":
                # The controller answers for the orchestrator side, with its key.
                key, signer = grants.load_signing_key(settings), CONTROLLER_SIGNER
            else:
                key, signer = trust.cached_private_key(settings.host_key_file), settings.host
            body = {k: v for k, v in result.items() if k != "signature"}
            result = {**body, "signature": {
                "host": signer, "task": self.name,
                "sig": trust.sign_document(key, RESULT_PURPOSE, body,
                                           id=str(self.request.id), task=self.name)}}
        except (OSError, ConfigError, TypeError, ValueError) as err:
            log.warning("result-unsigned", task=self.name, task_id=self.request.id,
                        error=getattr(err, "message", str(err)))
        return result

    def fail(self, err: FcqError) -> TaskError:
        info = err.to_dict()
        if isinstance(err, UserError):
            return TaskRejected(info)
        return TaskFailed(info)


def check_expiry(vm: str, operation: str, expires_at: object) -> None:
    """Refuse an imperative request whose ``expires_at`` (epoch seconds) has passed.

    A request without one comes from an orchestrator older than this rule
    (a rolling upgrade) and is accepted, as it was before.
    """
    if expires_at is None:
        return
    if (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
            or not math.isfinite(expires_at)):
        raise BadRequest("expires_at", f"must be a time in seconds since the epoch "
                         f"(got {expires_at!r})")
    # Wall clock, like the orchestrator that set it on another machine:
    # hosts are NTP-synced, and request_ttl is minutes, far beyond any skew.
    now = time.time()
    if now > expires_at:
        due = datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")
        raise Refused(f"{vm}: {operation} request expired: it was due by {due} and arrived "
                      f"{now - expires_at:.0f} s later (redelivered after a worker crash, or "
                      "held up that long); nothing was done: send it again if it is "
                      "still wanted", vm=vm, field="expires_at", expires_at=expires_at,
                      rule="an imperative request must run before its expires_at")


def run_on_vm(task: FcqTask, operation: str, vm: object, host: object,
              op: Callable[[VMAgent], dict[str, Any]],
              expires_at: object = None) -> dict[str, Any]:
    """Run *op* on VM *vm* here; refuse it if *expires_at* is given and has passed."""
    settings = current_settings()
    try:
        name = check_vm(vm)
        if host is not None and host != settings.host:
            raise BadRequest("host", f"task for host {host!r} reached host {settings.host!r}")
        # Before anything else: a stale request does not even wait for the VM.
        check_expiry(name, operation, expires_at)
        act = op
        if expires_at is not None:
            def act(agent: VMAgent) -> dict[str, Any]:
                # Waiting for a busy VM takes time too: decide on the world
                # as it is once this task holds the VM (the lock is reentrant).
                with agent.locked():
                    check_expiry(name, operation, expires_at)
                    return op(agent)
        tasksettings = dataclasses.replace(settings,
                                           operation_wait=settings.cluster.task_busy_wait)

        def progress(step: str, **details: Any) -> None:
            if task.request.id:
                task.update_state(state="PROGRESS", meta={
                    "vm": name, "host": settings.host, "operation": operation, "step": step,
                    **details})

        agent = VMAgent(tasksettings, name, progress=progress,
                        outmigrate_hook=move_asker(settings, name))
        structlog.contextvars.bind_contextvars(task_id=task.request.id, vm=name)
        try:
            return act(agent)
        finally:
            structlog.contextvars.unbind_contextvars("task_id", "vm")
            heartbeat(settings)
    except VMBusy as err:
        c = settings.cluster
        if task.request.retries < c.busy_retries:
            log.info("busy-retry", vm=vm, operation=operation, retries=task.request.retries)
            # Name the queue: a retry built from a message that came through
            # the host's direct exchange carries no queue of its own. The
            # retry reuses the request's kwargs, expires_at among them: a
            # long chain of retries ends as "expired", never acts late.
            raise task.retry(queue=host_queue(settings.host), countdown=c.busy_retry_delay,
                             max_retries=c.busy_retries) from err
        raise task.fail(err) from err
    except Retry:
        raise
    except FcqError as err:
        raise task.fail(err) from err


def move_asker(settings: HostSettings, name: str) -> Callable[[str], None]:
    """What a host does when its config sends a VM it runs elsewhere: it asks the controller.

    A host never sends work to another host (cluster/controller.py); the
    controller checks the request and starts the migration itself.
    """
    def ask(dst: str) -> None:
        from fcq_tasks.cluster.controller import request_move
        try:
            task_id = request_move(settings, name, dst)
            log.info("move-requested", vm=name, to=dst, task_id=task_id)
        except Exception as err:  # the next ensure asks again
            log.warning("move-not-requested", vm=name, to=dst, error=str(err))
    return ask


def vm_task(name: str, operation: str, method: Callable[[VMAgent], dict[str, Any]],
             expires: bool = True) -> Any:
    """One VM task: validate, take the VM's operation lock, call the agent.

    *expires*: the request is imperative and honours its ``expires_at``;
    ensure converges to the config as it is now and is always safe.
    """
    def body(self: FcqTask, /, vm: str | None = None, host: str | None = None,
             expires_at: object = None, **_: Any) -> dict[str, Any]:
        return run_on_vm(self, operation, vm, host, method,
                         expires_at if expires else None)
    body.__doc__ = f"{operation} VM *vm* on this host (see VMAgent.{method.__name__})."
    return app.task(bind=True, base=FcqTask, name=f"fcq.{name}")(body)


def refuse_live_holder(agent: VMAgent, client: redis.Redis,
                       beating: set[str] | None = None) -> None:
    """Refuse to break the VM's locks while their holder may be alive.

    Checked when the locks are about to be broken, on the host breaking
    them, not only when the request was submitted: a late or hand-made
    message must not break a live host's lock (invariant 2). Refused when
    another live host (heartbeat within its registry_ttl) reports the VM
    running, when a lock's owner has a live heartbeat (a live holder stops
    the VM itself), or when the registry cannot be read (never blind).
    Only a holder without a heartbeat, which the operator vouches is down,
    loses its lock. A holder's record counts only if it is still being
    written (registry.beating: a record the wall clock kept is not life);
    *beating*: that set, when the caller watched already.
    """
    me = agent.settings.host
    try:
        live = registry.hosts(client)
    # Not JSON (ValueError) or not a host record (KeyError, TypeError) is
    # as unreadable as an unreachable Redis.
    except (redis.RedisError, ValueError, KeyError, TypeError) as err:
        raise Refused(f"{agent.name}: cannot read the host registry ({err}); without it "
                      "a live lock holder cannot be ruled out, so no lock is broken",
                      vm=agent.name) from err
    for other, record in live.items():
        if other != me and agent.name in record.get("running", []):
            raise Refused(f"{agent.name} runs on live host {other}: stop it there before "
                          "breaking its locks", vm=agent.name, host=other)
    volumes = agent.storage.volumes(agent.name)
    owners = {v.lock_owner for v in volumes if v.lock_owner not in (None, me)}
    if beating is None:
        beating = registry.beating(client, {str(o) for o in owners},
                                   agent.settings.cluster.registry_ttl) if owners else set()
    for volume in volumes:
        owner = volume.lock_owner
        if owner is not None and owner != me and owner in beating:
            raise Refused(f"{agent.name}: volume {volume.name} is locked by live host "
                          f"{owner} (its heartbeat is fresh): {owner} must stop the VM "
                          "itself; only the lock of a host without a heartbeat can be broken",
                          vm=agent.name, volume=volume.name, host=owner)


def force_unlock_checked(agent: VMAgent) -> dict[str, Any]:
    """force-unlock, after ruling out a live holder, under the VM's operation lock."""
    with agent.locked():
        refuse_live_holder(agent, registry.connect(agent.settings))
        return agent.force_unlock()


start = vm_task("start", "start", VMAgent.start)
stop = vm_task("stop", "stop", VMAgent.stop)
restart = vm_task("restart", "restart", VMAgent.restart)
ensure = vm_task("ensure", "ensure", VMAgent.ensure, expires=False)
kill = vm_task("kill", "kill", VMAgent.kill)
force_unlock = vm_task("force_unlock", "force-unlock", force_unlock_checked)


@app.task(bind=True, base=FcqTask, name="fcq.apply_config")
def apply_config(self: FcqTask, /, vm: str | None = None, config: str | None = None,
                 config_version: object = None, host: str | None = None,
                 **_: Any) -> dict[str, Any]:
    """Write a VM's config file on this host (unless its file has a higher version), then ensure.

    The version that counts is the ``version`` key inside *config*: it
    travels with the file, so clocks, copies and fcq's own rewrites of
    ``kvm_host`` cannot reorder pushes. *config_version*, when sent, must
    agree with it. A ``version`` argument (the file's mtime, sent by
    orchestrators before this rule and still sent for hosts before it)
    is ignored.
    """
    settings = current_settings()
    try:
        name = check_vm(vm)
        if not isinstance(config, str):
            raise BadRequest("config", "must be the VM file's YAML text")
        spec = parse_vm_text(config, f"<apply_config {name}>")
        if spec.name != name:
            raise BadRequest("config", f"names VM {spec.name!r}, not {name!r}")
        if config_version is not None and (isinstance(config_version, bool)
                                           or config_version != spec.version):
            raise BadRequest("config_version", f"must equal the pushed file's version key "
                             f"({spec.version}) (got {config_version!r})")
    except FcqError as err:
        raise self.fail(err) from err
    path = spec_path(settings.vm_config_dir, name)
    text, pushed = config, spec.version

    def write_and_ensure(agent: VMAgent) -> dict[str, Any]:
        # Under the VM's operation lock: no ensure reads a half-applied change.
        with agent.locked():
            try:
                current = vm_file_version(path)
            except ConfigError as err:
                # Broken beyond reading its version: any valid push repairs it.
                log.warning("config-version-unreadable", vm=name, error=err.message)
                current = None
            # Equal is applied when it says what this host's file says
            # (pushing the same file twice is idempotent); see version_clash.
            if current is not None and current == pushed:
                version_clash(name, path, spec, pushed)
            if current is not None and current > pushed:
                return {"vm": name, "host": settings.host, "operation": "apply-config",
                        "actions": [], "status": None, "outcome": "ignored",
                        "version": pushed,
                        "reason": f"this host has a newer config (version {current} > "
                                  f"{pushed})"}
            settings.vm_config_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text, mode=0o644)
            try:
                result = agent.ensure()
            except LockedByOtherHost as err:
                # The VM moves here and still runs on its old host, which
                # will migrate it once it has the new config too.
                return {"vm": name, "host": settings.host, "operation": "apply-config",
                        "actions": ["write-config"], "status": "stopped",
                        "outcome": "written", "found": "stopped",
                        "reason": f"waiting for {err.owner} to hand it over"}
        result["operation"] = "apply-config"
        result["actions"] = ["write-config", *result["actions"]]
        return result

    return run_on_vm(self, "apply-config", name, host, write_and_ensure)


def version_clash(name: str, path: Path, pushed_spec: VMSpec, version: int) -> None:
    """Refuse a push whose version equals this host's file's but whose desired state differs.

    fcq raises a file's version itself when an operator changes the VM's
    desired state on its host (``fcq resize``). An inventory that raised its
    own copy's version meanwhile sends the same number with the old state:
    applying it would silently undo the resize (and every ensure after it
    would refuse the shrink). Only ``kvm_host`` may differ at an equal
    version: fcq's migrations rewrite it without raising the version.
    """
    try:
        here = load_vm_spec(path.parent, name)
    except (ConfigError, FcqError):
        return  # a broken file: any valid push repairs it
    if dataclasses.replace(here, kvm_host=None) == dataclasses.replace(pushed_spec,
                                                                      kvm_host=None):
        return
    fields = [f.name for f in dataclasses.fields(VMSpec) if f.compare
              and f.name != "kvm_host" and getattr(here, f.name) != getattr(pushed_spec, f.name)]
    differs = ", ".join(f"{f} {getattr(here, f)!r} here, {getattr(pushed_spec, f)!r} pushed"
                        for f in fields)
    raise Refused(f"{name}: this host's file has version {version} too, with another desired "
                  f"state ({differs}): it was changed on this host (fcq resize raises the "
                  f"version); push the file with version {version + 1} or more and the "
                  "state you want, nothing was written", vm=name, field="version",
                  version=version, rule="an equal version must say the same")


@app.task(bind=True, base=FcqTask, name="fcq.ping")
def ping(self: FcqTask, /, **_: Any) -> dict[str, Any]:
    """Answer at once: measures the round trip and proves a host's worker takes work."""
    return {"host": current_settings().host, "operation": "ping"}


#: This worker's open sweep monitors, opened at its first sweep.
_held_monitors: HeldMonitors | None = None
_held_lock = threading.Lock()


def held_monitors() -> HeldMonitors:
    global _held_monitors
    with _held_lock:
        if _held_monitors is None:
            _held_monitors = HeldMonitors()
        return _held_monitors


@worker_shutdown.connect(weak=False)
def close_held_monitors(**_: Any) -> None:
    global _held_monitors
    with _held_lock:
        if _held_monitors is not None:
            _held_monitors.close()
            _held_monitors = None


@app.task(bind=True, base=FcqTask, name="fcq.ensure_host")
def ensure_host(self: FcqTask, /, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The sweep: ensure every VM of this host; skip busy ones; isolate failures."""
    settings = current_settings()
    if host is not None and host != settings.host:
        raise self.fail(BadRequest("host", f"sweep for {host!r} reached {settings.host!r}"))
    sweep = ensure_all(dataclasses.replace(settings, operation_wait=0), held_monitors(),
                       lambda vm: move_asker(settings, vm))
    summary = {name: (r.get("actions") or r.get("outcome")) for name, r in sweep["vms"].items()}
    if any(actions != ["nothing"] for actions in summary.values()):
        # Something changed: show it at once. A converged sweep changed
        # nothing the record says (14-18 ms saved per sweep: the record
        # parses every VM file); the heartbeat thread refreshes it anyway.
        heartbeat(settings)
    log.info("sweep-done", host=settings.host, vms=len(summary), failed=sweep["failed"])
    errors = {name: r.get("message") for name, r in sweep["vms"].items()
              if r.get("outcome") == "error"}
    return {"host": settings.host, "operation": "sweep", "vms": summary, "errors": errors,
            "failed": sweep["failed"], "exit_code": sweep["exit_code"]}


def _check_name(field: str, value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadRequest(field, f"must be {what}: {NAME_RULE} (got {value!r})")
    return value


def _migration_half(task: FcqTask, operation: str, vm: object, host: object, attempt: object,
                    peer_field: str, peer: object,
                    half: Callable[[VMAgent, redis.Redis, str, str], dict[str, Any]]
                    ) -> dict[str, Any]:
    """Validate a half's arguments, then run it at most once for its attempt."""
    from fcq_tasks.host.migration import DuplicateHalf
    settings = current_settings()
    try:
        attempt_id = _check_name("attempt", attempt, "a migration attempt id")
        # The peer ends up in the VM's config (kvm_host): never an unchecked string.
        peer_host = _check_name(peer_field, peer, "a host name")
        if peer_host == settings.host:
            raise BadRequest(peer_field, f"names this host ({settings.host}): a migration "
                             "needs two hosts")
    except FcqError as err:
        raise task.fail(err) from err

    def op(agent: VMAgent) -> dict[str, Any]:
        return half(agent, registry.connect(settings), attempt_id, peer_host)
    try:
        return run_on_vm(task, operation, vm, host, op)
    except DuplicateHalf as dup:
        # A second delivery of a half that ran or runs: no result of its
        # own, so the chord counts the first one only.
        raise Ignore(str(dup)) from dup


# track_started off: a replayed half must not overwrite the first one's
# state with STARTED (it ends without any result of its own).
@app.task(bind=True, base=FcqTask, name="fcq.inmigrate", track_started=False)
def inmigrate(self: FcqTask, /, vm: str | None = None, attempt: str | None = None,
              src: str | None = None, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The destination half of a live migration."""
    from fcq_tasks.host import migration
    return _migration_half(self, "inmigrate", vm, host, attempt, "src", src,
                           migration.inmigrate)


@app.task(bind=True, base=FcqTask, name="fcq.outmigrate", track_started=False)
def outmigrate(self: FcqTask, /, vm: str | None = None, attempt: str | None = None,
               dst: str | None = None, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The source half of a live migration."""
    from fcq_tasks.host import migration
    return _migration_half(self, "outmigrate", vm, host, attempt, "dst", dst,
                           migration.outmigrate)
