"""Following a task's result through Redis outages, for a long-lived orchestrator.

Celery's Redis result backend pushes state changes over pub/sub. When the
pub/sub connection breaks, its consumer retries the reconnect
(``retry_policy``, 20 × 1 s by default) and then gives up for good: "Retry
limit exceeded while trying to reconnect to the Celery result store backend.
The Celery application must be restarted." (a RuntimeError). Measured: an
orchestrator waiting through a 20 s Redis outage was left that way, and
every later wait() hung until its timeout, because the consumer's
subscriptions were gone while it still listed them.

So an orchestrator does not rely on the consumer alone:

* its backend retries only briefly (CLIENT_RETRY_POLICY), so a wait() keeps
  control of its own deadline instead of sitting in Celery's retry loop;
* :func:`follow` reads the task's state itself at least every POLL_EVERY
  seconds (each ``AsyncResult.get`` starts with one read), so a lost
  pub/sub message costs at most that long;
* after any broker error it replaces its thread's result backend with a
  fresh one (:func:`renew_backend`) and reads the task's state until Redis
  answers again.

While Redis is away, :func:`follow` keeps trying until its timeout: an
outage is not the task's failure, and the task may well finish meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
import structlog
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fcq_tasks import trust
from fcq_tasks.config import peers
from fcq_tasks.errors import ConfigError, SystemFailure

log = structlog.get_logger()

#: What talking to Redis can raise, through redis-py or through kombu.
BROKER_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError)

#: Redis's own words (through redis-py or wrapped by kombu) → what is wrong.
_REDIS_REFUSALS = (
    (("wrongpass", "invalid username-password", "invalid password"),
     "Redis refused the credentials (wrong password or user name, or the user is "
     "disabled): check cluster.password_file and the user in cluster.broker_url"),
    (("without any password configured", "no password is set", "client sent auth, but"),
     "Redis has no password set, but cluster.password_file gives one: set requirepass "
     "(or an ACL user) on Redis, or drop password_file"),
    (("noauth", "authentication required", "already authenticated"),
     "Redis requires a password: set cluster.password_file"),
    (("noperm", "no permissions"),
     "Redis refused this user a command or key: its ACL rules (fcq config redis-acl, "
     "docs/security.md)"),
    (("certificate verify failed",),
     "Redis's TLS certificate is not trusted: check cluster.tls_ca_file"),
)


def redis_failure(err: BaseException, doing: str = "") -> SystemFailure:
    """A SystemFailure that says what is wrong with Redis: refused credentials are
    not "unreachable"."""
    text = str(err)
    lowered = text.lower()
    for needles, meaning in _REDIS_REFUSALS:
        if any(n in lowered for n in needles):
            return SystemFailure(f"{meaning}{doing} ({text})")
    return SystemFailure(f"Redis unreachable{doing}: {text}")

#: The result backend's own reconnect retries in an orchestrator: short, so
#: that an outage comes back to :func:`follow` (which has a deadline) at once.
CLIENT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                       "interval_max": 0.5}

#: What a host's signature on a task's result is for (trust.sign_document).
RESULT_PURPOSE = "fcq-result"

#: The signer the controller's results name: it signs them with the
#: orchestrator's key. Not a host name (NAME_RE), so no host record stands in.
CONTROLLER_SIGNER = "@controller"


def verify(info: dict[str, Any], task_id: str, expected: str | None,
           hosts_dir: Path, task: str | None = None,
           orchestrator_keys: Sequence[Ed25519PublicKey] = ()) -> str | None:
    """Why result *info* of task *task_id* is not to be believed, or None if it is.

    Believed: signed, for this task id and task name *task* (None: the one
    the signature names), by host *expected* (where the task was sent;
    None: by the host the signature names) with the key in that host's
    record in *hosts_dir*. The name counts: another task run under the
    same id (a ping sent with a start's id) answers something else.
    *expected* CONTROLLER_SIGNER: signed by the controller, with one of
    *orchestrator_keys*.
    """
    signature = info.get("signature")
    if not isinstance(signature, dict):
        return "it is not signed"
    signer = signature.get("host")
    if not isinstance(signer, str):
        return "its signature names no host"
    if expected is not None and signer != expected:
        return f"it is signed by {signer!r}, and the task was sent to {expected!r}"
    if signer == CONTROLLER_SIGNER:
        keys = list(orchestrator_keys)
    else:
        try:
            keys = [peers.cached_peer(hosts_dir, signer).public_key]
        except (ConfigError, ValueError) as err:
            return f"its signer {signer!r} has no usable record: {err}"
    signed_task = signature.get("task")
    if not isinstance(signed_task, str):
        return "its signature names no task"
    if task is not None and signed_task != task:
        return f"it is the result of {signed_task}, and the task sent was {task}"
    body = {k: v for k, v in info.items() if k != "signature"}
    if not any(trust.verify_document(key, RESULT_PURPOSE, body, signature.get("sig"),
                                     id=task_id, task=signed_task) for key in keys):
        return f"its signature does not verify with {signer}'s key"
    return None


#: The longest follow() goes without reading the task's state itself.
POLL_EVERY = 2.0
#: Pause between two attempts while Redis does not answer.
OUTAGE_RETRY = 0.5


def lost_result_store(err: BaseException) -> bool:
    """Whether *err* is Celery's "retry limit exceeded" (a RuntimeError) after a Redis error."""
    return isinstance(err, RuntimeError) and isinstance(err.__cause__, BROKER_ERRORS)


def renew_backend(app: Celery) -> None:
    """Give this thread a fresh result backend in place of one that went through an outage.

    Rebuilding the old one's consumer in place (Celery's own reconnect step,
    run again once Redis answered) was tried first: in one run of three, a
    wait() then hung for the backend's whole socket timeout (120 s), on a
    connection left over from before the outage. A new backend has a new
    pool and a new pub/sub connection; the old one is closed first, without
    network traffic, so that nothing it kept can reach Redis later.
    """
    a: Any = app  # Celery's stubs do not know the backend slot (per thread unless thread-safe)
    old = a._backend
    if old is not None:
        consumer = getattr(old, "result_consumer", None)
        if consumer is not None:
            consumer.subscribed_to.clear()  # nothing left to unsubscribe through it
            with contextlib.suppress(Exception):  # closing a dead socket may complain
                consumer.stop()
            consumer._pubsub = None
        client = old.__dict__.get("client")  # a cached_property: never create it here
        if client is not None:
            with contextlib.suppress(Exception):
                client.connection_pool.disconnect()
    a._backend = a._get_backend()


def follow(app: Celery, task_id: str, timeout: float | None,
           on_message: Callable[[dict[str, Any]], None]) -> AsyncResult[Any]:
    """Wait until task *task_id* is ready, through Redis outages, for at most *timeout* s.

    Raises SystemFailure when the timeout passes (saying whether Redis was
    reachable at the end).
    """
    res: AsyncResult[Any] = AsyncResult(task_id, app=app)
    deadline = None if timeout is None else time.monotonic() + timeout
    broken: BaseException | None = None  # the last broker error, while it lasts
    while True:
        left = POLL_EVERY if deadline is None else deadline - time.monotonic()
        if left <= 0:
            if broken is not None:
                raise SystemFailure(f"Redis unreachable while waiting for task {task_id} "
                                    f"({timeout} s): {broken}", task_id=task_id) from broken
            raise SystemFailure(f"task {task_id} not finished after {timeout} s "
                                f"(state {res.state})", task_id=task_id, state=res.state)
        try:
            if broken is not None:
                res.backend.get_task_meta(task_id, cache=False)  # raises while Redis is away
                log.info("result-store-back", task_id=task_id)
                broken = None
            res.get(timeout=min(left, POLL_EVERY), propagate=False, on_message=on_message,
                    interval=POLL_EVERY)
            return res
        except CeleryTimeoutError:
            continue  # not ready yet: the next get() reads its state again
        except (*BROKER_ERRORS, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not lost_result_store(err):
                raise
            if broken is None:
                log.warning("result-store-lost", task_id=task_id, error=str(err))
                renew_backend(app)
                res = AsyncResult(task_id, app=app)  # bound to the backend it was made with
            broken = err
            time.sleep(min(OUTAGE_RETRY, max(0.0, left)))
