"""`fcq controller`: the orchestrator side's own worker, holding the signing key.

Hosts never send work to each other (a host's credentials command nothing
but that host). When a host finds that a VM it runs is now declared for
another host (a pushed config moved ``kvm_host``), it asks the controller,
on the queue ``fcq.controller``, with a request signed by its *own* host
key: "move vm01 from me to beta". The controller checks that signature
against the host's record (``<cluster.hosts_dir>/<src>.yaml``), that the
request has not expired, that the VM runs on that very host and that the
host's own config declares the destination, and only then starts the
migration, signed with the orchestrator's key like any ``fcq migrate``.

What a host can therefore make the controller do: migrate a VM it runs
itself to the host its config names, nothing else; a host that lies can
give its own guests away, which root on it can do anyway.

A migration's chord ends here too: its callback (:func:`finish_migration`)
and errback (:func:`migration_failed`) go to this queue, not to a host's.
The half that finishes last sends them, so with a host as their target one
host would write another host's queue. The controller checks the halves'
signed results, signs its own with the orchestrator's key
(results.CONTROLLER_SIGNER), and after a failure asks both hosts for a
sweep, which converges each side at once.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any

import structlog
from kombu import Exchange, Queue

from fcq_tasks import trust
from fcq_tasks.cluster.celeryapp import CONTROLLER_QUEUE, app, configure
from fcq_tasks.cluster.redisacl import unacked_keys
from fcq_tasks.cluster.results import CONTROLLER_SIGNER as CONTROLLER_SIGNER
from fcq_tasks.cluster.results import verify as verify_result
from fcq_tasks.cluster.taskargs import kwargs_repr
from fcq_tasks.cluster.tasks import FcqTask, _check_name, current_settings
from fcq_tasks.config import peers
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.errors import BadRequest, FcqError, Refused, Unauthorized

log = structlog.get_logger()

MOVE_PURPOSE = "fcq-move-wanted"


def _move_fields(vm: str, src: str, dst: str, expires_at: float) -> dict[str, str]:
    return {"vm": vm, "src": src, "dst": dst, "expires_at": repr(float(expires_at))}


def request_move(settings: HostSettings, vm: str, dst: str) -> str:
    """On a host: ask the controller to migrate *vm* from here to *dst*; the task id."""
    key = trust.cached_private_key(settings.host_key_file)
    # Short: a sweep asks again next time if the VM still needs moving.
    expires_at = time.time() + min(settings.cluster.request_ttl,
                                   4 * settings.cluster.sweep_interval + 60)
    kwargs = {"vm": vm, "src": settings.host, "dst": dst, "expires_at": expires_at,
              "sig": trust.sign(key, MOVE_PURPOSE,
                                _move_fields(vm, settings.host, dst, expires_at))}
    # declare=[]: a host may not bind queues, and ignore_result: nor
    # subscribe to a result's channel (cluster/redisacl.py). The controller
    # declared its queue when it started; the host reads no answer (its
    # next sweep asks again if the VM still needs moving).
    result = app.send_task("fcq.move_wanted", kwargs=kwargs, queue=CONTROLLER_QUEUE,
                           kwargsrepr=kwargs_repr(kwargs), declare=[], ignore_result=True)
    return str(result.id)


@app.task(bind=True, base=FcqTask, name="fcq.move_wanted")
def move_wanted(self: FcqTask, /, vm: object = None, src: object = None, dst: object = None,
                expires_at: object = None, sig: object = None, **_: Any) -> dict[str, Any]:
    """On the controller: start the migration host *src* asked for, once it checks out."""
    from fcq_tasks.cluster.api import Orchestrator
    settings = current_settings()
    try:
        name = _check_name("vm", vm, "a VM name")
        source = _check_name("src", src, "the asking host's name")
        target = _check_name("dst", dst, "the destination host's name")
        if (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
                or not math.isfinite(expires_at)):
            raise BadRequest("expires_at", f"must be seconds since the epoch (got {expires_at!r})")
        peer = peers.load_peer(settings.cluster.hosts_dir, source)
        if not isinstance(sig, str) or not trust.verify(
                peer.public_key, MOVE_PURPOSE, _move_fields(name, source, target, expires_at),
                sig):
            raise Unauthorized(f"move of {name} from {source} to {target} refused: not "
                               f"signed by {source}'s key (its record in "
                               "cluster.hosts_dir); nothing was done", vm=name, field="sig",
                               rule="a host asks for its own moves, signed")
        if time.time() > expires_at:
            raise Refused(f"move of {name} from {source} to {target} refused: the request "
                          "expired; the host asks again at its next ensure", vm=name,
                          field="expires_at")
        with Orchestrator(settings) as orch:
            hosts = orch.hosts()  # one read of the registry for every check below
            record = hosts.get(source)
            if record is None or name not in record.get("running", []):
                raise Refused(f"{name} does not run on {source} (its heartbeat says so): "
                              "a host may only give away a VM it runs", vm=name, host=source)
            declared = record.get("vms", {}).get(name, {}).get("kvm_host")
            if declared != target:
                raise Refused(f"{source}'s config declares {name} for {declared!r}, not "
                              f"{target!r}: not moved", vm=name, host=source)
            # The destination's own word too: a host cannot send a VM to a
            # host whose config does not want it (or claim a VM it does not
            # run while another host runs it).
            wanted = hosts.get(target, {}).get("vms", {}).get(name, {}).get("kvm_host")
            if wanted != target:
                raise Refused(f"{target}'s config declares {name} for {wanted!r}, not "
                              f"itself: not moved", vm=name, host=target)
            others = sorted(h for h, r in hosts.items()
                            if h != source and name in r.get("running", []))
            if others:
                raise Refused(f"{name} runs on {', '.join(others)} too: not moved from "
                              f"{source}", vm=name, host=others[0])
            task_id = orch.migrate(name, target, src=source)
    except FcqError as err:
        log.warning("move-refused", vm=vm, src=src, dst=dst, error=err.message)
        raise self.fail(err) from err
    log.info("move-started", vm=name, src=source, dst=target, task_id=task_id)
    return {"vm": name, "operation": "move", "from": source, "to": target,
            "migration": task_id}


@app.task(bind=True, base=FcqTask, name="fcq.finish_migration")
def finish_migration(self: FcqTask, /, results: Any = None, vm: object = None,
                     attempt: object = None, src: object = None, dst: object = None,
                     sent_at: float | None = None, **_: Any) -> dict[str, Any]:
    """Chord body, on the controller: both halves succeeded; check and return the outcome.

    *sent_at*: when the orchestrator sent the chord (wall clock), for the phases.
    """
    from fcq_tasks.host.migration.phases import migration_phases
    callback_at = time.time()
    halves = {r.get("operation"): r for r in results or [] if isinstance(r, dict)}
    out, inn = halves.get("outmigrate", {}), halves.get("inmigrate", {})
    settings = current_settings()
    try:
        name = _check_name("vm", vm, "a VM name")
        attempt_id = _check_name("attempt", attempt, "a migration attempt id")
        source = _check_name("src", src, "the source host's name")
        target = _check_name("dst", dst, "the destination host's name")
        # The halves' results come in the message, which any host can send
        # to this queue: "migrated" only on results the two hosts signed.
        for half, signer, side in ((inn, target, "in"), (out, source, "out")):
            why = verify_result(half, f"{attempt_id}-{side}", signer,
                                settings.cluster.hosts_dir, f"fcq.{side}migrate")
            if why is not None and not (settings.cluster.accept_unsigned
                                        and "signature" not in half):
                raise Refused(f"{name}: migration {attempt_id}: a half's result is not "
                              f"believed: {why}; not recorded as migrated", vm=name,
                              attempt=attempt_id)
    except FcqError as err:
        raise self.fail(err) from err
    phases = migration_phases(out, inn, sent_at if isinstance(sent_at, float) else None,
                              callback_at)
    log.info("migrated", vm=name, attempt=attempt_id, src=source, dst=target, phases=phases)
    return {"vm": name, "operation": "migrate", "attempt": attempt_id, "outcome": "migrated",
            "from": out.get("host"), "to": inn.get("host"), "status": inn.get("status"),
            "total_ms": out.get("total_ms"), "downtime_ms": out.get("downtime_ms"),
            # The guest's pause beyond QEMU's downtime: source saw the copy
            # completed → destination's `cont` (the resume alone without marks).
            "handover_ms": phases.get("handover", inn.get("resume_ms")),
            "transferred": out.get("transferred"), "phases": phases,
            "callback_at": callback_at}


@app.task(bind=True, base=FcqTask, name="fcq.migration_failed")
def migration_failed(self: FcqTask, /, *args: Any, vm: object = None, attempt: object = None,
                     src: object = None, dst: object = None, **_: Any) -> dict[str, Any]:
    """Chord errback, on the controller: a half failed. Both hosts sweep now.

    Each half has rolled its own side back already; the sweeps converge
    what is left (a VM the declared state wants running) without waiting
    for beat. A sweep is what beat sends anyway: nothing a host could not
    ask for itself.
    """
    from fcq_tasks.cluster.api import Orchestrator
    settings = current_settings()
    log.warning("migration-failed", vm=vm, attempt=attempt, src=src, dst=dst)
    sweeps: dict[str, str] = {}
    with Orchestrator(settings) as orch:
        for host in (src, dst):
            if not isinstance(host, str):
                continue
            try:
                sweeps[_check_name("host", host, "a host name")] = orch.sweep(host)
            except FcqError as err:  # gone or unknown: beat's next sweep, if it comes back
                log.warning("migration-failed-sweep", vm=vm, host=host, error=err.message)
    return {"vm": vm, "attempt": attempt, "operation": "migration-failed", "sweeps": sweeps}


def run_controller(settings: HostSettings, loglevel: str = "INFO") -> None:
    """Run the controller: a worker of its own queue, which signs what it starts."""
    from fcq_tasks.cluster import grants
    grants.load_signing_key(settings)  # refused now, not at the first move
    configure(settings)
    app.conf.fcq_settings = settings
    app.conf.fcq_role = "controller"  # runs celeryapp.CONTROLLER_TASKS only
    # Declared here, with the exchange Celery makes for a queue it sends
    # to: hosts send with declare=[] (cluster/redisacl.py).
    app.conf.task_queues = [Queue(CONTROLLER_QUEUE, Exchange(CONTROLLER_QUEUE),
                                  routing_key=CONTROLLER_QUEUE)]
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         **unacked_keys("controller")}
    app.conf.worker_enable_remote_control = False
    app.worker_main([
        "worker", "--queues", CONTROLLER_QUEUE,
        "--hostname", f"controller@{socket.gethostname()}",
        "--pool", "threads", "--concurrency", "2",
        "--without-mingle", "--without-gossip", "--task-events", "--loglevel", loglevel,
    ])
