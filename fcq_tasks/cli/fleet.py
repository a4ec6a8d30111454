"""`fcq drain`, `fcq undrain` and `fcq evacuate`: emptying a host, as an operator sees it."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any

from fcq_tasks.cli.output import Output, say
from fcq_tasks.cli.remote import bar, fraction_done
from fcq_tasks.cluster import drain as fleet
from fcq_tasks.cluster.api import Orchestrator


def placement_table(moves: list[fleet.Move], verb: str) -> str:
    if not moves:
        return "nothing to move: no VM runs there"
    lines = [f"{'VM':<20} {'MB':>6}  {verb.upper():<12} REASON"]
    lines += [f"{m.vm:<20} {m.memory_mb:>6}  {m.dst or '-':<12} {m.reason or ''}"
              for m in moves]
    return "\n".join(lines)


class DrainView:
    """A drain's or evacuation's progress on stderr.

    Every finished VM is a line of its own. On a terminal one more line,
    rewritten in place, shows the whole (VMs done of planned) and each copy
    in flight; piped, copies in flight are reported every few seconds.
    """

    def __init__(self, quiet: bool) -> None:
        self.planned = 0
        self.done = 0
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.copies: dict[str, float] = {}
        self._last_plain: dict[str, float] = {}
        self._open = False
        self.tty = sys.stderr is not None and sys.stderr.isatty()

    def __call__(self, vm: str, event: str, details: dict[str, Any]) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if event == "copying":
            fraction = fraction_done("copying", details)
            if fraction is None:
                return
            self.copies[vm] = fraction
            if self.tty:
                self._status()
            elif now - self._last_plain.get(vm, 0.0) >= 5:
                self._last_plain[vm] = now
                self._line(f"  {vm} -> {details.get('to')}: copying {fraction * 100:.0f}%")
            return
        if event == "planned" and details.get("to"):
            self.planned += 1
        if event in ("moved", "evacuated", "failed", "not-started", "in-flight"):
            self.copies.pop(vm, None)
            self.done += 1
        extra = "".join(f" {k}={v}" for k, v in details.items()
                        if v not in (None, "") and k != "to")
        to = f" -> {details['to']}" if details.get("to") else ""
        self._line(f"  {vm}{to}: {event}{extra}  [{now - self.t0:.1f}s]")
        if self.tty:
            self._status()

    def _line(self, text: str) -> None:
        if self._open:
            sys.stderr.write("\r\x1b[K")
            self._open = False
        say(text, err=True)

    def _status(self) -> None:
        copies = ", ".join(f"{vm} {f * 100:.0f}%" for vm, f in sorted(self.copies.items()))
        text = f"  {bar(self.done / max(self.planned, 1))} {self.done}/{self.planned} VMs" + (
            f"; copying {copies}" if copies else "")
        width = shutil.get_terminal_size((100, 20)).columns - 1
        sys.stderr.write("\r\x1b[K" + text[:width])
        sys.stderr.flush()
        self._open = True

    def close(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False


def run(orch: Orchestrator, args: argparse.Namespace, out: Output, quiet: bool) -> None:
    cmd, host = args.command, args.host_name
    if cmd == "undrain":
        result = fleet.set_drained(orch, host, False)
        out.result(result, f"{host}: back in service" if result["changed"]
                   else f"{host}: was not drained, nothing done")
        return
    if args.dry_run:
        moves = fleet.drain_plan(orch, host) if cmd == "drain" else \
            fleet.evacuate_plan(orch, host)
        out.table([m.row() for m in moves], placement_table(moves, "to"))
        return
    show = DrainView(quiet)
    try:
        summary = (fleet.drain(orch, host, show, timeout=args.timeout) if cmd == "drain"
                   else fleet.evacuate(orch, host, show, timeout=args.timeout,
                                       force=args.force))
    finally:
        show.close()
    if cmd == "drain":
        left = summary["still_running"]
        state = "drained" if summary.get("drained") else "NOT drained any more"
        text = (f"{host}: {state}; {summary['moved']} VM(s) moved, "
                f"{summary['not_moved']} not moved"
                + (f"; still running there: {', '.join(left)}" if left else "; empty"))
    else:
        text = (f"{host}: {summary['evacuated']} VM(s) started elsewhere after fencing, "
                f"{summary['not_evacuated']} not" if summary["vms"] else
                f"{host}: no live host's config puts an online VM on it: nothing to evacuate "
                f"(a VM whose config only {host} has is not seen from here)")
    lines = [text] + [f"  {r['vm']}: {r['outcome']}" + (f" -> {r['to']}" if r["to"] else "")
                      + (f" ({r['reason']})" if r["reason"] else "") for r in summary["vms"]]
    out.result(summary, "\n".join(lines))
    out.code = max([out.code, *(int(r["exit_code"]) for r in summary["vms"])])
    if summary.get("still_running"):
        out.code = max(out.code, 4)  # not empty: something arrived or stayed
