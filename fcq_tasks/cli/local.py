"""Local commands: act on VMs of this host directly, without Celery.

For debugging on a host, and what the worker's tasks do underneath.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fcq_tasks.cli.output import (
    EXIT_INPUT,
    Output,
    describe,
    describe_status,
    escaped,
    ls_table,
    parse_size_gib,
    plan_table,
    say,
)
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.config.vmspec import parse_vm_file
from fcq_tasks.errors import BadRequest, ConfigErrors, FcqError
from fcq_tasks.host import handtools, hostkeys
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.sweep import ensure_all, list_vms, memory_summary, plan_all

VM_ACTIONS: dict[str, Callable[[VMAgent], dict[str, Any]]] = {
    "start": VMAgent.start,
    "stop": VMAgent.stop,
    "restart": VMAgent.restart,
    "ensure": VMAgent.ensure,
    "kill": VMAgent.kill,
    "force-unlock": VMAgent.force_unlock,
    "status": VMAgent.status,
    "upgrade": VMAgent.upgrade,
    "lock": handtools.lock_by_hand,
    "unlock": handtools.unlock_by_hand,
}


def run(settings: HostSettings, args: argparse.Namespace, out: Output) -> None:
    if args.command == "ls":
        rows = list_vms(settings)
        out.table(rows, ls_table(rows))
    elif args.command == "keygen" and args.orchestrator:
        made = hostkeys.orchestrator_keygen(Path(args.orchestrator))
        out.result(made, f"# cluster.orchestrator_keys on every host lists:\n{made['public_key']}")
    elif args.command == "keygen":
        record = hostkeys.keygen(settings, args.write_record)
        out.result(record, f"# {record['record_file']}\n{record['record'].rstrip()}")
    elif args.command == "memory":
        summary = memory_summary(settings)
        out.result(summary, f"{settings.host}: {summary['booked_mb']} of "
                   f"{summary['limit_mb']} MB booked by {len(summary['vms'])} VMs")
    elif args.command == "ensure" and args.all:
        sweep = ensure_all(settings)
        for name, r in sweep["vms"].items():
            out.result(r, describe(r) if "operation" in r else
                       f"{name}: {r['outcome']}: {r.get('message') or r.get('reason')}")
        out.code = max(out.code, sweep["exit_code"])
    elif args.command == "plan":
        rows = ([VMAgent(settings, _vm(vm)).preview() for vm in args.vms] if args.vms
                else plan_all(settings))
        out.table(rows, plan_table(rows))
    elif args.command == "monitor":
        monitor(VMAgent(settings, _vm(args.vm)), args.execute, out)
    elif args.command in ("snapshot", "resize"):
        try:
            agent = VMAgent(settings, _vm(args.vm))
            if args.command == "resize":
                result = agent.resize(parse_size_gib(args.size))
            elif args.list:
                result = agent.snapshots()
            elif args.remove is not None:
                result = agent.remove_snapshot(args.remove)
            else:
                result = agent.snapshot(args.name)
            out.result(result, describe(result))
        except FcqError as err:
            out.error(err, args.vm)
    else:
        for vm in args.vms:
            try:
                if not NAME_RE.match(vm):
                    raise BadRequest("VM", f"{NAME_RULE} (got {vm!r})")
                result = VM_ACTIONS[args.command](VMAgent(settings, vm))
                if args.command == "status" and _unknown(result):
                    raise BadRequest("VM", f"{vm} is unknown on {settings.host}: no config "
                                     f"in {settings.vm_config_dir}, not running, no volume "
                                     "or lock")
                out.result(result, describe_status(result) if args.command == "status"
                           else describe(result))
                for warning in result.get("warnings") or []:
                    say(f"fcq: warning: {escaped(str(warning), keep_lines=False)}", err=True)
            except FcqError as err:
                out.error(err, vm)


def _unknown(status: dict[str, Any]) -> bool:
    """A status that knows nothing of its VM: no config, no process, no volume, no lock."""
    return bool(status.get("config_error")) and status.get("status") == "stopped" \
        and status.get("pid") is None and status.get("root_bytes") is None \
        and not any((status.get("locks") or {}).values())


def monitor(agent: VMAgent, commands: list[str] | None, out: Output) -> None:
    """The VM's human monitor: the -e commands, or a prompt on stdin until EOF or `exit`."""
    import sys
    interactive = commands is None and sys.stdin.isatty()
    lines = iter(commands) if commands is not None else iter(sys.stdin.readline, "")
    if interactive:
        say(f"{agent.name}: QEMU human monitor on {agent.settings.host}; `help` lists "
            "commands, `exit` or Ctrl-D ends (cont, quit, migrate are fcq's)", err=True)
    while True:
        if interactive:
            print("(qemu) ", end="", file=sys.stderr, flush=True)
        line = next(lines, None)
        if line is None or line.strip() in ("exit", "quit-monitor"):
            return
        try:
            text = handtools.human_monitor(agent, line.strip())
        except FcqError as err:
            out.error(err, agent.name)
            continue
        out.result({"vm": agent.name, "command": line.strip(), "output": text}, text.rstrip())


def _vm(name: str) -> str:
    if not NAME_RE.match(name):
        raise BadRequest("VM", f"{NAME_RULE} (got {name!r})")
    return name


def redis_acl(role: str, host: str | None, password_file: Path, user: str | None,
              out: Output) -> None:
    """The Redis ACL file line of *role*'s user (cluster/redisacl.py)."""
    from fcq_tasks.cluster import redisacl
    from fcq_tasks.config.clustersettings import read_secret
    try:
        password = read_secret(password_file, "--password-file") or ""
        line = redisacl.acl_rule(role, password, host, user)
    except FcqError as err:
        out.error(err)
        return
    name = line.split()[1]
    out.result({"user": name, "acl": line}, line)


def check_configs(paths: list[str], strict: bool, out: Output) -> None:
    """Check VM files (a directory: its *.cfg files) and host settings files; every
    mistake of every file, one line each.

    A file is read as host settings when its top level has settings keys
    (``host``, ``cluster``, ``vm_config_dir``, …) and no VM's ``parameters``.
    Writes nothing. Says which files it checked: a directory without VM
    files is an error, not a silent "ok".
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.cfg"))
            if not found:
                out.error(BadRequest("FILE", f"{name} is a directory without VM files (*.cfg)"))
            files.extend(found)
        else:
            files.append(path)
    for path in files:
        _check_one(path, strict, out)


def _is_settings_file(path: Path) -> bool:
    from fcq_tasks.config.settings import DEFAULTS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # the VM file check says what is wrong with it
    return isinstance(data, dict) and "parameters" not in data and "name" not in data \
        and any(k in DEFAULTS for k in data)


def _check_one(path: Path, strict: bool, out: Output) -> None:
    """One file, a VM's or a host's settings: ok, its warnings, or every mistake."""
    from fcq_tasks.config.settings import load_host_settings
    name = str(path)
    settings_file = _is_settings_file(path)
    try:
        if settings_file:
            settings = load_host_settings(path)
            warnings = list(settings.warnings)
            record = {"file": name, "ok": True, "host": settings.host, "kind": "host settings"}
            text = f"{name}: ok (host settings of {settings.host})"
        else:
            spec = parse_vm_file(path)
            warnings = list(spec.warnings)
            record = {"file": name, "ok": True, "vm": spec.name}
            text = f"{name}: ok ({spec.name})"
    except ConfigErrors as many:
        for err in many.errors:
            out.error(err, None)
        return
    except FcqError as err:
        out.error(err, None)
        return
    for w in warnings:
        say(f"fcq: {'error' if strict else 'warning'}: {w}", err=True)
    if strict and warnings:
        out.code = max(out.code, EXIT_INPUT)
        out.records.append({"file": name, "ok": False, "warnings": warnings})
        return
    out.result({**record, "warnings": warnings}, text)
