"""Live migration: the two halves, meeting through Redis keys of one attempt.

Handover order (no window for two writers)::

    dst: start QEMU -incoming defer -S      (no locks; guest code cannot run)
    dst: migrate-incoming tcp:ADDR:PORT ──► key addr
    src: migrate ──► memory copy, progress published ──► completed
         (src now "postmigrate": paused, its guest will never run again)
    src: quit QEMU, release locks, rewrite kvm_host ──► key src-done
    dst: sees src-done, takes the locks, `cont`  ──► key dst-running
    dst: rewrite kvm_host                   (finish_migration records the outcome)

Both halves heartbeat (``hb:src``, ``hb:dst``, short ttl); either can set
``abort``. Each gives up on its own when the other goes silent or the
deadline (scaled with memory) passes. A crash at any point leaves a state
the next ensure decides safely: before ``completed`` the VM runs on the
source; between ``completed`` and ``src-done`` the source copy is
``postmigrate`` (the planner kills it) and nothing runs; after ``src-done``
the destination either runs it or, killed before ``cont``, the VM is stopped
everywhere and the destination's ensure starts it (its config says so).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
import yaml

from fcq_tasks.config.vmspec import GiB, spec_path
from fcq_tasks.errors import BadRequest, FcqError, QemuError, Refused, SystemFailure
from fcq_tasks.fileio import write_atomically
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.plan import Run

log = structlog.get_logger()

#: Seconds between heartbeats, and how long a heartbeat counts.
HEARTBEAT_EVERY = 0.5
HEARTBEAT_TTL = 5
#: How long one attempt's keys live.
KEY_TTL = 3600
#: Poll interval of the migration state.
POLL = 0.1


class MigrationAborted(SystemFailure):
    """The other half, a timeout or an operator ended the attempt."""


def current_key(vm: str) -> str:
    """Names the one attempt in flight for *vm* (set NX: no second migration starts)."""
    return f"fcq:mig:{vm}:current"


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


def request_abort(client: redis.Redis, vm: str, reason: str) -> str | None:
    """Ask the attempt in flight for *vm* to stop; return its id (None: nothing runs)."""
    raw = client.get(current_key(vm))
    if raw is None:
        return None
    attempt = str(raw)
    client.set(f"fcq:mig:{vm}:{attempt}:abort", f"operator: {reason}", ex=KEY_TTL, nx=True)
    return attempt


class Rendezvous:
    """The Redis keys one migration attempt of one VM shares."""

    def __init__(self, client: redis.Redis, vm: str, attempt: str, side: str) -> None:
        self.client = client
        self.prefix = f"fcq:mig:{vm}:{attempt}:"
        self.attempt = attempt
        self.side = side
        self.peer = "dst" if side == "src" else "src"
        self.vm = vm
        self._last_beat = 0.0

    def set(self, key: str, value: str) -> None:
        self.client.set(self.prefix + key, value, ex=KEY_TTL)

    def get(self, key: str) -> str | None:
        value = self.client.get(self.prefix + key)
        return None if value is None else str(value)

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_EVERY:
            self.client.set(self.prefix + f"hb:{self.side}", "1", ex=HEARTBEAT_TTL)
            self._last_beat = now

    def abort(self, reason: str) -> None:
        # If Redis is away, the peer's heartbeat check and deadline still end it.
        with contextlib.suppress(redis.RedisError):
            self.client.set(self.prefix + "abort", f"{self.side}: {reason}", ex=KEY_TTL,
                            nx=True)

    def check(self, started: float, deadline: float) -> None:
        """Raise MigrationAborted if the attempt is over for any reason."""
        self.beat()
        reason = self.get("abort")
        if reason is not None:
            raise MigrationAborted(f"{self.vm}: migration aborted ({reason})", vm=self.vm)
        # The peer gets HEARTBEAT_TTL to show up before its silence counts.
        if time.monotonic() - started > HEARTBEAT_TTL and \
                not self.client.exists(self.prefix + f"hb:{self.peer}"):
            raise MigrationAborted(f"{self.vm}: the {self.peer} half went silent", vm=self.vm)
        if time.monotonic() > deadline:
            raise MigrationAborted(f"{self.vm}: migration did not finish in time", vm=self.vm)

    def wait_for(self, key: str, started: float, deadline: float) -> str:
        while True:
            self.check(started, deadline)
            value = self.get(key)
            if value is not None:
                return value
            time.sleep(POLL)


def deadline_for(agent: VMAgent, memory_mb: int) -> float:
    gib = max(1.0, memory_mb * 2**20 / GiB)
    return time.monotonic() + agent.settings.migration_timeout_per_gib * gib


def count_migrations(agent: VMAgent) -> int:
    return len(list(agent.settings.run_dir.glob("*.migrating")))


def _slot(agent: VMAgent) -> Any:
    """Hold one of this host's migration slots (a marker file) or refuse."""
    agent.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker = agent.settings.run_dir / f"{agent.name}.migrating"
    if not marker.exists() and count_migrations(agent) >= agent.settings.max_migrations:
        raise Refused(f"{agent.name}: host {agent.settings.host} already runs "
                      f"{agent.settings.max_migrations} migration(s)", vm=agent.name)
    marker.touch(mode=0o600)
    return marker


def set_kvm_host(agent: VMAgent, host: str) -> None:
    """Point the VM's local config at *host*, so ensure agrees with where it runs."""
    path = spec_path(agent.settings.vm_config_dir, agent.name)
    if not path.exists():
        return
    data = yaml.safe_load(path.read_text())
    data.setdefault("parameters", {})["kvm_host"] = host
    write_atomically(path, yaml.safe_dump(data, sort_keys=False), mode=0o644)


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def inmigrate(agent: VMAgent, rdv: Rendezvous, src: str,
              progress: Callable[..., None]) -> dict[str, Any]:
    """The destination half. Holds the VM's operation lock throughout."""
    started = time.monotonic()
    with agent.locked():
        spec = agent.spec()  # UnknownVM: the destination refuses without a config
        found = agent.observe()
        if found.run not in (Run.STOPPED, Run.CRASHED):
            raise BadRequest("vm", f"{agent.name} already has a QEMU on {agent.settings.host} "
                             f"({found.run.value})")
        marker = _slot(agent)
        deadline = deadline_for(agent, spec.memory_mb)
        taken: list[str] = []
        try:
            rdv.beat()
            if found.run is Run.CRASHED:
                agent.qemu.clean_up()
            agent.start_incoming(spec)
            address = agent.settings.migration_address
            uri = f"tcp:{address}:{free_port(address)}"
            with agent.qemu.qmp() as qmp:
                qmp.execute("migrate-incoming", uri=uri)
            rdv.set("addr", uri)
            progress("waiting-for-memory", uri=uri)
            while True:
                rdv.check(started, deadline)
                if agent.qemu.find() is None:
                    raise QemuError(f"{agent.name}: incoming QEMU exited", vm=agent.name)
                with agent.qemu.qmp() as qmp:
                    state = qmp.runstate()
                if state != "inmigrate":
                    break
                time.sleep(POLL)
            if state != "paused":
                raise QemuError(f"{agent.name}: incoming QEMU is {state}, not paused",
                                vm=agent.name)
            progress("received")
            rdv.wait_for("src-done", started, deadline)
            t_handover = time.monotonic()
            taken = agent._take_locks()
            with agent.qemu.qmp() as qmp:
                qmp.execute("cont")
            rdv.set("dst-running", "1")
            handover_ms = round((time.monotonic() - t_handover) * 1000, 1)
            set_kvm_host(agent, agent.settings.host)
            if spec.iops:
                agent._set_iops(spec.iops)
            log.info("inmigrated", vm=agent.name, action="inmigrate", src=src,
                     handover_ms=handover_ms)
            return {"vm": agent.name, "host": agent.settings.host, "operation": "inmigrate",
                    "status": "running", "handover_ms": handover_ms}
        except BaseException as err:
            rdv.abort(str(err) or type(err).__name__)
            proc = agent.qemu.find()
            if proc is not None:
                agent.qemu.kill(proc)
            agent.qemu.clean_up()
            for volume in taken:
                agent.storage.unlock(agent.name, volume)
            log.warning("inmigrate-failed", vm=agent.name, action="inmigrate", error=str(err))
            raise
        finally:
            marker.unlink(missing_ok=True)
            release_attempt(rdv.client, agent.name, rdv.attempt)


def outmigrate(agent: VMAgent, rdv: Rendezvous, dst: str,
               progress: Callable[..., None]) -> dict[str, Any]:
    """The source half. Holds the VM's operation lock throughout."""
    started = time.monotonic()
    with agent.locked():
        found = agent.observe()
        if found.run is not Run.RUNNING:
            raise BadRequest("vm", f"{agent.name} is {found.run.value} on "
                             f"{agent.settings.host}, not running: nothing to migrate")
        if any(o != agent.settings.host for o in found.lock_owners.values()):
            raise Refused(f"{agent.name}: does not hold all its locks here", vm=agent.name)
        ident = agent.qemu.identity()
        memory_mb = ident.memory_mb if ident else 1024
        marker = _slot(agent)
        deadline = deadline_for(agent, memory_mb)
        completed = False
        try:
            rdv.beat()
            uri = rdv.wait_for("addr", started, deadline)
            s = agent.settings
            bandwidth = s.migration_bandwidth_mbps * 2**20 // 8 if s.migration_bandwidth_mbps \
                else 2**40  # "unlimited": QEMU's default would be 128 MiB/s
            with agent.qemu.qmp() as qmp:
                qmp.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "auto-converge", "state": True},
                    {"capability": "xbzrle", "state": False},
                    {"capability": "compress", "state": False}])
                qmp.execute("migrate-set-parameters", **{
                    "downtime-limit": s.migration_downtime_ms, "max-bandwidth": bandwidth})
                qmp.execute("migrate", uri=uri)
            progress("copying", uri=uri)
            info: dict[str, Any] = {}
            while True:
                try:
                    rdv.check(started, deadline)
                except MigrationAborted:
                    _cancel(agent)
                    raise
                with agent.qemu.qmp() as qmp:
                    info = qmp.execute("query-migrate")
                status = info.get("status")
                ram = info.get("ram", {})
                if status == "completed" and info.get("downtime"):
                    break  # downtime 0 right after completion: read again (FACTS.md)
                if status in ("failed", "cancelled"):
                    raise QemuError(f"{agent.name}: migration {status}: "
                                    f"{info.get('error-desc', '')}", vm=agent.name)
                if status == "active":
                    progress("copying", transferred=ram.get("transferred"),
                             remaining=ram.get("remaining"), mbps=ram.get("mbps"),
                             expected_downtime=info.get("expected-downtime"))
                time.sleep(POLL)
            completed = True
            # The guest's state is now on the destination; this copy is
            # paused for good. Stop it and give the locks away.
            agent._kill()
            agent._clean_up()
            rdv.set("src-done", "1")
            progress("handed-over")
            rdv.wait_for("dst-running", started, deadline)
            # Only now: had the destination failed before `cont`, this
            # host's config still saying "here" lets its ensure restart it.
            set_kvm_host(agent, dst)
            result = {"vm": agent.name, "host": agent.settings.host, "operation": "outmigrate",
                      "to": dst, "total_ms": info.get("total-time"),
                      "downtime_ms": info.get("downtime"),
                      "transferred": info.get("ram", {}).get("transferred")}
            log.info("outmigrated", vm=agent.name, action="outmigrate", to=dst,
                     total_ms=result["total_ms"], downtime_ms=result["downtime_ms"])
            return result
        except BaseException as err:
            rdv.abort(str(err) or type(err).__name__)
            if not completed:
                _cancel(agent)
            log.warning("outmigrate-failed", vm=agent.name, action="outmigrate",
                        error=str(err), completed=completed)
            raise
        finally:
            marker.unlink(missing_ok=True)
            release_attempt(rdv.client, agent.name, rdv.attempt)


def _cancel(agent: VMAgent) -> None:
    """Cancel an outgoing migration; the guest goes on running here."""
    # QEMU resumes the guest itself after a cancel; fcq never sends `cont`
    # here, because a cancel that lost the race with completion leaves the
    # guest in postmigrate, and resuming that would run it twice.
    try:
        with agent.qemu.qmp() as qmp:
            qmp.execute("migrate_cancel")
            for _ in range(100):
                if qmp.execute("query-migrate").get("status") != "cancelling":
                    break
                time.sleep(POLL)
    except FcqError as err:
        log.warning("migrate-cancel-failed", vm=agent.name, error=str(err))
