"""The storage side's sign that a host lives: its worker's watch on ``fcq.host.<host>``.

A host's heartbeat goes through Redis; a host cut off from Redis, or one
whose heartbeat lapsed a moment ago because it hung, is not necessarily
dead. Every RBD worker therefore holds a rados watch on the object
``fcq.host.<host>`` in its default pool, with a timeout of
``ceph.host_watch_timeout`` seconds (longer than ``cluster.registry_ttl``):
the watch lasts as long as the worker talks to Ceph, and that long after it
stops. ``fcq evacuate`` refuses while the dead host's watch is still there.
So a hung host is evacuated only once it has been silent on both sides for
the documented margins (docs/ceph.md), and a host that only lost Redis is
never taken for dead.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from typing import Any

import structlog

from fcq_tasks.config.cephsettings import CephSettings
from fcq_tasks.errors import StorageError
from fcq_tasks.storage import cephconn

log = structlog.get_logger()


def watch_object(host: str) -> str:
    return f"fcq.host.{host}"


class HostWatch:
    """This worker's watch on its host object; hold() (re)registers it, idempotently."""

    def __init__(self, ceph: CephSettings, host: str, conn: Any = None) -> None:
        """*conn*: the connection to watch on (default: the process's own)."""
        self.ceph = ceph
        self.host = host
        self._conn = conn
        self._watch: Any = None
        self._ioctx: Any = None
        self._lost = threading.Event()

    def hold(self) -> None:
        if self._watch is not None and not self._lost.is_set():
            return
        self.close()
        self._lost.clear()
        conn = self._conn if self._conn is not None else cephconn.connection(self.ceph)
        ioctx = conn.open_ioctx(self.ceph.pool)
        try:
            obj = watch_object(self.host)
            ioctx.write_full(obj, b"")  # an empty object: the watch needs one
            self._watch = ioctx.watch(obj, self._notified, self._error,
                                      timeout=self.ceph.host_watch_timeout)
        except BaseException:
            ioctx.close()
            raise
        self._ioctx = ioctx
        log.info("host-watch", host=self.host, object=watch_object(self.host),
                 timeout=self.ceph.host_watch_timeout)

    def _notified(self, *_: Any) -> None:
        pass  # nobody notifies; the watch is a sign, not a channel

    def _error(self, *args: Any) -> None:
        # The session broke (blocklisted, cluster away too long): hold()
        # registers again at its next call.
        log.warning("host-watch-lost", host=self.host, error=str(args))
        self._lost.set()

    def close(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.close()
            self._watch = None
        if self._ioctx is not None:
            with contextlib.suppress(Exception):
                self._ioctx.close()
            self._ioctx = None


def host_watchers(ceph: CephSettings, host: str) -> list[str]:
    """Client addresses watching *host*'s object now (the rados CLI: the bindings cannot)."""
    argv = ["rados", "--conf", str(ceph.conf), "--id", ceph.client_id, "--keyring",
            str(ceph.keyring), "-p", ceph.pool, "listwatchers", watch_object(host)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False,
                             timeout=ceph.op_timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StorageError(f"cannot list the watchers of {watch_object(host)}: {err}") from err
    if out.returncode != 0:
        if "No such file" in out.stderr or "(2)" in out.stderr:
            return []  # that host never ran a worker on RBD
        raise StorageError(f"cannot list the watchers of {watch_object(host)}: "
                           f"{out.stderr.strip()[-300:]}")
    return sorted(line.split()[0].removeprefix("watcher=") for line in out.stdout.splitlines()
                  if line.startswith("watcher="))
