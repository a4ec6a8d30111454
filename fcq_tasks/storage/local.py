"""Local storage: volumes as sparse image files, locks as small files.

Layout under the host's state directory::

    volumes/<vm>.<volume>        raw image file (sparse)
    volumes/<vm>.<volume>@<snap> a snapshot: a sparse (reflinked where the
                                 file system can) read-only copy
    locks/<vm>.<volume>.lock     JSON {"host": ..., "since": ...,
                                       ["handed_from": ..., "claimed": ...]}

A lock file is created complete under a temporary name and hard-linked into
place, so taking a lock is atomic and a reader never sees a half-written
owner. A migration's handover replaces the file in one rename, so the lock
never is free between source and destination. These locks mean what RBD's
advisory locks mean, but only for processes sharing this file system: not
for multi-host production use.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from fcq_tasks import metrics
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.errors import LockedByOtherHost, ShrinkRefused, StorageError
from fcq_tasks.hazmat.template import Drive
from fcq_tasks.storage.base import VOLUMES, SnapshotInfo, VolumeInfo, check_snapshot

#: How often lock() retries when a lock vanishes between link and read.
LOCK_ATTEMPTS = 3

#: Longest a create-vm / mkswap / mkfs command may run.
COMMAND_TIMEOUT = 300.0


def _run(argv: list[str], vm: str, what: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StorageError(f"{vm}: {what} failed: {err}", vm=vm, argv=" ".join(argv)) from err
    if result.returncode != 0:
        raise StorageError(f"{vm}: {what} exited with {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-1000:]}",
                           vm=vm, argv=" ".join(argv))


class LocalStorage:
    #: Nothing to fence: another host's writes cannot be stopped from here.
    fences = False
    atomic_snapshots = False  # a cp: the guest must not write meanwhile

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.host = settings.host
        self.volume_dir = settings.volume_dir
        self.lock_dir = settings.lock_dir

    def _image(self, vm: str, volume: str) -> Path:
        return self.volume_dir / f"{vm}.{volume}"

    def _lockfile(self, vm: str, volume: str) -> Path:
        return self.lock_dir / f"{vm}.{volume}.lock"

    def _prepare_dirs(self) -> None:
        for d in (self.volume_dir, self.lock_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- volumes ----------------------------------------------------------

    def volumes(self, vm: str) -> list[VolumeInfo]:
        out = []
        for volume in VOLUMES:
            try:
                size: int | None = self._image(vm, volume).stat().st_size
            except FileNotFoundError:
                size = None
            record = self._lock_record(vm, volume)
            if record is None:
                out.append(VolumeInfo(volume, size, None))
                continue
            handed = record.get("handed_from")
            out.append(VolumeInfo(volume, size, str(record["host"]),
                                  None if handed is None else str(handed),
                                  record.get("claimed") is not False,
                                  f"{record['host']}/{record.get('instance', '')}"
                                  f"/{record.get('since', '')}"))
        return out

    def ensure_volumes(self, spec: VMSpec) -> list[str]:
        self._prepare_dirs()
        created = []
        root = self._image(spec.name, "root")
        if not root.exists():
            # create-vm writes to a temporary name that is renamed into place
            # only once it succeeded: a create-vm killed half-way (timeout,
            # worker crash) never leaves a half-written root that looks done.
            tmp = self.volume_dir / f".{spec.name}.root.creating"
            tmp.unlink(missing_ok=True)
            values = {"name": spec.name, "path": str(tmp), "volume": "root",
                      "size": f"{spec.disk_gib}G", "size_bytes": str(spec.disk_bytes),
                      "size_mib": str(spec.disk_bytes >> 20)}
            try:
                _run([arg.format(**values) for arg in self.settings.create_vm], spec.name,
                     "create-vm")
                if not tmp.exists():
                    raise StorageError(f"{spec.name}: create-vm ran but did not create "
                                       "{path}", vm=spec.name)
                # Guest data: readable by root only, whatever create-vm's umask was.
                os.chmod(tmp, 0o600)
                os.replace(tmp, root)
            finally:
                tmp.unlink(missing_ok=True)
            created.append("root")
        for volume, size, argv in (
                ("swap", spec.swap_bytes, ["mkswap", "-L", "swap"]),
                ("tmp", spec.tmp_bytes, ["mkfs.xfs", "-q", "-L", "tmp"])):
            image = self._image(spec.name, volume)
            if image.exists():
                continue
            # Build under a temporary name: a crash never leaves an
            # unformatted volume that looks finished.
            fd, part = tempfile.mkstemp(dir=self.volume_dir, prefix=f".{spec.name}.{volume}.")
            try:
                os.ftruncate(fd, size)
                os.close(fd)
                _run([*argv, part], spec.name, f"making {volume}")
                os.replace(part, image)
            except BaseException:
                Path(part).unlink(missing_ok=True)
                raise
            created.append(volume)
        return created

    def grow(self, vm: str, volume: str, size: int) -> None:
        image = self._image(vm, volume)
        current = image.stat().st_size
        if size < current:
            raise ShrinkRefused(vm, volume, current, size)
        if size > current:
            os.truncate(image, size)

    # -- locks ------------------------------------------------------------

    def _lock_record(self, vm: str, volume: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._lockfile(vm, volume).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StorageError(f"{vm}: lock of {volume} is unreadable: {err}",
                               vm=vm, volume=volume) from err
        if not isinstance(data, dict) or not isinstance(data.get("host"), str):
            raise StorageError(f"{vm}: lock of {volume} names no host", vm=vm, volume=volume)
        return data

    def lock_owner(self, vm: str, volume: str) -> str | None:
        record = self._lock_record(vm, volume)
        return None if record is None else str(record["host"])

    def _replace_lock(self, vm: str, volume: str, record: dict[str, object]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.lock_dir, prefix=f".{vm}.{volume}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            os.replace(tmp, self._lockfile(vm, volume))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def hand_over(self, vm: str, volume: str, to_host: str) -> None:
        record = self._lock_record(vm, volume)
        if record and (record["host"], record.get("handed_from")) == (to_host, self.host):
            return  # handed already
        if self.lock_owner(vm, volume) != self.host:
            raise StorageError(f"{vm}: cannot hand the lock of {volume} to {to_host}: "
                               f"host {self.host} does not hold it", vm=vm, volume=volume)
        self._replace_lock(vm, volume, {"host": to_host, "since": time.time(),
                                        "handed_from": self.host, "claimed": False})

    def claim(self, vm: str, volume: str) -> None:
        record = self._lock_record(vm, volume)
        if record is None or record["host"] != self.host:
            raise StorageError(f"{vm}: cannot claim the lock of {volume}: host {self.host} "
                               "does not hold it", vm=vm, volume=volume)
        if record.get("claimed") is False:
            self._replace_lock(vm, volume, {**record, "claimed": True})

    def lock(self, vm: str, volume: str, instance: str = "") -> bool:
        self._prepare_dirs()
        path = self._lockfile(vm, volume)
        fd, tmp = tempfile.mkstemp(dir=self.lock_dir, prefix=f".{vm}.{volume}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": self.host, "since": time.time(), "instance": instance}, fh)
            for _ in range(LOCK_ATTEMPTS):
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    owner = self.lock_owner(vm, volume)
                    if owner == self.host:
                        return False
                    if owner is not None:
                        metrics.lock_conflict("volume")
                        raise LockedByOtherHost(vm, volume, owner) from None
                    # Released between our link and our read: try again.
            raise StorageError(f"{vm}: lock of {volume} keeps changing hands", vm=vm)
        finally:
            os.unlink(tmp)

    def unlock(self, vm: str, volume: str) -> bool:
        """Release the lock if this host holds it, and only then.

        The lock is first moved aside under a private name and checked there:
        a lock another host took in the meantime is never deleted, it is
        put back.
        """
        path = self._lockfile(vm, volume)
        if self.lock_owner(vm, volume) != self.host:
            return False
        aside = self.lock_dir / f".{vm}.{volume}.releasing.{os.getpid()}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if json.loads(aside.read_text()).get("host") == self.host:
                return True
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # not ours after all: put it back
            return False
        finally:
            aside.unlink(missing_ok=True)

    def force_unlock(self, vm: str, volume: str, keep: frozenset[str] = frozenset(),
                     only_from: str | None = None) -> str | None:
        # Nothing to fence: local files are written only by this host.
        owner = self.lock_owner(vm, volume)
        if only_from is not None and owner not in (None, only_from):
            raise LockedByOtherHost(vm, volume, owner)
        self._lockfile(vm, volume).unlink(missing_ok=True)
        return owner

    def clients(self, vm: str) -> dict[str, set[str]]:
        return {volume: set() for volume in VOLUMES}

    def record_writers(self, vm: str, before: dict[str, set[str]], instance: str) -> list[str]:
        return []  # nothing to fence with

    def whose(self, vm: str, addrs: list[str]) -> dict[str, str]:
        return dict.fromkeys(addrs, "unknown")

    def host_watchers(self, host: str) -> list[str]:
        return []  # no shared storage to hold a sign on

    def other_watchers(self, vm: str) -> dict[str, list[str]]:
        return {}  # no clients known: local files are written by this host only

    def take_over(self, vm: str, volume: str, from_host: str,
                  expect_cookie: str | None) -> list[str]:
        raise StorageError(f"{vm}: local storage cannot fence host {from_host}: no take-over",
                           vm=vm, volume=volume)

    # -- snapshots ----------------------------------------------------------

    def _snap(self, vm: str, volume: str, name: str) -> Path:
        return self.volume_dir / f"{vm}.{volume}@{check_snapshot(vm, name)}"

    def snapshot(self, vm: str, volume: str, name: str) -> bool:
        target = self._snap(vm, volume, name)
        if target.exists():
            return False
        part = self.volume_dir / f".{target.name}.part"
        _run(["cp", "--sparse=always", "--reflink=auto", str(self._image(vm, volume)),
              str(part)], vm, f"snapshot of {volume}")
        os.chmod(part, 0o400)
        os.replace(part, target)
        return True

    def snapshots(self, vm: str, volume: str) -> list[SnapshotInfo]:
        prefix = f"{vm}.{volume}@"
        found = []
        for path in self.volume_dir.glob(f"{prefix}*") if self.volume_dir.exists() else []:
            st = path.stat()
            found.append(SnapshotInfo(path.name[len(prefix):], st.st_size, st.st_mtime))
        return sorted(found, key=lambda s: (s.created, s.name))

    def remove_snapshot(self, vm: str, volume: str, name: str) -> bool:
        target = self._snap(vm, volume, name)
        # A copy that died half-way (the snapshotting process was killed).
        (self.volume_dir / f".{target.name}.part").unlink(missing_ok=True)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True

    def drive(self, vm: str, volume: str) -> Drive:
        # writeback: local files are never opened by a second host, and
        # cache=none needs O_DIRECT, which tmpfs (tests) does not offer.
        return Drive(id=volume, file=str(self._image(vm, volume)), format="raw",
                     cache="writeback")

