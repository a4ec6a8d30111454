"""Celery beat scheduler that sweeps every live host, and stays single.

The schedule is not a static table: hosts come and go. Every
``REFRESH_EVERY`` seconds the scheduler reads the host registry and keeps one
entry per live host: ``fcq.ensure_host`` to ``host.<name>`` every
``sweep_interval`` seconds, expiring after one interval so sweeps never pile
up in the queue of a host that is down.

Exactly one beat sends: each beat must hold the Redis key ``fcq:beat``
(``SET NX`` with a ttl, refreshed on every tick by its holder only). A second
beat waits in standby and takes over within ``LOCK_TTL`` seconds after the
first dies. Two beats would double every sweep (Celery beat does not
coordinate with other beats: each process sends the whole schedule).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from typing import Any

import redis
import structlog
from celery.beat import Scheduler

from fcq_tasks.cluster import registry
from fcq_tasks.cluster.celeryapp import host_queue
from fcq_tasks.config.settings import HostSettings

log = structlog.get_logger()

LOCK_KEY = "fcq:beat"
#: Seconds a beat's lock outlives its last tick.
LOCK_TTL = 30
#: Seconds between two reads of the host registry.
REFRESH_EVERY = 5.0
#: The longest beat sleeps between two ticks: the lock is refreshed that often.
MAX_SLEEP = 5.0
#: Seconds between two checks of the lock while ticks come fast (one tick
#: sends one sweep: a fan-out to 1,000 hosts is 1,000 ticks). Far below
#: LOCK_TTL: a beat that lost the lock (paused past the ttl) notices within
#: this, and the sweeps it sent meanwhile are idempotent.
LOCK_CHECK_EVERY = 1.0

#: Refresh the lock only if we still hold it (compare-and-expire).
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('expire', KEYS[1], ARGV[2])
end
return 0
"""


def sweep_entries(hosts: list[str], interval: int) -> dict[str, dict[str, Any]]:
    """The beat schedule for *hosts* (pure; tested directly).

    ``ignore_result``: nobody waits for a beat sweep's result (the sweep's
    outcome is in the host's log, its metrics and Flower's events). Kept,
    each would cost a result key per host and interval in Redis for
    ``result_expires`` (1.4 million keys a day at 1,000 hosts and 60 s), and
    each send a SUBSCRIBE to its result channel (measured: most of beat's
    time per host).
    """
    return {f"sweep-{h}": {"task": "fcq.ensure_host", "schedule": float(interval),
                           "kwargs": {"host": h},
                           "options": {"queue": host_queue(h), "expires": float(interval),
                                       "ignore_result": True}}
            for h in hosts}


class SweepScheduler(Scheduler):
    settings: HostSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.settings = kwargs["app"].conf.fcq_settings
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client: redis.Redis = registry.connect(self.settings)
        self.holding = False
        self.last_refresh = 0.0
        self.last_lock_check = 0.0
        self._entries_changed = True
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        self.merge_inplace({})

    def hold_lock(self) -> bool:
        try:
            if self.holding:
                self.holding = bool(self.client.eval(_REFRESH, 1, LOCK_KEY, self.token,
                                                     LOCK_TTL))
            if not self.holding:
                self.holding = bool(self.client.set(LOCK_KEY, self.token, nx=True, ex=LOCK_TTL))
                if self.holding:
                    log.info("beat-active", token=self.token)
        except redis.RedisError as err:
            log.warning("beat-lock-unknown", error=str(err))
            self.holding = False
        return self.holding

    def refresh(self) -> None:
        try:
            hosts = sorted(registry.hosts(self.client))
        except redis.RedisError as err:
            log.warning("registry-unreadable", error=str(err))
            return
        entries = sweep_entries(hosts, self.settings.cluster.sweep_interval)
        if set(entries) != set(self.schedule):
            log.info("sweep-hosts", hosts=len(hosts))
            self._entries_changed = True
        # merge_inplace takes entry dicts too (Scheduler._maybe_entry); the
        # stubs only know ScheduleEntry.
        self.merge_inplace(entries)  # type: ignore[arg-type]
        self.last_refresh = time.monotonic()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if not self.holding or now - self.last_lock_check >= LOCK_CHECK_EVERY:
            self.last_lock_check = now
            if not self.hold_lock():
                return MAX_SLEEP  # standby: another beat is active
        if time.monotonic() - self.last_refresh >= REFRESH_EVERY:
            self.refresh()
        return min(float(super().tick(*args, **kwargs)), MAX_SLEEP)

    def schedules_equal(self, *args: Any, **kwargs: Any) -> bool:
        """Whether the schedule is what the heap was built from.

        Celery compares every entry of the old and the new schedule on
        every tick, and a tick sends one entry: at 1,000 hosts that is a
        million comparisons per fan-out (measured: 7 of its 17 s). Here
        only refresh() changes the schedule, and it says when it did.
        """
        return not self._entries_changed

    def populate_heap(self, *args: Any, **kwargs: Any) -> None:
        self._entries_changed = False
        super().populate_heap(*args, **kwargs)

    def close(self) -> None:
        if self.holding:
            with contextlib.suppress(redis.RedisError):  # else it expires by itself
                self.client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                                 "return redis.call('del', KEYS[1]) end return 0",
                                 1, LOCK_KEY, self.token)
        super().close()
