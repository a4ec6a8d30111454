"""The per-VM operation lock: one operation on a VM at a time on this host.

Between processes it is an ``flock`` on ``<run_dir>/<vm>.op.lock``; between
threads of one process (the Celery threads pool) a registry of holders. It
is reentrant for the thread that holds it, so ``restart`` can call ``stop``
and ``start``. A second operation does not wait unless asked to: it gets
:class:`VMBusy`, so concurrent ensures collapse into one instead of racing.
The kernel drops an flock when its holder dies, so a crash never leaks it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fcq_tasks import metrics
from fcq_tasks.errors import VMBusy

#: How often a waiting operation tries again.
RETRY_INTERVAL = 0.1


@dataclass
class _Held:
    thread: int
    fd: int
    depth: int


_registry: dict[Path, _Held] = {}
_registry_lock = threading.Lock()


def _try_acquire(path: Path, vm: str) -> bool:
    me = threading.get_ident()
    with _registry_lock:
        held = _registry.get(path)
        if held is not None:
            if held.thread != me:
                return False
            held.depth += 1
            return True
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        _registry[path] = _Held(me, fd, 1)
        return True


def _release(path: Path) -> None:
    with _registry_lock:
        held = _registry[path]
        held.depth -= 1
        if held.depth == 0:
            del _registry[path]
            # Closing drops the flock; the file stays (unlinking it would
            # let two processes lock two different inodes of one name).
            os.close(held.fd)


@contextmanager
def operation_lock(run_dir: Path, vm: str, wait: float = 0.0) -> Iterator[None]:
    """Hold VM *vm*'s operation lock; raise VMBusy if not had within *wait* s."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir / f"{vm}.op.lock"
    deadline = time.monotonic() + wait
    while not _try_acquire(path, vm):
        if time.monotonic() >= deadline:
            metrics.lock_conflict("operation")
            raise VMBusy(vm)
        time.sleep(RETRY_INTERVAL)
    try:
        yield
    finally:
        _release(path)


def depth(run_dir: Path, vm: str) -> int:
    """How many times the calling thread holds VM *vm*'s operation lock (0: not at all)."""
    with _registry_lock:
        held = _registry.get(run_dir / f"{vm}.op.lock")
        return held.depth if held is not None and held.thread == threading.get_ident() else 0


def held_elsewhere(run_dir: Path, vm: str) -> bool:
    """Whether another process or thread holds VM *vm*'s operation lock right now.

    Read from /proc/locks, without taking the lock even for an instant: a
    look must never make a real operation find the VM busy.
    """
    path = run_dir / f"{vm}.op.lock"
    with _registry_lock:
        held = _registry.get(path)
        if held is not None:
            return held.thread != threading.get_ident()
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(" FLOCK " in f" {line} " and dev in line.split() for line in table.splitlines())
