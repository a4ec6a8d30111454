"""Host memory admission: starts never book more than vm_max_total_memory.

What a running VM books is the memory recorded in its identity file when it
was started, counted only while its QEMU process is alive. The check and the
start happen under one host-wide flock, so two starts of different VMs can
not both squeeze into the last free gigabyte.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcq_tasks import metrics
from fcq_tasks.errors import MemoryLimitExceeded, QemuError
from fcq_tasks.hazmat.qemu import QemuProcess, VMRunPaths, read_identity_files

#: How often a start waiting for the admission lock looks again.
RETRY_INTERVAL = 0.05


#: Where the second QEMU of an in-place upgrade lives while both run (its
#: files are named by a hash of the VM's name: socket paths stay short).
UPGRADE_DIR = "u"


def booked_memory(run_dir: Path, qmp_timeout: float, exclude: str = "",
                  identities: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """name → MB for every VM whose QEMU runs on this host (but *exclude*).

    The second QEMU of an upgrade in flight counts too, as ``<vm>+upgrade``.
    *identities*: what read_identity_files(run_dir) just returned, if the
    caller has it (the heartbeat), so the files are not read twice.
    """
    out = {}
    for directory, suffix in ((run_dir, ""), (run_dir / UPGRADE_DIR, "+upgrade")):
        records = identities if identities is not None and not suffix \
            else read_identity_files(directory)
        for name, ident in records.items():
            vm = str(ident.get("vm", name)) if suffix else name
            if vm == exclude and not suffix:
                continue
            # An upgrade's QEMU reads the VM's own config (VMRunPaths with vm=).
            paths = VMRunPaths(directory, name, vm=vm if suffix else "")
            if QemuProcess(paths, qmp_timeout).find() is not None:
                out[vm + suffix] = int(ident.get("memory_mb", 0))
    return out


@contextmanager
def admission(run_dir: Path, vm: str, memory_mb: int, limit_mb: int, qmp_timeout: float,
              wait: float, second_copy: bool = False) -> Iterator[None]:
    """Admit VM *vm* or raise MemoryLimitExceeded; hold the host lock while the caller starts it.

    *second_copy*: *vm* runs here and stays booked (an upgrade's new QEMU
    runs beside it until the copy is done).
    """
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(run_dir / "admission.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    metrics.admission_refused("lock-timeout")
                    raise QemuError(f"{vm}: another start holds the admission lock for "
                                    f"more than {wait} s", vm=vm) from None
                time.sleep(RETRY_INTERVAL)
        booked = sum(booked_memory(run_dir, qmp_timeout,
                                   exclude="" if second_copy else vm).values())
        if booked + memory_mb > limit_mb:
            metrics.admission_refused("memory")
            err = MemoryLimitExceeded(vm, memory_mb, booked, limit_mb)
            if second_copy:
                err.message += (": an upgrade runs a second copy of the VM until the old "
                                "one is gone, and the host lacks the memory for both")
                err.args = (err.message,)
            raise err
        yield
    finally:
        os.close(fd)
