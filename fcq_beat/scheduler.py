"""Celery beat scheduler that sweeps every live host, and stays single.

The schedule is not a static table: hosts come and go. Every
``REFRESH_EVERY`` seconds the scheduler reads the host registry and keeps one
entry per live host: ``fcq.ensure_host`` to ``host.<name>`` every
``sweep_interval`` seconds, expiring after one interval so sweeps never pile
up in the queue of a host that is down.

One tick sends every sweep that is due, through Redis pipelines
(:meth:`SweepScheduler.send_due`): Celery's own send path builds each
message, and kombu's publish batch defers only its final Redis commands
(the queue's LPUSH, the task-sent event's PUBLISH), so the wire format is
Celery's by construction. Celery beat alone sends one entry per tick, each a
few Redis round trips: 1,000 hosts took 2 s per sweep.

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
from kombu.exceptions import KombuError

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
#: Seconds between two checks of the lock while ticks come fast (a fan-out
#: to many hosts is several pipelines: send_due() hands back to tick() between
#: two once this has passed). Far below LOCK_TTL: a beat that lost the lock
#: (paused past the ttl) notices within this, and the sweeps it sent
#: meanwhile are idempotent.
LOCK_CHECK_EVERY = 1.0
#: Sweeps sent through one Redis pipeline: a pipeline that fails loses at
#: most these (each sweep of it may or may not have reached its queue; they
#: are reserved, and go again after one interval, as a sweep whose send
#: failed in Celery's own beat). Also bounds what one pipeline holds in memory.
SWEEPS_PER_PIPELINE = 500
#: Redis commands one sweep adds to a pipeline: LPUSH to the host's queue,
#: PUBLISH of its task-sent event (more with expiring queues, which fcq
#: does not declare). The batch's own flush threshold is set above what
#: SWEEPS_PER_PIPELINE sweeps need, so that only send_due() flushes.
COMMANDS_PER_SWEEP = 4

#: Refresh the lock only if we still hold it (compare-and-expire).
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('expire', KEYS[1], ARGV[2])
end
return 0
"""


def sweep_entries(hosts: list[str], interval: int, pipelined: bool = False
                  ) -> dict[str, dict[str, Any]]:
    """The beat schedule for *hosts* (pure; tested directly).

    ``ignore_result``: nobody waits for a beat sweep's result (the sweep's
    outcome is in the host's log, its metrics and Flower's events). Kept,
    each would cost a result key per host and interval in Redis for
    ``result_expires`` (1.4 million keys a day at 1,000 hosts and 60 s), and
    each send a SUBSCRIBE to its result channel (measured: most of beat's
    time per host).

    *pipelined* (the sends wait in a Redis pipeline, see send_due): no
    publish retry and no queue declaration per send. Neither changes the
    message. A publish into a pipeline does no I/O, so kombu's retry wrapper
    around it (built anew for each of the sweep's two publishes) retries
    nothing; the pipeline itself is never retried (a replay could double
    sweeps). The queues are declared by SweepScheduler.declare_queues at
    each refresh instead, a cached check per send that cost 10% of a
    fan-out's time.
    """
    extra: dict[str, Any] = {"retry": False, "declare": ()} if pipelined else {}
    return {f"sweep-{h}": {"task": "fcq.ensure_host", "schedule": float(interval),
                           "kwargs": {"host": h},
                           "options": {"queue": host_queue(h), "expires": float(interval),
                                       "ignore_result": True, **extra}}
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
        self._pipelined: bool | None = None
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
        self.last_refresh = time.monotonic()
        # Before the entries: they say whether their sends declare the queues.
        self.declare_queues(hosts)
        # The entries depend on the host names, the interval (fixed for the
        # process) and the transport only: merging the same ones again would
        # rebuild 1,000 entries every REFRESH_EVERY for nothing.
        if {f"sweep-{h}" for h in hosts} != set(self.schedule):
            log.info("sweep-hosts", hosts=len(hosts))
            self._entries_changed = True
            entries = sweep_entries(hosts, self.settings.cluster.sweep_interval,
                                    pipelined=self.pipelined)
            # merge_inplace takes entry dicts too (Scheduler._maybe_entry);
            # the stubs only know ScheduleEntry.
            self.merge_inplace(entries)  # type: ignore[arg-type]

    @property
    def pipelined(self) -> bool:
        """Whether sweeps go through pipelines (kombu's publish batch is safe here)."""
        if self._pipelined is None:
            producer: Any = self.producer  # supports_batch_publish: newer than the stubs
            self._pipelined = bool(producer.supports_batch_publish)
        return self._pipelined

    def declare_queues(self, hosts: list[str]) -> None:
        """Declare each host's queue at each refresh, not in its sweeps.

        Celery declares a queue the first time it sends to it (once per
        connection), a Redis round trip that kombu's publish batch cannot
        defer: left to the sweep, it made the first fan-out after beat
        started (or after a reconnection) 1,000 round trips slower. Here it
        happens when the host appears, an interval before its first sweep is
        due, and again after a reconnection (kombu forgets what it declared
        then). The same Queue object as Celery's send path (its queue table
        creates it), so a declaration is remembered for the send; pipelined
        sends skip the check (sweep_entries). A queue whose declaration
        failed here (Redis away) is declared at the next refresh; its sweeps
        reach it meanwhile all the same (the worker reads the queue's list,
        which the send writes; the declaration only records its binding).
        """
        queues = self.app.amqp.queues
        try:
            producer = self.producer
            declared = producer.connection.declared_entities or set()  # type: ignore[union-attr]
            for host in hosts:
                queue = queues[host_queue(host)]
                if hash(queue) not in declared:
                    producer.maybe_declare(queue)
        except (KombuError, redis.RedisError, OSError) as err:
            log.warning("beat-declare-failed", error=str(err))

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if not self.holding or now - self.last_lock_check >= LOCK_CHECK_EVERY:
            self.last_lock_check = now
            if not self.hold_lock():
                return MAX_SLEEP  # standby: another beat is active
        if time.monotonic() - self.last_refresh >= REFRESH_EVERY:
            self.refresh()
        return min(self.send_due(*args, **kwargs), MAX_SLEEP)

    def send_due(self, *args: Any, **kwargs: Any) -> float:
        """Send every due sweep; the seconds until the next one is due.

        Celery's tick sends one due entry (and returns 0 when it did): it is
        called until nothing is due, inside a kombu publish batch, so each
        entry keeps all of Celery's own handling (reserved before it is
        sent, "Sending due task" logged, a send error logged and the entry
        left for its next interval), and its Redis commands wait in a
        pipeline, flushed every SWEEPS_PER_PIPELINE sweeps. A transport
        that cannot batch safely (kombu refuses when Redis commands may be
        retried, as with Sentinel's retry_on_timeout: a replayed pipeline
        would double sweeps) publishes each at once, as before.
        """
        while True:
            sent = 0
            delay = 0.0
            try:
                # Producer.batch is kombu 5.7's, newer than the stubs.
                producer: Any = self.producer
                with producer.batch(max_size=SWEEPS_PER_PIPELINE * COMMANDS_PER_SWEEP):
                    while sent < SWEEPS_PER_PIPELINE:
                        delay = float(super().tick(*args, **kwargs))
                        if delay != 0:
                            break
                        sent += 1
            except (KombuError, redis.RedisError, OSError) as err:
                # Reserved already: these go again after one interval; the
                # sweeps still due are sent by the next tick.
                log.warning("beat-sweeps-uncertain", sweeps=sent, error=str(err))
                return 1.0
            if delay != 0:
                return delay
            if time.monotonic() - self.last_lock_check >= LOCK_CHECK_EVERY:
                return 0.0  # a long fan-out: tick() checks the lock, then goes on

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
