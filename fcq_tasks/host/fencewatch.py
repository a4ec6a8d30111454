"""The fence watch: a host that finds its own guests fenced stops them at once.

When another host takes a VM over (evacuate, force-unlock, a migration's
rescue), it blocklists the clients of this host's QEMU on the OSDs first.
The guest then fails at its next disk request, and its RBD drives pause it
there (werror/rerror=stop). A guest that does not touch its disks would run
on, answering on the network next to its new copy, until this host's next
sweep, and never if this host cannot reach Redis. So every worker on RBD
runs this watch in a thread of its own, which needs Ceph and nothing else:
every ``fence_check_interval`` seconds it reads the blocklist once (one mon
command) and kills each QEMU of this host whose clients it names.

The watch has a Ceph connection of its own, with a short operation
timeout, and looks at the blocklist before anything else. A host that hung
while it was fenced wakes up with its process's connection blocklisted
too; such a connection fails some calls at once and lets others (the
monitor's) wait for their whole timeout. So a failed call drops the
watch's connection and the next round, at once, opens a new one: the kill
never waits behind the process's other Ceph work or a broken session.

Killing is always right for such a QEMU: its clients stay blocklisted for
``ceph.blocklist_seconds`` (a week by default), so it can never write its
disks again, and the guest runs (or will run) elsewhere. The VM's run files
stay; the next ensure cleans up and follows the locks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable
from typing import Any

import structlog

from fcq_tasks import metrics
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths, identity_names
from fcq_tasks.storage import cephconn, fence
from fcq_tasks.storage.hostwatch import HostWatch

log = structlog.get_logger()

#: How often a lost host watch is registered again when the fence check is off.
HOLD_INTERVAL = 5.0
#: s: the longest one of the watch's own Ceph calls may take (or op_timeout
#: if shorter); then its connection is dropped and opened anew.
CALL_TIMEOUT = 5.0


def record_clients(qemu: QemuProcess, addrs: list[str]) -> None:
    """Note *addrs* as the storage clients of *qemu*, the QEMU just started (its identity)."""
    ident = qemu.identity()
    if not addrs or ident is None:
        return
    write_atomically(qemu.paths.clients, json.dumps({
        "pid": ident.pid, "start_ticks": ident.start_ticks, "addrs": addrs}), durable=False)


def _clients(paths: VMRunPaths) -> tuple[int, int, list[str]] | None:
    try:
        data: Any = json.loads(paths.clients.read_text())
        addrs = [str(a) for a in data["addrs"]]
        return int(data["pid"]), int(data["start_ticks"]), addrs
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_once(settings: HostSettings,
               blocklisted: Callable[[list[str]], list[str]]) -> list[str]:
    """Kill every QEMU of this host whose clients *blocklisted* names; return their VMs."""
    found: dict[str, tuple[QemuProcess, list[str]]] = {}
    for name in identity_names(settings.run_dir):
        paths = VMRunPaths(settings.run_dir, name)
        noted = _clients(paths)
        if noted is None:
            continue
        qemu = QemuProcess(paths, settings.qmp_timeout)
        ident = qemu.identity()
        # The note must describe the QEMU on record now, not an earlier one.
        if ident is None or (ident.pid, ident.start_ticks) != noted[:2]:
            continue
        found[name] = (qemu, noted[2])
    if not found:
        return []
    fenced = set(blocklisted(sorted({a for _, addrs in found.values() for a in addrs})))
    killed = []
    for name, (qemu, addrs) in sorted(found.items()):
        hit = sorted(set(addrs) & fenced)
        if not hit:
            continue
        proc = qemu.find()
        if proc is None:
            continue
        log.warning("fenced-guest-killed", vm=name, pid=proc.pid, clients=hit,
                    action="kill", detail="its storage clients are blocklisted: another "
                    "host took the VM over")
        qemu.kill(proc)
        metrics.fencing("fenced-guest-killed")
        killed.append(name)
    return killed


class FenceWatch:
    """In a daemon thread until stop(): hold this host's watch (storage/hostwatch.py) and,
    when *interval* > 0, check_once every *interval* seconds."""

    def __init__(self, settings: HostSettings, interval: float) -> None:
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="fcq-fence-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        ceph = self.settings.ceph
        assert ceph is not None
        conn: Any = None
        sign: HostWatch | None = None
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.interval or HOLD_INTERVAL
            try:
                if conn is None:
                    conn = cephconn.open_connection(ceph, min(ceph.op_timeout, CALL_TIMEOUT))
                    sign = HostWatch(ceph, self.settings.host, conn)
                if self.interval:
                    # First: a guest fenced while this host hung dies before
                    # this worker tries anything else on Ceph.
                    check_once(self.settings, functools.partial(fence.blocklisted, conn))
                assert sign is not None
                sign.hold()
            except Exception as err:  # Ceph away, or this connection fenced: a new one
                log.warning("fence-watch-failed", error=str(err),
                            detail="the watch's Ceph connection is opened anew")
                _retire(sign, conn)
                conn, sign = None, None
                wait = min(wait, 1.0)
        _retire(sign, conn)


def _retire(sign: HostWatch | None, conn: Any) -> None:
    """Close *sign* and shut *conn* down, in the background: a fenced session
    may take its whole timeout to shut down, and the watch must go on."""
    def close() -> None:
        if sign is not None:
            sign.close()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.shutdown()
    if sign is not None or conn is not None:
        threading.Thread(target=close, daemon=True, name="fcq-fence-retire").start()
