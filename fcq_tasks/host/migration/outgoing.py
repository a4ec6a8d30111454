"""The source half of a live migration, in named phases.

Each phase says what a crash inside it leaves behind; the next ensure on
each host turns that into one running copy (docs/migration.md has the
table).
"""

from __future__ import annotations

from typing import Any

import structlog

from fcq_tasks.config import peers
from fcq_tasks.deadline import Deadline
from fcq_tasks.errors import BadRequest, FcqError, QemuError, Refused
from fcq_tasks.hazmat.monitor import UNLIMITED_BANDWIDTH, MigrationStatus, Monitor
from fcq_tasks.host.migration import address
from fcq_tasks.host.migration.half import Half
from fcq_tasks.host.migration.rendezvous import POLL, MigrationAborted
from fcq_tasks.host.plan import Run

log = structlog.get_logger()

#: How long a cancelled copy may stay "cancelling".
CANCEL_WAIT = 10.0

#: The longest the copy is watched on one monitor connection. QEMU has one
#: monitor client at a time; letting go now and then lets another one (an
#: operator's status) in, and the first reading on the new connection
#: catches whatever changed meanwhile.
HOLD = 1.0

#: Between "completed" and QEMU filling in the downtime (a moment later).
SETTLE = 0.002


def _stamp(event: dict[str, Any]) -> float:
    """An event's own time (QEMU stamps it with the wall clock)."""
    ts = event.get("timestamp") or {}
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


class Outgoing(Half):
    """Send VM *agent.name*, running here, to host *peer* (the destination)."""

    action = "outmigrate"

    def run(self) -> dict[str, Any]:
        with self.holding():
            self.mark("held")
            try:
                dst = self.check()
                uri = self.address(dst)
                self.mark("addr")
                status = self.copy(uri)
                self.mark("completed")
            except BaseException as err:
                self.abort(err)
                self.log.warning("outmigrate-failed", error=str(err), phase="copy")
                raise
            self.hand_over()
        # The VM and the slot are free once the locks moved: the report
        # waits without holding either.
        return self.finish(status)

    def check(self) -> peers.Peer:
        """Phase 0: only a VM that runs here with all its locks can leave, to a host
        with a record. Changes nothing."""
        dst = peers.load_peer(self.agent.settings.cluster.hosts_dir, self.peer)
        found = self.agent.observe()
        if found.run is not Run.RUNNING:
            raise BadRequest("vm", f"{self.agent.name} is {found.run.value} on "
                             f"{self.agent.settings.host}, not running: nothing to migrate")
        if not self.agent.holds_all_locks():
            raise Refused(f"{self.agent.name}: does not hold all its locks here",
                          vm=self.agent.name)
        return dst

    def address(self, dst: peers.Peer) -> str:
        """The destination's address for this attempt, once it published one it signed."""
        raw = self.rdv.wait_for("addr", self.deadline)
        try:
            return address.verified(raw, dst, self.agent.name, self.rdv.attempt,
                                    self.agent.settings.host)
        except address.ForgedAddress as err:
            self.log.error("migration-address-refused", error=err.message)
            raise

    def copy(self, uri: str) -> MigrationStatus:
        """Phase 1: copy memory until QEMU says completed.

        Crash inside: QEMU goes on copying alone. If the copy completes, the
        guest is paused here for good (postmigrate) while this host still
        holds the locks; the destination gives up once this half is silent
        and kills its copy, and the source's ensure boots the guest again
        here (the one cold boot the protocol still has: nobody who could
        vouch that the source copy is gone handed the locks over).
        On abort: the copy is cancelled and the guest runs on here, unless
        the cancel lost the race with completion; then the copy is complete
        and handing over is the only way to keep the guest.
        """
        s = self.agent.settings
        bandwidth = s.migration_bandwidth_mbps * 2**20 // 8 if s.migration_bandwidth_mbps \
            else UNLIMITED_BANDWIDTH
        with self.agent.qemu.monitor() as mon:
            mon.migrate_to(uri, s.migration_downtime_ms, bandwidth)
            self.mark("migrate")
            self.agent.progress("copying", uri=uri)
            outcome = self.watch(mon)
        while True:
            if isinstance(outcome, MigrationAborted):
                # Outside the watch's connection: the cancel opens its own.
                completed = self.cancel()
                if completed is not None:
                    self.log.warning("cancel-too-late", detail="copy had completed: handing over")
                    return completed
                raise outcome
            if outcome is not None:
                return outcome
            with self.agent.qemu.monitor() as mon:
                outcome = self.watch(mon)

    def watch(self, mon: Monitor) -> MigrationStatus | MigrationAborted | None:
        """Follow the copy on *mon* for up to HOLD s: its final status, the abort, or None.

        QEMU's migration events end each wait the moment the copy changes
        state (a poll would find out up to POLL later, and the guest stays
        paused until the handover is done); POLL bounds the wait for the
        abort, heartbeat and deadline checks and the progress report.
        """
        held = Deadline.after(HOLD)
        while True:
            try:
                self.rdv.check(self.deadline)
            except MigrationAborted as err:
                return err
            status = mon.poll_migration()
            if status.completed:
                return status
            if status.failed:
                raise QemuError(f"{self.agent.name}: migration {status.status}: {status.error}",
                                vm=self.agent.name)
            if status.status == "completed" and not held.passed():
                self.deadline.sleep(SETTLE)  # the downtime is filled in a moment later
                continue
            if status.status == "active":
                self.agent.progress("copying", transferred=status.transferred,
                                    remaining=status.remaining, mbps=status.mbps,
                                    expected_downtime=status.expected_downtime_ms)
            if held.passed():
                return None
            event = mon.migration_event(min(POLL, self.deadline.remaining()))
            if event is not None and event.get("event") == "STOP":
                self.marks["stopped"] = _stamp(event)  # the guest's pause begins

    def cancel(self) -> MigrationStatus | None:
        """Cancel the copy; the completed status if it had completed first, else None."""
        try:
            with self.agent.qemu.monitor() as mon:
                mon.cancel_migration()
                wait = Deadline.after(CANCEL_WAIT, "the cancel")
                while True:
                    status = mon.poll_migration()
                    if status.status != "cancelling" or wait.passed():
                        break
                    wait.sleep(POLL)
                state = mon.runstate()
        except FcqError as err:
            self.log.warning("migrate-cancel-failed", error=str(err))
            return None
        # fcq never sends `cont` here: a postmigrate guest may run elsewhere.
        if state == "postmigrate":
            return status if status.completed else MigrationStatus("completed", downtime_ms=1)
        return None

    def hand_over(self) -> None:
        """Phase 2: the guest is paused here for good; give it to the destination.

        Order: kill our QEMU (and see it gone), hand every lock to the
        destination in one step each (the lock then records that this host
        let go), point our config at the destination, publish ``src-done``.
        Crash before the locks moved: as in phase 1. Crash after: the
        destination resumes its copy (it polls the locks, not only
        ``src-done``) and this host's ensure follows the locks (config →
        destination), never starting the guest here.
        """
        a = self.agent
        a.kill_qemu()
        self.mark("qemu_gone")
        a.clean_up(keep_locks=True)
        a.hand_over_locks(self.peer)
        self.mark("handed")
        try:
            a.set_kvm_host(self.peer)
        except (FcqError, OSError) as err:  # ensure follows the locks later
            self.log.warning("config-follow-deferred", error=str(err))
        self.rdv.try_set("src-done", "1")
        self.mark("src_done")
        a.progress("handed-over")

    def finish(self, status: MigrationStatus) -> dict[str, Any]:
        """Phase 3: report. The guest is the destination's now; waiting is for the report only."""
        dst_running = False
        wait = Deadline.after(2 * self.rdv.heartbeat_ttl, "the destination's resume")
        while not wait.passed():
            if self.rdv.try_get("dst-running") is not None:
                dst_running = True
                self.mark("dst_running")
                break
            self.rdv.nap("dst-running", min(POLL, wait.remaining()))
        self.mark("end")
        result = {"vm": self.agent.name, "host": self.agent.settings.host,
                  "operation": "outmigrate", "to": self.peer, "outcome": "handed-over",
                  "dst_running": dst_running, "total_ms": status.total_ms,
                  "downtime_ms": status.downtime_ms, "transferred": status.transferred,
                  "marks": self.marks}
        self.log.info("outmigrated", total_ms=status.total_ms, downtime_ms=status.downtime_ms,
                      dst_running=dst_running, marks=self.marks)
        return result
