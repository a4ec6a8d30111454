"""Where the two halves of one migration attempt meet: Redis keys under one prefix.

``fcq:mig:<vm>:current`` names the one attempt in flight (set NX by the
orchestrator, expiring). Under ``fcq:mig:<vm>:<attempt>:`` live:

=============  ======================================================
``request``    the halves' task arguments (orchestrator; for replays and operators)
``addr``       the destination's ephemeral listening address
``hb:src/dst`` heartbeats, written by a thread, expiring after ``heartbeat_ttl``
``ran:src/dst`` set NX when a half first runs: a half runs at most once per attempt
``done:src/dst`` a half's outcome once it ended
``src-done``   the source's QEMU is gone and its locks were handed over
``dst-running`` the destination resumed the guest
``abort``      either half, or the operator, ended the attempt (first reason wins)
``KEY:wake``   a list pushed to whenever KEY is set: a half waiting for KEY
               blocks on it (BLPOP) instead of sleeping between two reads
=============  ======================================================

Redis is a meeting point, not the authority: the handover itself is
recorded in the disk locks, so a half that cannot reach Redis for a while
still finishes or gives up safely.
"""

from __future__ import annotations

import contextlib
import threading
import time
from types import TracebackType

import redis
import structlog

from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import SystemFailure

log = structlog.get_logger()

#: Poll interval of keys and migration state: how often a waiting half
#: checks abort, its peer's heartbeat and its deadline. What it waits for
#: wakes it at once (a key's wake list, a QMP event); this bounds the rest.
POLL = 0.1


class MigrationAborted(SystemFailure):
    """The other half, a deadline or an operator ended the attempt."""


class PeerSilent(MigrationAborted):
    """The other half's heartbeat stopped: its process died, hangs or is cut off."""


class DuplicateHalf(Exception):
    """This half already ran (or runs) for this attempt: end without a result."""


def current_key(vm: str) -> str:
    """Names the one attempt in flight for *vm* (set NX: no second migration starts)."""
    return f"fcq:mig:{vm}:current"


def attempt_prefix(vm: str, attempt: str) -> str:
    return f"fcq:mig:{vm}:{attempt}:"


def claim_attempt(client: redis.Redis, vm: str, attempt: str, ttl: int) -> str | None:
    """Register *attempt* as vm's migration; return the attempt already in flight, if any."""
    if client.set(current_key(vm), attempt, nx=True, ex=ttl):
        return None
    other = client.get(current_key(vm))
    return None if other is None else str(other)


def release_attempt(client: redis.Redis, vm: str, attempt: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                    "return redis.call('del', KEYS[1]) end return 0", 1, current_key(vm),
                    attempt)


def request_abort(client: redis.Redis, vm: str, reason: str, ttl: int) -> str | None:
    """Ask the attempt in flight for *vm* to stop; return its id (None: nothing runs)."""
    raw = client.get(current_key(vm))
    if raw is None:
        return None
    attempt = str(raw)
    client.set(attempt_prefix(vm, attempt) + "abort", f"operator: {reason}", ex=ttl, nx=True)
    return attempt


class Rendezvous:
    """The keys one half of one attempt shares with its peer, and its heartbeat.

    Use it with ``with``: a thread keeps ``hb:<side>`` fresh for as long as
    the half runs, so a single slow step (a monitor call, a QEMU teardown)
    never makes this half look dead; only a stopped or dead process stops
    beating.
    """

    def __init__(self, client: redis.Redis, vm: str, attempt: str, side: str,
                 heartbeat_ttl: float, peer_grace: float, key_ttl: int) -> None:
        self.client = client
        self.vm = vm
        self.attempt = attempt
        self.side = side
        self.peer = "dst" if side == "src" else "src"
        self.prefix = attempt_prefix(vm, attempt)
        self.heartbeat_ttl = heartbeat_ttl
        self.peer_grace = peer_grace
        self.key_ttl = key_ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        #: Wall clock when this half began (its phase marks are wall clock too:
        #: the halves run on two hosts, whose monotonic clocks do not compare,
        #: while their wall clocks are NTP-synced).
        self.began_at = time.time()
        self._peer_seen = False
        self._redis_ok = time.monotonic()

    # -- keys ---------------------------------------------------------------

    def set(self, key: str, value: str) -> None:
        """Set *key* and wake a half blocked on it (:meth:`nap`), in one transaction."""
        wake = self.prefix + key + ":wake"
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.prefix + key, value, ex=self.key_ttl)
        pipe.rpush(wake, "1")
        pipe.expire(wake, self.key_ttl)
        pipe.execute()

    def nap(self, key: str, seconds: float) -> None:
        """Sleep up to *seconds*, ended early once *key* is set.

        The key itself stays the fact (the caller reads it again); the wake
        list only ends the sleep, so a missed or stale wake costs at most
        *seconds*. Redis away: a plain sleep.
        """
        if seconds <= 0:
            return
        try:
            self.client.blpop([self.prefix + key + ":wake"], timeout=seconds)
        except redis.RedisError:
            time.sleep(seconds)

    def get(self, key: str) -> str | None:
        value = self.client.get(self.prefix + key)
        return None if value is None else str(value)

    def try_set(self, key: str, value: str) -> bool:
        """Set *key*; a Redis failure is logged, not raised (the peer has other ways)."""
        try:
            self.set(key, value)
            return True
        except redis.RedisError as err:
            log.warning("rendezvous-set-failed", vm=self.vm, key=key, error=str(err))
            return False

    def try_get(self, key: str) -> str | None:
        try:
            value = self.get(key)
            self._redis_ok = time.monotonic()
            return value
        except redis.RedisError:
            return None

    # -- at most once -------------------------------------------------------

    def begin(self) -> str:
        """'first' when this half runs for the first time, else what became of the first.

        'running' (its heartbeat is fresh), 'finished' (it recorded an
        outcome) or 'died' (neither: its worker died, this is the broker's
        redelivery).
        """
        if self.client.set(self.prefix + f"ran:{self.side}", str(time.time()), nx=True,
                           ex=self.key_ttl):
            return "first"
        if self.client.exists(self.prefix + f"done:{self.side}"):
            return "finished"
        if self.client.exists(self.prefix + f"hb:{self.side}"):
            return "running"
        return "died"

    def is_current(self) -> bool:
        return self.client.get(current_key(self.vm)) == self.attempt

    def finish(self, outcome: str) -> None:
        self.try_set(f"done:{self.side}", outcome)

    def release(self) -> None:
        release_attempt(self.client, self.vm, self.attempt)

    # -- heartbeat ----------------------------------------------------------

    def __enter__(self) -> Rendezvous:
        self._beat_once()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"fcq-mig-hb-{self.vm}-{self.side}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.prefix + f"hb:{self.side}")

    def _beat_once(self) -> None:
        try:
            self.client.set(self.prefix + f"hb:{self.side}", "1",
                            px=int(self.heartbeat_ttl * 1000))
        except redis.RedisError as err:  # Redis away: the peer's patience covers it
            log.warning("heartbeat-failed", vm=self.vm, side=self.side, error=str(err))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_ttl / 5):
            self._beat_once()

    # -- the peer -----------------------------------------------------------

    def abort(self, reason: str) -> None:
        # If Redis is away, the peer's heartbeat check and deadline still end it.
        with contextlib.suppress(redis.RedisError):
            self.client.set(self.prefix + "abort", f"{self.side}: {reason}", ex=self.key_ttl,
                            nx=True)

    def check(self, deadline: Deadline) -> None:
        """Raise MigrationAborted if the attempt is over for any reason.

        The peer counts as gone only on a successful read that finds its
        heartbeat missing: after its start grace (the two halves are two
        tasks that may start seconds apart on busy hosts) or once it was
        seen. Redis being unreachable is not the peer's silence; it ends the
        attempt only when it lasts longer than a heartbeat would.
        """
        try:
            reason = self.get("abort")
            peer_alive = bool(self.client.exists(self.prefix + f"hb:{self.peer}"))
            self._redis_ok = time.monotonic()
        except redis.RedisError as err:
            if time.monotonic() - self._redis_ok > self.heartbeat_ttl:
                raise MigrationAborted(f"{self.vm}: Redis unreachable for more than "
                                       f"{self.heartbeat_ttl:.0f} s: {err}", vm=self.vm) from err
            reason, peer_alive = None, True
        if reason is not None:
            raise MigrationAborted(f"{self.vm}: migration aborted ({reason})", vm=self.vm)
        if peer_alive:
            self._peer_seen = True
        elif self._peer_seen or time.monotonic() - self._started > self.peer_grace:
            raise PeerSilent(f"{self.vm}: the {self.peer} half went silent", vm=self.vm)
        if deadline.passed():
            raise MigrationAborted(f"{self.vm}: migration did not finish in time", vm=self.vm)

    def wait_for(self, key: str, deadline: Deadline) -> str:
        while True:
            self.check(deadline)
            value = self.try_get(key)
            if value is not None:
                return value
            self.nap(key, min(POLL, deadline.remaining()))
