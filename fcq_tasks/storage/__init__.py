"""Volumes and their locks, behind one interface with one backend per kind.

``local`` keeps volumes as sparse image files and locks as small files next
to them (the embedded default for one machine). ``rbd`` keeps them as Ceph
images with advisory locks and fences before it breaks one (production).
The agent never looks behind it.
"""

from __future__ import annotations

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.storage.base import (
    AUTO_PREFIX,
    VOLUMES,
    SnapshotInfo,
    Storage,
    VolumeInfo,
    auto_snapshot_name,
    check_snapshot,
)
from fcq_tasks.storage.local import LocalStorage


def open_storage(settings: HostSettings) -> Storage:
    """The storage backend this host is configured for."""
    if settings.storage == "local":
        return LocalStorage(settings)
    if settings.storage == "rbd":
        # Imported only here: hosts on local storage need no Ceph bindings.
        from fcq_tasks.storage.rbd import RbdStorage
        return RbdStorage(settings)
    raise AssertionError(f"unknown storage {settings.storage!r}: settings validation missed it")


__all__ = [
    "AUTO_PREFIX",
    "VOLUMES",
    "LocalStorage",
    "SnapshotInfo",
    "Storage",
    "VolumeInfo",
    "auto_snapshot_name",
    "check_snapshot",
    "open_storage",
]
