"""The storage interface every backend implements.

A VM has three volumes: ``root`` (made by the host's create-vm command, grows
with the config's ``disk``, never shrinks), ``swap`` and ``tmp`` (made by
fcq, labelled ``swap`` and ``tmp``, moderate sizes). Each volume has an
exclusive lock that names the host holding it: a host runs a VM only while
it holds all of that VM's locks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.errors import BadRequest
from fcq_tasks.hazmat.template import Drive

VOLUMES = ("root", "swap", "tmp")

#: Snapshot names: no "@", "/" or spaces, which would change what an RBD
#: spec or a file name means.
SNAPSHOT_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}\Z")
SNAPSHOT_RULE = ("must be 1-64 characters of letters, digits, '.', '_' and '-', "
                 "starting with a letter or digit")


#: Prefix of the names fcq gives snapshots itself; retention prunes only these.
AUTO_PREFIX = "auto-"


def auto_snapshot_name(now: float | None = None) -> str:
    """``auto-<UTC time to the millisecond>``: sorts by time, valid as a snapshot name."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return AUTO_PREFIX + stamp.strftime("%Y%m%dT%H%M%S") + f"{stamp.microsecond // 1000:03d}"


def check_snapshot(vm: str, name: str) -> str:
    """*name* if it is a valid snapshot name; BadRequest naming the rule otherwise."""
    if not isinstance(name, str) or not SNAPSHOT_RE.match(name):
        raise BadRequest("snapshot", f"{SNAPSHOT_RULE} (got {name!r} for {vm})")
    return name


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    size: int           # bytes of the volume when the snapshot was taken
    created: float      # Unix time


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size: int | None          # bytes; None: the volume does not exist
    lock_owner: str | None    # host name holding its lock
    handed_from: str | None = None  # the host that handed the lock to its owner (migration)
    claimed: bool = True      # with handed_from: the new owner has taken the VM on
    cookie: str | None = None  # what identifies this very lock (host and QEMU instance)
    # A lock broken by force-unlock or an evacuation, not yet taken again:
    # the host it was broken from and the host that broke it (fenced first).
    broken_from: str | None = None
    broken_by: str | None = None


class Storage(Protocol):
    """What the agent needs from a storage backend."""

    host: str
    #: Whether breaking a lock fences its old holder (then a rescue may take over).
    fences: bool
    #: Whether a snapshot is one point in time even while the guest writes
    #: (RBD: yes; a file copy: no, the guest must not run meanwhile).
    atomic_snapshots: bool

    def volumes(self, vm: str) -> list[VolumeInfo]:
        """Size and lock owner of each of the VM's volumes."""
        ...

    def ensure_volumes(self, spec: VMSpec) -> list[str]:
        """Create the volumes that do not exist yet; return what was created."""
        ...

    def grow(self, vm: str, volume: str, size: int) -> None:
        """Grow a volume that no running QEMU has open. Refuses to shrink."""
        ...

    def lock(self, vm: str, volume: str, instance: str = "") -> bool:
        """Take the volume's lock for this host; True if it was taken now.

        *instance* names the QEMU instance the lock covers (recorded with it).
        A lock handed to another host and not yet claimed counts as that
        host's.
        """
        ...

    def unlock(self, vm: str, volume: str) -> bool:
        """Release this host's lock on the volume; True if it was released now."""
        ...

    def hand_over(self, vm: str, volume: str, to_host: str) -> None:
        """Give this host's lock to *to_host* in one step (the migration handover).

        Afterwards the lock names *to_host* as owner and this host as
        ``handed_from``, unclaimed: the lock itself records that the
        source let go only after its QEMU was gone. Raises StorageError if
        this host does not hold the lock.
        """
        ...

    def claim(self, vm: str, volume: str) -> None:
        """Mark a lock handed to this host as taken on (its VM runs here for good)."""
        ...

    def force_unlock(self, vm: str, volume: str, keep: frozenset[str] = frozenset(),
                     only_from: str | None = None) -> str | None:
        """Break the lock whoever holds it; return the previous owner.

        Where the backend can, the old holder is fenced first (RBD: every
        client that could write the image is blocklisted, except this
        process's and the client addresses in *keep*). *only_from*: refuse
        (LockedByOtherHost, nothing fenced) if another host holds it, read
        at the moment of breaking, not when the caller decided to.
        """
        ...

    def clients(self, vm: str) -> dict[str, set[str]]:
        """Per volume, the clients that have it open (RBD watchers; local: none known)."""
        ...

    def record_writers(self, vm: str, before: dict[str, set[str]], instance: str) -> list[str]:
        """Remember the clients of the QEMU this host just started (those not in *before*).

        Fencing blocklists them later even when their watches have expired.
        Returns them: the host's fence watch looks for them in the blocklist.
        """
        ...

    def whose(self, vm: str, addrs: list[str]) -> dict[str, str]:
        """For each client address using *vm*'s volumes, what fcq knows of it."""
        ...

    def host_watchers(self, host: str) -> list[str]:
        """Clients holding *host*'s storage-side sign of life (RBD: storage/hostwatch.py)."""
        ...

    def other_watchers(self, vm: str) -> dict[str, list[str]]:
        """Per volume, the clients other than this process that have it open (RBD: watch it)."""
        ...

    def take_over(self, vm: str, volume: str, from_host: str,
                  expect_cookie: str | None) -> list[str]:
        """Fence *from_host* and hand its lock to this host on its behalf (a rescue).

        Only the lock *expect_cookie* names (the one *from_host* held when
        the copy began), or a free one: a lock taken since belongs to a new
        start, not to the copy this host received.
        """
        ...

    def snapshot(self, vm: str, volume: str, name: str) -> bool:
        """Snapshot the volume as it is now; False if *name* exists already (a no-op).

        The caller makes the content consistent first (guest freeze).
        """
        ...

    def snapshots(self, vm: str, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first."""
        ...

    def remove_snapshot(self, vm: str, volume: str, name: str) -> bool:
        """Remove a snapshot; False if there was none of that name."""
        ...

    def drive(self, vm: str, volume: str) -> Drive:
        """How QEMU opens the volume."""
        ...
