"""The hypervisor contract: what fcq asks of a running QEMU, verb by verb.

Like Nova's virt driver, this is the boundary nobody above crosses: the agent
and the migration phases call these verbs, and no QMP command name appears
outside this module. Each verb says what it guarantees when it returns, and
raises :class:`~fcq_tasks.errors.QmpError` when the monitor did not answer
(nothing is known about what QEMU did) or
:class:`~fcq_tasks.errors.QemuRefused` when QEMU answered no (nothing was
done).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fcq_tasks.errors import BadRequest
from fcq_tasks.hazmat.qmp import QmpSession

#: The six throttle fields QEMU wants in every block_set_io_throttle.
_THROTTLE_ZERO = {"bps_rd": 0, "bps_wr": 0, "iops_rd": 0, "iops_wr": 0}

#: QEMU's "unlimited": its own default would be 128 MiB/s.
UNLIMITED_BANDWIDTH = 2**40

#: What an outgoing migration runs with: auto-converge, no compression, and
#: QEMU's MIGRATION events (state changes; they do not change the copy).
MIGRATION_CAPABILITIES = [
    {"capability": "auto-converge", "state": True},
    {"capability": "xbzrle", "state": False},
    {"capability": "compress", "state": False},
    {"capability": "events", "state": True}]

#: The events that end a wait for the migration: its state changed, the guest stopped.
MIGRATION_EVENTS = frozenset({"MIGRATION", "STOP"})


#: ``tcp:IPv4:port`` or ``tcp:[IPv6]:port``; the only migration address fcq uses.
_TCP_URI = re.compile(r"^tcp:(?:\[([0-9a-fA-F:.]{2,45})\]|([0-9.]{7,15})):([0-9]{1,5})\Z")


def tcp_migration_uri(uri: object) -> tuple[str, int]:
    """(IP, port) of a ``tcp:`` migration address; BadRequest for anything else.

    QEMU's ``migrate`` also takes ``exec:`` (a shell command, run as QEMU's
    user), ``unix:``, ``fd:`` and ``file:``: none of them is ever passed on.
    The IP comes back in its normal text form, for comparing.
    """
    match = _TCP_URI.match(uri) if isinstance(uri, str) else None
    if match is None:
        raise BadRequest("migration address", f"must be tcp:<IP>:<port> (got {uri!r:.80})")
    text = match.group(1) or match.group(2)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise BadRequest("migration address", f"{text!r} is not an IP address") from None
    if (ip.version == 6) != bool(match.group(1)):
        raise BadRequest("migration address", "an IPv6 address goes in brackets, IPv4 not")
    port = int(match.group(3))
    if not 1024 <= port <= 65535:
        raise BadRequest("migration address", f"port {port} is not in 1024-65535")
    return str(ip), port


def _unix_uri(path: Path) -> str:
    # fcq's own run directory, never a value from outside; QEMU reads the
    # whole rest of the string as the path.
    if not path.is_absolute() or any(c in str(path) for c in ",\n"):
        raise BadRequest("migration socket", f"must be an absolute path (got {str(path)!r})")
    return f"unix:{path}"


def tcp_uri(ip: str, port: int) -> str:
    return f"tcp:[{ip}]:{port}" if ":" in ip else f"tcp:{ip}:{port}"


@dataclass(frozen=True)
class BlockInfo:
    """One drive as QEMU has it open."""

    device: str
    size: int           # bytes the guest sees
    iops: int           # 0: no limit
    bps: int = 0        # bytes per second; 0: no limit


@dataclass(frozen=True)
class MigrationStatus:
    """One reading of an outgoing (or incoming) migration."""

    status: str                 # none, setup, active, completed, failed, cancelling, ...
    transferred: int | None = None
    remaining: int | None = None
    mbps: float | None = None
    total_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    error: str = ""

    @property
    def completed(self) -> bool:
        # Right after completion QEMU may report downtime 0 for a moment;
        # only a reading with the downtime filled in is final.
        return self.status == "completed" and bool(self.downtime_ms)

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "cancelled")


class Monitor:
    """fcq's monitor connection to one QEMU, opened with ``with``."""

    def __init__(self, socket_path: str, timeout: float, vm: str) -> None:
        self._session = QmpSession(socket_path, timeout, vm)
        self.vm = vm

    def __enter__(self) -> Monitor:
        self._session.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._session.__exit__(exc_type, exc, tb)

    def _do(self, command: str, **arguments: object) -> Any:
        return self._session.execute(command, **arguments)

    # -- observing ------------------------------------------------------

    def runstate(self) -> str:
        """QEMU's run state: running, paused, inmigrate, postmigrate, ..."""
        return str(self._do("query-status")["status"])

    def blocks(self) -> dict[str, BlockInfo]:
        """Every drive with a medium, by drive id."""
        out = {}
        for block in self._do("query-block"):
            inserted = block.get("inserted")
            if inserted is None:
                continue
            out[str(block["device"])] = BlockInfo(
                device=str(block["device"]), size=int(inserted["image"]["virtual-size"]),
                iops=int(inserted.get("iops", 0)), bps=int(inserted.get("bps", 0)))
        return out

    def guest_agent_open(self) -> bool:
        """Whether a process in the guest holds the agent's port open (qemu-ga runs).

        Asked of QEMU, not of the guest: answers at once even when no agent
        would ever reply, so "no agent" costs no timeout.
        """
        for dev in self._do("query-chardev"):
            if dev.get("label") == "ga":
                return bool(dev.get("frontend-open"))
        return False

    def human(self, command_line: str) -> str:
        """One human-monitor (HMP) command line; its text output (``fcq monitor``)."""
        return str(self._do("human-monitor-command", **{"command-line": command_line}))

    # -- life cycle -----------------------------------------------------

    def powerdown(self) -> None:
        """Press the ACPI power button; the guest may ignore it."""
        self._do("system_powerdown")

    def pause(self) -> None:
        """Stop guest code. Returns once no vCPU runs."""
        self._do("stop")

    def resume(self) -> None:
        """Run guest code. Only ever for a copy that is known to be the only one."""
        self._do("cont")

    def quit(self) -> None:
        """Ask QEMU to exit at once (the guest is not asked)."""
        self._do("quit")

    # -- disks ----------------------------------------------------------

    def resize_disk(self, device: str, size: int) -> None:
        """Grow *device* to *size* bytes; the guest sees the new size at once.

        QEMU has no shrink guard: callers check the size first.
        """
        self._do("block_resize", device=device, size=size)

    def throttle(self, devices: list[str], iops: int, bps: int = 0) -> None:
        """Limit each of *devices* to *iops* and *bps* bytes/s in total (0: no limit)."""
        for device in devices:
            self._do("block_set_io_throttle", device=device, iops=iops, bps=bps,
                     **_THROTTLE_ZERO)

    # -- migration --------------------------------------------------------

    def listen_for_migration(self, uri: str) -> None:
        """On a QEMU started with ``-incoming defer``: accept the stream on *uri*.

        Only ``tcp:IP:PORT`` (BadRequest otherwise). With migration events
        on, so that :meth:`migration_event` on this side wakes as the copy
        completes instead of waiting for a poll.
        """
        tcp_migration_uri(uri)  # never anything but tcp:IP:port
        self._listen(uri)

    def listen_on_socket(self, path: Path) -> None:
        """As listen_for_migration, on a unix socket of this host (an upgrade's copy)."""
        self._listen(_unix_uri(path))

    def _listen(self, uri: str) -> None:
        self._do("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}])
        self._do("migrate-incoming", uri=uri)

    def migrate_to(self, uri: str, downtime_ms: int, bandwidth_bytes: int) -> None:
        """Start sending this guest to *uri*: no compression, auto-converge.

        Returns once the copy has started; the guest runs here until
        QEMU's final pause, after which it never runs here again. Migration
        events on: they change nothing in the copy, and :meth:`migration_event`
        wakes on them. Only a ``tcp:IP:port`` *uri* is sent (BadRequest
        otherwise): which IP is the caller's to check.
        """
        tcp_migration_uri(uri)
        self._migrate(uri, downtime_ms, bandwidth_bytes)

    def migrate_to_socket(self, path: Path, downtime_ms: int, bandwidth_bytes: int) -> None:
        """As migrate_to, into a unix socket of this host (an upgrade's copy)."""
        self._migrate(_unix_uri(path), downtime_ms, bandwidth_bytes)

    def _migrate(self, uri: str, downtime_ms: int, bandwidth_bytes: int) -> None:
        self._do("migrate-set-capabilities", capabilities=MIGRATION_CAPABILITIES)
        self._do("migrate-set-parameters", **{
            "downtime-limit": downtime_ms, "max-bandwidth": bandwidth_bytes})
        self._do("migrate", uri=uri)

    def poll_migration(self) -> MigrationStatus:
        info = self._do("query-migrate")
        ram = info.get("ram", {})
        return MigrationStatus(
            status=str(info.get("status", "none")), transferred=ram.get("transferred"),
            remaining=ram.get("remaining"), mbps=ram.get("mbps"),
            total_ms=info.get("total-time"), downtime_ms=info.get("downtime"),
            expected_downtime_ms=info.get("expected-downtime"),
            error=str(info.get("error-desc", "")))

    def migration_event(self, timeout: float) -> dict[str, Any] | None:
        """Wait up to *timeout* s for the migration's next state change (or the guest's STOP).

        Only on a connection held across the wait: QEMU sends events to the
        client connected when they happen. The caller reads the state itself
        afterwards (:meth:`poll_migration`); the event only ends the wait early.
        """
        return self._session.next_event(MIGRATION_EVENTS, timeout)

    def cancel_migration(self) -> None:
        """Ask QEMU to cancel the outgoing copy.

        QEMU resumes the guest by itself after a cancel that came in time;
        a cancel that lost the race with completion leaves it postmigrate,
        which must never be resumed (the copy may run elsewhere).
        """
        self._do("migrate_cancel")
