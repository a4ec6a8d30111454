"""The rbd backend against a real throwaway Ceph cluster, with real QEMUs.

Two "hosts" here share one kernel, but RBD gives them no shared protection
(no image file locks): what keeps a second writer out is fcq's lock and,
once a lock is broken, the blocklist.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import rbd

from fcq_tasks.errors import BadRequest, FcqError, LockedByOtherHost, ShrinkRefused
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.storage import VolumeInfo, cephconn, rbdheader
from fcq_tasks.storage.rbd import RbdStorage
from fcq_tasks.storage.rbdimage import LockView
from tests.ceph import CephCluster
from tests.conftest import Host, HostFactory, rbd_settings
from tests.helpers import guest_disk_bytes, guest_sh, guest_write, qmp, wait_for, wait_guest

pytestmark = pytest.mark.qemu
GiB = 2**30
_names = itertools.count(1)


def vm_name() -> str:
    """A VM name no other test in this session used (the cluster is shared)."""
    return f"rbd{os.getpid() % 1000}-{next(_names)}"


def rbd_host(make_host: HostFactory, ceph: CephCluster, name: str, **ceph_settings: Any) -> Host:
    return make_host(name, **rbd_settings(ceph, name, **ceph_settings))


def volumes_on_alpha(make_host: HostFactory, ceph: CephCluster) -> tuple[RbdStorage, str]:
    """Host alpha's RBD storage and a new VM whose volumes exist (not started)."""
    alpha = rbd_host(make_host, ceph, "alpha")
    vm = vm_name()
    alpha.write_vm(vm)
    storage = RbdStorage(alpha.settings)
    storage.ensure_volumes(alpha.agent(vm).spec())
    return storage, vm


def vm_running_on_alpha(make_host: HostFactory, ceph: CephCluster
                        ) -> tuple[Host, Host, str, VMAgent]:
    """Hosts alpha and beta on RBD, and a new VM running on alpha: (alpha, beta, vm, agent)."""
    alpha = rbd_host(make_host, ceph, "alpha")
    beta = rbd_host(make_host, ceph, "beta")
    vm = vm_name()
    alpha.write_vm(vm)
    agent = alpha.agent(vm)
    agent.ensure()
    return alpha, beta, vm, agent


def lockers(ceph: CephCluster, image: str) -> list[dict[str, Any]]:
    out: Any = json.loads(ceph.rbd("lock", "ls", "--format", "json", f"fcq/{image}"))
    # Pacific prints a list of {id, locker, address}; older ones a mapping.
    return list(out) if isinstance(out, list) else [{"id": k, **v} for k, v in out.items()]


def watchers(ceph: CephCluster, image: str) -> list[str]:
    status = json.loads(ceph.rbd("status", "--format", "json", f"fcq/{image}"))
    return [str(w["address"]) for w in status["watchers"]]


def test_volumes_made_with_labels_and_no_exclusive_lock(make_host: HostFactory,
                                                        ceph: CephCluster,
                                                        tmp_path: Path) -> None:
    """root by create-vm (even one that asks for exclusive-lock), swap and tmp labelled."""
    alpha = rbd_host(make_host, ceph, "alpha")
    # librbd's default features include exclusive-lock: fcq must take it off.
    alpha.update_settings(create_vm=["rbd", "--conf", "{conf}", "--id", "{client_id}",
                                     "--keyring", "{keyring}", "create", "--size", "{size_mib}",
                                     "{pool}/{image}"])
    vm = vm_name()
    alpha.write_vm(vm)
    agent = alpha.agent(vm)
    assert sorted(agent.storage.ensure_volumes(agent.spec())) == ["root", "swap", "tmp"]
    assert agent.storage.ensure_volumes(agent.spec()) == []
    images = ceph.rbd("ls", "fcq").split()
    assert {f"{vm}.root", f"{vm}.swap", f"{vm}.tmp"} <= set(images)
    assert not [i for i in images if i.startswith(vm) and ".creating" in i]
    for volume, label, kind in (("swap", "swap", "swap"), ("tmp", "tmp", "xfs")):
        out = tmp_path / volume
        ceph.rbd("export", f"fcq/{vm}.{volume}", str(out))
        probe = subprocess.run(["blkid", "-o", "export", str(out)], capture_output=True,
                               text=True, check=True).stdout
        assert f"LABEL={label}" in probe and f"TYPE={kind}" in probe
    info = json.loads(ceph.rbd("info", "--format", "json", f"fcq/{vm}.root"))
    assert info["size"] == GiB
    assert "exclusive-lock" not in info["features"]


def test_vm_runs_from_rbd_and_locks_name_host(make_host: HostFactory, ceph: CephCluster) -> None:
    """A VM boots from RBD images through QEMU's rbd driver; the locks' cookies name the host."""
    _, beta, vm, agent = vm_running_on_alpha(make_host, ceph)
    wait_guest(agent)
    files = {b["device"]: b["inserted"]["file"] for b in qmp(agent, "query-block")}
    # QEMU shows the rbd driver's options as JSON: pool, image and identity.
    root = json.loads(files["root"].removeprefix("json:"))["file"]
    assert (root["driver"], root["pool"], root["image"], root["user"]) == (
        "rbd", "fcq", f"{vm}.root", "alpha")
    for volume in ("root", "swap", "tmp"):
        held = lockers(ceph, f"{vm}.{volume}")
        assert len(held) == 1 and held[0]["id"].startswith("fcq host=alpha instance=")
    # Another host may neither start it nor take a lock.
    beta.write_vm(vm, kvm_host="beta")
    with pytest.raises(LockedByOtherHost) as info:
        beta.agent(vm).ensure()
    assert info.value.owner == "alpha"
    assert beta.qemu_processes() == []
    assert lockers(ceph, f"{vm}.root")[0]["id"].startswith("fcq host=alpha")
    agent.stop()
    assert all(lockers(ceph, f"{vm}.{v}") == [] for v in ("root", "swap", "tmp"))


def test_stalled_holder_is_fenced_and_its_stale_copy_stopped(make_host: HostFactory,
                                                             ceph: CephCluster) -> None:
    """SIGSTOP the holder, break its locks, run the VM elsewhere, SIGCONT: it cannot write.

    Its host's next sweep kills the stale copy and leaves the new holder's
    locks alone. The old holder's clients, QEMU's included, are on the
    blocklist.
    """
    alpha, beta, vm, old = vm_running_on_alpha(make_host, ceph)
    wait_guest(old)
    assert "dd=0" in guest_write(old, "A")
    assert ceph.read("fcq", f"{vm}.root", 0, 4096) == b"A" * 4096
    [qemu] = alpha.qemu_processes()
    watchers_before = set(watchers(ceph, f"{vm}.root"))
    assert watchers_before
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        beta.write_vm(vm, kvm_host="beta")
        new = beta.agent(vm)
        broken = new.force_unlock()["broken"]
        assert broken == {"root": "alpha", "swap": "alpha", "tmp": "alpha"}
        fenced = set(ceph.blocklist())
        assert watchers_before <= fenced, (watchers_before, fenced)
        new.ensure()
        wait_guest(new)
        assert "dd=0" in guest_write(new, "B")
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
    # The woken holder's guest writes: its QEMU's client is fenced, the
    # write is refused, its drive pauses the guest there (werror=stop, the
    # runstate io-error: the guest never learns, never goes on), and the
    # new holder's data stays.
    with contextlib.suppress(FcqError, AssertionError):  # paused, it never answers
        guest_write(old, "C", timeout=5)
    wait_for(lambda: qmp(old, "query-status")["status"] == "io-error", 30,
             "the fenced guest paused by its drive")
    assert ceph.read("fcq", f"{vm}.root", 0, 4096) == b"B" * 4096
    # alpha's sweep: every lock is beta's, so the copy here is stale.
    result = old.ensure()
    assert result["actions"][:1] == ["kill"] and result["status"] == "stopped"
    assert alpha.qemu_processes() == []
    for volume in ("root", "swap", "tmp"):
        assert lockers(ceph, f"{vm}.{volume}")[0]["id"].startswith("fcq host=beta")
    assert qmp(new, "query-status")["status"] == "running"
    assert "dd=0" in guest_write(new, "D")
    assert ceph.read("fcq", f"{vm}.root", 0, 4096) == b"D" * 4096


def test_fence_reaches_a_stalled_qemu_whose_watch_expired(make_host: HostFactory,
                                                          ceph: CephCluster) -> None:
    """A QEMU stopped long enough drops off the watcher list; it is fenced all the same.

    Its host recorded its client addresses when it started it; breaking the
    lock blocklists them, and the woken guest's write is refused: its drive
    pauses it (io-error).
    """
    alpha, beta, vm, old = vm_running_on_alpha(make_host, ceph)
    wait_guest(old)
    qemu_addrs = set(watchers(ceph, f"{vm}.root"))
    assert qemu_addrs
    [qemu] = alpha.qemu_processes()
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        # The watch expires (osd client watch timeout is 5 s in this cluster).
        wait_for(lambda: not set(watchers(ceph, f"{vm}.root")) & qemu_addrs, 60,
                 "the stopped QEMU's watch to expire")
        beta.write_vm(vm, kvm_host="beta")
        beta.agent(vm).force_unlock()
        assert qemu_addrs <= set(ceph.blocklist())
        new = beta.agent(vm)
        new.ensure()
        wait_guest(new)
        assert "dd=0" in guest_write(new, "E")
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
    with contextlib.suppress(FcqError, AssertionError):  # paused, it never answers
        guest_write(old, "F", timeout=5)
    wait_for(lambda: qmp(old, "query-status")["status"] == "io-error", 30,
             "the fenced guest paused by its drive")
    assert ceph.read("fcq", f"{vm}.root", 0, 4096) == b"E" * 4096


def test_holder_woken_before_the_new_one_starts_does_not_relock(make_host: HostFactory,
                                                                ceph: CephCluster) -> None:
    """Locks broken while alpha is stopped, alpha resumed before anyone else runs the VM.

    alpha's sweep must not take the free locks again for its fenced copy: it
    sees them gone to the host that broke them and kills the copy; beta can
    then start the VM, and its lock clears the mark.
    """
    alpha, beta, vm, old = vm_running_on_alpha(make_host, ceph)
    [qemu] = alpha.qemu_processes()
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        beta.write_vm(vm, kvm_host="beta")
        assert beta.agent(vm).force_unlock()["broken"] == {
            "root": "alpha", "swap": "alpha", "tmp": "alpha"}
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
    assert {v.lock_owner for v in old.storage.volumes(vm)} == {"beta"}
    result = old.ensure()
    assert result["actions"][:1] == ["kill"] and alpha.qemu_processes() == []
    assert all(lockers(ceph, f"{vm}.{v}") == [] for v in ("root", "swap", "tmp"))
    with pytest.raises(LockedByOtherHost):
        old.ensure()  # alpha's config still says alpha: refused, not restarted
    new = beta.agent(vm)
    new.ensure()
    assert qmp(new, "query-status")["status"] == "running"
    assert lockers(ceph, f"{vm}.root")[0]["id"].startswith("fcq host=beta")
    assert {v.lock_owner for v in old.storage.volumes(vm)} == {"beta"}


def test_resize_seen_by_guest_and_shrink_refused(make_host: HostFactory,
                                                ceph: CephCluster) -> None:
    """A bigger config grows the image and the guest's disk; a smaller one changes nothing."""
    alpha = rbd_host(make_host, ceph, "alpha")
    vm = vm_name()
    alpha.write_vm(vm, disk=1)
    agent = alpha.agent(vm)
    agent.ensure()
    wait_guest(agent)
    assert guest_disk_bytes(agent, "root") == GiB
    alpha.write_vm(vm, disk=2)
    assert "grow-root" in agent.ensure()["actions"]
    wait_for(lambda: guest_disk_bytes(agent, "root") == 2 * GiB, 20, "guest sees 2 GiB")
    assert json.loads(ceph.rbd("info", "--format", "json", f"fcq/{vm}.root"))["size"] == 2 * GiB
    storage = agent.storage
    with pytest.raises(ShrinkRefused):
        storage.grow(vm, "root", GiB)
    alpha.write_vm(vm, disk=1)
    with pytest.raises(ShrinkRefused):
        agent.ensure()
    assert json.loads(ceph.rbd("info", "--format", "json", f"fcq/{vm}.root"))["size"] == 2 * GiB
    assert guest_disk_bytes(agent, "root") == 2 * GiB


def test_no_leaked_handles(make_host: HostFactory, ceph: CephCluster) -> None:
    """Many calls reuse one connection per identity and leave no image open behind them."""
    storage, vm = volumes_on_alpha(make_host, ceph)
    storage.volumes(vm)
    me = psutil.Process()
    fds, threads = me.num_fds(), me.num_threads()
    for _ in range(100):
        storage.volumes(vm)
        storage.lock(vm, "root")
        storage.unlock(vm, "root")
    assert me.num_fds() <= fds + 2 and me.num_threads() <= threads + 2
    assert len([k for k in cephconn._connections if k[1] == "alpha"]) == 1
    for volume in ("root", "swap", "tmp"):
        assert watchers(ceph, f"{vm}.{volume}") == []


def throttles(agent: VMAgent) -> dict[str, tuple[int, int]]:
    return {b["device"]: (b["inserted"]["iops"], b["inserted"]["bps"])
            for b in qmp(agent, "query-block")}


def test_limits_pool_default_vm_override_and_kept(make_host: HostFactory,
                                                 ceph: CephCluster) -> None:
    """Pool default from host settings, per-VM override, applied at start, put back by ensure."""
    alpha = rbd_host(make_host, ceph, "alpha",
                     pool_limits={"fcq": {"iops": 300, "bps": 20_000_000}})
    vm = vm_name()
    alpha.write_vm(vm, iops=1000)  # bps: the pool's default
    agent = alpha.agent(vm)
    agent.ensure()
    assert throttles(agent) == {v: (1000, 20_000_000) for v in ("root", "swap", "tmp")}
    # Changed by hand behind fcq's back: the next sweep puts it back.
    qmp(agent, "block_set_io_throttle", device="root", iops=5, bps=0, bps_rd=0, bps_wr=0,
        iops_rd=0, iops_wr=0)
    assert throttles(agent)["root"] == (5, 0)
    assert "set-iops" in agent.ensure()["actions"]
    assert throttles(agent)["root"] == (1000, 20_000_000)
    # An explicit 0 in the VM file means no limit, whatever the pool says.
    alpha.write_vm(vm, iops=0, bps=0)
    agent.ensure()
    assert throttles(agent) == {v: (0, 0) for v in ("root", "swap", "tmp")}


def test_snapshots_created_listed_removed(make_host: HostFactory, ceph: CephCluster) -> None:
    """RBD snapshots of a volume: the same name twice is a no-op, bad names are refused."""
    storage, vm = volumes_on_alpha(make_host, ceph)
    assert storage.snapshot(vm, "root", "daily-1")
    assert not storage.snapshot(vm, "root", "daily-1")
    assert storage.snapshot(vm, "root", "daily-2")
    assert [s.name for s in storage.snapshots(vm, "root")] == ["daily-1", "daily-2"]
    assert all(s.size == GiB and s.created > time.time() - 60
               for s in storage.snapshots(vm, "root"))
    assert "daily-1" in ceph.rbd("snap", "ls", f"fcq/{vm}.root")
    with pytest.raises(BadRequest, match="snapshot"):
        storage.snapshot(vm, "root", "x@y")
    assert storage.remove_snapshot(vm, "root", "daily-1")
    assert not storage.remove_snapshot(vm, "root", "daily-1")
    assert [s.name for s in storage.snapshots(vm, "root")] == ["daily-2"]
    assert storage.snapshots(vm, "swap") == []


def test_guest_reads_its_seed_data(make_host: HostFactory, ceph: CephCluster) -> None:
    """The VM's configuration as JSON, readable in the guest through fw_cfg at boot."""
    alpha = rbd_host(make_host, ceph, "alpha")
    vm = vm_name()
    alpha.write_vm(vm, memory=160, iops=700)
    agent = alpha.agent(vm)
    agent.ensure()
    wait_guest(agent)
    out = guest_sh(agent, "cat /sys/firmware/qemu_fw_cfg/by_name/opt/fcq/config.json/raw")
    seed = json.loads(out.rsplit("rc=", 1)[0])
    assert (seed["format"], seed["name"], seed["host"]) == (1, vm, "alpha")
    assert seed["parameters"]["memory"] == 160 and seed["parameters"]["iops"] == 700
    assert seed["parameters"]["kvm_host"] == "alpha"


def test_header_shortcut_agrees_with_opening_the_image(make_host: HostFactory,
                                                       ceph: CephCluster) -> None:
    """volumes() reads size and lock from the header objects; an open image says the same."""
    storage, vm = volumes_on_alpha(make_host, ceph)

    def both(image: str) -> tuple[Any, Any]:
        def read(conn: Any, ioctx: Any) -> tuple[Any, Any]:
            with rbd.Image(ioctx, image, read_only=True) as img:
                slow = (img.size(), [(c, k) for c, k, _ in img.list_lockers()["lockers"]]
                        if img.list_lockers() else [])
            fast = rbdheader.Header(ioctx, image)
            return slow, (fast.size(), [(c, k) for c, k, _ in fast.list_lockers()["lockers"]])
        return cephconn.with_pool(storage.ceph, "fcq", read)

    root = f"{vm}.root"
    slow, fast = both(root)
    assert slow == fast and slow[1] == []
    storage.lock(vm, "root", "abc123")
    slow, fast = both(root)
    assert slow == fast and fast[1][0][1] == "fcq host=alpha instance=abc123"
    storage.grow(vm, "root", 3 * GiB)
    assert both(root)[0] == both(root)[1] == (3 * GiB, both(root)[0][1])
    # A lock fcq did not take (shared, two holders): read alike, and it blocks.
    ceph.rbd("lock", "add", "--shared", "tag1", f"fcq/{vm}.swap", "other-1")
    ceph.rbd("lock", "add", "--shared", "tag1", f"fcq/{vm}.swap", "other-2")
    slow, fast = both(f"{vm}.swap")
    assert sorted(slow[1]) == sorted(fast[1]) and len(fast[1]) == 2
    vols = {v.name: v for v in storage.volumes(vm)}
    assert vols["root"].lock_owner == "alpha" and vols["root"].size == 3 * GiB
    assert vols["swap"].lock_owner is not None and "other-" in vols["swap"].lock_owner
    assert vols["tmp"].lock_owner is None
    with pytest.raises(LockedByOtherHost):
        storage.lock(vm, "swap")
    assert storage.volumes("nosuchvm") == [VolumeInfo(v, None, None)
                                          for v in ("root", "swap", "tmp")]
    # Truncated or strange encodings are refused, so volumes() opens the image.
    with pytest.raises(rbdheader.Unreadable):
        rbdheader.parse_lockers(b"\x01\x01\xff\x00\x00\x00")


def test_lock_taken_without_opening_the_image_is_rbds_own(make_host: HostFactory,
                                                          ceph: CephCluster) -> None:
    """lock, claim, unlock work on the header object (LockView): the lock `rbd lock ls` shows."""
    storage, vm = volumes_on_alpha(make_host, ceph)
    assert storage.lock(vm, "root", "abc123") is True
    assert [lk["id"] for lk in lockers(ceph, f"{vm}.root")] == ["fcq host=alpha instance=abc123"]
    assert storage.lock(vm, "root") is False  # ours already
    # Who holds it is read anew at each look, not when the view was made.
    def fresh(conn: Any, ioctx: Any) -> list[Any]:
        view = LockView(ioctx, f"{vm}.tmp")
        before = view.list_lockers()["lockers"]
        ceph.rbd("lock", "add", f"fcq/{vm}.tmp", "by-hand")
        return [before, [cookie for _, cookie, _ in view.list_lockers()["lockers"]]]
    assert cephconn.with_pool(storage.ceph, "fcq", fresh) == [[], ["by-hand"]]
    with pytest.raises(LockedByOtherHost, match="by-hand"):
        storage.lock(vm, "tmp")
    # A missing image is reported as such, and nothing is created for it.
    with pytest.raises(rbd.ImageNotFound):
        storage.lock(vm + "x", "root")
    assert f"{vm}x.root" not in ceph.rbd("ls", "fcq")
    assert storage.unlock(vm, "root") is True and lockers(ceph, f"{vm}.root") == []
    # Our host's lock taken by an earlier client of ours (a worker that
    # restarted): released by breaking it, which needs the image opened.
    ceph.rbd("lock", "add", f"fcq/{vm}.swap", "fcq host=alpha instance=old")
    assert storage.unlock(vm, "swap") is True and lockers(ceph, f"{vm}.swap") == []
