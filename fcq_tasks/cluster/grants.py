"""Signed commands: the orchestrator grants, the host verifies.

Every imperative request (start, stop, kill, apply_config, both migration
halves, …: :data:`SIGNED_TASKS`) carries a ``grant`` argument: an Ed25519
signature by the orchestrator's key over

    the task's name, its task id, the target host, a SHA-256 of every other
    argument (``expires_at`` among them, which such a request must carry)

so a grant made for one request is worth nothing for any other. The key
that signs lives only on the orchestrator side (``cluster.orchestrator_key_file``);
hosts know its public half (``cluster.orchestrator_keys``, two while a key
is rotated) and cannot make a grant themselves. Redis, which every host can
write, only carries them.

The task id is the nonce. A message comes twice for honest reasons (a
worker died and the broker delivers it again, a busy VM's retry), and then
it must run; after it has run once (whatever its outcome) the same id is a
replay and is refused. The host keeps the ids it has finished in
``<state_dir>/grants/`` until they expire: on its own disk, where no other
host can delete them, unlike anything in Redis.

Why not Celery's ``auth`` serializer: every certificate in its store may
sign any task for any queue, it signs only the body (the routing to a host
is not covered), and nothing in it stops a replay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fcq_tasks import trust
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import BadRequest, ConfigError, Unauthorized

log = structlog.get_logger()

PURPOSE = "fcq-command"

#: The tasks that change something on a host: each needs a grant.
#: Not signed, and why that is safe: ``ensure``/``ensure_host`` converge a
#: host to the VM files it already has (beat's sweeps send them);
#: ``plan``, ``snapshots`` and ``ping`` only read; ``finish_migration``
#: only records an outcome and ``migration_failed`` only runs ensure.
SIGNED_TASKS = frozenset({
    "fcq.start", "fcq.stop", "fcq.restart", "fcq.kill", "fcq.force_unlock",
    "fcq.apply_config", "fcq.snapshot", "fcq.remove_snapshot", "fcq.resize",
    "fcq.upgrade", "fcq.set_drained", "fcq.evacuate", "fcq.lock", "fcq.unlock",
    "fcq.inmigrate", "fcq.outmigrate"})

#: What a task id may look like before it names a file: Celery's uuid4, or
#: fcq's own ``<attempt>-out`` / ``<attempt>-in``.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")

#: Seconds a finished id is kept beyond its request's expiry (clock steps).
KEEP_MARGIN = 3600


class Replayed(Unauthorized):
    """A request that already ran here came again."""


def digest(kwargs: dict[str, Any]) -> str:
    """SHA-256 of every argument but the grant, canonical JSON (what the message carries)."""
    rest = {k: v for k, v in kwargs.items() if k != "grant"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _fields(task: str, task_id: str, host: str, kwargs: dict[str, Any]) -> dict[str, str]:
    return {"task": task, "id": task_id, "host": host, "args": digest(kwargs)}


def grant(key: Ed25519PrivateKey, task: str, task_id: str, host: str,
          kwargs: dict[str, Any]) -> dict[str, str]:
    """The ``grant`` argument for request *task_id* of *task* to *host* with *kwargs*."""
    return {"sig": trust.sign(key, PURPOSE, _fields(task, task_id, host, kwargs))}


def load_signing_key(settings: HostSettings) -> Ed25519PrivateKey:
    """The orchestrator's private key; a clear error where there is none (a host)."""
    path = settings.cluster.orchestrator_key_file
    if path is None:
        raise ConfigError(settings.source, "cluster.orchestrator_key_file",
                          "not set: imperative requests (start, stop, migrate, …) are "
                          "signed with the orchestrator's key, and this machine does not "
                          "hold it (hypervisors never do; docs/security.md)")
    return trust.cached_private_key(path, "cluster.orchestrator_key_file")


_keys_cache: dict[tuple[str, ...], list[Ed25519PublicKey]] = {}


def public_keys(settings: HostSettings) -> list[Ed25519PublicKey]:
    """The orchestrator keys *settings* accept (cluster.orchestrator_keys), parsed once."""
    texts = settings.cluster.orchestrator_keys
    keys = _keys_cache.get(texts)
    if keys is None:
        keys = [trust.parse_public_key(settings.source, "cluster.orchestrator_keys", t)
                for t in texts]
        _keys_cache[texts] = keys
    return keys


def check(settings: HostSettings, task: str, task_id: object,
          kwargs: dict[str, Any]) -> bool:
    """Verify *kwargs*' grant for request *task_id* of *task* to this host.

    Returns whether the request was signed (False: unsigned, accepted only
    under ``cluster.accept_unsigned``). Raises :class:`Unauthorized` for
    anything else: nothing has been looked at or changed yet.
    """
    given = kwargs.get("grant")
    if given is None and settings.cluster.accept_unsigned:
        log.warning("unsigned-request-accepted", task=task, task_id=task_id,
                    detail="cluster.accept_unsigned is true (rolling upgrade only)")
        return False
    what = f"{task} request {task_id}"
    if given is None:
        raise Unauthorized(f"{what} carries no grant: imperative requests must be signed "
                           "by the orchestrator's key; nothing was done", task=task,
                           field="grant", rule="an imperative request carries the "
                           "orchestrator's grant")
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise BadRequest("task_id", f"must be letters, digits and '-' (got {task_id!r})")
    sig = given.get("sig") if isinstance(given, dict) else None
    keys = public_keys(settings)
    try:
        fields = _fields(task, task_id, settings.host, kwargs)
    except (TypeError, ValueError) as err:  # not JSON-able as given: not what was signed
        raise BadRequest("kwargs", f"cannot be digested: {err}") from err
    if not isinstance(sig, str) or not any(trust.verify(k, PURPOSE, fields, sig)
                                           for k in keys):
        why = ("this host lists no orchestrator key (cluster.orchestrator_keys)" if not keys
               else "the signature does not verify with any key in cluster.orchestrator_keys "
               "for this task, id, host and arguments")
        raise Unauthorized(f"{what} refused: its grant is not valid: {why}; nothing was done",
                           task=task, field="grant", rule="signed by the orchestrator for "
                           "exactly this task, id, host and arguments")
    expires_at = kwargs.get("expires_at")
    if (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
            or not math.isfinite(expires_at)):
        raise Unauthorized(f"{what} refused: a signed request must carry expires_at "
                           f"(got {expires_at!r}); nothing was done", task=task,
                           field="expires_at", rule="an imperative request expires")
    if spent(settings, task_id):
        raise Replayed(f"{what} refused: this request already ran on "
                           f"{settings.host} (a replay); nothing was done", task=task,
                           field="grant", rule="a grant is used once")
    return True


@dataclass(frozen=True)
class Outcome:
    """How a request ended: ``result`` (its value), ``rejected``/``failed`` (the
    error's info), ``ignored`` (nothing to answer)."""

    kind: str
    value: Any = None


def _spent_dir(settings: HostSettings) -> Path:
    return settings.state_dir / "grants"


def spent(settings: HostSettings, task_id: str) -> bool:
    return (_spent_dir(settings) / task_id).exists()


def earlier_outcome(settings: HostSettings, task_id: str) -> Outcome | None:
    """The outcome kept for request *task_id*; None if none can be read."""
    try:
        with open(_spent_dir(settings) / task_id, encoding="utf-8") as f:
            raw = json.loads(f.read(MAX_OUTCOME_BYTES + 1))
        return Outcome(str(raw["kind"]), raw.get("value"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


_prune_lock = threading.Lock()
_last_prune = [0.0]

#: An outcome larger than this is not kept (only that the request ran).
MAX_OUTCOME_BYTES = 1 << 20


def mark_spent(settings: HostSettings, task_id: str, expires_at: float,
               outcome: Outcome | None = None) -> None:
    """Remember that request *task_id* has run here and how, until it could not run anyway.

    Written whole or not at all (a temporary file renamed), on this host's
    disk, mode 0600.
    """
    directory = _spent_dir(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = outcome or Outcome("ignored")
    try:
        text = json.dumps({"expires_at": expires_at, "kind": kept.kind, "value": kept.value})
    except (TypeError, ValueError):
        text = ""
    if not text or len(text) > MAX_OUTCOME_BYTES:
        text = json.dumps({"expires_at": expires_at, "kind": "ignored"})
    tmp = directory / f".{task_id}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, directory / task_id)
    _prune(directory)


def _prune(directory: Path) -> None:
    """Forget ids whose requests have expired long ago (at most once a minute)."""
    with _prune_lock:
        now = time.monotonic()
        if now - _last_prune[0] < 60:
            return
        _last_prune[0] = now
    wall = time.time()
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                with open(entry.path, encoding="utf-8") as f:
                    due = float(json.loads(f.read(MAX_OUTCOME_BYTES + 1))["expires_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if wall > due + KEEP_MARGIN:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
