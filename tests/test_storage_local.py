"""Local storage against the real file system and real mkswap/mkfs.xfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fcq_tasks.config.settings import DEFAULTS, parse_host_settings
from fcq_tasks.config.vmspec import GiB, MiB, VMSpec
from fcq_tasks.errors import BadRequest, LockedByOtherHost, ShrinkRefused, StorageError
from fcq_tasks.storage import LocalStorage

SPEC = VMSpec(name="vm01", id=1, resource_group="test", online=True, kvm_host="alpha",
              disk_gib=2, memory_mb=512, cores=1, nics=())


def storage(tmp_path: Path, host: str = "alpha", **raw: object) -> LocalStorage:
    settings = parse_host_settings({**DEFAULTS, "host": host, "state_dir": str(tmp_path),
                                    "run_dir": "/tmp/x", **raw}, "<test>")
    return LocalStorage(settings)


def blkid(path: Path, tag: str) -> str:
    return subprocess.run(["blkid", "-o", "value", "-s", tag, str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_volumes_created_with_labels(tmp_path: Path) -> None:
    """root comes from create-vm; swap and tmp are made by fcq with their labels."""
    s = storage(tmp_path)
    assert s.ensure_volumes(SPEC) == ["root", "swap", "tmp"]
    vols = {v.name: v for v in s.volumes("vm01")}
    assert vols["root"].size == 2 * GiB
    assert vols["swap"].size == 512 * MiB and vols["tmp"].size == 1 * GiB
    vdir = tmp_path / "volumes"
    assert (blkid(vdir / "vm01.swap", "TYPE"), blkid(vdir / "vm01.swap", "LABEL")) == ("swap",
                                                                                       "swap")
    assert (blkid(vdir / "vm01.tmp", "TYPE"), blkid(vdir / "vm01.tmp", "LABEL")) == ("xfs", "tmp")
    assert (vdir / "vm01.root").stat().st_mode & 0o777 == 0o600
    assert s.ensure_volumes(SPEC) == []  # idempotent


def test_swap_and_tmp_stay_moderate_for_big_vms() -> None:
    """A 256 GiB-memory, 2 TiB-disk VM gets 2 GiB swap and 16 GiB tmp, not hundreds."""
    big = VMSpec(name="big", id=1, resource_group="t", online=True, kvm_host=None,
                 disk_gib=2048, memory_mb=256 * 1024, cores=32, nics=())
    assert (big.swap_bytes, big.tmp_bytes) == (2 * GiB, 16 * GiB)
    assert (SPEC.swap_bytes, SPEC.tmp_bytes) == (512 * MiB, 1 * GiB)


def test_failing_create_vm_is_a_storage_error(tmp_path: Path) -> None:
    """A create-vm command that fails is reported with its output; no root appears."""
    s = storage(tmp_path, create_vm=["sh", "-c", "echo no space >&2; exit 3", "{name}"])
    with pytest.raises(StorageError, match="no space"):
        s.ensure_volumes(SPEC)
    assert not (tmp_path / "volumes" / "vm01.root").exists()


def test_placeholders_are_argv_elements_not_shell(tmp_path: Path) -> None:
    """Placeholders fill single arguments: a VM name can't inject shell syntax."""
    s = storage(tmp_path, create_vm=["touch", "{path}"])
    s.ensure_volumes(SPEC)
    assert (tmp_path / "volumes" / "vm01.root").exists()


def test_grow_and_refuse_shrink(tmp_path: Path) -> None:
    """grow enlarges the file; a smaller size raises ShrinkRefused and changes nothing."""
    s = storage(tmp_path)
    s.ensure_volumes(SPEC)
    s.grow("vm01", "root", 3 * GiB)
    with pytest.raises(ShrinkRefused):
        s.grow("vm01", "root", 1 * GiB)
    assert (tmp_path / "volumes" / "vm01.root").stat().st_size == 3 * GiB


def test_lock_semantics(tmp_path: Path) -> None:
    """Locks are exclusive per host, idempotent for the holder, released only by it."""
    alpha, beta = storage(tmp_path, "alpha"), storage(tmp_path, "beta")
    assert alpha.lock("vm01", "root") is True
    assert alpha.lock("vm01", "root") is False  # already ours
    with pytest.raises(LockedByOtherHost) as info:
        beta.lock("vm01", "root")
    assert info.value.owner == "alpha"
    assert beta.unlock("vm01", "root") is False  # not beta's to release
    assert alpha.lock_owner("vm01", "root") == "alpha"
    assert beta.force_unlock("vm01", "root") == "alpha"
    assert beta.lock("vm01", "root") is True
    assert not list((tmp_path / "locks").glob(".*")), "no temp files left behind"


def test_half_created_root_is_never_taken_for_done(tmp_path: Path) -> None:
    """create-vm that writes its file and then fails leaves no root behind."""
    s = storage(tmp_path, create_vm=["sh", "-c", 'truncate -s 1G "$0"; exit 1', "{path}"])
    with pytest.raises(StorageError):
        s.ensure_volumes(SPEC)
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()
                  if "root" in p.name) == []


def test_unlock_never_deletes_another_hosts_lock(tmp_path: Path) -> None:
    """alpha's stale unlock after beta re-took the lock leaves beta's lock in place."""
    alpha, beta = storage(tmp_path, "alpha"), storage(tmp_path, "beta")
    alpha.lock("vm01", "root")
    beta.force_unlock("vm01", "root")
    beta.lock("vm01", "root")
    assert alpha.unlock("vm01", "root") is False
    assert alpha.lock_owner("vm01", "root") == "beta"


def test_snapshots(tmp_path: Path) -> None:
    """A snapshot keeps the volume's content of that moment; names are checked."""
    s = storage(tmp_path)
    s.ensure_volumes(SPEC)
    root = tmp_path / "volumes" / "vm01.root"
    with root.open("r+b") as fh:
        fh.write(b"before")
    assert s.snapshot("vm01", "root", "s1")
    assert not s.snapshot("vm01", "root", "s1")
    with root.open("r+b") as fh:
        fh.write(b"after!")
    snap = tmp_path / "volumes" / "vm01.root@s1"
    assert snap.read_bytes()[:6] == b"before"
    assert [(x.name, x.size) for x in s.snapshots("vm01", "root")] == [("s1", 2 * GiB)]
    with pytest.raises(BadRequest):
        s.snapshot("vm01", "root", "../x")
    assert s.remove_snapshot("vm01", "root", "s1") and not snap.exists()
    assert not s.remove_snapshot("vm01", "root", "s1")
    assert [v.name for v in s.volumes("vm01")] == ["root", "swap", "tmp"]
