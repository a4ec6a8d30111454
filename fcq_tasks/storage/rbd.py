"""RBD storage: a VM's volumes as Ceph images, with advisory locks that fence.

Images are ``<pool>/<vm>.root``, ``<vm>.swap`` and ``<vm>.tmp``; the pool is
the VM file's ``rbd_pool``, else ``ceph.pool`` of the host settings.

Locks. Each image carries one exclusive advisory lock whose cookie names the
host and the QEMU instance it covers (``fcq host=alpha instance=3f2a…``).
Ownership is by the host in the cookie, not by the rados client that took
it: a worker that restarted (new client, new address) still owns its
host's locks and releases them by breaking its own old lock, without any
fencing.

Handover. RBD cannot move a lock from one client to another in one step,
so the handover is written down first: the source writes the note
``{"to": DEST, "from": SOURCE}`` (rados object ``fcq.handover.<image>`` in
the image's pool) and only then releases its lock. While that note is
unclaimed, only DEST may take the lock (anyone else is refused as if DEST
held it, and a host that took it in a race gives it back), and the image
reports DEST as owner, handed from SOURCE, unclaimed, as the local backend
does. DEST marks it claimed once the guest runs there; it stays while DEST
holds the lock, so SOURCE's sweep can still tell it handed the VM over.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import rbd
import structlog

from fcq_tasks import metrics
from fcq_tasks.config.cephsettings import CephSettings
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import VMSpec, load_vm_spec, spec_path
from fcq_tasks.errors import ConfigError, LockedByOtherHost, ShrinkRefused, StorageError
from fcq_tasks.hazmat.template import Drive
from fcq_tasks.storage import cephconn, fence, hostwatch, rbdheader
from fcq_tasks.storage.base import VOLUMES, SnapshotInfo, VolumeInfo, check_snapshot
from fcq_tasks.storage.rbdcreate import VolumeMaker
from fcq_tasks.storage.rbdimage import (
    HeaderView,
    Img,
    LockView,
    NeedsOpen,
    cookie_host,
    make_cookie,
    qemu_uri,
)

T = TypeVar("T")

#: Reads the volumes of one VM side by side (see RbdStorage.volumes).
_readers = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="rbd-read")

#: (VM file, default pool) -> ((mtime_ns, size, inode), pool), see RbdStorage.pool.
_pools: dict[tuple[str, str], tuple[tuple[int, int, int], str]] = {}

class RbdStorage:
    #: Breaking a lock here fences its old holder (fence.py).
    fences = True
    atomic_snapshots = True

    def __init__(self, settings: HostSettings) -> None:
        assert settings.ceph is not None
        self.settings = settings
        self.ceph: CephSettings = settings.ceph
        self.host = settings.host
        self.log = structlog.get_logger().bind(host=settings.host)

    # -- naming -------------------------------------------------------------

    def pool(self, vm: str) -> str:
        """The VM's pool: its file's rbd_pool, else the host's default.

        Remembered per file version (mtime, size, inode): parsing the file
        at every storage call cost a sweep ~5 ms per VM.
        """
        path = spec_path(self.settings.vm_config_dir, vm)
        try:
            st = path.stat()
        except FileNotFoundError:
            return self.ceph.pool
        version = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = _pools.get((str(path), self.ceph.pool))
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            pool = load_vm_spec(self.settings.vm_config_dir, vm).rbd_pool or self.ceph.pool
        except ConfigError as err:
            raise StorageError(f"{vm}: cannot tell its pool: {err}", vm=vm) from err
        _pools[(str(path), self.ceph.pool)] = (version, pool)
        return pool

    @staticmethod
    def image(vm: str, volume: str) -> str:
        return f"{vm}.{volume}"

    def _with_image(self, vm: str, volume: str, fn: Any, pool: str | None = None) -> Any:
        name = self.image(vm, volume)
        return cephconn.with_image(self.ceph, pool or self.pool(vm), name,
                                   lambda conn, ioctx, img: fn(conn, Img(ioctx, img, name)))

    def _with_lock(self, vm: str, volume: str, fn: Any) -> Any:
        """As _with_image, for steps that touch only the lock and note (LockView).

        *fn* may be called twice: on the view, and again on the opened image
        when the view raised NeedsOpen; it must re-read what it decides on.
        """
        name = self.image(vm, volume)
        pool = self.pool(vm)

        def call(conn: Any, ioctx: Any) -> Any:
            try:
                view = LockView(ioctx, name)
            except rbdheader.NoImage:
                raise rbd.ImageNotFound(f"no image {name}") from None
            except rbdheader.Unreadable as err:
                self.log.info("header-unreadable", image=name, error=str(err))
            else:
                try:
                    return fn(conn, view)
                except NeedsOpen:
                    pass
            with rbd.Image(ioctx, name) as img:
                return fn(conn, Img(ioctx, img, name))

        with cephconn.image_turn(self.ceph, pool, name):
            return cephconn.with_pool(self.ceph, pool, call)

    # -- volumes ------------------------------------------------------------

    def volumes(self, vm: str) -> list[VolumeInfo]:
        pool = self.pool(vm)

        def one(ioctx: Any, volume: str) -> VolumeInfo:
            name = self.image(vm, volume)
            try:
                # The sweep's path: ~1 ms instead of ~10 ms for an open.
                return self._info(volume, HeaderView(ioctx, name))
            except rbdheader.NoImage:
                return VolumeInfo(volume, None, None)
            except rbdheader.Unreadable as err:
                self.log.info("header-unreadable", image=name, error=str(err))
            with cephconn.image_turn(self.ceph, pool, name):
                try:
                    with rbd.Image(ioctx, name, read_only=True) as img:
                        return self._info(volume, Img(ioctx, img, name))
                except rbd.ImageNotFound:
                    return VolumeInfo(volume, None, None)

        def info(conn: Any, ioctx: Any) -> list[VolumeInfo]:
            # The three images at once: each read is a few round trips to
            # the OSDs, during which librados does not hold the GIL. All of
            # them end before the ioctx closes, also when one fails: a read
            # still running on a closed ioctx crashes the process.
            futures = [_readers.submit(one, ioctx, volume) for volume in VOLUMES]
            concurrent.futures.wait(futures)
            return [f.result() for f in futures]

        return cephconn.with_pool(self.ceph, pool, info)

    def _info(self, volume: str, img: Any) -> VolumeInfo:
        holder = self._holder(img)
        note = img.note()
        size = int(img.size())
        if holder is not None:
            host, cookie = holder[0], holder[2]
            if note and note.get("to") == host:
                return VolumeInfo(volume, size, host, str(note.get("from")),
                                  bool(note.get("claimed")), cookie)
            return VolumeInfo(volume, size, host, cookie=cookie)
        if note and "fenced" in note:
            # A lock broken by force-unlock: free for everyone but the host
            # that was fenced, which must see it gone to another host (so
            # that its sweep kills its stale copy instead of re-locking).
            was, by = str(note.get("fenced")), str(note.get("by"))
            return VolumeInfo(volume, size, by if was == self.host else None,
                              broken_from=was, broken_by=by)
        if note and not note.get("claimed"):
            return VolumeInfo(volume, size, str(note.get("to")), str(note.get("from")), False)
        return VolumeInfo(volume, size, None)

    @staticmethod
    def _holder(img: Any) -> tuple[str, str, str] | None:
        """(host, client, cookie) of the image's lock; None if it is free."""
        for client, cookie, _addr in fence.lockers(img):
            host = cookie_host(str(cookie))
            # A lock fcq did not take still blocks: report who took it.
            return (host or f"{client} (cookie {cookie!r})", str(client), str(cookie))
        return None

    def ensure_volumes(self, spec: VMSpec) -> list[str]:
        return VolumeMaker(self.settings, self.ceph).ensure(spec)

    def grow(self, vm: str, volume: str, size: int) -> None:
        def grow(conn: Any, img: Any) -> None:
            current = int(img.size())
            if size < current:
                raise ShrinkRefused(vm, volume, current, size)
            if size > current:
                # allow_shrink=False: librbd's resize shrinks by default.
                img.resize(size, allow_shrink=False)
        self._with_image(vm, volume, grow)

    # -- locks --------------------------------------------------------------

    def lock(self, vm: str, volume: str, instance: str = "") -> bool:
        cookie = make_cookie(self.host, instance or secrets.token_hex(6))

        def take(conn: Any, img: Any) -> bool:
            holder = self._holder(img)
            if holder is not None:
                if holder[0] == self.host:
                    return False
                raise LockedByOtherHost(vm, volume, holder[0])
            self._refuse_handed_elsewhere(vm, volume, img)
            try:
                img.lock_exclusive(cookie)
            except (rbd.ImageBusy, rbd.ImageExists):
                holder = self._holder(img)
                if holder is not None and holder[0] == self.host:
                    return False
                raise LockedByOtherHost(vm, volume, holder[0] if holder else "?") from None
            try:
                # The note may have been written between our look and our
                # lock: a lock taken against it is given back.
                self._refuse_handed_elsewhere(vm, volume, img)
            except LockedByOtherHost:
                img.unlock(cookie)
                raise
            note = img.note()
            if note and "fenced" in note:
                img.remove_note()  # the broken lock has a new holder: us
            return True

        try:
            return bool(self._with_lock(vm, volume, take))
        except LockedByOtherHost:
            metrics.lock_conflict("volume")
            raise

    def _refuse_handed_elsewhere(self, vm: str, volume: str, img: Any) -> None:
        note = img.note()
        if note and "fenced" in note:
            if note.get("fenced") == self.host:
                raise LockedByOtherHost(vm, volume, str(note.get("by")))
            return
        if note and not note.get("claimed") and note.get("to") != self.host:
            raise LockedByOtherHost(vm, volume, str(note.get("to")))

    def _release_own(self, img: Any, conn: Any, client: str, cookie: str) -> None:
        if client == f"client.{conn.get_instance_id()}":
            img.unlock(cookie)
        else:
            # Our host's lock, taken by an earlier client of ours (a worker
            # that restarted): break it, without fencing (it is our own).
            img.break_lock(client, cookie)

    def unlock(self, vm: str, volume: str) -> bool:
        def release(conn: Any, img: Any) -> bool:
            holder = self._holder(img)
            note = img.note()
            if note and "fenced" in note:
                note = None  # a broken lock's mark: nobody's to release
            if holder is None:
                if note and note.get("to") == self.host:
                    img.remove_note()
                    return True
                return False
            host, client, cookie = holder
            if host != self.host:
                return False
            self._release_own(img, conn, client, cookie)
            fence.forget(img.ioctx, img.name, [self.host])
            if note and note.get("to") == self.host:
                img.remove_note()
            return True

        try:
            return bool(self._with_lock(vm, volume, release))
        except rbd.ImageNotFound:
            return False

    def hand_over(self, vm: str, volume: str, to_host: str) -> None:
        def hand(conn: Any, img: Any) -> None:
            holder = self._holder(img)
            note = img.note()
            if (holder is None or holder[0] == to_host) and note \
                    and (note.get("to"), note.get("from")) == (to_host, self.host):
                return  # handed already (by us, or taken over by to_host in a rescue)
            if holder is None or holder[0] != self.host:
                raise StorageError(f"{vm}: cannot hand the lock of {volume} to {to_host}: "
                                   f"host {self.host} does not hold it", vm=vm, volume=volume)
            # The note first: the lock is never free without saying whose it is.
            img.set_note({"to": to_host, "from": self.host, "at": time.time()})
            self._release_own(img, conn, holder[1], holder[2])
            fence.forget(img.ioctx, img.name, [self.host])  # our QEMU is gone

        self._with_lock(vm, volume, hand)

    def claim(self, vm: str, volume: str) -> None:
        self.lock(vm, volume)

        def clear(conn: Any, img: Any) -> None:
            holder = self._holder(img)
            if holder is None or holder[0] != self.host:
                raise StorageError(f"{vm}: cannot claim the lock of {volume}: host "
                                   f"{self.host} does not hold it", vm=vm, volume=volume)
            note = img.note()
            if note and note.get("to") == self.host and not note.get("claimed"):
                # Kept, marked claimed, while we hold the lock: the old
                # holder's next sweep still sees it handed the VM to us, and
                # follows (its config names us) even after a crash.
                img.set_note({**note, "claimed": True})

        self._with_lock(vm, volume, clear)

    def force_unlock(self, vm: str, volume: str, keep: frozenset[str] = frozenset(),
                     only_from: str | None = None) -> str | None:
        """Fence every other writer of the image, then break its lock and handover note.

        The broken lock keeps a mark, the note ``{"fenced": OLD, "by": US}``:
        for OLD the image stays locked by us, so that OLD, waking up, kills
        its stale copy rather than locking the images again for it; for
        every other host the lock is free, and the next lock taken clears
        the mark. Breaking a lock that is free only clears a mark or note.
        """
        def brk(conn: Any, img: Any) -> str | None:
            holder = self._holder(img)
            note = img.note()
            if only_from is not None:
                if holder is not None and holder[0] != only_from:
                    raise LockedByOtherHost(vm, volume, holder[0])
                # A lock handed to another host and not yet claimed is that
                # host's (a migration or a rescue in progress).
                if holder is None and note and "to" in note and "fenced" not in note \
                        and note.get("to") != only_from:
                    raise LockedByOtherHost(vm, volume, str(note["to"]))
            fence.fence(self.ceph, conn, img, vm, volume, keep)
            if holder is not None:
                if holder[0] != self.host:
                    img.set_note({"fenced": holder[0], "by": self.host, "at": time.time()})
                with contextlib.suppress(rbd.ImageNotFound):  # released meanwhile
                    img.break_lock(holder[1], holder[2])
                return holder[0]
            # A repeated break on behalf of the same dead host keeps the mark:
            # removed, the fenced host could lock its images again on waking.
            if note and not (only_from is not None and "fenced" in note):
                img.remove_note()
            if note and "fenced" not in note:
                return str(note.get("to"))
            return None

        try:
            result = self._with_image(vm, volume, brk)
        except rbd.ImageNotFound:
            return None
        return None if result is None else str(result)

    # -- snapshots ----------------------------------------------------------

    def snapshot(self, vm: str, volume: str, name: str) -> bool:
        check_snapshot(vm, name)

        def snap(conn: Any, img: Any) -> bool:
            try:
                img.create_snap(name)
            except rbd.ImageExists:
                return False
            return True
        return bool(self._with_image(vm, volume, snap))

    def snapshots(self, vm: str, volume: str) -> list[SnapshotInfo]:
        def listing(conn: Any, img: Any) -> list[SnapshotInfo]:
            out = []
            for snap in img.list_snaps():
                created = img.get_snap_timestamp(snap["id"])
                out.append(SnapshotInfo(str(snap["name"]), int(snap["size"]),
                                        created.timestamp()))
            return sorted(out, key=lambda s: (s.created, s.name))
        try:
            return list(self._with_image(vm, volume, listing))
        except rbd.ImageNotFound:
            return []

    def remove_snapshot(self, vm: str, volume: str, name: str) -> bool:
        check_snapshot(vm, name)

        def remove(conn: Any, img: Any) -> bool:
            try:
                img.remove_snap(name)
            except rbd.ImageNotFound:
                return False
            return True
        return bool(self._with_image(vm, volume, remove))

    def _each_volume(self, step: Callable[[str], T]) -> dict[str, T]:
        """``step(volume)`` for the three volumes at once; all end before this returns.

        Each step opens its image (~8 ms of round trips, without the GIL):
        side by side the three cost about one. A failing step's error is
        raised once every step ended, the first volume's first.
        """
        futures = {volume: _readers.submit(step, volume) for volume in VOLUMES}
        concurrent.futures.wait(futures.values())
        return {volume: f.result() for volume, f in futures.items()}

    def _watchers(self, vm: str, volume: str, fn: Callable[[Any, Any], T], missing: T) -> T:
        try:
            return cast(T, self._with_image(vm, volume, fn))
        except rbd.ImageNotFound:
            return missing

    def clients(self, vm: str) -> dict[str, set[str]]:
        """Per volume, the addresses of the clients watching it (QEMUs that opened it)."""
        def watching(conn: Any, img: Any) -> set[str]:
            return {fence.client_addr(str(w["addr"])) for w in img.watchers_list()}
        return self._each_volume(lambda volume: self._watchers(vm, volume, watching, set()))

    def other_watchers(self, vm: str) -> dict[str, list[str]]:
        """Per volume, the clients other than this process that watch it.

        A watch lapses ~30 s (osd_client_watch_timeout) after its client stops
        answering the OSDs: one that is still there is a client alive and
        talking to Ceph, whoever it is (a QEMU, rbd-nbd, a rescue mount).
        """
        def others(conn: Any, img: Any) -> list[str]:
            own = fence.client_addr(str(conn.get_addrs()))
            return sorted({fence.client_addr(str(w["addr"])) for w in img.watchers_list()}
                          - {own})
        none: list[str] = []
        found = self._each_volume(lambda volume: self._watchers(vm, volume, others, none))
        return {volume: clients for volume, clients in found.items() if clients}

    def record_writers(self, vm: str, before: dict[str, set[str]], instance: str) -> list[str]:
        def note(volume: str) -> list[str]:
            def record(conn: Any, img: Any) -> list[str]:
                own = fence.client_addr(str(conn.get_addrs()))
                now = {fence.client_addr(str(w["addr"])) for w in img.watchers_list()}
                addrs = sorted(now - before.get(volume, set()) - {own})
                fence.record(img.ioctx, img.name, self.host, instance, addrs)
                return addrs
            none: list[str] = []
            return self._watchers(vm, volume, record, none)
        return sorted({a for addrs in self._each_volume(note).values() for a in addrs})

    def whose(self, vm: str, addrs: list[str]) -> dict[str, str]:
        """What fcq knows of each client address in *addrs* that uses *vm*'s images."""
        def look(volume: str) -> dict[str, str]:
            def read(conn: Any, img: Any) -> dict[str, str]:
                names: dict[str, str] = {}
                for host, recorded in fence.recorded(img.ioctx, img.name).items():
                    for addr in recorded:
                        names[fence.client_addr(addr)] = f"{host}'s QEMU, noted at its start"
                for client, cookie, addr in fence.lockers(img):
                    names.setdefault(fence.client_addr(addr),
                                     f"{cookie_host(cookie) or client}'s lock of {volume}")
                return names
            none: dict[str, str] = {}
            return self._watchers(vm, volume, read, none)
        known: dict[str, str] = {}
        for names in self._each_volume(look).values():
            known.update(names)
        unknown = ("no QEMU fcq noted: an earlier connection of some host's worker, "
                   "rbd-nbd, a rescue mount")
        return {a: known.get(fence.client_addr(a), unknown) for a in addrs}

    def host_watchers(self, host: str) -> list[str]:
        return hostwatch.host_watchers(self.ceph, host)

    def take_over(self, vm: str, volume: str, from_host: str,
                  expect_cookie: str | None) -> list[str]:
        """Fence *from_host*'s clients and hand its lock to this host on its behalf.

        For a rescue: *from_host* went silent after the copy completed. Every
        writer but this host's (its paused copy) is blocklisted, the lock is
        broken and the handover note names this host, exactly as if
        *from_host* had handed over. Refused (StorageError) when the lock is
        held by anyone but *from_host*, or by *from_host* under another
        cookie than *expect_cookie* (a new start since the copy began).
        Returns the fenced addresses.
        """
        def take(conn: Any, img: Any) -> list[str]:
            holder = self._holder(img)
            note = img.note()
            if note and (note.get("to"), note.get("from")) == (self.host, from_host) \
                    and (holder is None or holder[0] == self.host):
                return []  # taken over already (a retry)
            if holder is not None and holder[0] != from_host:
                raise StorageError(f"{vm}: {volume} is locked by {holder[0]}, not "
                                   f"{from_host}: nothing taken over", vm=vm, volume=volume)
            if holder is not None and holder[2] != expect_cookie:
                raise StorageError(f"{vm}: {volume} is locked by {from_host} under "
                                   f"{holder[2]!r}, not the lock of the copy received "
                                   f"({expect_cookie!r}): nothing taken over",
                                   vm=vm, volume=volume)
            fenced = fence.fence(self.ceph, conn, img, vm, volume, keep_host=self.host)
            img.set_note({"to": self.host, "from": from_host, "at": time.time(),
                          "rescued": True})
            if holder is not None:
                img.break_lock(holder[1], holder[2])
            return fenced

        return list(self._with_image(vm, volume, take))

    def drive(self, vm: str, volume: str) -> Drive:
        # cache=none: no librbd write-back cache, so a fenced QEMU's guest
        # sees its write fail instead of a cached write lost later.
        # on_error=stop: that failed request pauses the guest (runstate
        # io-error) instead of letting it run on, unable to write, next to
        # the copy that took its disks over.
        return Drive(id=volume, file=qemu_uri(self.ceph, self.pool(vm), self.image(vm, volume)),
                     format="raw", cache="none", on_error="stop")


