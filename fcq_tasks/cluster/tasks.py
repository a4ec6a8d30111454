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
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Retry

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import app, host_queue
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.config.vmspec import parse_vm_text, spec_path
from fcq_tasks.errors import (
    BadRequest,
    FcqError,
    LockedByOtherHost,
    TaskError,
    TaskFailed,
    TaskRejected,
    UserError,
    VMBusy,
)
from fcq_tasks.fileio import write_atomically
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.sweep import ensure_all

log = structlog.get_logger()


def current_settings() -> HostSettings:
    settings = app.conf.get("fcq_settings")
    if settings is None:
        raise RuntimeError("this process has no fcq settings: start it with `fcq worker`")
    assert isinstance(settings, HostSettings)
    return settings


def heartbeat(settings: HostSettings) -> None:
    """Publish this host's record now, so `fcq ls` shows the change at once."""
    try:
        registry.publish_host(registry.connect(settings), settings)
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

    def fail(self, err: FcqError) -> TaskError:
        info = err.to_dict()
        if isinstance(err, UserError):
            return TaskRejected(info)
        return TaskFailed(info)


def run_on_vm(task: FcqTask, operation: str, vm: object, host: object,
              op: Callable[[VMAgent], dict[str, Any]]) -> dict[str, Any]:
    settings = current_settings()
    try:
        name = check_vm(vm)
        if host is not None and host != settings.host:
            raise BadRequest("host", f"task for host {host!r} reached host {settings.host!r}")
        tasksettings = dataclasses.replace(settings,
                                           operation_wait=settings.cluster.task_busy_wait)

        def progress(step: str, **details: Any) -> None:
            if task.request.id:
                task.update_state(state="PROGRESS", meta={
                    "vm": name, "host": settings.host, "operation": operation, "step": step,
                    **details})

        def outmigrate(dst: str) -> None:
            from fcq_tasks.cluster.api import Orchestrator
            try:
                task_id = Orchestrator(settings).migrate(name, dst)
                log.info("outmigration-started", vm=name, to=dst, task_id=task_id)
            except FcqError as err:  # e.g. one already in flight: the next ensure looks again
                log.warning("outmigration-not-started", vm=name, to=dst, error=err.message)

        agent = VMAgent(tasksettings, name, progress=progress, outmigrate_hook=outmigrate)
        structlog.contextvars.bind_contextvars(task_id=task.request.id, vm=name)
        try:
            return op(agent)
        finally:
            structlog.contextvars.unbind_contextvars("task_id", "vm")
            heartbeat(settings)
    except VMBusy as err:
        c = settings.cluster
        if task.request.retries < c.busy_retries:
            log.info("busy-retry", vm=vm, operation=operation, retries=task.request.retries)
            # Name the queue: a retry built from a message that came through
            # the host's direct exchange carries no queue of its own.
            raise task.retry(queue=host_queue(settings.host), countdown=c.busy_retry_delay,
                             max_retries=c.busy_retries) from err
        raise task.fail(err) from err
    except Retry:
        raise
    except FcqError as err:
        raise task.fail(err) from err


def _vm_task(name: str, operation: str,
             method: Callable[[VMAgent], dict[str, Any]]) -> Any:
    """One VM task: validate, take the VM's operation lock, call the agent."""
    def body(self: FcqTask, /, vm: str | None = None, host: str | None = None,
             **_: Any) -> dict[str, Any]:
        return run_on_vm(self, operation, vm, host, method)
    body.__doc__ = f"{operation} VM *vm* on this host (see VMAgent.{method.__name__})."
    return app.task(bind=True, base=FcqTask, name=f"fcq.{name}")(body)


start = _vm_task("start", "start", VMAgent.start)
stop = _vm_task("stop", "stop", VMAgent.stop)
restart = _vm_task("restart", "restart", VMAgent.restart)
ensure = _vm_task("ensure", "ensure", VMAgent.ensure)
kill = _vm_task("kill", "kill", VMAgent.kill)
force_unlock = _vm_task("force_unlock", "force-unlock", VMAgent.force_unlock)


@app.task(bind=True, base=FcqTask, name="fcq.apply_config")
def apply_config(self: FcqTask, /, vm: str | None = None, config: str | None = None,
                 version: float | None = None, host: str | None = None,
                 **_: Any) -> dict[str, Any]:
    """Write a VM's config file on this host (unless it has a newer one), then ensure it."""
    settings = current_settings()
    try:
        name = check_vm(vm)
        if not isinstance(config, str):
            raise BadRequest("config", "must be the VM file's YAML text")
        if isinstance(version, bool) or not isinstance(version, (int, float)):
            raise BadRequest("version", "must be a number (the file's modification time)")
        spec = parse_vm_text(config, f"<apply_config {name}>")
        if spec.name != name:
            raise BadRequest("config", f"names VM {spec.name!r}, not {name!r}")
    except FcqError as err:
        raise self.fail(err) from err
    path = spec_path(settings.vm_config_dir, name)
    text, stamp = config, float(version)

    def write_and_ensure(agent: VMAgent) -> dict[str, Any]:
        # Under the VM's operation lock: no ensure reads a half-applied change.
        with agent.locked():
            try:
                current: float | None = path.stat().st_mtime
            except FileNotFoundError:
                current = None
            if current is not None and current > stamp:
                return {"vm": name, "host": settings.host, "operation": "apply-config",
                        "actions": [], "status": None, "outcome": "ignored",
                        "reason": f"this host has a newer config ({current} > {stamp})"}
            settings.vm_config_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text, mode=0o644)
            os.utime(path, (stamp, stamp))
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


@app.task(bind=True, base=FcqTask, name="fcq.ping")
def ping(self: FcqTask, /, **_: Any) -> dict[str, Any]:
    """Answer at once: measures the round trip and proves a host's worker takes work."""
    return {"host": current_settings().host, "operation": "ping"}


@app.task(bind=True, base=FcqTask, name="fcq.ensure_host")
def ensure_host(self: FcqTask, /, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The sweep: ensure every VM of this host; skip busy ones; isolate failures."""
    settings = current_settings()
    if host is not None and host != settings.host:
        raise self.fail(BadRequest("host", f"sweep for {host!r} reached {settings.host!r}"))
    sweep = ensure_all(dataclasses.replace(settings, operation_wait=0))
    heartbeat(settings)
    summary = {name: (r.get("actions") or r.get("outcome")) for name, r in sweep["vms"].items()}
    log.info("sweep-done", host=settings.host, vms=len(summary), failed=sweep["failed"])
    errors = {name: r.get("message") for name, r in sweep["vms"].items()
              if r.get("outcome") == "error"}
    return {"host": settings.host, "operation": "sweep", "vms": summary, "errors": errors,
            "failed": sweep["failed"], "exit_code": sweep["exit_code"]}


def _rendezvous(vm: str, attempt: object, side: str) -> Any:
    from fcq_tasks.host.migration import Rendezvous
    if not isinstance(attempt, str) or not NAME_RE.match(attempt):
        raise BadRequest("attempt", "must be a migration attempt id")
    return Rendezvous(registry.connect(current_settings()), vm, attempt, side)


@app.task(bind=True, base=FcqTask, name="fcq.inmigrate")
def inmigrate(self: FcqTask, /, vm: str | None = None, attempt: str | None = None,
              src: str | None = None, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The destination half of a live migration."""
    from fcq_tasks.host import migration

    def op(agent: VMAgent) -> dict[str, Any]:
        rdv = _rendezvous(agent.name, attempt, "dst")
        return migration.inmigrate(agent, rdv, str(src), agent.progress)
    return run_on_vm(self, "inmigrate", vm, host, op)


@app.task(bind=True, base=FcqTask, name="fcq.outmigrate")
def outmigrate(self: FcqTask, /, vm: str | None = None, attempt: str | None = None,
               dst: str | None = None, host: str | None = None, **_: Any) -> dict[str, Any]:
    """The source half of a live migration."""
    from fcq_tasks.host import migration

    def op(agent: VMAgent) -> dict[str, Any]:
        rdv = _rendezvous(agent.name, attempt, "src")
        return migration.outmigrate(agent, rdv, str(dst), agent.progress)
    return run_on_vm(self, "outmigrate", vm, host, op)


@app.task(bind=True, base=FcqTask, name="fcq.finish_migration")
def finish_migration(self: FcqTask, /, results: Any = None, vm: str | None = None,
                     attempt: str | None = None, **_: Any) -> dict[str, Any]:
    """Chord body: both halves succeeded; record and return the outcome."""
    halves = {r.get("operation"): r for r in results or [] if isinstance(r, dict)}
    out, inn = halves.get("outmigrate", {}), halves.get("inmigrate", {})
    outcome = {"vm": vm, "operation": "migrate", "attempt": attempt, "outcome": "migrated",
               "from": out.get("host"), "to": inn.get("host"), "status": inn.get("status"),
               "total_ms": out.get("total_ms"), "downtime_ms": out.get("downtime_ms"),
               "handover_ms": inn.get("handover_ms"), "transferred": out.get("transferred")}
    heartbeat(current_settings())
    return outcome


@app.task(bind=True, base=FcqTask, name="fcq.migration_failed")
def migration_failed(self: FcqTask, /, *args: Any, vm: str | None = None,
                     attempt: str | None = None, **_: Any) -> dict[str, Any]:
    """Chord errback: a half failed. Converge this host's side now, don't wait for a sweep."""
    settings = current_settings()
    log.warning("migration-failed", vm=vm, attempt=attempt)
    try:
        result = VMAgent(dataclasses.replace(settings, operation_wait=settings.cluster
                                             .task_busy_wait), check_vm(vm)).ensure()
    except FcqError as err:
        result = {"vm": vm, "outcome": "error", **err.to_dict()}
    heartbeat(settings)
    return {"vm": vm, "attempt": attempt, "operation": "migration-failed", "ensure": result}
