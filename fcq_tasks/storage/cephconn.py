"""One Ceph connection per process and identity, reused; images opened one at a time.

A worker handles many VMs on many threads: opening a cluster connection
per call would cost a monitor handshake each time (and fc.qemu crashed
librbd by leaking them). So each process keeps one ``rados.Rados`` per
(conf, client id, keyring), opens an ioctx and the image for each call and
always closes both, and never has one image open twice at once.

When another host fences this one (see :mod:`fcq_tasks.storage.fence`),
the connection is blocklisted and every call on it fails with
``ConnectionShutdown``: the next call reconnects under a new address, so a
host that was wrongly thought gone recovers by itself, while the fenced
QEMU processes (their own clients) stay fenced.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import rados
import rbd

from fcq_tasks.config.cephsettings import CephSettings
from fcq_tasks.errors import StorageError

T = TypeVar("T")

_connections: dict[tuple[str, str, str], Any] = {}
_connections_lock = threading.Lock()
_image_locks: dict[tuple[str, str, str, str], threading.Lock] = {}


def _key(ceph: CephSettings) -> tuple[str, str, str]:
    return (str(ceph.conf), ceph.client_id, str(ceph.keyring))


def connection(ceph: CephSettings) -> Any:
    """This process's connection for *ceph*'s identity (connected on first use)."""
    key = _key(ceph)
    with _connections_lock:
        conn = _connections.get(key)
        if conn is not None:
            return conn
        conn = open_connection(ceph)
        _connections[key] = conn
        return conn


def open_connection(ceph: CephSettings, timeout: float | None = None) -> Any:
    """A new connection of its own, for a caller that must not share the process's.

    *timeout* (s, default ``ceph.op_timeout``) bounds every monitor and OSD
    operation on it.
    """
    seconds = str(max(1, int(ceph.op_timeout if timeout is None else timeout)))
    conn = rados.Rados(conffile=str(ceph.conf), rados_id=ceph.client_id, conf={
        "keyring": str(ceph.keyring),
        # fcq fences explicitly (fence.py): breaking a lock must not
        # also blocklist whatever client happened to take it.
        "rbd_blocklist_on_break_lock": "false",
        # A cluster that does not answer makes a call fail, not hang a
        # worker thread forever.
        "rados_mon_op_timeout": seconds,
        "rados_osd_op_timeout": seconds,
        "client_mount_timeout": seconds,
    })
    try:
        conn.connect(timeout=int(seconds))
    except rados.Error as err:
        conn.shutdown()
        raise StorageError(f"cannot connect to Ceph as client.{ceph.client_id} "
                           f"({ceph.conf}): {err}") from err
    return conn


def drop(ceph: CephSettings, conn: Any) -> None:
    """Forget *conn* (blocklisted or broken); the next call connects anew.

    It is not shut down: other threads may still hold ioctxs and images on
    it, and librados frees them with the connection (a use after free).
    A blocklisted connection is dead anyway; it goes with the process.
    """
    with _connections_lock:
        if _connections.get(_key(ceph)) is conn:
            del _connections[_key(ceph)]


def shutdown_all() -> None:
    """Close every connection of this process (tests, worker shutdown)."""
    with _connections_lock:
        conns = list(_connections.values())
        _connections.clear()
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.shutdown()


def with_pool(ceph: CephSettings, pool: str, fn: Callable[[Any, Any], T]) -> T:
    """Call ``fn(conn, ioctx)`` with an ioctx of *pool* that is closed afterwards.

    Reconnects once when the connection turns out to be blocklisted: every
    caller re-reads what it decides on, so running *fn* again is safe.
    librados and librbd errors become StorageError, except
    ``rbd.ImageNotFound``, which callers answer ("no such volume").
    """
    for attempt in (1, 2):
        conn = connection(ceph)
        try:
            try:
                ioctx = conn.open_ioctx(pool)
            except rados.ObjectNotFound as err:
                raise StorageError(f"Ceph pool {pool!r} does not exist or client."
                                   f"{ceph.client_id} may not use it", pool=pool) from err
            with ioctx:
                return fn(conn, ioctx)
        except (rados.ConnectionShutdown, rbd.ConnectionShutdown) as err:
            drop(ceph, conn)
            if attempt == 2:
                raise StorageError(f"Ceph refuses client.{ceph.client_id} twice in a row "
                                   f"(blocklisted?): {err}", pool=pool) from err
        except rbd.ImageNotFound:
            raise
        except (rados.Error, rbd.Error) as err:
            raise StorageError(f"Ceph error in pool {pool!r} as client.{ceph.client_id}: "
                               f"{type(err).__name__}: {err}", pool=pool) from err
    raise AssertionError("unreachable")


@contextlib.contextmanager
def image_turn(ceph: CephSettings, pool: str, image: str) -> Iterator[None]:
    """Be the only thread of this process with *image* open."""
    key = (*_key(ceph)[:2], pool, image)
    with _connections_lock:
        lock = _image_locks.setdefault(key, threading.Lock())
    with lock:
        yield


def with_image(ceph: CephSettings, pool: str, image: str,
               fn: Callable[[Any, Any, Any], T]) -> T:
    """Call ``fn(conn, ioctx, img)`` with *image* open (closed afterwards), alone here.

    Raises ``rbd.ImageNotFound`` when the image does not exist.
    """
    def call(conn: Any, ioctx: Any) -> T:
        with rbd.Image(ioctx, image) as img:
            return fn(conn, ioctx, img)

    with image_turn(ceph, pool, image):
        return with_pool(ceph, pool, call)
