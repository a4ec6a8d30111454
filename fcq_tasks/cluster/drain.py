"""Emptying a host: ``fcq drain`` (a live host) and ``fcq evacuate`` (a dead one).

Placement (:func:`place`) is pure: from the host registry it picks, for
each VM, the live host that is not drained, has the VM's config, and has
the most memory free after the VMs placed before it (largest VMs first,
so a big one is not left without room by small ones). It is an estimate
made from heartbeats; every destination checks its own memory admission
again when the VM arrives, and refuses what does not fit.

A drain marks the host first (it starts and receives nothing from then
on, see :mod:`fcq_tasks.host.maintenance`), then moves its running VMs by
ordinary live migrations, never more at once than the source's or a
destination's ``max_migrations``. A VM that cannot move is reported with
the reason and left running where it is; a migration that fails leaves
the VM where the migration's own rescue put it (normally the source).

An evacuation starts a dead host's VMs elsewhere. Each is started by the
task ``fcq.evacuate`` on its new host, which fences the dead host's
writers and breaks its locks first (:mod:`fcq_tasks.cluster.draintasks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fcq_tasks.cluster.api import Orchestrator, remote_error
from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.errors import BadRequest, FcqError, Refused

#: How often a drain looks at the migrations it started.
POLL = 0.5

#: A drain's progress: (vm, event, details).
OnEvent = Callable[[str, str, dict[str, Any]], None]


@dataclass
class Move:
    vm: str
    memory_mb: int
    src: str
    dst: str | None = None          # None: cannot move, see reason
    reason: str = ""
    outcome: str = "planned"        # planned | moved | failed | unplaced | evacuated
    detail: dict[str, Any] = field(default_factory=dict)
    #: What `fcq` exits with for this VM: 4 unplaced (like a refusal), the
    #: host's error's code when it failed there, 1 for anything else failed.
    exit_code: int = 0

    def failed(self, err: FcqError | str) -> None:
        self.outcome = "failed"
        self.reason = err if isinstance(err, str) else err.message
        self.exit_code = 1 if isinstance(err, str) else err.exit_code

    def row(self) -> dict[str, Any]:
        return {"vm": self.vm, "memory_mb": self.memory_mb, "from": self.src, "to": self.dst,
                "outcome": self.outcome, "reason": self.reason, "exit_code": self.exit_code,
                **self.detail}


def free_mb(record: dict[str, Any]) -> int:
    return int(record.get("limit_mb", 0)) - int(record.get("booked_mb", 0))


def place(vms: list[tuple[str, int]], src: str, hosts: dict[str, dict[str, Any]],
          fencing: bool = False, preferred: dict[str, str] | None = None) -> list[Move]:
    """Where each of *vms* (name, MB) on *src* goes; a Move without dst says why not.

    Only hosts on RBD: live migration (drain) and fencing (*fencing*:
    evacuate) both need it.
    *preferred*: VM → the host its config already names (``kvm_host``),
    taken when it can: the VM was on its way there anyway, and a move
    elsewhere would race the migration its own ensure starts.
    """
    candidates = {h: r for h, r in hosts.items() if h != src and not r.get("drained")}
    # Live migration and fencing both need the VM's disks on RBD, here and there.
    unfit = {h: r for h, r in candidates.items() if r.get("storage") != "rbd"}
    candidates = {h: r for h, r in candidates.items() if h not in unfit}
    local_src = not fencing and hosts.get(src, {}).get("storage") not in (None, "rbd")
    free = {h: free_mb(r) for h, r in candidates.items()}
    moves = []
    for vm, memory in sorted(vms, key=lambda x: (-x[1], x[0])):
        move = Move(vm, memory, src)
        knowing = [h for h, r in candidates.items()
                   if vm in r.get("vms", {}) and "error" not in r["vms"][vm]]
        fits = [h for h in knowing if free[h] >= memory]
        if local_src:
            move.reason = (f"{src} keeps its VMs on local storage: they cannot live-migrate "
                           "(stop them, or move their disks by hand)")
        elif not candidates:
            what = "fence it" if fencing else "receive it by live migration"
            move.reason = (f"no live host can {what} (storage local): "
                           + ", ".join(sorted(unfit))
                           if unfit else "no other live host that is not drained")
        elif not knowing:
            move.reason = ("no other live host has its config: push it first "
                           "(fcq apply-config FILE --host HOST)")
        elif not fits:
            best = max(knowing, key=lambda h: (free[h], h))
            move.reason = (f"needs {memory} MB; the most free on a host with its config is "
                           f"{free[best]} MB ({best})")
        else:
            want = (preferred or {}).get(vm)
            move.dst = want if want in fits else sorted(fits, key=lambda h: (-free[h], h))[0]
            free[move.dst] -= memory
        move.outcome = "planned" if move.dst else "unplaced"
        move.exit_code = 0 if move.dst else 4
        moves.append(move)
    return sorted(moves, key=lambda m: m.vm)


def _check_host_name(host: str) -> None:
    if not NAME_RE.match(host):
        raise BadRequest("host", f"{NAME_RULE} (got {host!r})")


def drain_plan(orch: Orchestrator, host: str) -> list[Move]:
    """Where drain would move *host*'s running VMs now (nothing is marked or moved)."""
    _check_host_name(host)
    hosts = orch.hosts()
    if host not in hosts:
        raise BadRequest("host", f"host {host!r} has no live worker: drain moves VMs by live "
                         f"migration, which needs it; if it is dead: fcq evacuate {host}")
    record = hosts[host]
    vms = [(vm, int(record["vms"].get(vm, {}).get("memory_mb") or 0))
           for vm in record["running"]]
    preferred = {vm: str(conf["kvm_host"]) for vm, conf in record["vms"].items()
                 if conf.get("kvm_host") not in (None, host)}
    return place(vms, host, hosts, preferred=preferred)


def set_drained(orch: Orchestrator, host: str, drained: bool,
                timeout: float = 60) -> dict[str, Any]:
    """Set or clear *host*'s maintenance mark, on the host itself; its result."""
    _check_host_name(host)
    orch._check_host(host)
    task = orch._send("fcq.set_drained", {"host": host, "drained": drained,
                                           "reason": "fcq drain" if drained else None},
                      host, "drain" if drained else "undrain", "*")
    return orch.wait(task, timeout=timeout)


def drain(orch: Orchestrator, host: str, on_event: OnEvent | None = None,
          timeout: float = 3600) -> dict[str, Any]:
    """Mark *host* drained, then live-migrate its running VMs away; the summary.

    No migration is started once *timeout* has passed or the host was
    undrained meanwhile; one still in flight then is reported with its
    task id (it goes on: `fcq wait ID`).
    """
    emit = on_event or (lambda vm, event, details: None)
    set_drained(orch, host, True)
    moves = drain_plan(orch, host)
    for m in moves:
        emit(m.vm, "planned" if m.dst else "unplaced",
             {"to": m.dst, "memory_mb": m.memory_mb, "reason": m.reason})
    limits = {h: int(r.get("max_migrations") or 1) for h, r in orch.hosts().items()}
    pending = [m for m in moves if m.dst]
    active: dict[str, tuple[str, Move, float]] = {}
    used: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while pending or active:
        halt = _halt(orch, host, deadline, timeout) if pending else ""
        if halt:
            for m in pending:
                m.failed(f"not started: {halt}")
                m.outcome = "not-started"
                emit(m.vm, "not-started", {"to": m.dst, "reason": halt})
            pending = []
        for m in list(pending):
            assert m.dst is not None
            if used.get(host, 0) >= limits.get(host, 1) or \
                    used.get(m.dst, 0) >= limits.get(m.dst, 1):
                continue
            pending.remove(m)
            try:
                task = orch.migrate(m.vm, m.dst)
            except FcqError as err:
                m.failed(err)
                emit(m.vm, "failed", {"to": m.dst, "reason": err.message})
                continue
            active[m.vm] = (task, m, time.monotonic())
            for h in (host, m.dst):
                used[h] = used.get(h, 0) + 1
            emit(m.vm, "migrating", {"to": m.dst})
        if not active:
            break
        time.sleep(POLL)
        for vm, (task, m, t0) in list(active.items()):
            try:
                state, info = orch.verified_state(task)
            except FcqError:
                continue  # Redis away for a moment: the migration goes on; look again
            if state not in ("SUCCESS", "FAILURE"):
                if time.monotonic() < deadline:
                    _copy_progress(orch, vm, m, emit)
                    continue
                m.failed(f"still in flight after {timeout:.0f} s: fcq wait {task}")
                m.outcome, m.detail = "in-flight", {"task_id": task}
            elif state == "SUCCESS" and isinstance(info, dict) and info.get("to") == m.dst:
                m.outcome = "moved"
                m.detail = {"seconds": round(time.monotonic() - t0, 1),
                            "downtime_ms": info.get("downtime_ms")}
            else:
                m.failed(remote_error(info) if state == "FAILURE" else
                         f"the migration ended with the VM on {info.get('to')}"
                         if isinstance(info, dict) else f"the migration ended: {state}")
            del active[vm]
            assert m.dst is not None
            for h in (host, m.dst):
                used[h] -= 1
            emit(vm, m.outcome, {"to": m.dst, "reason": m.reason, **m.detail})
    try:
        record = orch.hosts().get(host, {})
    except FcqError:
        record = {}
    return {"host": host, "operation": "drain", "drained": record.get("drained"),
            "moved": sum(m.outcome == "moved" for m in moves),
            "not_moved": sum(m.outcome != "moved" for m in moves),
            "still_running": sorted(record.get("running", [])),
            "vms": [m.row() for m in moves]}


def _halt(orch: Orchestrator, host: str, deadline: float, timeout: float) -> str:
    """Why no further migration may start now ("" if they may)."""
    if time.monotonic() >= deadline:
        return f"the drain's {timeout:.0f} s are up"
    try:
        record = orch.hosts().get(host)
        if record is None:
            return f"{host} has no heartbeat any more"
        if not record.get("drained"):
            return f"{host} was undrained meanwhile"
    except FcqError:
        pass  # Redis away: the mark is on the host itself and stays
    return ""


def _copy_progress(orch: Orchestrator, vm: str, m: Move, emit: OnEvent) -> None:
    try:
        copy = orch.migration_progress(vm)
    except FcqError:
        return  # progress is a nicety; a Redis blip must not end the drain
    if copy is not None and copy[0] == "PROGRESS" and isinstance(copy[1], dict):
        emit(vm, "copying", {"to": m.dst, **{k: copy[1].get(k) for k in (
            "transferred", "remaining", "mbps")}})


def evacuate_plan(orch: Orchestrator, host: str) -> list[Move]:
    """Where evacuate would start dead *host*'s VMs (refused while it has a heartbeat)."""
    _check_host_name(host)
    hosts = orch.hosts()
    if host in hosts:
        raise Refused(f"host {host} has a fresh heartbeat: it is alive; evacuate is for a "
                      f"dead host (its VMs are booted elsewhere): use fcq drain {host}",
                      host=host, rule="evacuate only a host without a heartbeat")
    vms: dict[str, int] = {}
    taken: dict[str, str] = {}  # VMs a live host runs already: not the dead one's
    claimed: dict[str, str] = {}  # a live host's config puts it there: go there
    for name, record in hosts.items():
        for vm in record.get("running", []):
            taken[vm] = f"runs on {name}"
    for name, record in hosts.items():
        for vm, conf in record.get("vms", {}).items():
            if conf.get("kvm_host") == name and vm not in taken:
                # Moved there, but not running: the dead host may still hold
                # its locks; evacuated there like the dead host's own.
                claimed[vm] = name
                vms[vm] = max(vms.get(vm, 0), int(conf.get("memory_mb") or 0))
            if conf.get("kvm_host") == host and conf.get("online"):
                vms[vm] = max(vms.get(vm, 0), int(conf.get("memory_mb") or 0))
    moves = place(sorted((v, m) for v, m in vms.items() if v not in taken), host, hosts,
                  fencing=True, preferred=claimed)
    moves += [Move(vm, vms[vm], host, outcome="elsewhere", reason=taken[vm])
              for vm in vms if vm in taken]
    return sorted(moves, key=lambda m: m.vm)


def evacuate(orch: Orchestrator, host: str, on_event: OnEvent | None = None,
             timeout: float = 600, force: bool = False) -> dict[str, Any]:
    """Start dead *host*'s online VMs on other hosts, each after its writers were fenced."""
    emit = on_event or (lambda vm, event, details: None)
    moves = evacuate_plan(orch, host)
    tasks = {}
    for m in moves:
        emit(m.vm, "planned" if m.dst else m.outcome, {"to": m.dst, "reason": m.reason})
    for m in moves:
        if m.dst is None:
            continue
        try:
            tasks[m.vm] = (orch._vm_task("fcq.evacuate", "evacuate", m.vm, m.dst, dead=host,
                                         force=force), m)
        except FcqError as err:
            m.failed(err)
            emit(m.vm, "failed", {"to": m.dst, "reason": err.message})
            continue
        emit(m.vm, "evacuating", {"to": m.dst})
    for vm, (task, m) in tasks.items():
        try:
            result = orch.wait(task, timeout=timeout)
        except FcqError as err:
            m.failed(err)
            emit(vm, "failed", {"to": m.dst, "reason": err.message})
            continue
        m.outcome = "evacuated"
        m.detail = {"fenced": result.get("fenced"), "status": result.get("status")}
        if result.get("status") != "running":
            m.failed(f"fenced, but it does not run there: {result.get('status')}")
        emit(vm, m.outcome, {"to": m.dst, **m.detail})
    return {"host": host, "operation": "evacuate",
            "evacuated": sum(m.outcome == "evacuated" for m in moves),
            "not_evacuated": sum(m.outcome not in ("evacuated", "elsewhere") for m in moves),
            "vms": [m.row() for m in moves]}
