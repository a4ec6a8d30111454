"""This host as a whole: which VMs it knows, what it books, the ensure sweep.

The sweep follows Nova's ``_sync_power_states`` lesson: each VM's failure is
isolated (one broken config or one hung QEMU never aborts the sweep) and a VM
with an operation in flight is skipped, not waited for.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any

import structlog

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import NAME_RE
from fcq_tasks.errors import FcqError, VMBusy
from fcq_tasks.hazmat.heldmonitors import HeldMonitors
from fcq_tasks.hazmat.qemu import identity_names
from fcq_tasks.host import maintenance
from fcq_tasks.host.admission import booked_memory
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.storage import open_storage

log = structlog.get_logger()


def configured_vms(settings: HostSettings) -> list[str]:
    """Names of the VM config files in this host's config directory."""
    try:
        entries = os.listdir(settings.vm_config_dir)
    except FileNotFoundError:
        return []
    return sorted(e[:-4] for e in entries if e.endswith(".cfg") and NAME_RE.match(e[:-4]))


def known_vms(settings: HostSettings, configured: list[str] | None = None) -> list[str]:
    """Configured VMs (*configured*, if just listed) plus any that left run files here."""
    names = set(configured_vms(settings) if configured is None else configured)
    names.update(n for n in identity_names(settings.run_dir) if NAME_RE.match(n))
    return sorted(names)


def list_vms(settings: HostSettings) -> list[dict[str, Any]]:
    storage = open_storage(settings)
    rows = []
    for name in known_vms(settings):
        try:
            rows.append(VMAgent(settings, name, storage).status())
        except FcqError as err:
            rows.append({"vm": name, "host": settings.host, "status": "error",
                         "error": err.message})
    return rows


def ensure_all(settings: HostSettings, held: HeldMonitors | None = None,
               move: Callable[[str], Callable[[str], None]] | None = None) -> dict[str, Any]:
    """Ensure every VM this host knows; one VM's failure never stops the others.

    *held*: the worker's open sweep monitors, on which a converged VM's run
    state is asked (a process that sweeps once, like ``fcq ensure --all``,
    passes none). *move*: VM → what to do when that VM is to move to
    another host (the worker asks its controller); without it, logged.

    ``sweep_concurrency`` VMs are looked at side by side: a look waits on
    QEMU's monitor and on the storage (Ceph round trips on RBD), not on the
    CPU. Each VM is still looked at and acted on under its own operation
    lock, and what the sweep does to VMs (a start, a kill, an upgrade, ...)
    is done one VM at a time, as by a sweep that goes VM after VM: the host
    never sees more of the sweep's starts or copies at once than before.
    """
    storage = open_storage(settings)
    listed = configured_vms(settings)
    configured = set(listed)
    drained = maintenance.drained(settings) is not None
    acting = threading.Lock()

    def one(name: str) -> dict[str, Any]:
        agent = VMAgent(settings, name, storage,
                        outmigrate_hook=None if move is None else move(name))
        agent.sweep_drained = drained
        agent.held_monitors = held
        agent.sweep_act_lock = acting
        try:
            return agent.ensure() if name in configured else agent.orphan()
        except VMBusy:
            return {"vm": name, "outcome": "skipped", "reason": "operation in flight"}
        except FcqError as err:
            return {"vm": name, "outcome": "error", "exit_code": err.exit_code,
                    **err.to_dict()}
        except Exception as err:  # a bug in one VM's path must not end the sweep
            log.exception("ensure-crashed", vm=name)
            return {"vm": name, "outcome": "error", "exit_code": 1,
                    "error": type(err).__name__, "message": str(err)}

    names = known_vms(settings, listed)
    if settings.sweep_concurrency <= 1 or len(names) <= 1:
        results = {name: one(name) for name in names}
    else:
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=min(settings.sweep_concurrency, len(names)),
                thread_name_prefix="fcq-sweep") as pool:
            results = dict(zip(names, pool.map(one, names), strict=True))
    failed = sum(1 for r in results.values() if r.get("outcome") == "error")
    if held is not None:
        # A stopped QEMU closed its side already; a VM whose file is gone is forgotten.
        held.keep_only(set(results))
    exit_code = max((r.get("exit_code", 0) for r in results.values()), default=0)
    return {"host": settings.host, "vms": results, "failed": failed, "exit_code": exit_code}


def plan_all(settings: HostSettings) -> list[dict[str, Any]]:
    """What ensure would do to every VM of this host, doing nothing."""
    storage = open_storage(settings)
    return [VMAgent(settings, name, storage).preview() for name in known_vms(settings)]


def memory_summary(settings: HostSettings) -> dict[str, Any]:
    booked = booked_memory(settings.run_dir, settings.qmp_timeout)
    return {"host": settings.host, "booked_mb": sum(booked.values()),
            "limit_mb": settings.vm_max_total_memory, "vms": booked}
