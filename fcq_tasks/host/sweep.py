"""This host as a whole: which VMs it knows, what it books, the ensure sweep.

The sweep follows Nova's ``_sync_power_states`` lesson: each VM's failure is
isolated (one broken config or one hung QEMU never aborts the sweep) and a VM
with an operation in flight is skipped, not waited for.
"""

from __future__ import annotations

import os
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


def ensure_all(settings: HostSettings, held: HeldMonitors | None = None) -> dict[str, Any]:
    """Ensure every VM this host knows; one VM's failure never stops the others.

    *held*: the worker's open sweep monitors, on which a converged VM's run
    state is asked (a process that sweeps once, like ``fcq ensure --all``,
    passes none).
    """
    storage = open_storage(settings)
    results: dict[str, Any] = {}
    failed = 0
    listed = configured_vms(settings)
    configured = set(listed)
    drained = maintenance.drained(settings) is not None
    for name in known_vms(settings, listed):
        agent = VMAgent(settings, name, storage)
        agent.sweep_drained = drained
        agent.held_monitors = held
        try:
            results[name] = agent.ensure() if name in configured else agent.orphan()
        except VMBusy:
            results[name] = {"vm": name, "outcome": "skipped", "reason": "operation in flight"}
        except FcqError as err:
            failed += 1
            results[name] = {"vm": name, "outcome": "error", "exit_code": err.exit_code,
                             **err.to_dict()}
        except Exception as err:  # a bug in one VM's path must not end the sweep
            failed += 1
            log.exception("ensure-crashed", vm=name)
            results[name] = {"vm": name, "outcome": "error", "exit_code": 1,
                             "error": type(err).__name__, "message": str(err)}
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
