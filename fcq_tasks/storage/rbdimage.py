"""An RBD image as fcq handles it: lock cookies, the handover note, the QEMU address.

:class:`Img` wraps an open librbd image with fcq's lock and note done at
the rados level (see its docstring for why); :class:`HeaderView` reads what
a sweep needs without opening the image at all.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import rados
import rbd

from fcq_tasks.config.cephsettings import CephSettings
from fcq_tasks.storage import rbdheader

HANDOVER_KEY = "fcq.handover"
COOKIE_PREFIX = "fcq "


def make_cookie(host: str, instance: str) -> str:
    return f"{COOKIE_PREFIX}host={host} instance={instance}"


def cookie_host(cookie: str) -> str | None:
    """The host a lock cookie names; None for a lock fcq did not take."""
    if not cookie.startswith(COOKIE_PREFIX):
        return None
    fields = dict(part.split("=", 1) for part in cookie[len(COOKIE_PREFIX):].split()
                  if "=" in part)
    return fields.get("host")


def qemu_uri(ceph: CephSettings, pool: str, image: str) -> str:
    """How QEMU's rbd driver (and qemu-img) open *image* under this host's identity."""
    return (f"rbd:{pool}/{image}:id={ceph.client_id}:conf={ceph.conf}"
            f":keyring={ceph.keyring}")


class HeaderView(rbdheader.Header):
    """What volumes() reads of an image without opening it, plus its handover note."""

    def __init__(self, ioctx: Any, name: str) -> None:
        super().__init__(ioctx, name)
        self.ioctx = ioctx
        self.name = name

    def note(self) -> dict[str, Any] | None:
        return read_note(self.ioctx, self.name)


class _LockAndNote:
    """fcq's lock and handover note of image *name*, done at the rados level.

    librbd's own ``lock_exclusive``/``unlock`` and image metadata send a
    header-update notification to every watcher and wait for each to
    answer: a QEMU that died without closing its images (SIGKILL, crash)
    stays a watcher for ~30 s and costs every such call 5 s. The same
    advisory lock (class ``lock``, name ``rbd_lock`` on the image's header
    object, what ``rbd lock ls`` shows) taken through rados, and the
    handover note kept in an object of its own, need no notification.
    Breaking another client's lock still goes through librbd.
    """

    LOCK_NAME = "rbd_lock"
    ioctx: Any
    name: str

    def _header(self) -> str:
        raise NotImplementedError

    def lock_exclusive(self, cookie: str) -> None:
        try:
            self.ioctx.lock_exclusive(self._header(), self.LOCK_NAME, cookie)
        except rados.ObjectBusy as err:
            raise rbd.ImageBusy(str(err)) from err
        except rados.ObjectExists as err:
            raise rbd.ImageExists(str(err)) from err

    def unlock(self, cookie: str) -> None:
        with contextlib.suppress(rados.ObjectNotFound):  # not held (any more): done
            self.ioctx.unlock(self._header(), self.LOCK_NAME, cookie)

    def note(self) -> dict[str, Any] | None:
        """The handover note: {"to", "from", ["claimed"], ["rescued"]}, or None."""
        return read_note(self.ioctx, self.name)

    def set_note(self, note: dict[str, Any]) -> None:
        self.ioctx.write_full(note_object(self.name), json.dumps(note).encode())

    def remove_note(self) -> None:
        with contextlib.suppress(rados.ObjectNotFound):
            self.ioctx.remove_object(note_object(self.name))


class Img(_LockAndNote):
    """An open image and its pool, with fcq's lock and note done at the rados level."""

    def __init__(self, ioctx: Any, img: Any, name: str) -> None:
        self.ioctx = ioctx
        self.img = img
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.img, attr)

    def _header(self) -> str:
        return f"rbd_header.{self.img.id()}"


class NeedsOpen(Exception):
    """A LockView step needs librbd (breaking another client's lock): open the image, redo."""


class LockView(_LockAndNote):
    """Image *name*'s lock and note without opening it (~1 ms instead of ~8 for an open).

    Enough to take, check, mark and release fcq's lock (lock, claim,
    unlock, hand_over); the lockers are read anew at each call, so a look
    after a failed take sees who took it. Breaking another client's lock is
    librbd's: :meth:`break_lock` raises :class:`NeedsOpen`, and the step is
    done again on the opened image (every step that breaks re-reads first).
    Raises rbdheader.NoImage or rbdheader.Unreadable like HeaderView (the
    caller then opens the image).
    """

    def __init__(self, ioctx: Any, name: str) -> None:
        self.ioctx = ioctx
        self.name = name
        self._oid = f"rbd_header.{rbdheader.image_id(ioctx, name)}"
        try:
            # A lock taken on a missing object would create it: the header
            # must exist (an image being removed may have lost it).
            ioctx.stat(self._oid)
        except rados.ObjectNotFound as err:
            raise rbdheader.NoImage(name) from err

    def _header(self) -> str:
        return self._oid

    def break_lock(self, client: str, cookie: str) -> None:
        raise NeedsOpen(self.name)

    def list_lockers(self) -> dict[str, Any]:
        """As librbd's ``Image.list_lockers`` (without addresses), read now."""
        return {"lockers": [(client, cookie, "")
                            for client, cookie in rbdheader.lockers(self.ioctx, self._oid)]}


def note_object(image: str) -> str:
    """The rados object holding *image*'s handover note (in the image's pool)."""
    return f"{HANDOVER_KEY}.{image}"


def read_note(ioctx: Any, image: str) -> dict[str, Any] | None:
    try:
        raw = ioctx.read(note_object(image), 4096)
    except rados.ObjectNotFound:
        return None
    try:
        note = json.loads(raw)
    except ValueError:
        return {"to": "?", "from": "?"}
    return note if isinstance(note, dict) else {"to": "?", "from": "?"}
