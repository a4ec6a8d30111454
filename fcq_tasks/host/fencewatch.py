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

Killing is always right for such a QEMU: its clients stay blocklisted for
``ceph.blocklist_seconds`` (a week by default), so it can never write its
disks again, and the guest runs (or will run) elsewhere. The VM's run files
stay; the next ensure cleans up and follows the locks.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import structlog

from fcq_tasks import metrics
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths, identity_names
from fcq_tasks.storage import Storage, open_storage
from fcq_tasks.storage.hostwatch import HostWatch

log = structlog.get_logger()

#: How often a lost host watch is registered again when the fence check is off.
HOLD_INTERVAL = 5.0


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


def check_once(settings: HostSettings, storage: Storage) -> list[str]:
    """Kill every QEMU of this host whose clients are blocklisted; return their VMs."""
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
    fenced = set(storage.fenced_clients(sorted({a for _, addrs in found.values()
                                                for a in addrs})))
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
        storage = open_storage(self.settings)
        assert self.settings.ceph is not None
        sign = HostWatch(self.settings.ceph, self.settings.host)
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.interval or HOLD_INTERVAL
            try:
                sign.hold()
            except Exception as err:  # Ceph away: again next time
                log.warning("host-watch-failed", error=str(err))
            if not self.interval:
                continue
            try:
                check_once(self.settings, storage)
            except Exception as err:  # Ceph away: look again next time, never die
                log.warning("fence-watch-failed", error=str(err))
        sign.close()
