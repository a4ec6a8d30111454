"""Migration slots: at most ``max_migrations`` halves (in or out) at once on a host.

A slot is an ``flock`` on one of N files in the run directory. Taking it is
check-and-take in one system call, and the kernel drops it when its holder
dies, so a worker killed mid-migration never leaks a slot (marker files
did, and then every later migration was refused). flock locks belong to an
open file, so two threads of one worker exclude each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fcq_tasks.errors import Refused


def slot_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"migration-slot.{index}.lock"


@contextlib.contextmanager
def migration_slot(run_dir: Path, limit: int, vm: str, host: str) -> Iterator[int]:
    """Hold one of this host's *limit* migration slots, or refuse at once."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for index in range(limit):
        fd = os.open(slot_path(run_dir, index), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield index
        finally:
            os.close(fd)  # closing drops the flock; the file stays for the next taker
        return
    raise Refused(f"{vm}: host {host} already runs {limit} migration(s) "
                  "(max_migrations)", vm=vm, host=host, limit=limit)


def slots_in_use(run_dir: Path, limit: int) -> int:
    """How many slots are held right now (for status and tests)."""
    used = 0
    for index in range(limit):
        path = slot_path(run_dir, index)
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            used += 1
        finally:
            os.close(fd)
    return used
