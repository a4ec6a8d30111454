"""Invariant sampling for fault tests: is the guest ever running on two hosts?

:class:`GuestSampler` is a thread that, every 100 ms or less, asks every
QEMU of a VM on every host of a test cluster for its run state through the
QEMU's *observer* monitor (``<run_dir>/<vm>.obs.sock``), never through
fcq's own monitor (a QMP socket serves one client at a time, and a sampler
holding it would make fcq's own calls time out). A QEMU that does not answer
(SIGSTOPped, busy) is recorded as not answering, not as running.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from fcq_tasks.errors import FcqError
from fcq_tasks.hazmat.qmp import QmpSession
from tests.cluster import Cluster

#: How often the sampler looks, and how long one QEMU may take to answer.
INTERVAL = 0.1
ANSWER_TIMEOUT = 0.3


@dataclass
class Sample:
    at: float                                    # monotonic
    running: list[str] = field(default_factory=list)   # hosts with a QEMU in "running"
    silent: list[str] = field(default_factory=list)    # hosts with a QEMU that did not answer


class GuestSampler:
    """Samples where VM *vm* runs until the ``with`` block ends."""

    def __init__(self, cluster: Cluster, vm: str) -> None:
        self.cluster = cluster
        self.vm = vm
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="guest-sampler")

    def __enter__(self) -> GuestSampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.samples.append(self.sample())
            self._stop.wait(max(0.0, INTERVAL - (time.monotonic() - t0)))

    def sample(self) -> Sample:
        s = Sample(time.monotonic())
        for name, host in self.cluster.hosts.items():
            obs = host.settings.run_dir / f"{self.vm}.obs.sock"
            if not host.qemu_processes() or not obs.exists():
                continue
            try:
                with QmpSession(str(obs), ANSWER_TIMEOUT, self.vm) as qmp:
                    state = str(qmp.execute("query-status")["status"])
            except FcqError:
                s.silent.append(name)
                continue
            if state == "running":
                s.running.append(name)
        return s

    def max_running(self) -> int:
        return max((len(s.running) for s in self.samples), default=0)

    def longest_gap(self) -> float:
        times = [s.at for s in self.samples]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def assert_never_twice(self) -> None:
        assert self.samples, "the sampler took no sample"
        twice = [s for s in self.samples if len(s.running) > 1]
        assert not twice, f"guest running on {twice[0].running} at once " \
                          f"({len(twice)} of {len(self.samples)} samples)"
        # A sampler that stalled could miss a short overlap.
        assert self.longest_gap() < 2.0, f"sampling gap of {self.longest_gap():.1f} s"
