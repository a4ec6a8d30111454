"""`fcq drain`, `fcq undrain` and `fcq evacuate`: emptying a host, as an operator sees it."""

from __future__ import annotations

import argparse
import time
from typing import Any

from fcq_tasks.cli.output import EXIT_SYSTEM, Output, say
from fcq_tasks.cluster import drain as fleet
from fcq_tasks.cluster.api import Orchestrator

#: Exit code when a host could not be emptied because a VM had nowhere to go
#: (a placement rule, like a refusal): the same as a refused request.
EXIT_NOT_EMPTIED = 4


def placement_table(moves: list[fleet.Move], verb: str) -> str:
    if not moves:
        return "nothing to move: no VM runs there"
    lines = [f"{'VM':<20} {'MB':>6}  {verb.upper():<12} REASON"]
    lines += [f"{m.vm:<20} {m.memory_mb:>6}  {m.dst or '-':<12} {m.reason or ''}"
              for m in moves]
    return "\n".join(lines)


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
    t0 = time.monotonic()

    def show(vm: str, event: str, details: dict[str, Any]) -> None:
        if quiet:
            return
        extra = "".join(f" {k}={v}" for k, v in details.items()
                        if v not in (None, "") and k != "to")
        to = f" -> {details['to']}" if details.get("to") else ""
        say(f"  {vm}{to}: {event}{extra}  [{time.monotonic() - t0:.1f}s]", err=True)

    if cmd == "drain":
        summary = fleet.drain(orch, host, show, timeout=args.timeout)
        left = summary["still_running"]
        text = (f"{host}: drained; {summary['moved']} VM(s) moved, {summary['not_moved']} not moved"
                + (f"; still running there: {', '.join(left)}" if left else "; empty"))
    else:
        summary = fleet.evacuate(orch, host, show, timeout=args.timeout)
        text = (f"{host}: {summary['evacuated']} VM(s) started elsewhere after fencing, "
                f"{summary['not_evacuated']} not")
    lines = [text] + [f"  {r['vm']}: {r['outcome']}" + (f" -> {r['to']}" if r["to"] else "")
                      + (f" ({r['reason']})" if r["reason"] else "") for r in summary["vms"]]
    out.result(summary, "\n".join(lines))
    outcomes = {r["outcome"] for r in summary["vms"]}
    if "failed" in outcomes:
        out.code = max(out.code, EXIT_SYSTEM)
    if "unplaced" in outcomes:
        out.code = max(out.code, EXIT_NOT_EMPTIED)
