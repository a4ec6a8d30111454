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
    check_expiry,
    current_settings,
    heartbeat,
    refuse_live_holder,
    run_on_vm,
    vm_task,
)
from fcq_tasks.config.vmspec import VMSpec, spec_path, update_vm_file
from fcq_tasks.errors import BadRequest, FcqError, MemoryLimitExceeded, Refused, ShrinkRefused
from fcq_tasks.host import handtools, maintenance, oplock
from fcq_tasks.host.admission import booked_memory
from fcq_tasks.host.agent import VMAgent

#: An operator's hand locks (fcq lock / fcq unlock), imperative like start.
lock = vm_task("lock", "lock", handtools.lock_by_hand)
unlock = vm_task("unlock", "unlock", handtools.unlock_by_hand)


@app.task(bind=True, base=FcqTask, name="fcq.set_drained")
def set_drained(self: FcqTask, /, host: str | None = None, drained: object = None,
                reason: object = None, expires_at: object = None,
                **_: Any) -> dict[str, Any]:
    """Drain this host (``drained=True``) or put it back into service (``False``).

    Imperative, so it expires: an undrain redelivered after a later drain
    must not put a host in maintenance back into service.
    """
    settings = current_settings()
    try:
        if host != settings.host:
            raise BadRequest("host", f"task for host {host!r} reached host {settings.host!r}")
        if not isinstance(drained, bool):
            raise BadRequest("drained", f"must be true or false (got {drained!r})")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("reason", f"must be text (got {reason!r})")
        check_expiry(settings.host, "drain" if drained else "undrain", expires_at)
    except FcqError as err:
        raise self.fail(err) from err
    mark: dict[str, Any] | None
    if drained:
        mark, changed = maintenance.mark_drained(settings, reason or "fcq drain")
    else:
        changed, mark = maintenance.clear_drained(settings), None
    heartbeat(settings)  # placement must see the mark before anything moves
    return {"host": settings.host, "operation": "drain" if drained else "undrain",
            "drained": mark, "changed": changed}


def evacuate_here(agent: VMAgent, dead: str, force: bool = False) -> dict[str, Any]:
    """Boot *agent*'s VM here, in place of dead host *dead*, once its writers are fenced.

    Everything that would make the boot fail is checked before anything is
    fenced or broken (the config wants it online, its disks fit, this host
    has the memory), so a refusal changes nothing. *force*: go on although
    another client still watches the VM's images. Fencing cuts a QEMU off
    its disks, not off the network: a guest that still runs on a host taken
    for dead would answer on the VM's addresses next to its new copy, so a
    live watch (which lapses ~30 s after a host stops answering) is a sign
    of life that refuses the evacuation.
    """
    settings = agent.settings
    me = settings.host
    # One evacuation at a time on this host: the memory check below is made
    # before fencing, and must see the VMs evacuated just before as booked.
    with agent.locked(), oplock.operation_lock(settings.run_dir, "evacuations",
                                               settings.cluster.task_busy_wait):
        spec = agent.spec()
        volumes = agent.storage.volumes(agent.name)
        dead_holds = any(v.lock_owner == dead for v in volumes)
        if spec.kvm_host == me and not dead_holds:
            # Done before (a redelivered message, or a second evacuate):
            # converge, which starts it if it is still down.
            result = agent.ensure()
            result.update(operation="evacuate", outcome="here", fenced={})
            return result
        if spec.kvm_host not in (me, dead):
            raise Refused(f"{agent.name}: config puts it on {spec.kvm_host}, not on {dead}: "
                          "not evacuated", vm=agent.name, kvm_host=spec.kvm_host)
        if not agent.storage.fences:
            raise Refused(f"{agent.name}: storage {settings.storage} cannot fence host {dead}: "
                          f"its disks are {dead}'s own, and nothing here can stop {dead} "
                          "from writing them; bring the host back, or recover the VM by hand",
                          vm=agent.name, host=dead,
                          rule="a dead host's VMs start elsewhere only after fencing")
        missing = [v.name for v in volumes if v.size is None]
        if missing:
            raise Refused(f"{agent.name}: this host finds no volume {', '.join(missing)}: its "
                          "config may name another pool than the dead host's, or the VM never "
                          "ran; evacuating would boot empty disks: not evacuated",
                          vm=agent.name, volumes=missing)
        others = sorted({str(v.lock_owner) for v in volumes} - {"None", dead, me})
        if others:
            raise Refused(f"{agent.name}: volumes locked by {others[0]}, not by {dead}: "
                          "not evacuated", vm=agent.name, host=others[0])
        _check_can_boot(agent, spec)
        client = registry.connect(settings)
        # Read now, under the VM's lock: the dead host may have come back
        # since the orchestrator looked.
        owners = {str(v.lock_owner) for v in volumes if v.lock_owner not in (None, me)}
        beating = _beating(agent, client, owners | {dead})
        refuse_live_holder(agent, client, beating)
        _refuse_alive(agent, dead, beating)
        talking = [] if force else agent.storage.host_watchers(dead)
        if talking:
            timeout = settings.ceph.host_watch_timeout if settings.ceph else 0
            raise Refused(f"{agent.name}: host {dead} has no heartbeat, but its worker still "
                          f"talks to Ceph (client {', '.join(talking)} watches "
                          f"fcq.host.{dead}): it is alive and cut off from Redis, or hung "
                          f"for less than ceph.host_watch_timeout ({timeout} s). Wait, power "
                          "the host off, or evacuate --force", vm=agent.name, host=dead,
                          clients=talking,
                          rule="no evacuation while the host shows signs of life")
        alive = agent.storage.other_watchers(agent.name)
        if alive and not force:
            clients = sorted({c for cs in alive.values() for c in cs})
            whose = agent.storage.whose(agent.name, clients)
            said = "; ".join(f"{c} ({whose[c]})" for c in clients)
            raise Refused(f"{agent.name}: its images are still watched by {said}: a live "
                          "client of the disks; fencing would cut its disks, not its "
                          "network. Wait (the watch of a hung client lapses after the OSDs' "
                          "osd_client_watch_timeout, 30 s by default), power the host off, or "
                          "evacuate --force", vm=agent.name, host=dead,
                          clients=clients, whose=whose,
                          rule="no evacuation while the VM's disks show signs of life")
        # The config first: once one lock is broken, the VM is this host's
        # to run, and if this task dies before the last one (a worker
        # restart, an OOM kill), this host's next ensure finishes the
        # takeover (plan: take-over) instead of leaving the VM down.
        if spec.kvm_host != me:
            update_vm_file(spec_path(settings.vm_config_dir, agent.name), {"kvm_host": me},
                           bump_version=True)
        # force_unlock fences every writer before it breaks a lock, and
        # breaks only locks *dead* holds, read as it breaks them: a host
        # that took the VM meanwhile keeps its lock.
        broken = agent.force_unlock(only_from=dead)["broken"]
        # Came back while we fenced? Its guest has lost its disks; booting
        # here too would put a second copy on the network. The config goes
        # back, so that this host's ensure does not boot it either.
        try:
            _refuse_alive(agent, dead, _beating(agent, client, {dead}), fenced=True)
        except Refused:
            if spec.kvm_host != me:
                update_vm_file(spec_path(settings.vm_config_dir, agent.name),
                               {"kvm_host": spec.kvm_host}, bump_version=True)
            raise
        agent.log.warning("evacuated", action="evacuate", dead=dead, broken=broken)
        result = agent.ensure()
    result.update(operation="evacuate", outcome="evacuated", fenced=broken, dead=dead)
    return result


def _check_can_boot(agent: VMAgent, spec: VMSpec) -> None:
    """Refuse, before anything is fenced, what would make the boot here fail."""
    maintenance.refuse_if_drained(agent.settings, agent.name, "start")
    maintenance.refuse_if_held(agent.settings, agent.name)
    if not spec.online:
        raise Refused(f"{agent.name}: this host's config says online: false: nothing to "
                      "start, nothing fenced", vm=agent.name, field="online")
    for volume in agent.storage.volumes(agent.name):
        if volume.name == "root" and volume.size is not None and volume.size > spec.disk_bytes:
            raise ShrinkRefused(agent.name, "root", volume.size, spec.disk_bytes)
    s = agent.settings
    booked = sum(booked_memory(s.run_dir, s.qmp_timeout, exclude=agent.name).values())
    if booked + spec.memory_mb > s.vm_max_total_memory:
        raise MemoryLimitExceeded(agent.name, spec.memory_mb, booked, s.vm_max_total_memory)


def _beating(agent: VMAgent, client: Any, names: set[str]) -> set[str]:
    """registry.beating, with an unreadable registry refusing: never decide blind."""
    try:
        return registry.beating(client, names, agent.settings.cluster.registry_ttl)
    except Exception as err:
        raise Refused(f"{agent.name}: cannot read the host registry ({err}): not evacuated",
                      vm=agent.name) from err


def _refuse_alive(agent: VMAgent, dead: str, beating: set[str],
                  fenced: bool = False) -> None:
    if dead in beating:
        me = agent.settings.host
        after = (" It came back while its writers were being fenced: its guest there has "
                 f"lost its disks, and its locks are broken. To run the VM there again: "
                 f"`fcq force-unlock {agent.name} --host {me}`, then `fcq restart "
                 f"{agent.name}`") if fenced else ""
        raise Refused(f"{agent.name}: host {dead} has a fresh heartbeat: it is alive; use "
                      f"`fcq drain {dead}`.{after}", vm=agent.name, host=dead)


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
