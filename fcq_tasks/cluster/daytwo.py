"""The day-two tasks: snapshots, resize, in-place upgrade, and the plan preview.

Built like every fcq task (see :mod:`fcq_tasks.cluster.tasks`): keyword
arguments only, validated first, run under the VM's operation lock through
:func:`~fcq_tasks.cluster.tasks.run_on_vm`. snapshot, remove_snapshot,
resize and upgrade are imperative and honour ``expires_at``; the listing
and the plan only read.
"""

from __future__ import annotations

from typing import Any

from fcq_tasks.cluster.celeryapp import app
from fcq_tasks.cluster.tasks import FcqTask, check_vm, current_settings, run_on_vm, vm_task
from fcq_tasks.errors import BadRequest, FcqError
from fcq_tasks.host.agent import VMAgent

upgrade = vm_task("upgrade", "upgrade", VMAgent.upgrade)


@app.task(bind=True, base=FcqTask, name="fcq.plan")
def plan_preview(self: FcqTask, /, vm: str | None = None, host: str | None = None,
                 **_: Any) -> dict[str, Any]:
    """What ensure would do now to *vm* (or every VM of this host) and why; does nothing."""
    from fcq_tasks.host.sweep import plan_all
    settings = current_settings()
    try:
        if host is not None and host != settings.host:
            raise BadRequest("host", f"task for host {host!r} reached host {settings.host!r}")
        rows = [VMAgent(settings, check_vm(vm)).preview()] if vm is not None \
            else plan_all(settings)
    except FcqError as err:
        raise self.fail(err) from err
    return {"host": settings.host, "operation": "plan", "vms": rows}


@app.task(bind=True, base=FcqTask, name="fcq.snapshot")
def snapshot(self: FcqTask, /, vm: str | None = None, name: str | None = None,
             host: str | None = None, expires_at: object = None, **_: Any) -> dict[str, Any]:
    """Snapshot VM *vm* under *name* (the orchestrator names it: a replay is a no-op)."""
    return run_on_vm(self, "snapshot", vm, host, lambda agent: agent.snapshot(name),
                     expires_at)


@app.task(bind=True, base=FcqTask, name="fcq.snapshots")
def list_snapshots(self: FcqTask, /, vm: str | None = None, host: str | None = None,
                   **_: Any) -> dict[str, Any]:
    """The snapshots of VM *vm* (read only)."""
    return run_on_vm(self, "snapshots", vm, host, VMAgent.snapshots)


@app.task(bind=True, base=FcqTask, name="fcq.remove_snapshot")
def remove_snapshot(self: FcqTask, /, vm: str | None = None, name: str | None = None,
                    host: str | None = None, expires_at: object = None,
                    **_: Any) -> dict[str, Any]:
    """Remove snapshot *name* of VM *vm*; one that is gone already is a no-op."""
    if not isinstance(name, str):
        raise self.fail(BadRequest("name", f"must be a snapshot name (got {name!r})"))
    return run_on_vm(self, "remove-snapshot", vm, host,
                     lambda agent: agent.remove_snapshot(name), expires_at)


@app.task(bind=True, base=FcqTask, name="fcq.resize")
def resize(self: FcqTask, /, vm: str | None = None, disk: object = None,
           host: str | None = None, expires_at: object = None, **_: Any) -> dict[str, Any]:
    """Grow VM *vm*'s root to *disk* GiB (refused if smaller); the same size twice is a no-op."""
    return run_on_vm(self, "resize", vm, host, lambda agent: agent.resize(disk), expires_at)
