"""Live migration: the two halves of one attempt, and what makes each run once.

Handover order (no moment with two copies that may run)::

    dst: start QEMU -incoming defer -S        (no locks; guest code cannot run)
    dst: listen on an ephemeral port ──► key addr
    src: migrate ──► memory copy, progress ──► completed
         (src QEMU is now postmigrate: paused, never to run again)
    src: kill its QEMU, hand every lock to dst (the lock records "from src"),
         config → dst ──► key src-done
    dst: sees the locks handed over, checks it holds all of them,
         config → dst, `cont` ──► key dst-running, claims the locks

The disk locks carry the handover, not Redis: a destination resumes a
received copy only when every lock was handed to it, which the source does
only after its QEMU is gone; a source whose locks were handed away never
starts the guest again and its ensure points its config at the holder.
Each half heartbeats from a thread, runs at most once per attempt
(``ran:<side>``), and only while its attempt is the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import structlog

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import GiB
from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import Refused
from fcq_tasks.host import maintenance
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.migration.incoming import Incoming
from fcq_tasks.host.migration.outgoing import Outgoing
from fcq_tasks.host.migration.rendezvous import (
    DuplicateHalf,
    MigrationAborted,
    Rendezvous,
    claim_attempt,
    current_key,
    release_attempt,
    request_abort,
)

log = structlog.get_logger()

__all__ = ["DuplicateHalf", "MigrationAborted", "Rendezvous", "attempt_seconds",
           "claim_attempt", "current_key", "inmigrate", "key_ttl", "outmigrate",
           "release_attempt", "request_abort"]


class AttemptOver(Refused):
    """The attempt this half belongs to ended or was replaced: nothing was done."""


def attempt_seconds(settings: HostSettings, memory_mb: int) -> float:
    """How long one attempt may take: per GiB of guest memory, capped."""
    gib = max(1.0, memory_mb * 2**20 / GiB)
    return min(settings.migration_timeout_per_gib * gib, settings.migration_timeout_max)


def key_ttl(settings: HostSettings) -> int:
    """How long an attempt's keys live: past any redelivery of its halves.

    The broker delivers an unacknowledged half again after the visibility
    timeout (while it still runs, or after its worker died); ``ran:<side>``
    must still be there then, or the replay would run again.
    """
    c = settings.cluster
    return int(2 * c.visibility_timeout + settings.migration_timeout_max
               + settings.migration_peer_grace + 60)


def _rendezvous(client: redis.Redis, settings: HostSettings, vm: str, attempt: str,
                side: str) -> Rendezvous:
    return Rendezvous(client, vm, attempt, side, settings.migration_heartbeat_ttl,
                      settings.migration_peer_grace, key_ttl(settings))


def _run_half(agent: VMAgent, rdv: Rendezvous, body: Callable[[], dict[str, Any]],
              rescue: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    first = rdv.begin()
    if first in ("running", "finished"):
        log.warning("duplicate-half", vm=agent.name, side=rdv.side, attempt=rdv.attempt,
                    first=first, action="ignore")
        raise DuplicateHalf(f"{agent.name}: {rdv.side} half of {rdv.attempt} {first} already")
    if first == "died":
        # The broker's redelivery after this half's worker died: the world
        # moved on; converge this host and say where the guest is.
        log.warning("half-redelivered", vm=agent.name, side=rdv.side, attempt=rdv.attempt,
                    action="ensure")
        return rescue()
    if not rdv.is_current():
        rdv.finish("not-current")
        raise AttemptOver(f"{agent.name}: migration attempt {rdv.attempt} is no longer the "
                          "current one (it ended or was replaced): nothing done",
                          vm=agent.name, attempt=rdv.attempt)
    try:
        with rdv:
            result = body()
        rdv.finish(str(result.get("outcome", "ok")))
        return result
    except BaseException as err:
        rdv.finish(f"failed: {err}")
        raise
    finally:
        rdv.release()


def inmigrate(agent: VMAgent, client: redis.Redis, attempt: str, src: str) -> dict[str, Any]:
    """The destination half. Holds the VM's operation lock throughout."""
    rdv = _rendezvous(client, agent.settings, agent.name, attempt, "dst")

    def body() -> dict[str, Any]:
        # Checked on this host, not only by the orchestrator: a late or
        # hand-made request must not bring a VM onto a host in maintenance.
        try:
            maintenance.refuse_if_drained(agent.settings, agent.name, "receive")
        except Refused as err:
            rdv.abort(err.message)  # tell the source now, not by our silence
            raise
        spec = agent.spec()
        deadline = Deadline.after(attempt_seconds(agent.settings, spec.memory_mb)
                                  + agent.settings.migration_peer_grace, "the migration")
        return Incoming(agent, rdv, src, deadline).run()

    def rescue() -> dict[str, Any]:
        result = agent.ensure()
        if result.get("status") == "running":
            return {"vm": agent.name, "host": agent.settings.host, "operation": "inmigrate",
                    "status": "running", "outcome": "rescued", "rescue": "redelivered",
                    "ensure": result}
        raise MigrationAborted(f"{agent.name}: the destination's worker died during attempt "
                               f"{attempt}; ensure here found {result.get('status')}",
                               vm=agent.name)
    return _run_half(agent, rdv, body, rescue)


def outmigrate(agent: VMAgent, client: redis.Redis, attempt: str, dst: str) -> dict[str, Any]:
    """The source half. Holds the VM's operation lock throughout."""
    rdv = _rendezvous(client, agent.settings, agent.name, attempt, "src")

    def body() -> dict[str, Any]:
        ident = agent.qemu.identity()
        memory_mb = ident.memory_mb if ident else 1024
        deadline = Deadline.after(attempt_seconds(agent.settings, memory_mb)
                                  + agent.settings.migration_peer_grace, "the migration")
        return Outgoing(agent, rdv, dst, deadline).run()

    def rescue() -> dict[str, Any]:
        result = agent.ensure()
        if agent.observe().handed_away_to == dst:
            return {"vm": agent.name, "host": agent.settings.host, "operation": "outmigrate",
                    "to": dst, "outcome": "handed-over", "rescue": "redelivered",
                    "ensure": result}
        raise MigrationAborted(f"{agent.name}: the source's worker died during attempt "
                               f"{attempt}; ensure here found {result.get('status')}",
                               vm=agent.name)
    return _run_half(agent, rdv, body, rescue)
