"""Read an RBD image's size and advisory lock without opening the image.

Opening an image costs ~10 ms (header, object map, watch registration and
unregistration); a sweep that reads three images per VM this way took
~30 ms per VM, 150 times the local backend. The three facts a sweep needs
are in two RADOS objects, read here in ~1 ms:

- ``rbd_id.<image>`` holds the image id (a length-prefixed string);
- ``rbd_header.<id>`` has the size in its omap (key ``size``, u64 LE) and
  the advisory lock in its xattr ``lock.rbd_lock`` (cls_lock's
  ``lock_info_t``: a map of ``locker_id_t{entity_name_t, cookie}`` to
  ``locker_info_t``, each in Ceph's versioned encoding, which says its own
  length, so what is not needed is skipped).

These are RBD format 2's on-disk layout, stable since Ceph 0.56. Anything
unexpected raises :class:`Unreadable` and the caller opens the image the
ordinary way instead: this is a shortcut, never the only way.
"""

from __future__ import annotations

import struct
from typing import Any

import rados

ENTITY_TYPES = {1: "mon", 2: "mds", 4: "osd", 8: "client", 16: "mgr"}

class Unreadable(Exception):
    """The objects do not look as expected: open the image instead."""


class NoImage(Exception):
    """There is no such image."""


def _u32(blob: bytes, at: int) -> int:
    if at + 4 > len(blob):
        raise Unreadable("truncated")
    return int(struct.unpack_from("<I", blob, at)[0])


def _struct(blob: bytes, at: int, limit: int | None = None) -> tuple[int, int]:
    """(start of payload, end) of the versioned struct at *at*, within *limit*."""
    limit = len(blob) if limit is None else limit
    if at + 6 > limit:
        raise Unreadable("truncated")
    if blob[at + 1] > 1:  # compat: the oldest decoder that understands it
        raise Unreadable(f"struct needs a decoder of version {blob[at + 1]}")
    length = _u32(blob, at + 2)
    start, end = at + 6, at + 6 + length
    if end > limit:
        raise Unreadable("truncated struct")
    return start, end


def parse_lockers(blob: bytes) -> list[tuple[str, str]]:
    """(client, cookie) of each holder in an encoded cls_lock ``lock_info_t``."""
    start, end = _struct(blob, 0)
    count = _u32(blob, start)
    at = start + 4
    out = []
    for _ in range(count):
        id_start, id_end = _struct(blob, at, end)       # locker_id_t
        if id_start + 13 > id_end:
            raise Unreadable("short locker id")
        etype = blob[id_start]
        num = struct.unpack_from("<q", blob, id_start + 1)[0]
        clen = _u32(blob, id_start + 9)
        cookie = blob[id_start + 13:id_start + 13 + clen]
        if id_start + 13 + clen > id_end:
            raise Unreadable("short cookie")
        out.append((f"{ENTITY_TYPES.get(etype, str(etype))}.{num}",
                    cookie.decode("utf-8", "replace")))
        _info_start, info_end = _struct(blob, id_end, end)  # locker_info_t: skipped
        at = info_end
    return out


def image_id(ioctx: Any, image: str) -> str:
    """The id of *image*, read anew each time (~0.2 ms).

    Not cached: an image moved to the trash keeps its header object, and a
    new image of the same name gets a new id.
    """
    try:
        raw = bytes(ioctx.read(f"rbd_id.{image}", 128))
    except rados.ObjectNotFound as err:
        raise NoImage(image) from err
    length = _u32(raw, 0)
    if length == 0 or 4 + length > len(raw):
        raise Unreadable("bad rbd_id object")
    return raw[4:4 + length].decode()


def lockers(ioctx: Any, header: str) -> list[tuple[str, str]]:
    """(client, cookie) of each holder of the lock on header object *header*, read now."""
    try:
        blob = ioctx.get_xattr(header, "lock.rbd_lock")
    except (rados.NoData, rados.ObjectNotFound):
        return []
    return parse_lockers(blob) if blob else []


class Header:
    """An image's size and lock holders, read from its header object."""

    def __init__(self, ioctx: Any, image: str) -> None:
        header = f"rbd_header.{image_id(ioctx, image)}"
        try:
            with rados.ReadOpCtx() as op:
                vals, _ret = ioctx.get_omap_vals_by_keys(op, ("size",))
                ioctx.operate_read_op(op, header)
                omap = dict(vals)
        except rados.ObjectNotFound as err:
            raise NoImage(image) from err
        if "size" not in omap or len(omap["size"]) != 8:
            raise Unreadable("no size in header")
        self._size = int(struct.unpack("<Q", omap["size"])[0])
        self._lockers = lockers(ioctx, header)

    def size(self) -> int:
        return self._size

    def list_lockers(self) -> dict[str, Any]:
        """As librbd's ``Image.list_lockers`` (without addresses)."""
        return {"lockers": [(client, cookie, "") for client, cookie in self._lockers]}
