"""Logging never fails an operation, and writes JSON lines with vm= and action=."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import structlog

from fcq_tasks import logs
from tests.conftest import HostFactory


def test_json_file_and_text_stream(tmp_path: Path) -> None:
    """Each event lands as a JSON line (with timestamp) and as readable text."""
    stream = io.StringIO()
    logs.configure(tmp_path / "log" / "fcq.jsonl", "info", stream=stream, colors=False)
    structlog.get_logger().bind(vm="vm01").info("started", action="start")
    line = json.loads((tmp_path / "log" / "fcq.jsonl").read_text().splitlines()[0])
    assert (line["event"], line["vm"], line["action"], line["level"]) == (
        "started", "vm01", "start", "info")
    assert "T" in line["timestamp"]
    assert "started" in stream.getvalue() and "vm=vm01" in stream.getvalue()


def test_a_rotated_log_is_reopened(tmp_path: Path) -> None:
    """logrotate moves the file away (or removes it): the next line goes to a new
    file under the configured name, not on into the old one."""
    path = tmp_path / "fcq.log"
    logs.configure(path, "info", stream=None)
    log = structlog.get_logger()
    log.info("before")
    path.rename(tmp_path / "fcq.log.1")
    log.info("after-move")
    log.info("after-move-2")
    path.unlink()
    log.info("after-remove")

    def events(p: Path) -> list[str]:
        return [json.loads(line)["event"] for line in p.read_text().splitlines()]
    assert events(tmp_path / "fcq.log.1") == ["before"]
    assert events(path) == ["after-remove"]


def test_broken_destinations_are_survived(tmp_path: Path) -> None:
    """An unwritable log file and a closed stream cost the line, not the caller."""
    stream = io.StringIO()
    stream.close()
    logs.configure(Path("/proc/fcq-cannot-exist/fcq.log"), "info", stream=stream)
    structlog.get_logger().info("still-fine", vm="vm01")


def test_vm_start_with_unwritable_log_and_closed_stdout(make_host: HostFactory) -> None:
    """`fcq start` with stdout/stderr closed and a log file on /proc still starts the VM."""
    host = make_host(log_file="/proc/fcq-no/fcq.log")
    host.write_vm("vm01")
    # sh closes fds 1 and 2 before exec: fcq starts with no stdout/stderr at all.
    argv = ["sh", "-c", 'exec "$0" -m fcq_tasks --local -c "$1" start vm01 >&- 2>&-',
            sys.executable, str(host.settings_file)]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, check=False, timeout=120)
    assert proc.returncode == 0
    assert host.agent("vm01").status()["status"] == "running"
