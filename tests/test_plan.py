"""The planner as a table: every (wanted, found, locks) cell has one expected plan."""

from __future__ import annotations

import dataclasses

import pytest

from fcq_tasks.config.vmspec import GiB, VMSpec
from fcq_tasks.host.plan import Do, Observed, Run, plan

HOST = "alpha"
BASE = VMSpec(name="vm01", id=1, resource_group="test", online=True, kvm_host=HOST,
              disk_gib=5, memory_mb=256, cores=1, nics=())

WANTED = {
    "offline": dataclasses.replace(BASE, online=False),
    "unplaced": dataclasses.replace(BASE, kvm_host=None),
    "elsewhere": dataclasses.replace(BASE, kvm_host="beta"),
    "here": BASE,
}
LOCKS: dict[str, dict[str, str | None]] = {
    "free": {"root": None, "swap": None, "tmp": None},
    "ours": {"root": HOST, "swap": HOST, "tmp": HOST},
    "partial": {"root": HOST, "swap": None, "tmp": None},
    "other": {"root": "beta", "swap": "beta", "tmp": "beta"},
    "mixed": {"root": "beta", "swap": HOST, "tmp": HOST},
}
K, CU, ST, SP, PA, TL = Do.KILL, Do.CLEAN_UP, Do.START, Do.STOP, Do.PAUSE, Do.TAKE_LOCKS
N, R, OUT = Do.NOTHING, Do.REFUSE, Do.OUTMIGRATE

# (wanted, found, locks) -> actions, for a root volume of the configured size.
TABLE: dict[tuple[str, Run, str], list[Do]] = {}
for w in WANTED:
    for locks in LOCKS:
        # Not running here.
        held = locks in ("ours", "partial")
        for run in (Run.STOPPED, Run.CRASHED):
            acts = [CU] if run is Run.CRASHED or held else []
            if w != "here":
                acts = acts or [N]
            elif locks in ("other", "mixed"):
                acts = [*acts, R]
            else:
                acts = [*acts, ST]
            TABLE[(w, run, locks)] = acts
        # A QEMU without a monitor is killed, then planned as crashed.
        TABLE[(w, Run.UNRESPONSIVE, locks)] = [K, *TABLE[(w, Run.CRASHED, locks)]]
        # Migration states. The planner runs only under the VM's operation
        # lock, which a live inmigrate half holds: an incoming copy found
        # here belongs to no half and goes, whatever the locks say.
        TABLE[(w, Run.INMIGRATE, locks)] = [K, CU]
        TABLE[(w, Run.RECEIVED, locks)] = [K, CU]
        TABLE[(w, Run.POSTMIGRATE, locks)] = [K, CU]
        # Not the QEMU we started: never signalled, never cleaned up.
        TABLE[(w, Run.IMPOSTOR, locks)] = [R]
        # QEMU paused the guest on a failed disk request: a retry only while
        # every lock is ours; else its clients were fenced, whatever the
        # config wants.
        TABLE[(w, Run.IO_ERROR, locks)] = [Do.CONTINUE] if locks == "ours" else [K, CU]
        # Running or paused here.
        for run in (Run.RUNNING, Run.PAUSED):
            if locks == "other":
                # Every lock is beta's: ours were broken, the copy here is
                # stale, whatever the config wants.
                acts = [K, CU]
            elif w == "offline":
                acts = [SP, CU]
            elif locks == "mixed":
                acts = [R] if run is Run.PAUSED else [PA, R]
            elif w == "elsewhere":
                acts = [OUT]
            else:
                take = [TL] if locks in ("free", "partial") else []
                acts = take or [N]
            TABLE[(w, run, locks)] = acts


@pytest.mark.parametrize(("w", "run", "locks"), sorted(TABLE, key=str))
def test_plan_table(w: str, run: Run, locks: str) -> None:
    """Each cell of wanted × found × locks gives exactly the expected actions."""
    observed = Observed(run, LOCKS[locks], root_bytes=BASE.disk_bytes, iops=0, silent_for=60)
    got = [a.do for a in plan(WANTED[w], observed, HOST, kill_silent_after=30)]
    assert got == TABLE[(w, run, locks)]


def test_table_covers_every_cell() -> None:
    """No combination of wanted, run state and lock state is left out of the table."""
    assert len(TABLE) == len(WANTED) * len(Run) * len(LOCKS)


def test_running_here_grows_root_and_never_shrinks() -> None:
    """A smaller root grows to the config; a larger one is refused as a shrink."""
    small = plan(BASE, Observed(Run.RUNNING, LOCKS["ours"], 2 * GiB, 0), HOST)
    assert [(a.do, a.size) for a in small] == [(Do.GROW_ROOT, 5 * GiB)]
    big = plan(BASE, Observed(Run.RUNNING, LOCKS["ours"], 8 * GiB, 0), HOST)
    assert [(a.do, a.refusal) for a in big] == [(Do.REFUSE, "shrink")]


def test_stopped_with_larger_root_is_refused_before_starting() -> None:
    """A config asking for a smaller disk than the VM has is refused, and nothing
    starts: a start reported as refused must not leave a QEMU running."""
    acts = plan(BASE, Observed(Run.STOPPED, LOCKS["free"], 8 * GiB), HOST)
    assert [(a.do, a.refusal) for a in acts] == [(Do.REFUSE, "shrink")]
    crashed = plan(BASE, Observed(Run.CRASHED, LOCKS["ours"], 8 * GiB), HOST)
    assert [a.do for a in crashed] == [Do.CLEAN_UP, Do.REFUSE]


def test_iops_converge() -> None:
    """A running VM whose throttle differs from the config gets the config's limit."""
    spec = dataclasses.replace(BASE, iops=500)
    acts = plan(spec, Observed(Run.RUNNING, LOCKS["ours"], BASE.disk_bytes, 0), HOST)
    assert [(a.do, a.iops) for a in acts] == [(Do.SET_IOPS, 500)]


def test_refusals_name_the_other_host() -> None:
    """A start refused for a foreign lock and a split brain both say which host holds it."""
    locked = plan(BASE, Observed(Run.STOPPED, LOCKS["other"]), HOST)
    assert (locked[-1].refusal, locked[-1].host) == ("locked", "beta")
    split = plan(BASE, Observed(Run.RUNNING, LOCKS["mixed"], BASE.disk_bytes, 0), HOST)
    assert (split[-1].refusal, split[-1].host) == ("split-brain", "beta")


def test_outmigrate_names_destination() -> None:
    """Config moving a running VM elsewhere yields an outmigration to that host."""
    acts = plan(WANTED["elsewhere"], Observed(Run.RUNNING, LOCKS["ours"], BASE.disk_bytes, 0),
                HOST)
    assert acts[0].host == "beta"


def test_briefly_silent_monitor_is_left_alone() -> None:
    """A monitor silent for less than the grace is reported, not killed."""
    acts = plan(BASE, Observed(Run.UNRESPONSIVE, LOCKS["ours"], silent_for=10), HOST,
                kill_silent_after=120)
    assert [a.do for a in acts] == [Do.NOTHING]
    assert "silent for 10 s" in acts[0].reason


# Rows written out literally, so a bug shared by the table builder above and
# the planner cannot pass: (wanted, found, locks) -> actions.
LITERAL_ROWS = [
    ("here", Run.STOPPED, "free", [Do.START]),
    ("here", Run.CRASHED, "ours", [Do.CLEAN_UP, Do.START]),
    ("here", Run.STOPPED, "other", [Do.REFUSE]),
    ("here", Run.RUNNING, "other", [Do.KILL, Do.CLEAN_UP]),
    ("offline", Run.RUNNING, "other", [Do.KILL, Do.CLEAN_UP]),
    ("here", Run.RUNNING, "mixed", [Do.PAUSE, Do.REFUSE]),
    ("here", Run.RECEIVED, "free", [Do.KILL, Do.CLEAN_UP]),
    ("here", Run.IMPOSTOR, "ours", [Do.REFUSE]),
    ("elsewhere", Run.RUNNING, "ours", [Do.OUTMIGRATE]),
    ("offline", Run.RUNNING, "ours", [Do.STOP, Do.CLEAN_UP]),
    ("here", Run.POSTMIGRATE, "ours", [Do.KILL, Do.CLEAN_UP]),
]


@pytest.mark.parametrize(("w", "run", "locks", "expected"), LITERAL_ROWS)
def test_literal_rows(w: str, run: Run, locks: str, expected: list[Do]) -> None:
    """Key cells, spelled out by hand."""
    observed = Observed(run, LOCKS[locks], root_bytes=BASE.disk_bytes, iops=0, silent_for=60)
    assert [a.do for a in plan(WANTED[w], observed, HOST, kill_silent_after=30)] == expected


def handed_to_us(run: Run) -> Observed:
    return Observed(run, LOCKS["ours"], root_bytes=BASE.disk_bytes, iops=0, handed_to_us=True)


# The source handed every lock to this host: its QEMU was gone before it did,
# so the VM is this host's whatever its (maybe not yet rewritten) config says.
HANDED_TO_US = [
    ("elsewhere", Run.RECEIVED, [Do.RESUME]),
    ("here", Run.RECEIVED, [Do.RESUME]),
    ("elsewhere", Run.INMIGRATE, [Do.NOTHING]),
    ("elsewhere", Run.RUNNING, [Do.CLAIM]),
    ("here", Run.RUNNING, [Do.CLAIM]),
    ("elsewhere", Run.CRASHED, [Do.CLAIM, Do.CLEAN_UP, Do.START]),
    ("elsewhere", Run.STOPPED, [Do.CLAIM, Do.CLEAN_UP, Do.START]),
]


@pytest.mark.parametrize(("w", "run", "expected"), HANDED_TO_US)
def test_handed_locks_make_the_vm_ours(w: str, run: Run, expected: list[Do]) -> None:
    """A received copy is resumed, a lost one is booted here; the locks are never let go."""
    acts = plan(WANTED[w], handed_to_us(run), HOST)
    assert [a.do for a in acts] == expected
    assert all(a.keep_locks for a in acts if a.do is Do.CLEAN_UP)


@pytest.mark.parametrize(("run", "expected"), [
    (Run.STOPPED, [Do.FOLLOW]),
    (Run.CRASHED, [Do.CLEAN_UP, Do.FOLLOW]),
    (Run.POSTMIGRATE, [Do.KILL, Do.CLEAN_UP, Do.FOLLOW]),
])
def test_source_follows_its_handed_locks(run: Run, expected: list[Do]) -> None:
    """A source whose locks went to beta points its config there and never starts the VM."""
    observed = Observed(run, LOCKS["other"], root_bytes=BASE.disk_bytes, handed_away_to="beta")
    acts = plan(BASE, observed, HOST)
    assert [a.do for a in acts] == expected
    assert acts[-1].host == "beta"
    assert all(a.keep_locks for a in acts if a.do is Do.CLEAN_UP)


def test_handed_away_but_config_moved_on_is_not_followed() -> None:
    """Once the config names another host than us, the handover mark changes nothing."""
    observed = Observed(Run.STOPPED, LOCKS["other"], handed_away_to="beta")
    acts = plan(dataclasses.replace(BASE, kvm_host="gamma"), observed, HOST)
    assert [a.do for a in acts] == [Do.NOTHING]


#: A takeover from beta stopped halfway: root's lock broken by us, swap and
#: tmp still beta's (observing.taking_over_from says "beta").
HALF_TAKEN = {"root": None, "swap": "beta", "tmp": "beta"}


@pytest.mark.parametrize(("w", "run", "drained", "held", "expected"), [
    ("here", Run.STOPPED, False, False, [Do.TAKE_OVER, Do.START]),
    ("here", Run.CRASHED, False, False, [Do.CLEAN_UP, Do.TAKE_OVER, Do.START]),
    # Drained or held by hand: nothing starts here, so nothing more is broken.
    ("here", Run.STOPPED, True, False, [Do.REFUSE]),
    ("here", Run.STOPPED, False, True, [Do.NOTHING]),
    # The config names another host again (the evacuation was refused and
    # put it back): this host does not finish what it no longer wants.
    ("elsewhere", Run.STOPPED, False, False, [Do.NOTHING]),
    ("offline", Run.STOPPED, False, False, [Do.NOTHING]),
])
def test_half_finished_takeover_is_finished_by_ensure(w: str, run: Run, drained: bool,
                                                      held: bool, expected: list[Do]) -> None:
    """Our takeover broke root's lock from beta and died: ensure breaks the rest, then starts."""
    observed = Observed(run, HALF_TAKEN, root_bytes=BASE.disk_bytes, taking_over_from="beta")
    acts = plan(WANTED[w], observed, HOST, drained=drained, held=held)
    assert [a.do for a in acts] == expected
    assert all(a.host == "beta" for a in acts if a.do in (Do.TAKE_OVER, Do.REFUSE))
    assert all(a.keep_locks for a in acts if a.do is Do.CLEAN_UP)
