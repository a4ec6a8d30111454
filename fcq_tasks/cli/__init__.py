"""The ``fcq`` command.

By default VM commands go through the cluster: they are enqueued to the
VM's host queue and followed until done (``--no-wait`` prints the task id).
``--local`` acts on this host directly, without Celery, for debugging on a
host. Services: ``fcq worker``, ``fcq beat``, ``fcq controller``, ``fcq flower``,
``fcq metrics``.

Exit codes (docs/cli.md): 0 done; 1 the system failed; 2 bad input; 3 the VM
is busy; 4 refused by a safety rule. With several VMs the highest code wins.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from fcq_tasks import __version__
from fcq_tasks.cli.output import Output, say
from fcq_tasks.config.settings import DEFAULT_SETTINGS_FILE, load_host_settings
from fcq_tasks.errors import FcqError

VM_COMMANDS = {
    "start": "start VMs (their config must allow the host)",
    "stop": "power VMs off (ACPI, then quit, then kill) and release locks",
    "restart": "stop, then start",
    "ensure": "converge VMs to their config",
    "kill": "SIGKILL VMs' QEMU at once and release locks",
    "force-unlock": "break VMs' volume locks (refused while the VM runs there)",
    "lock": "hold a stopped VM's locks by hand: no host starts it until unlock",
    "unlock": "give back the locks held by hand (refused while the VM runs here)",
}
#: Seconds `fcq` follows a task by default: longer than any task should take
#: (stop's grace, busy retries), short enough that a lost task is noticed.
DEFAULT_WAIT = 1800.0

LOCAL_ONLY = {"status", "memory", "monitor", "keygen"}
CLUSTER_ONLY = {"hosts", "jobs", "wait", "apply-config", "migrate", "drain", "undrain",
                "evacuate"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcq", description="Manage QEMU VMs across hosts.")
    p.add_argument("--version", action="version", version=f"fcq {__version__}")
    p.add_argument("-c", "--config", help=f"settings file (default: $FCQ_CONFIG, else "
                   f"{DEFAULT_SETTINGS_FILE} if it exists, else built-in defaults)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no log or progress lines")
    p.add_argument("--local", action="store_true",
                   help="act on this host directly, without the cluster")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ls", help="VMs and where they run (--local: this host in detail)")
    for name, text in VM_COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        sp.add_argument("vms", nargs="*" if name == "ensure" else "+", metavar="VM")
        if name == "ensure":
            sp.add_argument("--all", action="store_true",
                            help="sweep every VM (every live host; --local: this host)")
        _wait_options(sp)
        sp.add_argument("--host", help="the host to act on (default: the VM's kvm_host)")
    sp = sub.add_parser("migrate", help="live-migrate VMs to another host")
    sp.add_argument("vms", nargs="+", metavar="VM")
    sp.add_argument("--to", metavar="HOST", help="the destination host")
    sp.add_argument("--abort", action="store_true", help="stop the migration in flight")
    _wait_options(sp)
    sp = sub.add_parser("drain", help="maintenance: mark a host so it starts and receives "
                        "nothing, then live-migrate its VMs to hosts with free memory")
    sp.add_argument("host_name", metavar="HOST")
    sp.add_argument("--dry-run", action="store_true", help="print the placement; do nothing")
    sp.add_argument("--timeout", type=float, default=DEFAULT_WAIT * 2,
                    help="seconds the whole drain may take")
    sp = sub.add_parser("undrain", help="put a drained host back into service")
    sp.add_argument("host_name", metavar="HOST")
    sp = sub.add_parser("evacuate", help="a dead host: fence its writers, start its VMs "
                        "elsewhere (refused while it has a heartbeat)")
    sp.add_argument("host_name", metavar="HOST")
    sp.add_argument("--dry-run", action="store_true", help="print the placement; do nothing")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for each VM's start")
    sp.add_argument("--force", action="store_true",
                    help="evacuate although the host's QEMUs still watch their images (they "
                    "are fenced off their disks, not off the network)")
    sp = sub.add_parser("snapshot", help="snapshot a VM's disks, its guest frozen if it can be "
                        "(--list, --remove)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("name", nargs="?", metavar="NAME",
                    help="snapshot name (default: auto-<UTC time>, pruned by retention)")
    sp.add_argument("--list", action="store_true", help="list the VM's snapshots")
    sp.add_argument("--remove", metavar="NAME", help="remove snapshot NAME")
    sp.add_argument("--host", help="the host to act on (default: the VM's kvm_host)")
    _wait_options(sp)
    sp = sub.add_parser("resize", help="grow a VM's root disk (never shrinks)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("size", metavar="SIZE", help="new size in GiB: 20, 20G or 20GiB")
    sp.add_argument("--host", help="the host to act on (default: the VM's kvm_host)")
    _wait_options(sp)
    sp = sub.add_parser("upgrade", help="move running VMs onto a fresh QEMU of the host's "
                        "current generation, without a guest reboot")
    sp.add_argument("vms", nargs="+", metavar="VM")
    sp.add_argument("--host", help="the host to act on (default: the VM's kvm_host)")
    _wait_options(sp)
    sp = sub.add_parser("plan", help="what ensure would do now and why; does nothing")
    sp.add_argument("vms", nargs="*", metavar="VM")
    sp.add_argument("--host", help="every VM of this host (or: the host of the VMs named)")
    sp.add_argument("--all", action="store_true", help="every VM of every live host")
    _wait_options(sp)
    sp = sub.add_parser("status", help="state, process, locks, guest agent (this host)")
    sp.add_argument("vms", nargs="+", metavar="VM")
    sp = sub.add_parser("monitor", help="QEMU's human monitor of a VM on this host "
                        "(one command per line; cont, quit, migrate refused)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("-e", "--execute", action="append", metavar="COMMAND",
                    help="run COMMAND and exit (repeatable)")
    sub.add_parser("memory", help="memory booked by running VMs and the limit (this host)")
    sp = sub.add_parser("keygen", help="make this host's key (host_key_file) if it has none "
                        "and print its host record")
    sp.add_argument("--write-record", action="store_true",
                    help="also write the record to cluster.hosts_dir (one machine, demos)")
    sp.add_argument("--orchestrator", metavar="FILE",
                    help="instead: make the orchestrator's signing key at FILE (never on a "
                    "hypervisor) and print the public key for cluster.orchestrator_keys")
    sub.add_parser("hosts", help="live hosts: VMs, memory booked and limit, last heartbeat")
    sp = sub.add_parser("jobs", help="recent tasks, their VM, host and state")
    sp.add_argument("--limit", type=int, default=20)
    sp = sub.add_parser("wait", help="follow tasks by id until they finish")
    sp.add_argument("ids", nargs="+", metavar="TASK_ID")
    sp.add_argument("--timeout", type=float, default=DEFAULT_WAIT)
    sp = sub.add_parser("apply-config", help="push VM files to their hosts, then ensure")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--host", action="append", help="push to this host (repeatable)")
    _wait_options(sp)
    cp = sub.add_parser("config", help="configuration tools")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = csub.add_parser("check", help="validate VM config files (a directory: its *.cfg), "
                            "every mistake of every file; writes nothing")
    check.add_argument("files", nargs="+", metavar="FILE|DIR")
    check.add_argument("--strict", action="store_true", help="unknown keys are errors too")
    acl = csub.add_parser("redis-acl", help="print the Redis ACL file line for a role's user "
                          "(docs/security.md); the password goes in as its SHA-256")
    acl.add_argument("role", choices=("host", "orchestrator", "beat", "reader"))
    acl.add_argument("--host", help="the host's name (role host only)")
    acl.add_argument("--password-file", required=True, metavar="FILE",
                     help="the user's password (mode 0600), as in its cluster.password_file")
    acl.add_argument("--user", help="the user name (default fcq-host-HOST or fcq-ROLE)")
    sp = sub.add_parser("worker", help="run this host's Celery worker")
    sp.add_argument("--host", help="host name (default: the settings' host)")
    sp.add_argument("--metrics-port", type=int, metavar="PORT",
                    help="port of its /metrics (default: the settings' metrics_port); "
                    "two workers sharing one machine and one settings file need two")
    sub.add_parser("beat", help="run Celery beat: ensure sweeps for every live host")
    sub.add_parser("controller", help="run the orchestrator side's worker: starts the "
                   "moves hosts ask for (needs cluster.orchestrator_key_file)")
    sub.add_parser("metrics", help="serve the cluster's metrics (hosts, queues, VMs) for "
                   "Prometheus")
    sp = sub.add_parser("flower", help="run Flower (basic auth unless --no-auth)")
    sp.add_argument("--no-auth", action="store_true", help="demo only: no authentication")
    _global_options_after(sub)
    return p


def _global_options_after(sub: Any) -> None:
    """--json, -q and --local are accepted after the subcommand too (`fcq status vm01
    --json`); SUPPRESS keeps a subcommand from resetting what came before it."""
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print results as JSON")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no log or progress lines")
        if sp.prog.split()[-1] != "config":
            sp.add_argument("--local", action="store_true", default=argparse.SUPPRESS,
                            help="act on this host directly, without the cluster")
        for action in sp._actions:  # `fcq config check ... --json`
            if isinstance(action, argparse._SubParsersAction):
                _global_options_after(action)


def _wait_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--no-wait", action="store_true", help="print the task id and return")
    sp.add_argument("--timeout", type=float, default=DEFAULT_WAIT,
                    help=f"seconds to wait at most (default {DEFAULT_WAIT:.0f})")


def settings_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("FCQ_CONFIG")
    if env:
        return env
    return DEFAULT_SETTINGS_FILE if Path(DEFAULT_SETTINGS_FILE).exists() else None


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.json)
    if args.command == "config":
        from fcq_tasks.cli import local
        if args.config_command == "redis-acl":
            local.redis_acl(args.role, args.host, Path(args.password_file), args.user, out)
        else:
            local.check_configs(args.files, args.strict, out)
        return out.finish()
    if args.local and args.command in CLUSTER_ONLY:
        parser.error(f"{args.command} is a cluster command; drop --local")
    if args.command == "ensure" and not args.vms and not args.all:
        parser.error("ensure: name at least one VM, or --all")
    if args.command == "plan" and not (args.vms or args.host or args.all or args.local):
        parser.error("plan: name VMs, --host HOST or --all")
    if args.command == "snapshot" and sum(
            [bool(args.name), bool(args.list), args.remove is not None]) > 1:
        parser.error("snapshot: give a NAME, --list or --remove NAME, only one of them")
    try:
        settings = load_host_settings(settings_path(args.config))
        if args.command in ("worker", "beat", "controller", "flower", "metrics"):
            from fcq_tasks.cli import services  # Celery is imported only where it is used
            return services.run(settings, args)
    except FcqError as err:
        out.error(err)
        return out.finish()
    # SIGTERM ends a command like an exception, so every `finally` runs: a
    # snapshot thaws its guest, a start gives back the locks it took.
    signal.signal(signal.SIGTERM, _terminated)
    for warning in settings.warnings:
        say(f"fcq: warning: {warning}", err=True)
    try:
        if args.local or args.command in LOCAL_ONLY:
            # Imported only where used: the host side (agent, storage, QMP,
            # structlog) costs a cluster command ~150 ms it has no use for.
            from fcq_tasks import logs
            from fcq_tasks.cli import local
            logs.configure(settings.log_file, settings.log_level,
                           stream=None if args.quiet or args.json else sys.stderr)
            local.run(settings, args, out)
        else:
            from fcq_tasks.cli import remote
            remote.run(settings, args, out)
    except FcqError as err:
        out.error(err)
    return out.finish()
