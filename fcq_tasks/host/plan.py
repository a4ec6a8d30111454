"""The planner: desired state × observed state → actions. Pure, no I/O.

Every decision fcq makes about a VM is made here, so it can be tested as a
table (tests/test_plan.py covers every cell). The agent executes the actions
in order and observes again; it never decides on its own.

Safety rules encoded here:

* a VM runs only on the host its config names (``kvm_host``);
* a VM running here while one other host holds *every* one of its locks is
  a stale copy: its locks were broken (on RBD its clients were fenced first)
  and the other host runs the VM now. It is killed, not powered down (a
  clean shutdown would write to disks that are no longer ours), and the
  other host's locks are left alone;
* a VM running here while another host holds only some of its locks is a
  split brain: it is paused (guest code stops) and reported, never resumed
  by fcq;
* a guest that QEMU paused on a failed disk request (RBD drives pause on
  errors) is let retry only while every lock is ours; otherwise its clients
  were fenced and it is killed;
* a VM is started only when no other host holds its locks;
* a QEMU whose monitor stays silent longer than a grace is killed: it cannot
  be managed (a briefly slow monitor on a loaded host is left alone);
* a live process that names the VM's config but is not the QEMU fcq started
  (by pid, start ticks and boot) is never treated as gone: no clean-up, no
  released lock, no second start; an operator decides;
* an incoming QEMU that no migration half owns (the agent only plans while
  it holds the VM's operation lock, which a running half holds throughout)
  is killed, and its locks are never taken on its behalf, unless the source
  handed the locks over: then the source's QEMU is gone for sure and the
  received copy is resumed instead of booting the guest again;
* a source whose locks were handed to another host follows them: its config
  is pointed at the new holder and it never starts the VM itself;
* a takeover this host began (some locks broken from another host, fenced
  first) and that stopped halfway is finished by the next ensure here: the
  rest of that host's locks are fenced and broken, then the VM starts;
* disks grow, never shrink.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from fcq_tasks import units
from fcq_tasks.config.vmspec import VMSpec


class Run(enum.Enum):
    """What we found of the VM's QEMU process on this host."""

    STOPPED = "stopped"            # no process, no run files
    CRASHED = "crashed"            # no process, but run files: it ended without fcq
    RUNNING = "running"
    PAUSED = "paused"              # any other QMP runstate: paused, suspended, ...
    IO_ERROR = "io-error"          # paused by QEMU itself: a disk request failed (werror=stop)
    INMIGRATE = "inmigrate"        # waiting for or receiving an incoming migration
    RECEIVED = "received"          # incoming copy complete, paused, waiting for `cont`
    POSTMIGRATE = "postmigrate"    # source after a completed migration: guest moved away
    UNRESPONSIVE = "unresponsive"  # process alive, QMP does not answer
    IMPOSTOR = "impostor"          # a live process names our config but is not the QEMU we started


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
    RESUME = "resume"              # run a received copy whose locks were handed to us
    CONTINUE = "continue"          # let a guest paused by an I/O error retry (every lock ours)
    CLAIM = "claim"                # take on a VM whose locks were handed to us (config follows)
    FOLLOW = "follow"              # point our config at the host our locks were handed to
    TAKE_OVER = "take-over"        # fence and break the rest of a half-taken-over VM's locks
    REFUSE = "refuse"              # a safety rule forbids the next step: report
    NOTHING = "nothing"


@dataclass(frozen=True)
class Observed:
    run: Run
    lock_owners: dict[str, str | None] = field(default_factory=dict)  # volume → host
    root_bytes: int | None = None
    iops: int | None = None        # current limit of a running VM (0: none)
    bps: int = 0                   # current bandwidth limit, bytes/s (0: none)
    silent_for: float = 0.0        # UNRESPONSIVE: seconds since QMP first failed to answer
    handed_to_us: bool = False     # every lock was handed to this host and not yet claimed
    handed_away_to: str = ""       # every lock was handed by this host to that host
    impostor_pid: int = 0          # IMPOSTOR: the pid
    # This host broke some of the VM's locks from that host (fenced first),
    # which still holds others: a takeover (evacuate, force-unlock) stopped
    # halfway, e.g. its worker died.
    taking_over_from: str = ""
    agent_open: bool = False       # RUNNING: qemu-ga holds its port open in the guest
    # RUNNING: root_bytes, iops, bps and agent_open were asked of QEMU now;
    # False: they are what the last full look found (VMSteps.observe says when).
    fresh: bool = True


@dataclass(frozen=True)
class Action:
    do: Do
    reason: str
    size: int = 0                  # GROW_ROOT: new size in bytes
    iops: int = 0                  # SET_IOPS
    bps: int = 0                   # SET_IOPS
    host: str = ""                 # OUTMIGRATE: destination; REFUSE: lock owner
    refusal: str = ""              # REFUSE: "locked" | "shrink" | "split-brain" | ...
    keep_locks: bool = False       # CLEAN_UP: remove run files only


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
         kill_silent_after: float = 0.0, drained: bool = False,
         held: bool = False) -> list[Action]:
    """The actions that bring VM *spec* on *host* from *observed* to its config.

    *kill_silent_after*: seconds a QEMU's monitor may stay silent before it
    is killed; a loaded host answers slowly, and one slow answer must not
    cost a guest its life. *drained*: the host is in maintenance and starts
    nothing (a VM running here is still kept healthy). *held*: an operator
    holds the VM's locks by hand (``fcq lock``): it is neither started nor
    are its locks released.
    """
    want = wanted(spec, host)
    locks, other = _lock_summary(observed.lock_owners, host)
    run = observed.run

    if run is Run.IMPOSTOR:
        return [Action(Do.REFUSE, f"pid {observed.impostor_pid} names this VM's config but is "
                       "not the QEMU fcq started: left alone, locks kept", refusal="impostor")]

    if run is Run.UNRESPONSIVE:
        if observed.silent_for < kill_silent_after:
            return [Action(Do.NOTHING, f"monitor silent for {observed.silent_for:.0f} s; "
                           f"killed after {kill_silent_after:.0f} s")]
        # Kill, then plan as if stopped: an unmanageable QEMU helps nobody.
        rest = plan(spec, dataclasses.replace(observed, run=Run.CRASHED, silent_for=0.0),
                    host, drained=drained, held=held)
        return [Action(Do.KILL, "QEMU process alive but its monitor does not answer"), *rest]

    if observed.handed_to_us:
        return _plan_handed_to_us(spec, observed, host, kill_silent_after)

    if run in (Run.INMIGRATE, Run.RECEIVED):
        # We plan only while holding the operation lock, which a running
        # inmigrate half holds throughout: nobody receives this copy.
        return [Action(Do.KILL, "incoming QEMU that no migration owns"),
                Action(Do.CLEAN_UP, "remove its run files; it never held locks")]

    if observed.handed_away_to and spec.kvm_host == host and \
            run in (Run.STOPPED, Run.CRASHED, Run.POSTMIGRATE):
        moved = [Action(Do.KILL, "migrated away: source copy left over")] \
            if run is Run.POSTMIGRATE else []
        if run is not Run.STOPPED:
            moved.append(Action(Do.CLEAN_UP, "remove run files", keep_locks=True))
        return [*moved, Action(Do.FOLLOW, f"locks were handed to {observed.handed_away_to}: "
                              "the VM lives there now", host=observed.handed_away_to)]

    if observed.taking_over_from and want == "here" and not held and not drained and \
            run in (Run.STOPPED, Run.CRASHED):
        # Some locks were broken from that host already, its writers fenced
        # on them: its guest lost those disks for good. Finishing is the
        # only way the VM runs again; undoing cannot unfence.
        old = observed.taking_over_from
        files = [Action(Do.CLEAN_UP, "ended without fcq: remove run files", keep_locks=True)
                 ] if run is Run.CRASHED else []
        # Refused before anything is fenced, broken or started.
        refusal = _shrink_refusal(spec, observed)
        if refusal:
            return [*files, *refusal]
        return [*files,
                Action(Do.TAKE_OVER, f"a takeover from {old} broke some of its locks and "
                       "stopped halfway: fence and break the rest", host=old),
                Action(Do.START, "online here, every lock now free")]

    if run in (Run.STOPPED, Run.CRASHED):
        if held:
            files = [Action(Do.CLEAN_UP, "ended without fcq: remove run files", keep_locks=True)
                     ] if run is Run.CRASHED else []
            return [*files, Action(Do.NOTHING, "locks held by hand (fcq lock): not started, "
                                   "locks kept (fcq unlock)")]
        acts: list[Action] = []
        if run is Run.CRASHED or locks in ("ours", "partial"):
            acts.append(Action(Do.CLEAN_UP, "not running: remove run files, release our locks"
                               if want != "here" else "ended without fcq: remove run files"))
        if want != "here":
            return acts or [Action(Do.NOTHING, f"{want} and not running here")]
        if locks == "other":
            return [*acts, Action(Do.REFUSE, f"locks held by host {other}: not starting",
                                  host=other, refusal="locked")]
        if drained:
            return [*acts, Action(Do.NOTHING, "online here, but this host is drained for "
                                  "maintenance: not started (fcq undrain)")]
        # A refusal is decided before anything starts: a start the CLI
        # reports as refused must not leave a QEMU running.
        refusal = _shrink_refusal(spec, observed)
        if refusal:
            return [*acts, *refusal]
        acts.append(Action(Do.START, "online here but not running"))
        return acts

    if run is Run.POSTMIGRATE:
        # The guest runs elsewhere now; this copy must never be resumed.
        return [Action(Do.KILL, "migrated away: source copy left over"),
                Action(Do.CLEAN_UP, "release what the source still holds")]

    if run is Run.IO_ERROR:
        # QEMU paused the guest on a failed disk request. With every lock
        # ours, the failure was the storage's (a full pool, a blip): QEMU
        # retries the request on `cont`. Without them, our clients were
        # fenced and another host may run the VM: this copy goes.
        if locks == "ours":
            return [Action(Do.CONTINUE, "paused by a failed disk request while every lock "
                           "is ours: let QEMU retry it")]
        return [Action(Do.KILL, "paused by a failed disk request and its locks are not all "
                       "ours: its clients were fenced", host=other),
                Action(Do.CLEAN_UP, "remove run files, release what is still ours")]

    # RUNNING or PAUSED
    if locks == "other" and all(o == other for o in observed.lock_owners.values()):
        return [Action(Do.KILL, f"stale copy: host {other} holds every lock (ours were "
                       "broken)", host=other),
                Action(Do.CLEAN_UP, "remove run files; the locks are not ours",
                       keep_locks=True)]
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
        acts.append(Action(Do.GROW_ROOT, f"root {units.size(observed.root_bytes)} < "
                           f"{units.size(spec.disk_bytes)}", size=spec.disk_bytes))
    acts.extend(_shrink_refusal(spec, observed))
    want_limits = (spec.iops or 0, spec.bps or 0)
    if observed.iops is not None and (observed.iops, observed.bps) != want_limits:
        acts.append(Action(Do.SET_IOPS, f"limits iops {observed.iops}, bps {observed.bps} → "
                           f"iops {want_limits[0]}, bps {want_limits[1]}",
                           iops=want_limits[0], bps=want_limits[1]))
    return acts or [Action(Do.NOTHING, "running as configured")]


def _plan_handed_to_us(spec: VMSpec, observed: Observed, host: str,
                       kill_silent_after: float) -> list[Action]:
    """The source handed every lock to this host (its QEMU was gone first): the VM is ours."""
    run = observed.run
    if run is Run.RECEIVED:
        return [Action(Do.RESUME, "locks handed over: resume the received copy")]
    if run is Run.INMIGRATE:
        return [Action(Do.NOTHING, "locks handed over; the copy is still loading")]
    claim = Action(Do.CLAIM, "locks handed over: this host runs the VM now", host=host)
    if run in (Run.RUNNING, Run.PAUSED):
        return [claim]
    # STOPPED or CRASHED: the received copy is gone; boot the guest here.
    own = dataclasses.replace(spec, kvm_host=host)
    rest = plan(own, dataclasses.replace(observed, handed_to_us=False), host, kill_silent_after)
    return [claim, *[dataclasses.replace(a, keep_locks=True) if a.do is Do.CLEAN_UP else a
                     for a in rest]]


def _shrink_refusal(spec: VMSpec, observed: Observed) -> list[Action]:
    if observed.root_bytes is not None and observed.root_bytes > spec.disk_bytes:
        return [Action(Do.REFUSE, f"root is {units.size(observed.root_bytes)}, config asks "
                       f"{units.size(spec.disk_bytes)}: disks never shrink", refusal="shrink")]
    return []
