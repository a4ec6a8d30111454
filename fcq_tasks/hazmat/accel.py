"""Choose QEMU's accelerator: KVM only where it is real, TCG otherwise.

``/dev/kvm`` existing proves nothing: on these machines it is a software
"PVM" hypervisor that makes QEMU ~2000x slower and aborts with ``-cpu host``
(such a machine shows no vmx/svm flag in /proc/cpuinfo and has
/sys/module/kvm_pvm, yet QEMU starts with ``accel=kvm``). Real KVM needs the
CPU's virtualisation flag and the matching kvm_intel/kvm_amd module.
"""

from __future__ import annotations

import os
from pathlib import Path


def kvm_is_real(cpu_flags: set[str], modules: set[str], dev_kvm_rw: bool) -> bool:
    """Pure decision from what the host shows."""
    if not dev_kvm_rw or "kvm_pvm" in modules:
        return False
    return ("vmx" in cpu_flags and "kvm_intel" in modules) or (
        "svm" in cpu_flags and "kvm_amd" in modules)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _modules() -> set[str]:
    try:
        return set(os.listdir("/sys/module"))
    except OSError:
        return set()


def detect_accelerator(setting: str) -> str:
    """The accelerator to pass to QEMU for host setting *setting* (auto|kvm|tcg)."""
    if setting != "auto":
        return setting
    dev_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return "kvm" if kvm_is_real(_cpu_flags(), _modules(), dev_ok) else "tcg"


def cpu_model(accel: str) -> str:
    # "host" passes the real CPU through; under TCG it does not exist.
    return "host" if accel == "kvm" else "qemu64"
