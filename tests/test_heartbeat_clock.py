"""A heartbeat is life only while it is being written, whatever the wall clock did.

Redis expires keys by the wall clock. The machine's real clock is stepped
(CLOCK_REALTIME, like tests/test_identity.py does) while a real `fcq worker`
beats: a record written during a step forward outlives its worker by the
size of the step once the clock is back (an hour, for an hour's step); one
written during a step back expires at once although its worker lives.

The step is a minute, ten heartbeat lifetimes of these tests: an hour would
show the same, but it also expires the cephx tickets of the session's Ceph
cluster, which every later test of the session needs (seen: every RBD test
after it failed).
registry.beating() must call the first dead and the second alive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fcq_tasks.cluster import registry
from tests.cluster import Cluster

ClusterFactory = Any
#: Ten times the tests' registry_ttl (6 s); see the module's docstring.
STEP = 60.0


def step_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + seconds)


@pytest.fixture
def alpha_beating(make_cluster: ClusterFactory) -> Iterator[Cluster]:
    c: Cluster = make_cluster(names=("alpha",))
    c.worker("alpha")
    yield c


def stepped(seconds: float, c: Cluster) -> None:
    """Step the clock by *seconds* for a bit more than one beat, then back."""
    ttl = c.hosts["alpha"].settings.cluster.registry_ttl
    step_clock(seconds)
    try:
        time.sleep(ttl / 3 + 1.0)  # monotonic: one heartbeat at least, in stepped time
    finally:
        step_clock(-seconds)


def test_record_kept_by_a_clock_step_is_not_life(alpha_beating: Cluster) -> None:
    """+1 min and back, then the worker dies: its record lives on for a minute, but
    beating() sees it unchanged and calls the host dead (within half a ttl)."""
    c = alpha_beating
    client = c.redis.client()
    ttl = c.hosts["alpha"].settings.cluster.registry_ttl
    stepped(STEP, c)
    worker = next(s for s in c.services if s.name == "worker@alpha")
    c.kill9(worker)
    assert client.ttl("fcq:host:alpha") > STEP - 10  # Redis keeps it: that is the trap
    assert "alpha" in registry.hosts(client)
    t0 = time.monotonic()
    assert registry.beating(client, {"alpha"}, ttl) == set()
    assert time.monotonic() - t0 <= ttl / 2 + 1


def test_record_dropped_by_a_clock_step_is_still_life(alpha_beating: Cluster) -> None:
    """-1 min and back: the live worker's record expires early, reappears at its next
    beat, and beating() calls the host alive."""
    c = alpha_beating
    client = c.redis.client()
    ttl = c.hosts["alpha"].settings.cluster.registry_ttl
    stepped(-STEP, c)
    client.delete("fcq:host:alpha")  # what the forward step does to it: gone at once
    assert registry.beating(client, {"alpha"}, ttl) == {"alpha"}


def test_a_live_worker_beats_and_a_dead_one_does_not(alpha_beating: Cluster) -> None:
    c = alpha_beating
    client = c.redis.client()
    ttl = c.hosts["alpha"].settings.cluster.registry_ttl
    assert registry.beating(client, {"alpha", "ghost"}, ttl) == {"alpha"}

