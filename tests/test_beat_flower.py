"""Beat sweeps every live host exactly once per interval; Flower shows tasks by VM."""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from fcq_beat.scheduler import sweep_entries
from tests.cluster import Cluster, free_port
from tests.helpers import wait_for

ClusterFactory = Any


def sweeps_logged(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"sweep-done"' in line)


def test_sweep_entries_route_and_expire() -> None:
    """Each host's sweep goes to its own queue and expires after one interval."""
    entries = sweep_entries(["alpha", "beta"], 30)
    assert entries["sweep-beta"]["options"] == {"queue": "host.beta", "expires": 30.0,
                                                "ignore_result": True}
    assert entries["sweep-alpha"]["kwargs"] == {"host": "alpha"}


def test_beat_sweeps_both_hosts_and_heals_killed_qemu(make_cluster: ClusterFactory) -> None:
    """Beat sends sweeps to alpha and beta; a QEMU killed behind fcq's back comes back."""
    c: Cluster = make_cluster(sweep_interval=2)
    alpha, beta = c.hosts["alpha"], c.hosts["beta"]
    alpha.write_vm("vm01")
    c.worker("alpha")
    c.worker("beta")
    c.spawn("beat")
    agent = alpha.agent("vm01")
    wait_for(lambda: agent.status()["status"] == "running", 60, "the first sweep to start vm01")
    wait_for(lambda: sweeps_logged(beta.base / "fcq.log") >= 1, 30, "a sweep of beta")
    old = agent.status()["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: agent.status()["pid"] not in (None, old), 60, "vm01 restarted by a sweep")
    # The pidfile names the new QEMU a moment before its daemonizing parent
    # (no longer its parent after QEMU's second fork) has exited.
    new = agent.status()["pid"]
    wait_for(lambda: [p.pid for p in alpha.qemu_processes()] == [new], 10,
             "exactly one QEMU, the new one")


def test_only_one_beat_sends(make_cluster: ClusterFactory) -> None:
    """Two beats: one sends, the other stands by; sweeps are not doubled."""
    c: Cluster = make_cluster(("alpha",), sweep_interval=1)
    c.worker("alpha")
    first = c.spawn("beat")
    wait_for(lambda: c.redis.client().get("fcq:beat"), 30, "the first beat to take the lock")
    second = c.spawn("beat")
    log = c.hosts["alpha"].base / "fcq.log"
    wait_for(lambda: sweeps_logged(log) >= 2, 30, "two sweeps")
    start = sweeps_logged(log)
    time.sleep(6)
    per_second = (sweeps_logged(log) - start) / 6
    assert per_second <= 1.4, f"{per_second:.1f} sweeps/s: beats doubled the schedule"
    sent = [s.log.read_text().count("Sending due task") for s in (first, second)]
    assert sorted(sent)[0] == 0 and sorted(sent)[1] > 0, sent
    # When the active beat dies, the standby takes over (lock ttl 30 s).
    active = first if sent[0] else second
    c.kill9(active)
    standby = second if active is first else first
    wait_for(lambda: "Sending due task" in standby.log.read_text(), 60, "the standby to send")


def test_flower_lists_tasks_with_vm_names_behind_auth(make_cluster: ClusterFactory) -> None:
    """Flower's API needs the password, and lists fcq tasks with their VM."""
    port = free_port()
    c: Cluster = make_cluster(("alpha",), flower_port=port)
    alpha = c.hosts["alpha"]
    auth = alpha.base / "flower.auth"
    auth.write_text("ops:secret-flower\n")
    auth.chmod(0o600)
    alpha.update_settings(cluster={**_raw_cluster(alpha.settings_file), "flower_port": port,
                                   "flower_auth_file": str(auth)})
    alpha.write_vm("vm01")
    c.worker("alpha")
    flower = c.spawn("flower")
    url = f"http://127.0.0.1:{port}/api/tasks"

    def get(with_auth: bool) -> tuple[int, Any]:
        req = urllib.request.Request(url)
        if with_auth:
            token = base64.b64encode(b"ops:secret-flower").decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, None
        except (urllib.error.URLError, ConnectionError):
            return 0, None

    wait_for(lambda: get(False)[0] == 401, 30, "Flower to answer")
    # /metrics and /healthcheck are behind the same password as the rest.
    for path in ("/metrics", "/healthcheck"):
        assert fetch(f"http://127.0.0.1:{port}{path}", None) == 401
        assert fetch(f"http://127.0.0.1:{port}{path}", b"ops:secret-flower") == 200
    orch = c.orchestrator()

    def listed(task_id: str) -> Any:
        status, tasks = get(True)
        found = status == 200 and tasks.get(task_id)
        return found if found and found["state"] == "SUCCESS" and found["name"] else None

    # Flower's HTTP server answers before its event receiver listens: pings
    # until one is seen whole (sent to succeeded) prove the receiver is live.
    def ping_seen() -> Any:
        ping = orch.ping("alpha")
        orch.wait(ping, timeout=30)
        return wait_for_quietly(lambda: listed(ping), 3)
    wait_for(ping_seen, 60, "Flower to receive task events")
    task_id = orch.submit("start", "vm01")
    orch.wait(task_id, timeout=120)
    task = wait_for(lambda: listed(task_id), 30, "Flower to list the task as succeeded")
    assert task["name"] == "fcq.start" and task["kwargs"] == "vm=vm01 host=alpha", task
    assert task["worker"].startswith("alpha@")
    # The day-two operations show up the same way, with VM, host and outcome.
    for job, name, outcome in ((orch.snapshot("vm01", "nightly"), "fcq.snapshot", "taken"),
                               (orch.resize("vm01", 2), "fcq.resize", "grown")):
        orch.wait(job, timeout=120)
        task = wait_for(functools.partial(listed, job), 30, f"Flower to list {name}")
        assert task["name"] == name and task["kwargs"].startswith("vm=vm01 host=alpha")
        assert outcome in str(task["result"]), task
    assert "secret-flower" not in " ".join(flower.proc.args)  # type: ignore[arg-type]
    # Read-only: the operators' password enqueues nothing and stops no worker.
    for path, body in (("/api/task/async-apply/fcq.set_drained",
                        {"kwargs": {"host": "alpha", "drained": True}}),
                       ("/api/task/send-task/fcq.stop", {"kwargs": {"vm": "vm01"}}),
                       (f"/api/worker/shutdown/{task['worker']}", {}),
                       (f"/api/worker/queue/cancel-consumer/{task['worker']}?queue=host.alpha",
                        {})):
        assert post(f"http://127.0.0.1:{port}{path}", body, b"ops:secret-flower") == \
            (403, "fcq runs Flower read-only"), path
    assert orch.wait(orch.ping("alpha"), timeout=30)["host"] == "alpha"
    assert not orch.hosts()["alpha"].get("drained")
    assert alpha.agent("vm01").status()["status"] == "running"


def post(url: str, body: dict[str, Any], credentials: bytes) -> tuple[int, str]:
    """The status of a POST and the start of its reason (what refused it)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic "
                                          + base64.b64encode(credentials).decode()})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), str(resp.reason)
    except urllib.error.HTTPError as err:
        return err.code, str(err.reason).split(":")[0]


def fetch(url: str, credentials: bytes | None) -> int:
    req = urllib.request.Request(url)
    if credentials is not None:
        req.add_header("Authorization", f"Basic {base64.b64encode(credentials).decode()}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def wait_for_quietly(predicate: Any, timeout: float) -> Any:
    try:
        return wait_for(predicate, timeout, "")
    except AssertionError:
        return None


def _raw_cluster(settings_file: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(settings_file.read_text())["cluster"])


def test_expired_sweeps_do_not_run_when_a_host_comes_back(make_cluster: ClusterFactory) -> None:
    """Sweeps queued for a host that is down expire; its worker discards them on return."""
    c: Cluster = make_cluster(("alpha",))
    c.hosts["alpha"].write_vm("vm01")
    orch = c.orchestrator()
    # As beat sends them (explicit queue, expiring after one interval, here
    # 1 s), except that beat does not keep results: kept here, so that the
    # REVOKED each discarded sweep leaves can be read.
    stale = [orch.app.send_task("fcq.ensure_host", kwargs={"host": "alpha"},
                                queue="host.alpha", expires=1.0) for _ in range(3)]
    time.sleep(2)
    c.worker("alpha")
    # str(): the stubs list the states as a Literal that forgot REVOKED.
    wait_for(lambda: all(str(r.state) == "REVOKED" for r in stale), 30,
             "the stale sweeps to be discarded")
    assert sweeps_logged(c.hosts["alpha"].base / "fcq.log") == 0
    assert c.hosts["alpha"].agent("vm01").status()["status"] == "stopped"
