"""Progress on a terminal (a real pseudo-terminal) and in a pipe."""

from __future__ import annotations

import io
import os
import pty
import sys
from typing import Any

import pytest

from fcq_tasks.cli.fleet import DrainView
from fcq_tasks.cli.remote import Progress, bar, fraction_done


def read_all(fd: int) -> str:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


def copying(moved: int, left: int) -> dict[str, Any]:
    return {"vm": "vm01", "host": "alpha", "operation": "outmigrate", "step": "copying",
            "transferred": moved, "remaining": left, "mbps": 80}


def test_bar_and_fractions() -> None:
    assert bar(0.5, width=10) == "[#####.....]  50%"
    assert bar(1.0, width=4) == "[####] 100%"
    assert fraction_done("copying", {"transferred": 30, "remaining": 10}) == 0.75
    assert fraction_done("snapshotted", {}) == pytest.approx(2 / 3)
    assert fraction_done("qemu-start", {}) is None


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            show = Progress("vm01 copy", quiet=False, stream=tty)
            show("PROGRESS", copying(50, 50))
            show("PROGRESS", copying(100, 0))
            show("SUCCESS", None)
        text = read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    assert text.count("\r\x1b[K") == 2
    assert "[############............]  50%" in text
    assert "[########################] 100%" in text
    # The bar's line is ended before the final state's line.
    assert text.rstrip().endswith("success  [0.0s]") and "100%" in text.splitlines()[-2]


def test_progress_is_plain_lines_when_piped() -> None:
    stream = io.StringIO()
    show = Progress("vm01 copy", quiet=False, stream=stream)
    show("PROGRESS", copying(50, 50))
    show("PROGRESS", copying(100, 0))
    show("SUCCESS", None)
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 3
    assert "copying transferred=50 B remaining=50 B" in text and "vm01 copy: success" in text
    assert "speed=9.54 MiB/s" in text and "mbps" not in text  # QEMU's Mbit/s, as MiB/s


def test_drain_view_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", tty)
        view = DrainView(quiet=False)
        view("vm01", "planned", {"to": "beta"})
        view("vm02", "planned", {"to": "gamma"})
        view("vm01", "copying", {"to": "beta", "transferred": 25, "remaining": 75})
        view("vm01", "moved", {"to": "beta", "seconds": 2.0})
        view.close()
        tty.flush()
        text = read_all(master)
    finally:
        monkeypatch.undo()
        tty.close()
        os.close(master)
    assert "copying vm01 25%" in text
    assert "1/2 VMs" in text and "vm01 -> beta: moved" in text
