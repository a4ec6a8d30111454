"""The host side of ``fcq drain``, ``fcq evacuate``, ``fcq lock`` and ``fcq unlock``.

``fcq.set_drained`` sets or clears this host's maintenance mark (see
:mod:`fcq_tasks.host.maintenance`); the moves themselves are ordinary live
migrations, planned by the orchestrator (:mod:`fcq_tasks.cluster.drain`).

``fcq.evacuate`` runs on the host that takes over a VM of a dead host. It
boots the guest here only after every lock of the VM was broken with its
old writers fenced, all under the VM's operation lock, and it decides on
this host, at the moment it acts: the dead host must still have no
heartbeat, no live host may run the VM, and the storage must be able to
fence (RBD blocklists the dead host's clients; a local disk of a dead
host cannot be fenced, or even reached, from here).
"""

from __future__ import annotations

from typing import Any

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import app
from fcq_tasks.cluster.tasks import (
    FcqTask,
    _check_name,
    current_settings,
    heartbeat,
    refuse_live_holder,
    run_on_vm,
    vm_task,
)
from fcq_tasks.config.vmspec import spec_path, update_vm_file
from fcq_tasks.errors import BadRequest, FcqError, Refused
from fcq_tasks.host import handtools, maintenance
from fcq_tasks.host.agent import VMAgent

#: An operator's hand locks (fcq lock / fcq unlock), imperative like start.
lock = vm_task("lock", "lock", handtools.lock_by_hand)
unlock = vm_task("unlock", "unlock", handtools.unlock_by_hand)


@app.task(bind=True, base=FcqTask, name="fcq.set_drained")
def set_drained(self: FcqTask, /, host: str | None = None, drained: object = None,
                reason: object = None, **_: Any) -> dict[str, Any]:
    """Drain this host (``drained=True``) or put it back into service (``False``)."""
    settings = current_settings()
    try:
        if host != settings.host:
            raise BadRequest("host", f"task for host {host!r} reached host {settings.host!r}")
        if not isinstance(drained, bool):
            raise BadRequest("drained", f"must be true or false (got {drained!r})")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("reason", f"must be text (got {reason!r})")
    except FcqError as err:
        raise self.fail(err) from err
    if drained:
        mark: dict[str, Any] | None = maintenance.mark_drained(settings, reason or "fcq drain")
        changed = True
    else:
        changed, mark = maintenance.clear_drained(settings), None
    heartbeat(settings)  # placement must see the mark before anything moves
    return {"host": settings.host, "operation": "drain" if drained else "undrain",
            "drained": mark, "changed": changed}


def evacuate_here(agent: VMAgent, dead: str, force: bool = False) -> dict[str, Any]:
    """Boot *agent*'s VM here, in place of dead host *dead*, once its writers are fenced.

    *force*: go on although *dead*'s QEMU still watches the VM's images.
    Fencing cuts a QEMU off its disks, not off the network: a guest that
    still runs on a host taken for dead would answer on the VM's addresses
    next to its new copy. So a live watch (which lapses ~30 s after a host
    stops answering) is a sign of life that refuses the evacuation.
    """
    settings = agent.settings
    me = settings.host
    with agent.locked():
        spec = agent.spec()
        if spec.kvm_host == me:
            # Done before (a redelivered message, or a second evacuate):
            # converge, which starts it if it is still down.
            result = agent.ensure()
            result.update(operation="evacuate", outcome="here", fenced={})
            return result
        if spec.kvm_host != dead:
            raise Refused(f"{agent.name}: config puts it on {spec.kvm_host}, not on {dead}: "
                          "not evacuated", vm=agent.name, kvm_host=spec.kvm_host)
        maintenance.refuse_if_drained(settings, agent.name, "start")
        if not agent.storage.fences:
            raise Refused(f"{agent.name}: storage {settings.storage} cannot fence host {dead}: "
                          f"its disks are {dead}'s own, and nothing here can stop {dead} "
                          "from writing them; bring the host back, or recover the VM by hand",
                          vm=agent.name, host=dead,
                          rule="a dead host's VMs start elsewhere only after fencing")
        client = registry.connect(settings)
        # Read now, under the VM's lock: the dead host may have come back
        # since the orchestrator looked.
        refuse_live_holder(agent, client)
        if dead in registry.hosts(client):
            raise Refused(f"{agent.name}: host {dead} has a fresh heartbeat: it is alive; "
                          f"use `fcq drain {dead}`", vm=agent.name, host=dead)
        alive = agent.storage.live_writers(agent.name, dead)
        if alive and not force:
            clients = sorted({c for cs in alive.values() for c in cs})
            raise Refused(f"{agent.name}: {dead}'s QEMU still watches its images (client "
                          f"{', '.join(clients)}): it is alive and may still run the guest; "
                          "fencing would cut its disks, not its network. Wait (the watch of "
                          "a hung host lapses within ~30 s), power the host off, or "
                          "evacuate --force", vm=agent.name, host=dead, clients=clients,
                          rule="no evacuation while the dead host's QEMU shows signs of life")
        # force_unlock fences every writer before it breaks a lock: after
        # it, the dead host's QEMU can no longer write, whatever it does.
        broken = agent.force_unlock()["broken"]
        update_vm_file(spec_path(settings.vm_config_dir, agent.name), {"kvm_host": me},
                       bump_version=True)
        agent.log.warning("evacuated", action="evacuate", dead=dead, broken=broken)
        result = agent.ensure()
    result.update(operation="evacuate", outcome="evacuated", fenced=broken, dead=dead)
    return result


@app.task(bind=True, base=FcqTask, name="fcq.evacuate")
def evacuate(self: FcqTask, /, vm: str | None = None, dead: str | None = None,
             host: str | None = None, force: object = False, expires_at: object = None,
             **_: Any) -> dict[str, Any]:
    """Start VM *vm* of dead host *dead* on this host, after fencing its writers."""
    settings = current_settings()
    try:
        dead_host = _check_name("dead", dead, "the dead host's name")
        if dead_host == settings.host:
            raise BadRequest("dead", f"names this host ({settings.host}), which is alive")
        if not isinstance(force, bool):
            raise BadRequest("force", f"must be true or false (got {force!r})")
    except FcqError as err:
        raise self.fail(err) from err
    return run_on_vm(self, "evacuate", vm, host,
                     lambda agent: evacuate_here(agent, dead_host, force), expires_at)
