"""The invariant sampler against one real guest: running, SIGSTOPped, resumed."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from fcq_tasks.host.migration.slots import migration_slot
from tests.cluster import Cluster
from tests.conftest import Host
from tests.invariants import NOT_ANSWERING, GuestSampler, Sample, cluster_state


def alpha_running(s: Sample) -> bool:
    return s.running == ("alpha",)


def test_sampler_sees_running_not_answering_and_running_again(host: Host) -> None:
    """While its QEMU is SIGSTOPped the guest counts as not answering (never as
    running); after SIGCONT it is running again; samples come every ~100 ms."""
    host.write_vm("vm01")
    host.agent("vm01").start()
    with GuestSampler({host.name: host}, "vm01") as sampler:
        first = sampler.wait_for(alpha_running, 30, "vm01 running on alpha")
        (qemu,) = first.hosts["alpha"].qemus
        # The sampler's own /proc scan finds what the fixtures' psutil scan finds.
        assert [p.pid for p in host.qemu_processes()] == [qemu.pid]
        assert not qemu.incoming and not qemu.stopped
        os.kill(qemu.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            # A probe already out when the signal landed can make one sample
            # "not answering" from before /proc shows the stop: wait for both.
            sampler.wait_for(lambda s: s.hosts["alpha"].runstate == NOT_ANSWERING
                             and s.hosts["alpha"].qemus[0].stopped,
                             10, "vm01 stopped and not answering")
            time.sleep(1.5)  # many samples while it cannot answer
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        again = sampler.wait_for(alpha_running, 10, "vm01 running again")
        assert again.hosts["alpha"].qemus == (qemu,)  # the same process, not a restart
    # Samples begun a moment after the SIGSTOP and finished before the SIGCONT
    # (a sample begun just before the SIGCONT may be answered just after it).
    during = [s for s in sampler.samples
              if stopped_at + 0.05 < s.t and s.t + s.spread < resumed_at]
    assert len(during) >= 10
    assert all(s.hosts["alpha"].runstate == NOT_ANSWERING and not s.running for s in during)
    assert sampler.max_running() == 1
    sampler.assert_never_twice()
    # A QEMU that cannot answer delays no sample: the gap stays about one interval.
    sampler.assert_gaps_below(0.5)
    span = sampler.samples[-1].t - sampler.samples[0].t
    assert sampler.sample_count >= span / 0.2, (sampler.sample_count, span)  # ~0.1 s each


def test_cluster_state_names_what_is_left_behind(host: Host, redis_server: Any) -> None:
    """One running copy with its locks and config agreeing is clean; a leftover
    attempt key and a held migration slot are reported."""
    host.write_vm("vm01")
    host.agent("vm01").start()
    c = Cluster(redis_server, {"alpha": host})
    state = cluster_state(c, "vm01")
    assert state.running == ["alpha"]
    assert state.hosts["alpha"].locks == {"root": "alpha", "swap": "alpha", "tmp": "alpha"}
    assert state.hosts["alpha"].kvm_host == "alpha"
    assert state.problems() == []
    client = redis_server.client()
    client.set("fcq:mig:vm01:current", "0123456789abcdef", ex=600)
    client.set("fcq:mig:vm01:0123456789abcdef:done:src", "ok", ex=600)
    with migration_slot(host.settings.run_dir, 1, "vm01", "alpha"):
        problems = cluster_state(c, "vm01").problems()
    assert any("migration slots left: migration-slot.0.lock" in p for p in problems), problems
    assert any("fcq:mig:vm01:current" in p for p in problems), problems
    # An expiring attempt record is a note, not a problem.
    assert not any("done:src" in p for p in problems), problems
    assert any("done:src" in n for n in cluster_state(c, "vm01").notes())


def test_sampler_with_no_qemu_records_absence(host: Host) -> None:
    """No QEMU for the VM: every sample says so; nothing is counted as running."""
    with GuestSampler({host.name: host}, "vm01") as sampler:
        time.sleep(0.5)
    assert sampler.sample_count >= 3
    assert all(s.hosts["alpha"].runstate is None for s in sampler.samples)
    assert sampler.max_running() == 0
