"""Rendering the QEMU config: the built-in template, a host's own, and what is refused."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from fcq_tasks.config.settings import DEFAULTS, HostSettings, parse_host_settings
from fcq_tasks.config.vmspec import Nic, VMSpec
from fcq_tasks.errors import ConfigError
from fcq_tasks.hazmat.template import Drive, RunPaths, render_qemu_config

SPEC = VMSpec(name="vm01", id=12345, resource_group="test", online=True, kvm_host="alpha",
              disk_gib=5, memory_mb=512, cores=2,
              nics=(Nic("srv", "00:01:02:03:05:06"), Nic("fe", "00:01:02:03:05:07")))
DRIVES = [Drive("root", "/var/lib/fcq/volumes/vm01.root", "raw", "writeback"),
          Drive("swap", "/var/lib/fcq/volumes/vm01.swap", "raw", "writeback")]
PATHS = RunPaths(qmp="/run/fcq/vm01.qmp.sock", ga="/run/fcq/vm01.ga.sock")


def settings(**raw: object) -> HostSettings:
    return parse_host_settings({**DEFAULTS, "host": "alpha", **raw}, "<test>")


def test_default_template_has_every_part() -> None:
    """Memory, cores, monitor, agent port, drives (root boots) and tap NICs are rendered."""
    text = render_qemu_config(settings(), SPEC, "tcg", DRIVES, PATHS)
    for line in ('guest = "vm01"', 'accel = "tcg"', 'size = "512M"', 'cpus = "2"',
                 'path = "/run/fcq/vm01.qmp.sock"', 'name = "org.qemu.guest_agent.0"',
                 'file = "/var/lib/fcq/volumes/vm01.root"', 'bootindex = "1"',
                 'ifname = "tsrv12345"', 'mac = "00:01:02:03:05:07"'):
        assert line in text, line
    assert text.count("bootindex") == 1
    assert "kernel =" not in text


def test_user_networking_and_direct_boot() -> None:
    """nic_mode user gives user netdevs; direct_boot adds kernel, initrd and append."""
    s = settings(nic_mode="user", direct_boot={"kernel": "/k", "initrd": "/i",
                                               "append": "console=ttyS0 quiet"})
    text = render_qemu_config(s, SPEC, "kvm", DRIVES, PATHS)
    assert 'type = "user"' in text and "ifname" not in text
    assert 'kernel = "/k"' in text and 'append = "console=ttyS0 quiet"' in text


def test_rendered_config_is_accepted_by_qemu(tmp_path: Path) -> None:
    """QEMU 7.2 parses the built-in template's output (-readconfig, no guest started)."""
    root = tmp_path / "root.img"
    root.write_bytes(b"\0" * 1024 * 1024)
    drives = [Drive("root", str(root), "raw", "writeback")]
    paths = RunPaths(qmp=str(tmp_path / "q.sock"), ga=str(tmp_path / "g.sock"))
    text = render_qemu_config(settings(nic_mode="user"), SPEC, "tcg", drives, paths)
    cfg = tmp_path / "vm01.cfg"
    cfg.write_text(text)
    proc = subprocess.run(["qemu-system-x86_64", "-nodefaults", "-display", "none",
                           "-readconfig", str(cfg), "-S", "-qmp", "stdio"],
                          input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"return"' in proc.stdout


def test_custom_template_and_strict_variables(tmp_path: Path) -> None:
    """A host's own template is used; an unknown variable in it is an error, not empty."""
    own = tmp_path / "own.j2"
    own.write_text('[name]\n  guest = {{ vm.name | q }}\n')
    assert render_qemu_config(settings(template=str(own)), SPEC, "tcg", [], PATHS) == \
        '[name]\n  guest = "vm01"\n'
    own.write_text("{{ vm.nmae }}\n")
    with pytest.raises(ConfigError, match="template"):
        render_qemu_config(settings(template=str(own)), SPEC, "tcg", [], PATHS)


def test_values_that_could_break_out_of_quotes_are_refused() -> None:
    """A path with a quote never reaches QEMU's config parser."""
    bad = [Drive("root", '/x/a"b', "raw", "writeback")]
    with pytest.raises(ConfigError, match="cannot be quoted"):
        render_qemu_config(settings(), SPEC, "tcg", bad, PATHS)


def test_tap_name_longer_than_linux_allows_is_refused() -> None:
    """t<net><id> must fit 15 characters; the error names the NIC field."""
    spec = dataclasses.replace(SPEC, id=123456789, nics=(Nic("storage1", "02:00:00:00:00:01"),))
    with pytest.raises(ConfigError) as info:
        render_qemu_config(settings(), spec, "tcg", DRIVES, PATHS)
    assert info.value.field == "parameters.nics.storage1"
