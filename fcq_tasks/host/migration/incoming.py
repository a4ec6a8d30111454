"""The destination half of a live migration, in named phases.

Each phase says what a crash inside it leaves behind; the next ensure on
each host turns that into one running copy (docs/migration.md has the
table).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fcq_tasks import metrics, trust
from fcq_tasks.config import peers
from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import BadRequest, ConfigError, FcqError, QemuError, QmpError
from fcq_tasks.hazmat.monitor import tcp_uri
from fcq_tasks.host.migration import address
from fcq_tasks.host.migration.half import Half
from fcq_tasks.host.migration.rendezvous import POLL, MigrationAborted, PeerSilent
from fcq_tasks.host.plan import Run
from fcq_tasks.storage import VOLUMES

#: The longest the incoming copy is watched on one monitor connection.
HOLD = 1.0


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class Incoming(Half):
    """Receive VM *agent.name* from host *peer* (the source)."""

    action = "inmigrate"
    #: Per volume, the cookie of the source's lock when the copy began (prepare).
    source_locks: dict[str, str | None]
    #: How this half got the guest when not by the normal handover (the result's "rescue").
    rescued: str | None = None
    #: This host's key, which signs the address it listens on (check).
    key: Ed25519PrivateKey

    def run(self) -> dict[str, Any]:
        with self.holding():
            self.mark("held")
            try:
                spec = self.check()
            except BaseException as err:
                self.abort(err)
                raise
            try:
                self.prepare(spec)
                self.receive()
                self.await_handover()
            except BaseException as err:
                self.give_up(err)
                raise
            return self.resume(spec)

    def check(self) -> VMSpec:
        """Phase 0: a config here, no QEMU of this VM here, a key to sign with. Changes nothing."""
        spec = self.agent.spec()  # UnknownVM: the destination refuses without a config
        s = self.agent.settings
        self.key = trust.load_private_key(s.host_key_file)
        me = peers.load_peer(s.cluster.hosts_dir, s.host)
        if me.migration_address != s.migration_address:
            # The source would refuse the address later, after a QEMU was
            # started here for nothing: say it now, and what to change.
            raise ConfigError(str(peers.record_path(s.cluster.hosts_dir, s.host)),
                              "migration_address",
                              f"{me.migration_address} in this host's record, but its "
                              f"migration_address setting is {s.migration_address}: the "
                              "source sends only to the address of the record")
        found = self.agent.observe()
        if found.run not in (Run.STOPPED, Run.CRASHED):
            raise BadRequest("vm", f"{self.agent.name} already has a QEMU on "
                             f"{self.agent.settings.host} ({found.run.value})")
        if found.run is Run.CRASHED:
            self.agent.clean_up(keep_locks=True)
        return spec

    def prepare(self, spec: VMSpec) -> None:
        """Phase 1: start QEMU paused (-incoming defer -S), listen, publish the address.

        Crash inside or later, before the locks were handed over: an
        incoming QEMU that no half owns, holding no locks; the next ensure
        here kills it (it only plans under the operation lock, which a live
        half holds).
        """
        # The source's locks as the copy begins: a rescue takes over these
        # very locks, never ones taken since (a new start of the guest).
        self.source_locks = {v.name: v.cookie
                             for v in self.agent.storage.volumes(self.agent.name)}
        self.agent.start_qemu(spec, incoming=self.rdv.attempt)
        self.mark("qemu_up")
        s = self.agent.settings
        uri = tcp_uri(s.migration_address, free_port(s.migration_address))
        with self.agent.qemu.monitor() as mon:
            mon.listen_for_migration(uri)
        self.rdv.set("addr", address.signed(self.key, self.agent.name, self.rdv.attempt,
                                            self.peer, s.host, uri))
        self.mark("addr")
        self.agent.progress("waiting-for-memory", uri=uri)

    def receive(self) -> None:
        """Phase 2: wait until QEMU has the whole guest (paused, never run here).

        A source that falls silent now may only be a stalled worker whose
        QEMU goes on sending: where a rescue is possible, the copy gets up
        to ``migration_peer_grace`` more to complete.
        """
        silent_since: float | None = None
        state = "inmigrate"
        while state == "inmigrate":
            # One connection for up to HOLD s (QEMU has one monitor client at
            # a time): its migration event wakes the wait as the copy
            # completes, where a poll would see it up to POLL later.
            with self.agent.qemu.monitor() as mon:
                held = Deadline.after(HOLD)
                while True:
                    try:
                        self.rdv.check(self.deadline)
                    except PeerSilent:
                        if not self.agent.storage.fences:
                            raise
                        silent_since = silent_since or time.monotonic()
                        if time.monotonic() - silent_since > \
                                self.agent.settings.migration_peer_grace:
                            raise
                    try:
                        state = mon.runstate()
                    except QmpError:
                        if self.agent.process() is None:
                            raise QemuError(f"{self.agent.name}: incoming QEMU exited",
                                            vm=self.agent.name) from None
                        raise
                    if state != "inmigrate" or held.passed():
                        break
                    if self.agent.process() is None:
                        raise QemuError(f"{self.agent.name}: incoming QEMU exited",
                                        vm=self.agent.name)
                    mon.migration_event(min(POLL, self.deadline.remaining()))
        if state != "paused":
            raise QemuError(f"{self.agent.name}: incoming QEMU is {state}, not paused",
                            vm=self.agent.name)
        self.mark("received")
        self.agent.progress("received")

    def await_handover(self) -> None:
        """Phase 3: wait until the source handed every lock to this host.

        The locks, not the ``src-done`` key, are the source's word: they
        move only after its QEMU is gone, and they are on the disks, so a
        Redis restart or a source that stalls right after handing over
        cannot lose them. Before giving up for any reason (abort, silence,
        deadline) the locks are read once more: handed over means resume.
        """
        while not self._handed_to_us():
            try:
                self.rdv.check(self.deadline)
            except PeerSilent as err:
                if self._handed_to_us() or self.rescue(err):
                    break
                raise
            except MigrationAborted:
                if self._handed_to_us():
                    break
                raise
            # Woken as the source publishes src-done; the locks are read
            # again then, and at least every POLL without it.
            self.rdv.nap("src-done", min(POLL, self.deadline.remaining()))
        self.mark("handed_seen")

    def rescue(self, err: PeerSilent) -> bool:
        """The source went silent after the copy completed: fence it, take the guest on.

        Only where the storage fences (RBD): every client of the source
        that could write the images, its QEMU's included, is blocklisted
        before its locks are broken, so even a source that was only stalled
        can never write again, and its next sweep kills its stale copy. The
        locks then carry a handover note naming this host, as if the source
        had handed them over; the normal resume follows. Without fencing
        (local storage) the guest is booted again instead (no rescue).
        """
        storage = self.agent.storage
        if not storage.fences or self.agent.observe().run is not Run.RECEIVED:
            return False
        vm = self.agent.name
        self.log.warning("rescue", source=self.peer, reason=str(err),
                         detail="source silent after the copy completed: fencing it and "
                         "resuming the received copy here")
        taken = []
        try:
            for volume in VOLUMES:
                storage.take_over(vm, volume, self.peer, self.source_locks.get(volume))
                taken.append(volume)
                metrics.fencing("take-over")
        except FcqError as take_err:
            self.log.error("rescue-failed", error=str(take_err), taken=taken)
            # All or nothing: drop the notes naming us (the source is fenced
            # already; its next sweep boots the guest again).
            for volume in taken:
                try:
                    storage.unlock(vm, volume)
                except FcqError as undo_err:
                    self.log.error("rescue-undo-failed", volume=volume, error=str(undo_err))
            return False
        self.agent.progress("rescued", source=self.peer)
        self.rescued = "fenced-source"
        return True

    def _handed_to_us(self) -> bool:
        # The locks alone (storage): no monitor round trip.
        return self.agent.locks_handed_to_us()

    def give_up(self, err: BaseException) -> None:
        """Before the handover: kill our copy (it never ran), keep nothing."""
        self.abort(err)
        try:
            if self._handed_to_us():
                # Handed over while we were failing: the copy is the guest now.
                self.log.warning("handed-while-failing", detail="left for ensure to resume")
                return
            self.agent.kill_qemu()
            self.agent.clean_up(keep_locks=True)
        except FcqError as cleanup_err:
            self.log.error("inmigrate-cleanup-failed", error=str(cleanup_err))
        self.log.warning("inmigrate-failed", error=str(err))

    def resume(self, spec: VMSpec) -> dict[str, Any]:
        """Phase 4: confirm every lock is ours right before `cont`, then run the guest.

        Nothing after a successful `cont` kills the guest: the steps after
        it are best effort and the next ensure finishes them. Crash before
        `cont`: the copy is received and the locks are ours, so ensure
        resumes it. Crash after: ensure claims it (config and locks).
        """
        def resumed() -> None:
            # At once: the source's report waits for it, not for our claims.
            self.mark("resumed")
            self.rdv.try_set("dst-running", "1")
        t0 = time.monotonic()
        self.agent.resume_received(resumed=resumed)
        resume_ms = round((time.monotonic() - t0) * 1000, 1)
        self.mark("end")
        self.log.info("inmigrated", resume_ms=resume_ms, marks=self.marks)
        result = {"vm": self.agent.name, "host": self.agent.settings.host,
                  "operation": "inmigrate", "status": "running", "outcome": "resumed",
                  "resume_ms": resume_ms, "marks": self.marks}
        if self.rescued:
            result["rescue"] = self.rescued
        return result
