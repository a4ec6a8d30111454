"""The planner: desired state × observed state → actions. Pure, no I/O.

Every decision fcq makes about a VM is made here, so it can be tested as a
table (tests/test_plan.py covers every cell). The agent executes the actions
in order and observes again; it never decides on its own.

Safety rules encoded here:

* a VM runs only on the host its config names (``kvm_host``);
* a VM running here while another host holds one of its locks is a split
  brain: it is paused (guest code stops) and reported, never resumed by fcq;
* a VM is started only when no other host holds its locks;
* a QEMU whose monitor stays silent longer than a grace is killed: it cannot
  be managed (a briefly slow monitor on a loaded host is left alone);
* disks grow, never shrink.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fcq_tasks.config.vmspec import VMSpec


class Run(enum.Enum):
    """What we found of the VM's QEMU process on this host."""

    STOPPED = "stopped"            # no process, no run files
    CRASHED = "crashed"            # no process, but run files: it ended without fcq
    RUNNING = "running"
    PAUSED = "paused"              # any other QMP runstate: paused, suspended, ...
    INMIGRATE = "inmigrate"        # waiting for an incoming migration
    POSTMIGRATE = "postmigrate"    # source after a completed migration: guest moved away
    UNRESPONSIVE = "unresponsive"  # process alive, QMP does not answer


class Do(enum.Enum):
    START = "start"
    STOP = "stop"
    KILL = "kill"
    PAUSE = "pause"
    CLEAN_UP = "clean-up"          # remove run files, release this host's locks
    TAKE_LOCKS = "take-locks"      # a running VM here whose locks are free
    GROW_ROOT = "grow-root"
    SET_IOPS = "set-iops"
    OUTMIGRATE = "outmigrate"      # config moved the VM to another host
    REFUSE = "refuse"              # a safety rule forbids the next step: report
    NOTHING = "nothing"


@dataclass(frozen=True)
class Observed:
    run: Run
    lock_owners: dict[str, str | None] = field(default_factory=dict)  # volume → host
    root_bytes: int | None = None
    iops: int | None = None        # current limit of a running VM (0: none)
    silent_for: float = 0.0        # UNRESPONSIVE: seconds since QMP first failed to answer


@dataclass(frozen=True)
class Action:
    do: Do
    reason: str
    size: int = 0                  # GROW_ROOT: new size in bytes
    iops: int = 0                  # SET_IOPS
    host: str = ""                 # OUTMIGRATE: destination; REFUSE: lock owner
    refusal: str = ""              # REFUSE: "locked" | "shrink" | "split-brain" | ...


def wanted(spec: VMSpec, host: str) -> str:
    """One word for what the config asks of this host, for logs and tables."""
    if not spec.online:
        return "offline"
    if spec.kvm_host is None:
        return "unplaced"
    return "here" if spec.kvm_host == host else "elsewhere"


def _lock_summary(owners: dict[str, str | None], host: str) -> tuple[str, str]:
    """("free" | "ours" | "partial" | "other", other host name)."""
    others = sorted({o for o in owners.values() if o is not None and o != host})
    if others:
        return "other", others[0]
    held = [o for o in owners.values() if o == host]
    if not held:
        return "free", ""
    return ("ours" if len(held) == len(owners) else "partial"), ""


def plan(spec: VMSpec, observed: Observed, host: str,
         kill_silent_after: float = 0.0) -> list[Action]:
    """The actions that bring VM *spec* on *host* from *observed* to its config.

    *kill_silent_after*: seconds a QEMU's monitor may stay silent before it
    is killed; a loaded host answers slowly, and one slow answer must not
    cost a guest its life.
    """
    want = wanted(spec, host)
    locks, other = _lock_summary(observed.lock_owners, host)
    run = observed.run

    if run is Run.UNRESPONSIVE:
        if observed.silent_for < kill_silent_after:
            return [Action(Do.NOTHING, f"monitor silent for {observed.silent_for:.0f} s; "
                           f"killed after {kill_silent_after:.0f} s")]
        # Kill, then plan as if stopped: an unmanageable QEMU helps nobody.
        rest = plan(spec, Observed(Run.CRASHED, observed.lock_owners, observed.root_bytes),
                    host)
        return [Action(Do.KILL, "QEMU process alive but its monitor does not answer"), *rest]

    if run in (Run.STOPPED, Run.CRASHED):
        acts: list[Action] = []
        if run is Run.CRASHED or locks in ("ours", "partial"):
            acts.append(Action(Do.CLEAN_UP, "not running: remove run files, release our locks"
                               if want != "here" else "ended without fcq: remove run files"))
        if want != "here":
            return acts or [Action(Do.NOTHING, f"{want} and not running here")]
        if locks == "other":
            return [*acts, Action(Do.REFUSE, f"locks held by host {other}: not starting",
                                  host=other, refusal="locked")]
        acts.append(Action(Do.START, "online here but not running"))
        acts.extend(_shrink_refusal(spec, observed))
        return acts

    if run is Run.INMIGRATE:
        if want == "offline":
            return [Action(Do.KILL, "incoming VM but config says offline"), Action(Do.CLEAN_UP, "")]
        return [Action(Do.NOTHING, "waiting for an incoming migration")]

    if run is Run.POSTMIGRATE:
        # The guest runs elsewhere now; this copy must never be resumed.
        return [Action(Do.KILL, "migrated away: source copy left over"),
                Action(Do.CLEAN_UP, "release what the source still holds")]

    # RUNNING or PAUSED
    if want == "offline":
        return [Action(Do.STOP, "config says offline"), Action(Do.CLEAN_UP, "release locks")]
    if locks == "other":
        if run is Run.PAUSED:
            return [Action(Do.REFUSE, f"paused; host {other} holds its locks", host=other,
                           refusal="split-brain")]
        return [Action(Do.PAUSE, f"running here while host {other} holds its locks"),
                Action(Do.REFUSE, f"split brain with host {other}: paused, operator needed",
                       host=other, refusal="split-brain")]
    if want == "elsewhere":
        assert spec.kvm_host is not None
        return [Action(Do.OUTMIGRATE, f"config moved it to {spec.kvm_host}",
                       host=spec.kvm_host)]
    acts = []
    if locks in ("free", "partial"):
        acts.append(Action(Do.TAKE_LOCKS, f"running here with {locks} locks"))
    if want == "unplaced":
        return acts or [Action(Do.NOTHING, "online without kvm_host: left as it is")]
    if run is Run.PAUSED:
        return acts or [Action(Do.NOTHING, "paused: left for the operator")]
    if observed.root_bytes is not None and observed.root_bytes < spec.disk_bytes:
        acts.append(Action(Do.GROW_ROOT, f"root {observed.root_bytes} < {spec.disk_bytes} bytes",
                           size=spec.disk_bytes))
    acts.extend(_shrink_refusal(spec, observed))
    if observed.iops is not None and observed.iops != spec.iops:
        acts.append(Action(Do.SET_IOPS, f"iops {observed.iops} → {spec.iops}", iops=spec.iops))
    return acts or [Action(Do.NOTHING, "running as configured")]


def _shrink_refusal(spec: VMSpec, observed: Observed) -> list[Action]:
    if observed.root_bytes is not None and observed.root_bytes > spec.disk_bytes:
        return [Action(Do.REFUSE, f"root is {observed.root_bytes} bytes, config asks "
                       f"{spec.disk_bytes}: disks never shrink", refusal="shrink")]
    return []
