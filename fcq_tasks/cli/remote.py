"""Cluster commands: enqueue to host queues through the orchestrator and wait."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fcq_tasks import units
from fcq_tasks.cli.output import (
    EXIT_SYSTEM,
    Output,
    describe,
    escaped,
    parse_size_gib,
    plan_table,
    say,
)
from fcq_tasks.cluster.api import Orchestrator
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import BadRequest, FcqError

#: Steps of work whose progress is a sequence of known steps: step → (n, of).
SEQUENCED_STEPS = {"frozen": (1, 3), "snapshotted": (2, 3), "thawed": (3, 3)}


def _clock(epoch: Any) -> str:
    """When a job was sent, local time of day (HH:MM:SS)."""
    if not isinstance(epoch, (int, float)):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _took(seconds: Any) -> str:
    return "-" if not isinstance(seconds, (int, float)) else units.duration_ms(seconds * 1000)


#: Progress fields under the name a person reads (the value is converted too).
LABELS = {"mbps": "speed", "expected_downtime": "expected-downtime"}


def human(key: str, value: Any) -> str:
    """A progress field as a person reads it (JSON keeps the exact numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key in ("transferred", "remaining", "total", "bytes", "size"):
        return units.size(value)
    if key == "mbps":
        return units.rate_mbit(value)
    if key.endswith("_ms") or key in ("expected_downtime", "downtime"):
        return units.duration_ms(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class Progress:
    """Shows a task's state changes on stderr while `fcq` waits.

    On a terminal, progress of one task rewrites one line, with a bar where
    the work has a measure (a migration's copy, a snapshot's steps); piped
    or redirected, every change is a plain line of its own, for logs.
    """

    def __init__(self, label: str, quiet: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.quiet = quiet
        self.stream = stream
        self.t0 = time.monotonic()
        self._open = False  # a bar line is on screen, without its newline yet

    def _tty(self) -> bool:
        stream = self.stream or sys.stderr
        try:
            return stream is not None and stream.isatty()
        except (OSError, ValueError):
            return False

    def __call__(self, state: str, info: Any) -> None:
        if self.quiet:
            return
        detail, fraction = "", None
        if state == "PROGRESS" and isinstance(info, dict):
            extra = {k: v for k, v in info.items()
                     if k not in ("vm", "host", "operation", "step")}
            step = str(info.get("step"))
            detail = f" {step}" + "".join(f" {LABELS.get(k, k)}={human(k, v)}"
                                          for k, v in extra.items())
            fraction = fraction_done(step, extra)
        elif state == "PENDING":
            detail = " (queued)"
        elapsed = f"[{time.monotonic() - self.t0:.1f}s]"
        if not self._tty():
            self._say(f"  {self.label}: {state.lower()}{detail}  {elapsed}")
            return
        stream = self.stream or sys.stderr
        if fraction is not None:
            text = f"  {self.label}: {bar(fraction)} {detail.strip()}  {elapsed}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            stream.write("\r\x1b[K" + text[:width])
            stream.flush()
            self._open = True
            return
        if self._open:
            stream.write("\n")
            self._open = False
        self._say(f"  {self.label}: {state.lower()}{detail}  {elapsed}")

    def _say(self, text: str) -> None:
        if self.stream is None:
            say(text, err=True)
            return
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text + "\n")
            self.stream.flush()


def fraction_done(step: str, details: dict[str, Any]) -> float | None:
    """How far work is, 0..1, where its progress says (None: no measure)."""
    if step in SEQUENCED_STEPS:
        done, total = SEQUENCED_STEPS[step]
        return done / total
    moved, left = details.get("transferred"), details.get("remaining")
    if isinstance(moved, int) and isinstance(left, int) and moved + left > 0:
        return moved / (moved + left)
    return None


def bar(fraction: float, width: int = 24) -> str:
    full = max(0, min(width, round(fraction * width)))
    return f"[{'#' * full}{'.' * (width - full)}] {fraction * 100:3.0f}%"


def run(settings: HostSettings, args: argparse.Namespace, out: Output) -> None:
    orch = Orchestrator(settings)
    quiet = bool(args.quiet or args.json)
    cmd = args.command
    if cmd in ("drain", "undrain", "evacuate"):
        from fcq_tasks.cli import fleet
        fleet.run(orch, args, out, quiet)
    elif cmd == "hosts":
        hosts = orch.hosts()
        rows = [{"host": h, "queue": r["queue"], "vms": len(r["vms"]),
                 "running": len(r["running"]), "booked_mb": r["booked_mb"],
                 "limit_mb": r["limit_mb"], "seen_ago": round(time.time() - r["seen"], 1),
                 "drained": r.get("drained")}
                for h, r in hosts.items()]
        lines = [f"{'HOST':<16} {'VMS':>4} {'RUNNING':>8} {'MB BOOKED':>10} {'LIMIT':>8} "
                 f"{'DRAINED':<8} SEEN"]
        lines += [f"{r['host']:<16} {r['vms']:>4} {r['running']:>8} {r['booked_mb']:>10} "
                  f"{r['limit_mb']:>8} {'yes' if r['drained'] else 'no':<8} "
                  f"{r['seen_ago']}s ago" for r in rows]
        out.table(rows, "\n".join(lines) if rows else "no live hosts")
        for name in orch.untrusted:
            say(f"fcq: warning: host {name}: its heartbeat is not signed by the key in its "
                "record (cluster.hosts_dir): ignored", err=True)
    elif cmd == "ls":
        rows = fleet_rows(orch.hosts())
        lines = [f"{'VM':<20} {'STATE':<9} {'KVM_HOST':<12} {'ONLINE':<7} {'MB':>6} "
                 f"{'GEN':>5}  RUNNING ON"]
        lines += [f"{r['vm']:<20} {r['state']:<9} {r['kvm_host'] or '-':<12} "
                  f"{str(r['online']).lower():<7} {r.get('memory_mb') or '-':>6} "
                  f"{_gen(r):>5}  {','.join(r['running_on']) or '-'}" for r in rows]
        if any(r.get("generation_behind") for r in rows):
            lines.append("* runs an older QEMU generation than its host's: fcq upgrade VM")
        out.table(rows, "\n".join(lines))
    elif cmd == "jobs":
        rows = orch.jobs(args.limit)
        lines = [f"{'TASK':<36} {'SENT':<8} {'TOOK':>8} {'OP':<13} {'VM':<16} "
                 f"{'HOST':<10} STATE"]
        lines += [f"{r['id']:<36} {_clock(r.get('submitted')):<8} "
                  f"{_took(r.get('seconds')):>8} {r['op']:<13} {r['vm']:<16} {r['host']:<10} "
                  f"{r['state']}"
                  + (f" ({r['step']})" if r.get("step") else "")
                  + (f": {r['error']}" if r.get("error") else "") for r in rows]
        out.table(rows, "\n".join(lines))
    elif cmd == "wait":
        for task_id in args.ids:
            if not orch.known_task(task_id):
                # Celery calls every id it never heard of PENDING: waiting
                # would last the whole timeout for nothing.
                out.error(BadRequest("TASK_ID", f"no task {task_id!r} is known: not sent by "
                                     "fcq, mistyped, or its record expired "
                                     "(cluster.result_expires)"))
                continue
            follow(orch, task_id, task_id[:8], args, out, quiet)
    elif cmd == "apply-config":
        for name in args.files:
            try:
                jobs = orch.apply_config(Path(name), args.host or None)
            except FcqError as err:
                out.error(err)
                continue
            for host, task_id in jobs.items():
                follow_or_print(orch, task_id, f"{name}@{host}", args, out, quiet)
    elif cmd == "migrate":
        for vm in args.vms:
            try:
                if args.abort:
                    attempt = orch.abort_migration(vm)
                    out.result({"vm": vm, "aborted": attempt},
                               f"{vm}: abort requested for migration {attempt}")
                    continue
                if not args.to:
                    raise BadRequest("--to", "name the destination host")
                task_id = orch.migrate(vm, args.to)
                if not args.no_wait and not quiet:
                    watch_migration(orch, vm)
            except FcqError as err:
                out.error(err, vm)
                continue
            follow_or_print(orch, task_id, vm, args, out, quiet)
    elif cmd == "plan":
        if args.vms:
            plans = [orch.plan(vm, args.host) for vm in args.vms]
        else:
            targets = sorted(orch.hosts()) if args.all else [args.host]
            plans = [orch.plan(None, h) for h in targets]
        rows = []
        for job in plans:
            try:
                rows += orch.wait(job, timeout=args.timeout)["vms"]
            except FcqError as err:
                out.error(err)
        out.table(rows, plan_table(rows))
    elif cmd in ("snapshot", "resize"):
        try:
            if cmd == "resize":
                task_id = orch.resize(args.vm, parse_size_gib(args.size), args.host)
            elif args.list:
                task_id = orch.list_snapshots(args.vm, args.host)
            elif args.remove is not None:
                task_id = orch.remove_snapshot(args.vm, args.remove, args.host)
            else:
                task_id = orch.snapshot(args.vm, args.name, args.host)
        except FcqError as err:
            out.error(err, args.vm)
            return
        follow_or_print(orch, task_id, args.vm, args, out, quiet)
    elif cmd == "upgrade":
        for vm in args.vms:
            try:
                task_id = orch.upgrade(vm, args.host)
            except FcqError as err:
                out.error(err, vm)
                continue
            follow_or_print(orch, task_id, vm, args, out, quiet)
    elif cmd == "ensure" and args.all:
        for host in sorted(orch.hosts()):
            follow_or_print(orch, orch.sweep(host), f"sweep@{host}", args, out, quiet)
    else:
        op = cmd.replace("-", "_")
        for vm in args.vms:
            try:
                task_id = orch.submit(op, vm, args.host)
            except FcqError as err:
                out.error(err, vm)
                continue
            follow_or_print(orch, task_id, vm, args, out, quiet)


def follow_or_print(orch: Orchestrator, task_id: str, label: str, args: argparse.Namespace,
                    out: Output, quiet: bool) -> None:
    if args.no_wait:
        out.result({"task_id": task_id, "label": label}, task_id)
    else:
        follow(orch, task_id, label, args, out, quiet)


def follow(orch: Orchestrator, task_id: str, label: str, args: argparse.Namespace,
           out: Output, quiet: bool) -> None:
    try:
        result = orch.wait(task_id, timeout=args.timeout, on_progress=Progress(label, quiet))
    except FcqError as err:
        out.error(err, label)
        return
    if result.get("operation") == "sweep":
        text = f"{result['host']}: sweep: " + ", ".join(
            f"{vm}={'+'.join(a) if isinstance(a, list) else a}"
            for vm, a in result["vms"].items())
        out.code = max(out.code, int(result.get("exit_code", EXIT_SYSTEM if result.get("failed")
                                                     else 0)))
        out.result(result, text)
    else:
        out.result(result, describe(result))
    for warning in result.get("warnings") or []:
        say(f"fcq: warning: {escaped(str(warning), keep_lines=False)}", err=True)


def watch_migration(orch: Orchestrator, vm: str) -> None:
    """Show the copy's progress (the source half's task state) in the background."""
    import threading

    show = Progress(f"{vm} copy", quiet=False)

    def run() -> None:
        last = None
        while True:
            try:
                state = orch.migration_progress(vm)
            except FcqError:
                return
            if state is None or state[0] in ("SUCCESS", "FAILURE"):
                return
            if state != last and state[0] == "PROGRESS":
                show(*state)
                last = state
            time.sleep(0.5)

    threading.Thread(target=run, daemon=True).start()


def _gen(row: dict[str, Any]) -> str:
    gen = row.get("generation")
    if gen is None:
        return "-"
    return f"{gen}*" if row.get("generation_behind") else str(gen)


def fleet_rows(hosts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per VM: what its config says, and which hosts run it."""
    rows: dict[str, dict[str, Any]] = {}
    for host, rec in hosts.items():
        for vm, conf in rec["vms"].items():
            row = rows.setdefault(vm, {"vm": vm, "kvm_host": None, "online": None,
                                       "running_on": [], "known_on": []})
            row["known_on"].append(host)
            if conf.get("kvm_host") == host or row["kvm_host"] is None:
                row["kvm_host"] = conf.get("kvm_host")
                row["online"] = conf.get("online")
                row["memory_mb"] = conf.get("memory_mb")
        for vm in rec["running"]:
            row = rows.setdefault(vm, {"vm": vm, "kvm_host": None, "online": None,
                                       "running_on": [], "known_on": []})
            row["running_on"].append(host)
            gen = rec.get("generations", {}).get(vm)
            if gen is not None:
                row["generation"] = gen
                row["generation_behind"] = gen < int(rec.get("qemu_generation", 0))
    for row in rows.values():
        running = len(row["running_on"])
        # A QEMU on two hosts: a migration in flight (its incoming copy
        # counts), or something for an operator; never hidden by picking one.
        row["state"] = "running" if running == 1 else "stopped" if not running \
            else f"{running} hosts"
    return [rows[k] for k in sorted(rows)]
