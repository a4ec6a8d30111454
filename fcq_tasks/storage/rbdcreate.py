"""Making a VM's RBD images: root by the host's create-vm command, swap and tmp by fcq.

Each image is made under a temporary name of this host's and renamed into
place only once complete, so a command killed half-way never leaves an
image that looks done, and two hosts told to create the same VM at once
never touch each other's half-made image. No host needs kernel rbd: a file
system is made on a sparse local file and copied into the image by
``qemu-img convert`` through QEMU's rbd driver (only written blocks travel).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import rbd
import structlog

from fcq_tasks.config.cephsettings import CephSettings
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.errors import StorageError
from fcq_tasks.storage import cephconn, rbdheader
from fcq_tasks.storage.rbdimage import qemu_uri

#: Longest a create-vm / mkfs / qemu-img command may run.
COMMAND_TIMEOUT = 300.0

#: The only image features fcq accepts: librbd's exclusive-lock (and what
#: depends on it) would make a second QEMU's writes hang instead of
#: failing, and trades the lock between live QEMUs: not fencing.
UNWANTED_FEATURES = (rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_OBJECT_MAP
                     | rbd.RBD_FEATURE_JOURNALING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK)


def _run(argv: list[str], vm: str, what: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StorageError(f"{vm}: {what} failed: {err}", vm=vm) from err
    if result.returncode != 0:
        raise StorageError(f"{vm}: {what} exited with {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-1000:]}", vm=vm)


class VolumeMaker:
    """Creates the images of VMs on this host that do not exist yet."""

    def __init__(self, settings: HostSettings, ceph: CephSettings) -> None:
        self.settings = settings
        self.ceph = ceph
        self.host = settings.host
        self.log = structlog.get_logger().bind(host=settings.host)

    def ensure(self, spec: VMSpec) -> list[str]:
        pool = spec.rbd_pool or self.ceph.pool
        created = []
        if not self._exists(pool, spec.name, "root"):
            self._create_root(spec, pool)
            created.append("root")
        for volume, size, argv in (
                ("swap", spec.swap_bytes, ["mkswap", "-L", "swap"]),
                ("tmp", spec.tmp_bytes, ["mkfs.xfs", "-q", "-L", "tmp"])):
            if not self._exists(pool, spec.name, volume):
                self._create_formatted(spec.name, pool, volume, size, argv)
                created.append(volume)
        return created

    def _exists(self, pool: str, vm: str, volume: str) -> bool:
        return self._image_exists(pool, f"{vm}.{volume}")

    def _image_exists(self, pool: str, image: str) -> bool:
        # Its id and header objects read (~1 ms) rather than the image
        # opened (~8 ms); the open stays for what the shortcut cannot read.
        def look(conn: Any, ioctx: Any) -> bool | None:
            try:
                rbdheader.Header(ioctx, image)
                return True
            except rbdheader.NoImage:
                return False
            except rbdheader.Unreadable:
                return None
        try:
            found = cephconn.with_pool(self.ceph, pool, look)
            if found is not None:
                return found
            cephconn.with_image(self.ceph, pool, image, lambda c, io, i: None)
            return True
        except rbd.ImageNotFound:
            return False

    def _creating(self, vm: str, volume: str) -> str:
        # Per host: two hosts told to create the same VM at once (a config
        # pushed to both) must not remove or rename each other's half-made image.
        return f"{vm}.{volume}.creating-{self.host}"

    def _remove(self, pool: str, image: str) -> None:
        def remove(conn: Any, ioctx: Any) -> None:
            with contextlib.suppress(rbd.ImageNotFound):
                rbd.RBD().remove(ioctx, image)
        cephconn.with_pool(self.ceph, pool, remove)

    def _rename_into_place(self, pool: str, vm: str, volume: str) -> None:
        tmp = self._creating(vm, volume)

        def finish(conn: Any, ioctx: Any) -> None:
            with rbd.Image(ioctx, tmp) as img:
                unwanted = img.features() & UNWANTED_FEATURES
                if unwanted:
                    # In one call: fast-diff needs object-map, which needs
                    # exclusive-lock; librbd refuses to drop them one by one.
                    img.update_features(unwanted, False)
                    self.log.info("features-disabled", vm=vm, volume=volume,
                                  features=unwanted, action="create")
            try:
                rbd.RBD().rename(ioctx, tmp, f"{vm}.{volume}")
            except rbd.ImageExists:
                self.log.warning("volume-made-elsewhere", vm=vm, volume=volume,
                                 detail="another host created it first; ours is removed")

        cephconn.with_pool(self.ceph, pool, finish)

    def _create_root(self, spec: VMSpec, pool: str) -> None:
        # create-vm writes a temporary image that is renamed into place only
        # once it succeeded: a create-vm killed half-way never leaves a root
        # that looks done.
        tmp = self._creating(spec.name, "root")
        self._remove(pool, tmp)
        c = self.ceph
        values = {"name": spec.name, "pool": pool, "image": tmp, "volume": "root",
                  "size": f"{spec.disk_gib}G", "size_bytes": str(spec.disk_bytes),
                  "size_mib": str(spec.disk_bytes >> 20), "conf": str(c.conf),
                  "client_id": c.client_id, "keyring": str(c.keyring)}
        try:
            _run([arg.format(**values) for arg in self.settings.create_vm], spec.name,
                 "create-vm")
            if not self._image_exists(pool, tmp):
                raise StorageError(f"{spec.name}: create-vm ran but did not create "
                                   f"{pool}/{tmp}", vm=spec.name)
            self._rename_into_place(pool, spec.name, "root")
        finally:
            self._remove(pool, tmp)

    def _create_formatted(self, vm: str, pool: str, volume: str, size: int,
                          mkfs: list[str]) -> None:
        # No kernel rbd on a host is assumed: the file system is made on a
        # sparse local file and copied into the image by QEMU's own rbd
        # driver (only the written blocks travel).
        tmp = self._creating(vm, volume)
        self._remove(pool, tmp)

        def create(conn: Any, ioctx: Any) -> None:
            rbd.RBD().create(ioctx, tmp, size, features=rbd.RBD_FEATURE_LAYERING)

        scratch = self.settings.state_dir / "scratch"
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, part = tempfile.mkstemp(dir=scratch, prefix=f".{vm}.{volume}.")
        try:
            os.ftruncate(fd, size)
            os.close(fd)
            _run([*mkfs, part], vm, f"making {volume}")
            cephconn.with_pool(self.ceph, pool, create)
            _run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", part,
                  qemu_uri(self.ceph, pool, tmp)], vm, f"writing {volume}")
            self._rename_into_place(pool, vm, volume)
        finally:
            Path(part).unlink(missing_ok=True)
            self._remove(pool, tmp)
