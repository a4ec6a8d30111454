"""The ``fcq`` command. Local commands act on VMs of this host directly.

Exit codes (docs/cli.md): 0 done; 1 the system failed (QEMU, QMP, storage);
2 bad input (usage, config, unknown VM); 3 the VM is busy with another
operation; 4 refused by a safety rule (memory limit, shrink, foreign lock,
inconsistent state). With several VMs the highest code wins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__, logs
from .agent import VMAgent
from .errors import BadRequest, FcqError
from .host import ensure_all, list_vms, memory_summary
from .settings import DEFAULT_SETTINGS_FILE, HostSettings, load_host_settings
from .validate import NAME_RE, NAME_RULE
from .vmspec import parse_vm_file

EXIT_OK, EXIT_SYSTEM, EXIT_INPUT = 0, 1, 2

VM_COMMANDS: dict[str, tuple[Callable[[VMAgent], dict[str, Any]], str]] = {
    "start": (VMAgent.start, "start VMs here (their config must allow this host)"),
    "stop": (VMAgent.stop, "power VMs off (ACPI, then quit, then kill) and release locks"),
    "restart": (VMAgent.restart, "stop, then start"),
    "kill": (VMAgent.kill, "SIGKILL VMs' QEMU at once and release locks"),
    "force-unlock": (VMAgent.force_unlock,
                     "break VMs' volume locks (refused while the VM runs here)"),
    "status": (VMAgent.status, "show state, process, locks and guest agent of VMs"),
}


def say(text: str, err: bool = False) -> None:
    """Print, but a closed or broken stdout/stderr never turns a done job into a failure."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcq", description="Manage QEMU VMs on this host.")
    p.add_argument("--version", action="version", version=f"fcq {__version__}")
    p.add_argument("-c", "--config", help=f"host settings file (default: $FCQ_CONFIG, "
                   f"else {DEFAULT_SETTINGS_FILE} if it exists, else built-in defaults)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on the terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ls", help="list the VMs this host knows and their state")
    sub.add_parser("memory", help="memory booked by running VMs and the host limit")
    for name, (_, text) in VM_COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        sp.add_argument("vms", nargs="+", metavar="VM")
    sp = sub.add_parser("ensure", help="converge VMs to their config on this host")
    sp.add_argument("vms", nargs="*", metavar="VM")
    sp.add_argument("--all", action="store_true", help="every VM this host knows (the sweep)")
    cp = sub.add_parser("config", help="configuration tools")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = csub.add_parser("check", help="validate VM config files; writes nothing")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--strict", action="store_true", help="unknown keys are errors too")
    return p


def settings_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("FCQ_CONFIG")
    if env:
        return env
    return DEFAULT_SETTINGS_FILE if Path(DEFAULT_SETTINGS_FILE).exists() else None


class Output:
    """Results to stdout (text or JSON), errors to stderr; remembers the exit code."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.code = EXIT_OK
        self.records: list[dict[str, Any]] = []

    def result(self, record: dict[str, Any], text: str) -> None:
        self.records.append(record)
        if not self.as_json:
            say(text)

    def error(self, err: FcqError, vm: str | None = None) -> None:
        self.code = max(self.code, err.exit_code)
        record = {"vm": vm, **err.to_dict()} if vm else err.to_dict()
        self.records.append(record)
        if not self.as_json:
            say(f"fcq: error: {err.message}", err=True)

    def finish(self) -> int:
        if self.as_json:
            say(json.dumps(self.records if len(self.records) != 1 else self.records[0],
                           indent=2, default=str))
        return self.code


def describe(result: dict[str, Any]) -> str:
    """One line for a finished operation."""
    if result.get("operation") == "force-unlock":
        broken = result["broken"]
        return f"{result['vm']}: force-unlock: " + (
            ", ".join(f"{v} (was {o})" for v, o in broken.items()) if broken else "no locks held")
    actions = ", ".join(result.get("actions") or []) or "nothing to do"
    return (f"{result['vm']}: {result.get('operation')}: found {result.get('found')}, "
            f"did {actions}; now {result.get('status')}")


def describe_status(row: dict[str, Any]) -> str:
    locks = row.get("locks") or {}
    holders = sorted({o for o in locks.values() if o})
    lines = [f"{row['vm']}: {row['status']}" + (f" (config: {row['wanted']})"
                                               if row.get("wanted") else "")]
    if row.get("config_error"):
        lines.append(f"  config error: {row['config_error']}")
    if row.get("pid"):
        lines.append(f"  pid {row['pid']}, {row.get('memory_mb')} MB")
    if row.get("root_bytes") is not None:
        lines.append(f"  root {row['root_bytes'] / 2**30:.1f} GiB")
    lines.append(f"  locks: {', '.join(holders) if holders else 'none'}")
    if "guest_agent" in row:
        lines.append(f"  guest agent: {'answers' if row['guest_agent'] else 'silent'}")
    return "\n".join(lines)


def ls_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'VM':<20} {'STATUS':<13} {'CONFIG':<10} {'PID':>8} {'MB':>6}  LOCKS"
    lines = [header]
    for r in rows:
        holders = ",".join(sorted({o for o in (r.get("locks") or {}).values() if o})) or "-"
        lines.append(f"{r['vm']:<20} {r['status']:<13} {r.get('wanted') or '?':<10} "
                     f"{r.get('pid') or '-':>8} {r.get('memory_mb') or '-':>6}  {holders}")
    return "\n".join(lines)


def run_vm_command(settings: HostSettings, command: str, vms: list[str], out: Output) -> None:
    for vm in vms:
        try:
            if not NAME_RE.match(vm):
                raise BadRequest("VM", f"{NAME_RULE} (got {vm!r})")
            agent = VMAgent(settings, vm)
            result = agent.ensure() if command == "ensure" else VM_COMMANDS[command][0](agent)
            out.result(result, describe_status(result) if command == "status"
                       else describe(result))
        except FcqError as err:
            out.error(err, vm)


def check_configs(files: list[str], strict: bool, out: Output) -> None:
    for name in files:
        try:
            spec = parse_vm_file(Path(name))
        except FcqError as err:
            out.error(err, None)
            continue
        if spec.warnings:
            for w in spec.warnings:
                say(f"fcq: {'error' if strict else 'warning'}: {w}", err=True)
            if strict:
                out.code = max(out.code, EXIT_INPUT)
                out.records.append({"file": name, "ok": False, "warnings": list(spec.warnings)})
                continue
        out.result({"file": name, "ok": True, "vm": spec.name, "warnings": list(spec.warnings)},
                   f"{name}: ok ({spec.name})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    if args.command == "config":
        check_configs(args.files, args.strict, out)
        return out.finish()
    try:
        settings = load_host_settings(settings_path(args.config))
    except FcqError as err:
        out.error(err)
        return out.finish()
    logs.configure(settings.log_file, settings.log_level,
                   stream=None if args.quiet or args.json else sys.stderr)
    for warning in settings.warnings:
        say(f"fcq: warning: {warning}", err=True)
    try:
        if args.command == "ls":
            rows = list_vms(settings)
            out.records.extend(rows)
            if not args.json:
                say(ls_table(rows))
        elif args.command == "memory":
            summary = memory_summary(settings)
            out.result(summary, f"{settings.host}: {summary['booked_mb']} of "
                       f"{summary['limit_mb']} MB booked by {len(summary['vms'])} VMs")
        elif args.command == "ensure" and args.all:
            sweep = ensure_all(settings)
            for name, r in sweep["vms"].items():
                out.result(r, describe(r) if "operation" in r else f"{name}: {r['outcome']}: "
                           f"{r.get('message') or r.get('reason')}")
            if sweep["failed"]:
                out.code = max(out.code, EXIT_SYSTEM)
        elif args.command == "ensure" and not args.vms:
            out.error(BadRequest("VM", "name at least one VM, or --all"))
        else:
            run_vm_command(settings, args.command, args.vms, out)
    except FcqError as err:
        out.error(err)
    return out.finish()


if __name__ == "__main__":
    sys.exit(main())
