"""`fcq plan`: what ensure would do now and why, doing nothing, taking no lock."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Host
from tests.helpers import qmp


def test_plan_shows_what_the_next_ensure_does(host: Host) -> None:
    host.write_vm("pa01")                       # online here, not running: start
    host.write_vm("pb01", iops=300)             # running, limit changed by hand: set-iops
    host.write_vm("pc01")                       # running, then set offline: stop
    for vm in ("pb01", "pc01"):
        host.agent(vm).start()
    qmp(host.agent("pb01"), "block_set_io_throttle", device="root", iops=5, bps=0,
        bps_rd=0, bps_wr=0, iops_rd=0, iops_wr=0)
    host.write_vm("pc01", online=False)
    planned = json.loads(host.fcq("--json", "plan", check=True).stdout)
    by_vm = {r["vm"]: [a["do"] for a in r["actions"]] for r in planned}
    assert by_vm == {"pa01": ["start"], "pb01": ["set-iops"], "pc01": ["stop", "clean-up"]}
    assert all(a["reason"] for r in planned for a in r["actions"])
    # Nothing was done: pa01 is still stopped, pb01's limit still the hand-made one.
    assert host.agent("pa01").status()["status"] == "stopped"
    assert host.agent("pb01").status()["iops"] == 5
    text = host.fcq("plan", "pb01", check=True).stdout
    assert "pb01@alpha: wanted here, found running" in text and "set-iops:" in text
    # The next ensure does exactly what the plan said.
    swept = json.loads(host.fcq("--json", "ensure", "--all", check=True).stdout)
    done = {r["vm"]: [a for a in r["actions"] if a != "nothing"] for r in swept}
    assert done == by_vm
    after = json.loads(host.fcq("--json", "plan", check=True).stdout)
    assert {r["vm"]: [a["do"] for a in r["actions"]] for r in after} == {
        "pa01": ["nothing"], "pb01": ["nothing"], "pc01": ["nothing"]}


def test_plan_takes_no_lock_and_says_when_work_is_in_flight(host: Host) -> None:
    host.write_vm("pd01")
    lock = host.settings.run_dir / "pd01.op.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        row = json.loads(host.fcq("--json", "plan", "pd01", check=True).stdout)
        assert row["busy"] is True and [a["do"] for a in row["actions"]] == ["start"]
        # A real operation is what the lock holds off; the plan never did.
        assert host.fcq("start", "pd01").returncode == 3
    finally:
        holder.kill()
        holder.communicate()
    assert json.loads(host.fcq("--json", "plan", "pd01", check=True).stdout)["busy"] is False
