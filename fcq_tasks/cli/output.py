"""How the fcq command prints: results on stdout (text or JSON), errors on stderr.

Printing never fails a finished job: a closed or broken stdout costs the
output, not the exit code of the work that was done.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Any

from fcq_tasks.errors import ConfigErrors, FcqError

EXIT_OK, EXIT_SYSTEM, EXIT_INPUT = 0, 1, 2


#: Control characters (C0, DEL, C1) but line feed and tab: what a terminal
#: would obey (ANSI escapes, carriage returns) instead of showing.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escaped(text: str, keep_lines: bool = True) -> str:
    """*text* with control characters shown as escapes, never obeyed by the terminal.

    Some of what fcq prints comes from outside (a guest agent's error, a
    value read from Redis): it must not move the cursor, recolour the
    screen or, in an error message (*keep_lines* false), forge a line.
    """
    pattern = CONTROL if keep_lines else CONTROL_OR_NEWLINE
    return pattern.sub(lambda m: repr(m.group())[1:-1], text)


def say(text: str, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        print(escaped(text), file=stream, flush=True)


class Output:
    """Collects results and errors; the worst exit code wins."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.code = EXIT_OK
        self.records: list[dict[str, Any]] = []

    def result(self, record: dict[str, Any], text: str) -> None:
        self.records.append(record)
        if not self.as_json:
            say(text)

    def table(self, rows: list[dict[str, Any]], text: str) -> None:
        self.records.extend(rows)
        if not self.as_json:
            say(text)

    def error(self, err: FcqError, vm: str | None = None) -> None:
        if isinstance(err, ConfigErrors):  # every mistake on a line of its own
            for one in err.errors:
                self.error(one, vm)
            return
        self.code = max(self.code, err.exit_code)
        record = {"vm": vm, **err.to_dict()} if vm else err.to_dict()
        self.records.append(record)
        if not self.as_json:
            say(f"fcq: error: {escaped(err.message, keep_lines=False)}", err=True)

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
    if result.get("operation") == "migrate":
        return (f"{result['vm']}: migrated {result.get('from')} -> {result.get('to')} in "
                f"{result.get('total_ms')} ms, downtime {result.get('downtime_ms')} ms, "
                f"handover {result.get('handover_ms')} ms; now {result.get('status')}")
    op = result.get("operation")
    if op == "lock":
        return (f"{result['vm']}: locks held by hand on {result['host']} "
                f"({', '.join(result['volumes'])}); nothing starts it until fcq unlock")
    if op == "unlock":
        text = (f"{result['vm']}: released {', '.join(result['released'])}"
                if result["released"] else f"{result['vm']}: held no locks here"
                + (" (the hand mark is lifted)" if result["outcome"] == "released" else ""))
        return text + (f"; {result['note']}" if result.get("note") else "")
    if op == "snapshot":
        if result.get("outcome") == "exists":
            return f"{result['vm']}: snapshot {result['snapshot']}: exists already, nothing done"
        how = (f"frozen for {result.get('frozen_ms')} ms" if result.get("frozen")
               else f"not frozen: {result.get('reason') or result.get('consistency')}")
        return (f"{result['vm']}: snapshot {result['snapshot']} of "
                f"{', '.join(result['volumes'])} taken ({result.get('consistency')}-consistent, "
                f"{how})")
    if op == "snapshots":
        snaps = result.get("snapshots") or []
        lines = [f"{'SNAPSHOT':<32} {'CREATED (UTC)':<20} VOLUMES"]
        lines += [f"{r['name']:<32} {_utc(r['created']):<20} "
                  + ", ".join(f"{v} {b / 2**30:.1f} GiB" for v, b in r["volumes"].items())
                  for r in snaps]
        return "\n".join(lines) if snaps else f"{result['vm']}: no snapshots"
    if op == "remove-snapshot":
        return (f"{result['vm']}: snapshot {result['snapshot']}: "
                + ("removed" if result.get("volumes") else "none of that name, nothing done"))
    if op == "resize":
        if not result.get("actions"):
            return f"{result['vm']}: root is {result['disk']} GiB already, nothing done"
        return (f"{result['vm']}: root grown to {result['disk']} GiB "
                f"({', '.join(result['actions'])}); config version {result.get('version')}")
    if op == "upgrade":
        if not result.get("actions"):
            return (f"{result['vm']}: runs generation {result.get('generation')} already, "
                    "nothing done")
        return (f"{result['vm']}: moved from generation {result.get('from_generation')} to "
                f"{result.get('generation')} without a reboot (pid {result.get('old_pid')} -> "
                f"{result.get('pid')}, paused {result.get('downtime_ms')} ms)")
    if result.get("outcome") == "ignored":
        return f"{result['vm']}: {result.get('operation')}: ignored: {result.get('reason')}"
    actions = ", ".join(result.get("actions") or []) or "nothing to do"
    where = f"@{result['host']}" if result.get("host") else ""
    reason = f" ({result['reason']})" if result.get("reason") else ""
    return (f"{result['vm']}{where}: {result.get('operation')}: found {result.get('found')}, "
            f"did {actions}; now {result.get('status')}{reason}")


def plan_table(rows: list[dict[str, Any]]) -> str:
    """``fcq plan``: per VM, what it wants, what was found, and each action with its reason."""
    lines = []
    for r in rows:
        where = f"{r['vm']}@{r['host']}"
        if r.get("error"):
            lines.append(f"{where}: cannot plan: {r['error']}")
            continue
        busy = " (an operation is in flight: this may change)" if r.get("busy") else ""
        lines.append(f"{where}: wanted {r['wanted']}, found {r['found']}{busy}")
        lines += [f"  {a['do']}: {a['reason']}" for a in r["actions"]]
    return "\n".join(lines) if lines else "no VMs"


def _utc(epoch: float) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_size_gib(text: str) -> int:
    """``20``, ``20G`` or ``20GiB`` → 20; anything else (``20GB``: decimal?) is a BadRequest."""
    import re

    from fcq_tasks.errors import BadRequest
    match = re.fullmatch(r"([0-9]{1,6})(G|GiB)?", text.strip())
    if match is None or int(match.group(1)) < 1:
        raise BadRequest("SIZE", f"must be a whole number of GiB, like 20, 20G or 20GiB "
                         f"(got {text!r})")
    return int(match.group(1))


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
    if row.get("generation") is not None:
        old = " (older than the host's: fcq upgrade)" if row.get("generation_behind") else ""
        lines.append(f"  QEMU generation {row['generation']}{old}")
    if "guest_agent" in row:
        lines.append(f"  guest agent: {'answers' if row['guest_agent'] else 'silent'}")
    return "\n".join(lines)


def ls_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'VM':<20} {'STATUS':<13} {'CONFIG':<10} {'PID':>8} {'MB':>6} {'GEN':>4}  LOCKS"
    lines = [header]
    for r in rows:
        holders = ",".join(sorted({o for o in (r.get("locks") or {}).values() if o})) or "-"
        lines.append(f"{r['vm']:<20} {r['status']:<13} {r.get('wanted') or '?':<10} "
                     f"{r.get('pid') or '-':>8} {r.get('memory_mb') or '-':>6} "
                     f"{_generation(r):>4}  {holders}")
    return "\n".join(lines)


def _generation(row: dict[str, Any]) -> str:
    """The running QEMU's generation; ``3*``: older than the host's current one."""
    gen = row.get("generation")
    if gen is None:
        return "-"
    return f"{gen}*" if row.get("generation_behind") else str(gen)
