"""fcq lock / unlock (locks held by hand) and fcq monitor (QEMU's human monitor), for real.

Two hosts on the throwaway Ceph cluster, each with its own identity and
directories: only the RBD locks stand between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import Host, HostFactory, rbd_settings
from tests.helpers import wait_guest


def pair(make_host: HostFactory, ceph: Any) -> tuple[Host, Host]:
    pool = ceph.new_pool()
    alpha = make_host("alpha", **rbd_settings(ceph, "alpha", pool=pool))
    beta = make_host("beta", **rbd_settings(ceph, "beta", pool=pool))
    for h in (alpha, beta):
        h.write_vm("vm01", kvm_host="alpha")
    return alpha, beta


def owners(host: Host) -> set[str | None]:
    return set(host.agent("vm01").status()["locks"].values())


def test_held_locks_keep_every_host_from_starting_the_vm(make_host: HostFactory,
                                                         ceph: Any) -> None:
    alpha, beta = pair(make_host, ceph)
    assert alpha.fcq("start", "vm01").returncode == 0
    running = alpha.fcq("lock", "vm01")
    assert running.returncode == 4 and "runs on this host" in running.stderr
    assert alpha.fcq("stop", "vm01").returncode == 0
    assert owners(alpha) == {None}

    held = alpha.fcq("--json", "lock", "vm01")
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout)["outcome"] == "held"
    assert owners(alpha) == {"alpha"}
    # This host's own ensure neither starts it nor gives the locks back.
    ensure = alpha.fcq("--json", "ensure", "vm01")
    assert ensure.returncode == 0, ensure.stderr
    assert json.loads(ensure.stdout)["status"] == "stopped"
    assert owners(alpha) == {"alpha"} and not alpha.qemu_processes()
    plan = alpha.fcq("plan", "vm01")
    assert "held by hand" in plan.stdout
    # stop and kill clean up, but keep what is held by hand; force-unlock
    # on the holder itself is refused (unlock is how they are given back).
    for command in ("stop", "kill"):
        assert alpha.fcq(command, "vm01").returncode == 0
        assert owners(alpha) == {"alpha"}, command
    refused_break = alpha.fcq("force-unlock", "vm01")
    assert refused_break.returncode == 4 and "fcq unlock" in refused_break.stderr
    assert owners(alpha) == {"alpha"}
    start = alpha.fcq("start", "vm01")
    assert start.returncode == 4 and "held by hand" in start.stderr
    # Another host can neither take them nor start the VM.
    other = beta.fcq("lock", "vm01")
    assert other.returncode == 4 and "locked by host alpha" in other.stderr
    beta.write_vm("vm01", kvm_host="beta")
    assert beta.fcq("start", "vm01").returncode == 4
    assert not beta.qemu_processes()
    beta.write_vm("vm01", kvm_host="alpha")
    # Unlock on the wrong host changes nothing there.
    assert beta.fcq("unlock", "vm01").returncode == 0
    assert owners(alpha) == {"alpha"}

    released = alpha.fcq("--json", "unlock", "vm01")
    assert released.returncode == 0, released.stderr
    assert sorted(json.loads(released.stdout)["released"]) == ["root", "swap", "tmp"]
    assert owners(alpha) == {None}
    assert alpha.fcq("start", "vm01").returncode == 0
    refused = alpha.fcq("unlock", "vm01")
    assert refused.returncode == 4 and "belong to its QEMU" in refused.stderr
    assert owners(alpha) == {"alpha"}  # a running QEMU keeps its locks


def test_human_monitor_answers_and_refuses_what_fcq_owns(make_host: HostFactory) -> None:
    host = make_host("alpha")
    host.write_vm("vm01")
    assert host.fcq("start", "vm01").returncode == 0
    wait_guest(host.agent("vm01"))
    out = host.fcq("monitor", "vm01", "-e", "info status", "-e", "info name")
    assert out.returncode == 0, out.stderr
    assert "VM status: running" in out.stdout and "vm01" in out.stdout
    for command in ("cont", "stop", "quit", "migrate tcp:127.0.0.1:1", "snapshot_blkdev x y",
                    "nbd_server_start 127.0.0.1:10809"):
        refused = host.fcq("monitor", "vm01", "-e", command)
        assert refused.returncode == 2 and "refused here" in refused.stderr, command
    assert host.agent("vm01").status()["status"] == "running"
    # Lines on stdin, as from a pipe; each line its own short QMP session,
    # so fcq's own monitor use between them is never shut out.
    env = {**os.environ, "FCQ_CONFIG": str(host.settings_file)}
    piped = subprocess.run([sys.executable, "-m", "fcq_tasks", "--local", "monitor", "vm01"],
                           input="info status\nstop\ninfo name\n", text=True,
                           capture_output=True, env=env, timeout=60, check=False)
    assert "VM status: running" in piped.stdout and "vm01" in piped.stdout
    assert piped.returncode == 2 and "'stop' is refused" in piped.stderr
    assert host.agent("vm01").status()["status"] == "running"
    stopped = host.fcq("monitor", "other", "-e", "info status")
    assert stopped.returncode == 4 and "no QEMU runs" in stopped.stderr
