"""The smaller findings of the security review, each tried for real.

A hostile guest agent here is a real Unix socket whose far end floods it,
standing in for a guest whose agent was replaced (the outermost seam: a
real guest cannot be made to misbehave on purpose from the test).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from fcq_tasks.cli.output import escaped
from fcq_tasks.config.settings import load_host_settings
from fcq_tasks.errors import ConfigError, GuestAgentError
from fcq_tasks.hazmat.guestagent import MAX_MESSAGE_BYTES, AgentTimeouts, GuestAgent
from tests.conftest import Host


def flooding_agent(path: str, newlines: bool) -> threading.Thread:
    """A 'guest agent' that answers nothing and sends garbage as fast as it can."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        chunk = (b"x" * 1023 + b"\n") if newlines else b"x" * 1024
        try:
            while True:
                conn.sendall(chunk * 64)
        except OSError:
            pass
        finally:
            conn.close()
            server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("newlines", [False, True])
def test_a_flooding_guest_agent_costs_a_bounded_read(newlines: bool) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = os.path.join(d, "vm01.ga.sock")
        thread = flooding_agent(path, newlines)
        agent = GuestAgent(path, AgentTimeouts(call=30, lock=5), "vm01")
        with agent, pytest.raises(GuestAgentError, match="more than"):
            agent.sync()
        # What fcq kept of the flood: bounded by one line, not by the flood.
        assert len(agent._buf) <= MAX_MESSAGE_BYTES + 65536
        thread.join(5)


def test_control_characters_are_shown_not_obeyed() -> None:
    hostile = "frozen\x1b[2J\x1b[31m\rfcq: done: all fine\nforged line\x9b"
    assert escaped(hostile, keep_lines=False) == \
        "frozen\\x1b[2J\\x1b[31m\\rfcq: done: all fine\\nforged line\\x9b"
    assert escaped("a table\nof two lines\twith a tab") == "a table\nof two lines\twith a tab"


def test_guest_text_in_an_error_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """The CLI's error path, end to end: a message with an escape prints as one
    escaped line (an unknown VM name is echoed back; names are checked, so the
    text comes through the settings file's name here)."""
    settings = tmp_path / "host.yaml"
    settings.write_text(yaml.safe_dump({"host": "alpha", "cluster": {
        "password_file": str(tmp_path / "pw\x1b[31m")}}))
    (tmp_path / "pw\x1b[31m").write_text("secret\n")
    (tmp_path / "pw\x1b[31m").chmod(0o644)
    out = subprocess.run([sys.executable, "-m", "fcq_tasks", "--config", str(settings),
                          "hosts"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "\x1b" not in out.stderr and "\\x1b[31m" in out.stderr
    assert "has mode 0644" in out.stderr


def write_settings(tmp_path: Path, **raw: Any) -> Path:
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump({"host": "alpha", **raw}))
    return path


@pytest.mark.parametrize("field", ["conf", "keyring"])
@pytest.mark.parametrize("char", [":", ",", "@"])
def test_ceph_paths_that_would_change_the_drive_string_are_refused(
        tmp_path: Path, field: str, char: str) -> None:
    path = write_settings(tmp_path, storage="rbd",
                          ceph={field: f"/etc/ceph/a{char}id=admin"})
    with pytest.raises(ConfigError) as info:
        load_host_settings(path)
    assert f"ceph.{field}" in info.value.message and repr(char) in info.value.message


@pytest.mark.parametrize("key", ["password_file", "flower_auth_file"])
def test_secret_files_readable_by_others_are_refused(tmp_path: Path, key: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("ops:pw\n")
    secret.chmod(0o644)
    path = write_settings(tmp_path, cluster={key: str(secret)})
    out = subprocess.run([sys.executable, "-m", "fcq_tasks", "--config", str(path),
                          "flower" if key == "flower_auth_file" else "hosts"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and f"cluster.{key}" in out.stderr, out.stderr
    assert "has mode 0644" in out.stderr and "chmod 0600" in out.stderr


def test_run_dir_is_made_private_and_the_serial_log_too(host: Host) -> None:
    """A run directory left at 0755 (by hand, an older package) is 0700 once a VM
    starts, and what QEMU writes there (serial log, sockets) is the host's only."""
    host.settings.run_dir.mkdir(parents=True, exist_ok=True)
    host.settings.run_dir.chmod(0o755)
    host.write_vm("vm01")
    agent = host.agent("vm01")
    assert agent.start()["status"] == "running"
    assert stat.S_IMODE(host.settings.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(agent.paths.serial_log.stat().st_mode) == 0o600
    for sock in (agent.paths.qmp, agent.paths.ga):
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    agent.kill()
