"""The fcq command as an operator and a program use it: output and exit codes."""

from __future__ import annotations

import json

from tests.conftest import Host
from tests.helpers import wait_guest


def test_unknown_vm_and_bad_name_exit_2(host: Host) -> None:
    """A VM with no config and a name that is not a safe identifier are input errors."""
    unknown = host.fcq("start", "nosuchvm")
    assert unknown.returncode == 2 and "nosuchvm: no config" in unknown.stderr
    bad = host.fcq("start", "../../etc/passwd")
    assert bad.returncode == 2 and "VM: must be 1-63 characters" in bad.stderr
    assert host.qemu_processes() == []


def test_broken_settings_file_exit_2(host: Host) -> None:
    """A broken host settings file stops the command before it touches any VM."""
    host.settings_file.write_text("accelerator: warp\n")
    cli = host.fcq("ls")
    assert cli.returncode == 2 and "accelerator: must be one of auto, kvm, tcg" in cli.stderr


def test_start_status_ls_stop_json(host: Host) -> None:
    """--json gives programs the same results people read as text."""
    host.write_vm("vm01")
    host.write_vm("vm02", online=False)
    started = json.loads(host.fcq("--json", "start", "vm01", check=True).stdout)
    assert (started["vm"], started["actions"], started["status"]) == ("vm01", ["start"],
                                                                      "running")
    rows = {r["vm"]: r for r in json.loads(host.fcq("--json", "ls", check=True).stdout)}
    assert rows["vm01"]["status"] == "running" and rows["vm01"]["wanted"] == "here"
    assert rows["vm02"]["status"] == "stopped" and rows["vm02"]["wanted"] == "offline"
    text = host.fcq("ls", check=True).stdout
    assert text.splitlines()[0].split()[:3] == ["VM", "STATUS", "CONFIG"]
    assert "vm01" in text and "running" in text
    status = json.loads(host.fcq("--json", "status", "vm01", check=True).stdout)
    assert status["locks"] == {"root": "alpha", "swap": "alpha", "tmp": "alpha"}
    assert status["memory_mb"] == 128
    memory = json.loads(host.fcq("--json", "memory", check=True).stdout)
    assert memory["booked_mb"] == 128 and memory["vms"] == {"vm01": 128}
    stopped = host.fcq("kill", "vm01", check=True)
    assert "now stopped" in stopped.stdout


def test_several_vms_worst_exit_code_wins(host: Host) -> None:
    """ensure of a good VM and an unknown one converges the good one and exits 2."""
    host.write_vm("vm01")
    cli = host.fcq("ensure", "vm01", "ghost")
    assert cli.returncode == 2
    assert "vm01@alpha: ensure: found stopped, did start; now running" in cli.stdout
    assert "ghost: no config" in cli.stderr


def test_restart_gives_new_process(host: Host) -> None:
    """restart = stop + start under one operation lock: a new QEMU process runs after it."""
    host.write_vm("vm01")
    host.fcq("start", "vm01", check=True)
    wait_guest(host.agent("vm01"))  # so the stop half goes through ACPI, not the grace
    before = host.agent("vm01").status()["pid"]
    result = json.loads(host.fcq("--json", "restart", "vm01", check=True).stdout)
    assert result["operation"] == "restart" and result["status"] == "running"
    assert host.agent("vm01").status()["pid"] != before
