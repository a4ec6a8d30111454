"""The per-VM operation lock across threads and processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fcq_tasks.errors import VMBusy
from fcq_tasks.host.oplock import operation_lock

HOLDER = """
import sys, time
from pathlib import Path
from fcq_tasks.host.oplock import operation_lock
with operation_lock(Path(sys.argv[1]), "vm01"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_reentrant_in_one_thread(tmp_path: Path) -> None:
    """restart = stop + start under one lock: the holder may take it again."""
    with operation_lock(tmp_path, "vm01"), operation_lock(tmp_path, "vm01"):
        pass
    with operation_lock(tmp_path, "vm01"):  # and it is free again afterwards
        pass


def test_other_thread_gets_busy(tmp_path: Path) -> None:
    """A second thread is told the VM is busy instead of waiting or racing."""
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with operation_lock(tmp_path, "vm01"):
                pass
        except VMBusy as err:
            errors.append(err)

    with operation_lock(tmp_path, "vm01"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1


def test_other_process_gets_busy_and_crash_releases(tmp_path: Path) -> None:
    """Across processes the flock says busy; killing the holder frees it at once."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "60"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    with pytest.raises(VMBusy), operation_lock(tmp_path, "vm01"):
        pass
    proc.kill()
    proc.wait()
    with operation_lock(tmp_path, "vm01"):
        pass


def test_wait_is_bounded(tmp_path: Path) -> None:
    """With wait > 0 the second operation gets the lock once the first ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "0.5"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    with operation_lock(tmp_path, "vm01", wait=30):
        pass
    proc.wait()
