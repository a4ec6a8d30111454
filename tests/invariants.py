"""Invariant checks for fault tests: who runs the guest, continuously and after a sweep.

:class:`GuestSampler` watches every host of a test cluster while a fault test
runs and records, about every 100 ms, which hosts had a QEMU for the VM in
runstate ``running`` at that moment: the product's first invariant is that
this is never more than one. It asks each QEMU through its observer monitor
(``<run_dir>/<vm>.obs.sock``), never through fcq's own: a QMP socket serves
one client at a time, so a sampler on fcq's monitor would make fcq's own
calls fail and change what is being observed.

:func:`cluster_state` is the check after the dust settles (one sweep of every
host): exactly one running copy, the disk locks and every host's config
naming that host, no migration key or slot left behind.

    with GuestSampler(cluster.hosts, "vm01") as sampler:
        ...inject a fault...
    sampler.assert_never_twice()
    assert cluster_state(cluster, "vm01").problems() == []
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
import yaml

from fcq_tasks.errors import FcqError
from fcq_tasks.hazmat.qmp import QmpSession
from tests.cluster import Cluster
from tests.conftest import Host

#: A QEMU process exists, but its observer monitor gave no answer in time
#: (SIGSTOPped, busy, socket not there yet). Never counted as running.
NOT_ANSWERING = "not answering"

#: Seconds between two samples (the brief for fault tests: 100 ms or less).
INTERVAL = 0.1

#: Per QMP step (connect, query-status, disconnect) of one probe.
PROBE_TIMEOUT = 0.3


@dataclass(frozen=True)
class Qemu:
    """One QEMU process of the VM on one host, as the process table shows it."""

    pid: int
    start_ticks: int        # field 22 of /proc/<pid>/stat: with the pid, an identity
    incoming: bool          # started with -incoming: a migration's destination copy
    stopped: bool = False   # process state T (SIGSTOP)

    @property
    def ident(self) -> tuple[int, int]:
        return self.pid, self.start_ticks


@dataclass(frozen=True)
class HostSample:
    """One host at one sample: its QEMUs for the VM and what the observer said."""

    qemus: tuple[Qemu, ...]
    runstate: str | None    # None: no QEMU for the VM; NOT_ANSWERING; or QEMU's runstate

    @property
    def running(self) -> bool:
        return self.runstate == "running"


@dataclass(frozen=True)
class Sample:
    """Every host at one moment: probes sent at *t*, answers within *spread* seconds."""

    t: float                # time.monotonic() when the probes went out
    spread: float
    hosts: Mapping[str, HostSample]

    @property
    def running(self) -> tuple[str, ...]:
        return tuple(sorted(h for h, s in self.hosts.items() if s.running))

    def describe(self) -> str:
        parts = []
        for name, s in sorted(self.hosts.items()):
            pids = ",".join(f"{q.pid}{'(incoming)' if q.incoming else ''}"
                            f"{'(stopped)' if q.stopped else ''}" for q in s.qemus)
            parts.append(f"{name}: {s.runstate or 'no qemu'}" + (f" [pid {pids}]" if pids else ""))
        return f"t={self.t:.3f} (+{self.spread * 1000:.0f} ms): " + "; ".join(parts)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of *pid*, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces:
    # count fields from the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def find_qemus(hosts: Mapping[str, Host], vm: str) -> dict[str, tuple[Qemu, ...]]:
    """Each host's QEMU processes for *vm*, in one pass over /proc.

    The same rule as ``Host.qemu_processes()`` (a live QEMU whose command
    line names the host's run directory, not a parent waiting for its
    daemonized child), narrowed to the VM's run files. One pass of plain
    reads instead of one psutil scan per host: that costs ~26 ms per host
    here, too much for a 100 ms sampling period.
    """
    prefixes = {name: f"{h.settings.run_dir}/{vm}." for name, h in hosts.items()}
    found: dict[int, tuple[str, bool]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = raw.decode(errors="replace").split("\0")
        if not argv or "qemu" not in argv[0]:
            continue  # also zombies and kernel threads: their cmdline is empty
        for name, prefix in prefixes.items():
            if any(a.startswith(prefix) for a in argv):
                found[int(entry)] = (name, "-incoming" in argv)
                break
    stats = {pid: _proc_stat(pid) for pid in found}
    parents = {st[1] for st in stats.values() if st is not None}
    out: dict[str, list[Qemu]] = {name: [] for name in hosts}
    for pid, (name, incoming) in sorted(found.items()):
        st = stats[pid]
        if st is None or st[0] == "Z" or pid in parents:
            continue
        out[name].append(Qemu(pid, st[2], incoming, stopped=st[0] in ("T", "t")))
    return {name: tuple(qs) for name, qs in out.items()}


def probe_runstate(socket: Path, vm: str, timeout: float = PROBE_TIMEOUT) -> str:
    """The runstate QEMU reports on its observer monitor, or NOT_ANSWERING."""
    try:
        with QmpSession(str(socket), timeout, vm) as session:
            return session.runstate()
    except FcqError:
        return NOT_ANSWERING
    except Exception:  # a QEMU killed mid-probe may end the session any odd way
        return NOT_ANSWERING


def observer_socket(host: Host, vm: str) -> Path:
    # The path VMRunPaths.observer gives QEMU: the sampler does not import
    # the agent's layout code, so that a change there shows up here.
    return host.settings.run_dir / f"{vm}.obs.sock"


class GuestSampler(threading.Thread):
    """Samples, every *interval* seconds, which hosts run VM *vm*; use it with ``with``.

    Probes run in a pool with one thread per host, so a QEMU that does not
    answer delays no other host's probe and no sample: a probe still out when a
    sample is taken makes that host NOT_ANSWERING in it, and no second probe
    goes to that QEMU until the first one ended (its QMP timeout bounds it).
    A sample therefore combines answers sent at one moment and received
    within the interval (its ``spread``): not an atomic snapshot, but two
    copies that both say "running" within a few milliseconds did run at the
    same time unless a whole handover fitted in between.
    """

    def __init__(self, hosts: Cluster | Mapping[str, Host], vm: str,
                 interval: float = INTERVAL, timeout: float = PROBE_TIMEOUT) -> None:
        super().__init__(name=f"sampler-{vm}", daemon=True)
        self.hosts = dict(hosts.hosts if isinstance(hosts, Cluster) else hosts)
        self.vm = vm
        self.interval = interval
        self.timeout = timeout
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._first = threading.Event()
        self._lock = threading.Lock()

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.hosts),
                                                     thread_name_prefix=f"probe-{self.vm}")
        out: dict[str, concurrent.futures.Future[str]] = {}
        try:
            next_tick = time.monotonic()
            while not self._stop_event.is_set():
                self._sample_once(pool, out)
                self._first.set()
                next_tick = max(next_tick + self.interval, time.monotonic())
                self._stop_event.wait(next_tick - time.monotonic())
        except BaseException as err:  # an invariant checker must never fail quietly
            self.error = err
        finally:
            self._first.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _sample_once(self, pool: concurrent.futures.ThreadPoolExecutor,
                     out: dict[str, concurrent.futures.Future[str]]) -> None:
        t0 = time.monotonic()
        qemus = find_qemus(self.hosts, self.vm)
        sent: dict[str, concurrent.futures.Future[str]] = {}
        for name, host in self.hosts.items():
            previous = out.get(name)
            if qemus[name] and (previous is None or previous.done()):
                out[name] = sent[name] = pool.submit(
                    probe_runstate, observer_socket(host, self.vm), self.vm, self.timeout)
        # Wait for this sample's answers within most of one interval; a
        # probe answered later is dropped (the next sample asks again).
        concurrent.futures.wait(sent.values(), timeout=self.interval * 0.8)
        states: dict[str, HostSample] = {}
        for name in self.hosts:
            fut = sent.get(name)
            if not qemus[name]:
                runstate = None
            elif fut is not None and fut.done():
                runstate = fut.result()
            else:
                runstate = NOT_ANSWERING
            states[name] = HostSample(qemus[name], runstate)
        sample = Sample(t0, time.monotonic() - t0, states)
        with self._lock:
            self.samples.append(sample)

    def __enter__(self) -> GuestSampler:
        self.start()
        # Callers inject faults right after entering: sampling must have begun.
        self._first.wait(10)
        self._raise_error()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is None:
            self._raise_error()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(10)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the guest sampler failed: {self.error!r}") from self.error

    # -- results ------------------------------------------------------------

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    @property
    def sample_count(self) -> int:
        with self._lock:
            return len(self.samples)

    def max_running(self) -> int:
        """The most hosts seen running the guest in one sample."""
        return max((len(s.running) for s in self.snapshot()), default=0)

    def longest_gap(self) -> float:
        """The longest time between two consecutive samples, in seconds."""
        ts = [s.t for s in self.snapshot()]
        return max((b - a for a, b in itertools.pairwise(ts)), default=0.0)

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def wait_for(self, predicate: Callable[[Sample], bool], timeout: float,
                 what: str) -> Sample:
        """Wait for a sample (taken after this call) that satisfies *predicate*."""
        start = self.sample_count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_error()
            with self._lock:
                fresh = self.samples[start:]
            for s in fresh:
                if predicate(s):
                    return s
            start += len(fresh)
            time.sleep(self.interval / 2)
        last = self.latest()
        raise AssertionError(f"the sampler saw no sample with {what} within {timeout} s; "
                             f"last: {last.describe() if last else 'none'}")

    def twice(self) -> list[Sample]:
        """Every sample in which more than one host ran the guest."""
        return [s for s in self.snapshot() if len(s.running) > 1]

    def assert_never_twice(self, max_gap: float = 2.0) -> None:
        """Never two running copies in a sample, and no gap that could hide one."""
        self._raise_error()
        assert self.sample_count > 0, "the sampler took no sample"
        bad = self.twice()
        assert not bad, (f"{self.vm} ran on {len(bad[0].running)} hosts at once in "
                         f"{len(bad)} of {self.sample_count} samples; first: {bad[0].describe()}")
        # A sampler that stalled (a loaded machine) could miss a short overlap.
        self.assert_gaps_below(max_gap)

    def assert_gaps_below(self, limit: float) -> None:
        gap = self.longest_gap()
        assert gap < limit, f"{gap * 1000:.0f} ms between two samples (limit {limit * 1000:.0f})"

    def qemus_seen(self) -> dict[str, set[Qemu]]:
        """Every QEMU process of the VM each host had at any sample."""
        seen: dict[str, set[Qemu]] = {name: set() for name in self.hosts}
        for s in self.snapshot():
            for name, hs in s.hosts.items():
                seen[name].update(Qemu(q.pid, q.start_ticks, q.incoming) for q in hs.qemus)
        return seen


# -- after a sweep ------------------------------------------------------------


@dataclass
class HostState:
    """One host's view of the VM after a sweep."""

    qemus: tuple[Qemu, ...]
    runstate: str | None                    # as for HostSample
    locks: dict[str, str | None]            # volume → lock owner, as this host reads them
    unclaimed: list[str]                    # volumes handed to their owner, not yet claimed
    kvm_host: str | None                    # its config's kvm_host; None: no config file
    slots: list[str]                        # migration slots held, marker files left


@dataclass
class ClusterState:
    vm: str
    hosts: dict[str, HostState]
    keys: dict[str, int] = field(default_factory=dict)  # fcq:mig:<vm>:* → pttl ms (-1: none)

    @property
    def running(self) -> list[str]:
        return sorted(h for h, s in self.hosts.items() if s.runstate == "running")

    @property
    def stale_keys(self) -> list[str]:
        """Keys that outlived their migration.

        ``current`` blocks the VM's next migration until it expires; a key
        without a ttl never goes away; a heartbeat means a half (or its
        thread) still beats. Other attempt keys (request, ran:, done:, ...)
        expire on their own: they guard against a late replay, by design.
        """
        return sorted(k for k, ttl in self.keys.items()
                      if k.endswith(":current") or ttl == -1 or ":hb:" in k)

    def problems(self) -> list[str]:
        """Every way this state differs from "one running copy, everything agreeing"."""
        running = self.running
        if len(running) == 1:
            return self.stale()
        return [f"{self.vm} runs on {len(running)} hosts ({', '.join(running) or '-'})",
                *self.stale()]

    def stale(self) -> list[str]:
        """What is left behind or disagrees: QEMUs that do not run the guest (or a
        second one), locks or configs not naming the running host (none, if the VM
        runs nowhere), migration slots held, Redis keys that outlived the attempt."""
        out = []
        running = self.running
        owner = running[0] if len(running) == 1 else None
        for name, s in sorted(self.hosts.items()):
            extra = [q for q in s.qemus if name != owner or len(s.qemus) > 1]
            if extra:
                out.append(f"{name}: QEMU left over (pids {', '.join(str(q.pid) for q in extra)}, "
                           f"runstate {s.runstate})")
            wrong = {v: o for v, o in s.locks.items() if o != owner}
            if wrong:
                out.append(f"{name} reads locks {wrong}, expected {owner}")
            if owner is not None and s.kvm_host not in (None, owner):
                out.append(f"{name}'s config says kvm_host {s.kvm_host}, runs on {owner}")
            if s.slots:
                out.append(f"{name}: migration slots left: {', '.join(s.slots)}")
        configs = {s.kvm_host for s in self.hosts.values() if s.kvm_host is not None}
        if owner is None and len(configs) > 1:
            out.append(f"the configs disagree: kvm_host {', '.join(sorted(configs))}")
        if self.stale_keys:
            out.append(f"Redis keys left: {', '.join(self.stale_keys)}")
        return out

    def notes(self) -> list[str]:
        """Not violations, but worth a look: expiring attempt keys, unclaimed handovers."""
        out = [f"{name}: lock handed over, not claimed: {', '.join(s.unclaimed)}"
               for name, s in sorted(self.hosts.items()) if s.unclaimed]
        by_attempt: dict[str, list[str]] = {}
        for key in sorted(set(self.keys) - set(self.stale_keys)):
            # fcq:mig:<vm>:<attempt>:<name>
            attempt, _, name = key.split(":", 3)[-1].partition(":")
            by_attempt.setdefault(attempt, []).append(name)
        out += [f"attempt {attempt}: expiring keys {', '.join(names)}"
                for attempt, names in by_attempt.items()]
        return out


def held_slots(run_dir: Path) -> list[str]:
    """Migration slot flocks someone holds, and old-style marker files, in *run_dir*.

    Slot files themselves stay by design (the next taker reuses them): only a
    held flock is a slot in use. Probing takes the flock for a moment, so
    call this when no migration should run.
    """
    out = [p.name for p in sorted(run_dir.glob("*.migrating"))]
    for path in sorted(run_dir.glob("migration-slot*")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            out.append(path.name)
        finally:
            os.close(fd)
    return out


def config_kvm_host(host: Host, vm: str) -> str | None:
    path = host.settings.vm_config_dir / f"{vm}.cfg"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    value = (raw.get("parameters") or {}).get("kvm_host") if isinstance(raw, dict) else None
    return None if value is None else str(value)


def migration_keys(client: redis.Redis, vm: str) -> dict[str, int]:
    """Every fcq:mig:<vm>:* key with its remaining ttl in ms (-1: none)."""
    out = {}
    for key in client.scan_iter(f"fcq:mig:{vm}:*"):
        ttl = int(client.pttl(key))
        if ttl != -2:  # expired between SCAN and PTTL
            out[str(key)] = ttl
    return out


def cluster_state(cluster: Cluster, vm: str) -> ClusterState:
    """Who runs *vm*, what the locks, configs, Redis and run dirs say (after a sweep)."""
    qemus = find_qemus(cluster.hosts, vm)
    hosts = {}
    for name, host in cluster.hosts.items():
        # The authoritative process list, cross-checked against the sampler's
        # own faster scan: they must name the same processes.
        listed = {p.pid for p in host.qemu_processes()
                  if any(a.startswith(f"{host.settings.run_dir}/{vm}.") for a in p.cmdline())}
        mine = tuple(q for q in qemus[name] if q.pid in listed)
        runstate = probe_runstate(observer_socket(host, vm), vm, 1.0) if mine else None
        volumes = host.agent(vm).storage.volumes(vm)
        hosts[name] = HostState(
            qemus=mine, runstate=runstate,
            locks={v.name: v.lock_owner for v in volumes},
            unclaimed=[v.name for v in volumes if v.handed_from and not v.claimed],
            kvm_host=config_kvm_host(host, vm),
            slots=held_slots(host.settings.run_dir))
    return ClusterState(vm, hosts, migration_keys(cluster.redis.client(), vm))
