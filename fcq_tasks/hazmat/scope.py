"""Each QEMU in a cgroup of its own, never in the worker's.

Under systemd a worker runs as a service, and stopping or restarting a
service (``KillMode=control-group``, the default) kills every process in
its cgroup: a QEMU started by the worker would die with it, and an upgrade
of fcq would power off every guest of the host. libvirt avoids this by
registering each guest as a scope in ``machine.slice``; fcq does the same:

* ``systemd`` (systemd is PID 1): QEMU is started through ``systemd-run
  --scope --slice=machine.slice``, which registers the scope and then
  becomes QEMU (same pid);
* ``cgroupfs`` (no systemd, a cgroup file system fcq may write): QEMU is
  moved into ``machine.slice/fcq-<vm>.scope`` of every hierarchy it can
  write, right after it started;
* ``none``: left where it starts (the worker's cgroup).

``auto`` (the default) picks the first that works here. With an explicit
choice that does not work, a start fails; with ``auto``, the start goes on
and logs ``qemu-scope-failed``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

CHOICES = ("auto", "systemd", "cgroupfs", "none")
SLICE = "machine.slice"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ScopeError(OSError):
    """QEMU could not be given a cgroup of its own."""


def resolve(choice: str) -> str:
    """What *choice* means on this machine: systemd, cgroupfs or none."""
    if choice != "auto":
        return choice
    if Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"):
        return "systemd"
    return "cgroupfs" if hierarchies() else "none"


def hierarchies() -> list[Path]:
    """The cgroup hierarchies a process's membership matters in, as mounted here.

    cgroup v2 alone (``/sys/fs/cgroup`` itself), or the hybrid layout's
    unified tree and systemd's named v1 tree (what a service's kill follows).
    """
    if (CGROUP_ROOT / "cgroup.procs").exists():
        return [CGROUP_ROOT]
    return [p for p in (CGROUP_ROOT / "unified", CGROUP_ROOT / "systemd")
            if (p / "cgroup.procs").exists()]


def command_prefix(mode: str, vm: str) -> list[str]:
    """What goes before QEMU's own argv: the systemd-run call, or nothing."""
    if mode != "systemd":
        return []
    # A name per start: an upgrade runs two QEMUs of one VM for a moment.
    unit = f"fcq-{vm}-{secrets.token_hex(3)}"
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--slice={SLICE}",
            f"--unit={unit}", "--description", f"fcq guest {vm}"]


def scope_dirs(vm: str) -> list[Path]:
    return [h / SLICE / f"fcq-{vm}.scope" for h in hierarchies()]


def move(pid: int, vm: str) -> list[Path]:
    """Move process *pid* into VM *vm*'s scope in every hierarchy; the scopes."""
    moved = []
    for scope in scope_dirs(vm):
        try:
            scope.mkdir(parents=True, exist_ok=True)
            (scope / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as err:
            raise ScopeError(err.errno, f"cannot move QEMU {pid} into {scope}: "
                             f"{err.strerror}") from err
        moved.append(scope)
    if not moved:
        raise ScopeError(0, "no cgroup hierarchy to move QEMU into")
    return moved


def cgroups_of(pid: int) -> list[str]:
    """The cgroup paths of *pid*, one per hierarchy (``/proc/<pid>/cgroup``)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return []
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def forget(vm: str) -> None:
    """Remove VM *vm*'s empty scopes (after its QEMU ended); a busy one stays."""
    for scope in scope_dirs(vm):
        with contextlib.suppress(OSError):
            os.rmdir(scope)
