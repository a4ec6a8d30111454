"""Signed commands: a host's credentials command nothing but that host.

The attacker in these tests is host beta as root on beta has it: beta's
settings (the shared Redis password), beta's own host key, and no
orchestrator key. Everything runs against real workers on a real Redis;
every refusal is checked to have changed nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fcq_tasks import trust
from fcq_tasks.cluster import grants, registry
from fcq_tasks.cluster.api import Orchestrator, record_max_age
from fcq_tasks.cluster.celeryapp import CONTROLLER_QUEUE
from fcq_tasks.cluster.controller import MOVE_PURPOSE, _move_fields
from fcq_tasks.errors import ConfigError, RemoteError, Unauthorized
from tests.cluster import Cluster, send_signed
from tests.conftest import Host, new_host
from tests.helpers import events, wait_for

ClusterFactory = Any


def attacker(c: Cluster) -> Orchestrator:
    """An orchestrator made from beta's settings without the orchestrator key."""
    beta = c.hosts["beta"]
    settings = dataclasses.replace(beta.settings, cluster=dataclasses.replace(
        beta.settings.cluster, orchestrator_key_file=None))
    orch = Orchestrator(settings)
    c.orchestrators.append(orch)
    return orch


def refused(c: Cluster, task_id: str) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        c.orchestrator().wait(task_id, timeout=60)
    return info.value


def running_pid(host: Host, vm: str = "vm01") -> int | None:
    procs = host.qemu_processes()
    return procs[0].pid if procs else None


def alpha_runs_vm01(c: Cluster) -> tuple[Host, int]:
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"
    pid = running_pid(alpha)
    assert pid is not None
    return alpha, pid


def test_a_host_cannot_command_another(make_cluster: ClusterFactory) -> None:
    """Requests made by beta (no grant, beta's own key, a grant for other
    arguments, for another host, for another task) are refused by alpha before
    anything happens, with an error naming the grant; alpha's VM runs on."""
    c: Cluster = make_cluster()
    alpha, pid = alpha_runs_vm01(c)
    evil = attacker(c)
    soon = time.time() + 300
    config_before = (alpha.settings.vm_config_dir / "vm01.cfg").read_text()

    # 1. No grant at all: what anyone with the Redis password could send before.
    with pytest.raises(ConfigError, match=r"cluster\.orchestrator_key_file"):
        evil.submit("stop", "vm01", host="alpha")
    plain = {"vm": "vm01", "host": "alpha", "expires_at": soon}
    tasks = [str(evil.app.send_task(f"fcq.{t}", kwargs=k, queue="host.alpha").id) for t, k in (
        ("stop", plain), ("kill", plain), ("force_unlock", plain),
        ("set_drained", {"host": "alpha", "drained": True, "expires_at": soon}),
        ("apply_config", {**plain, "config": config_before.replace("online: true",
                                                                   "online: false")}))]
    # 2. Signed with beta's own host key, as if it were the orchestrator's.
    beta_key = trust.load_private_key(c.hosts["beta"].settings.host_key_file)
    tid = str(uuid.uuid4())
    tasks.append(str(evil.app.send_task(
        "fcq.stop", kwargs={**plain, "grant": grants.grant(beta_key, "fcq.stop", tid, "alpha",
                                                           plain)},
        queue="host.alpha", task_id=tid).id))
    # 3. A genuine grant (say, read from a queue) reused with other arguments,
    #    for another host, or for another task.
    orch = c.orchestrator()
    tid, genuine = orch.signed("fcq.stop", "beta", {"vm": "vm01", "host": "beta"})
    tasks.append(str(evil.app.send_task("fcq.stop", kwargs={**genuine, "host": "alpha"},
                                        queue="host.alpha", task_id=tid).id))
    tid, genuine = orch.signed("fcq.snapshot", "alpha", {"vm": "vm01", "host": "alpha",
                                                         "name": "mine"})
    tasks.append(str(evil.app.send_task("fcq.kill", kwargs=genuine, queue="host.alpha",
                                        task_id=tid).id))
    tid, genuine = orch.signed("fcq.start", "alpha", {"vm": "vm01", "host": "alpha"})
    tasks.append(str(evil.app.send_task("fcq.start", kwargs=genuine, queue="host.alpha",
                                        task_id=str(uuid.uuid4())).id))  # another id
    for task_id in tasks:
        err = refused(c, task_id)
        assert err.fields["error"] == "Unauthorized", err.fields
        assert err.fields["field"] == "grant" and "nothing was done" in err.message
    assert running_pid(alpha) == pid
    assert (alpha.settings.vm_config_dir / "vm01.cfg").read_text() == config_before
    assert not orch.hosts()["alpha"].get("drained")
    assert set(alpha.agent("vm01").status()["locks"].values()) == {"alpha"}
    assert events(alpha).count("request-refused") == len(tasks)


def test_a_replayed_grant_changes_nothing(make_cluster: ClusterFactory) -> None:
    """A genuine stop, copied and sent again after it ran (the VM started again
    since), does nothing: no second stop; it is answered with the first run's
    result (which is what a redelivery after a lost result needs too)."""
    c: Cluster = make_cluster(("alpha",))
    alpha, _ = alpha_runs_vm01(c)
    orch = c.orchestrator()
    tid, kwargs = orch.signed("fcq.stop", "alpha", {"vm": "vm01", "host": "alpha"})
    orch.app.send_task("fcq.stop", kwargs=kwargs, queue="host.alpha", task_id=tid)
    first = orch.wait(tid, timeout=120)
    assert first["status"] == "stopped"
    assert orch.wait(orch.submit("start", "vm01"), timeout=120)["status"] == "running"
    pid = running_pid(alpha)
    orch.app.send_task("fcq.stop", kwargs=kwargs, queue="host.alpha", task_id=tid)
    wait_for(lambda: "request-replay-answered" in events(alpha), 30, "the replay to be seen")
    assert running_pid(alpha) == pid
    assert orch.wait(tid, timeout=30) == first  # the first run's result, signed again


def test_hosts_ask_the_controller_and_it_checks(make_cluster: ClusterFactory) -> None:
    """A move request is honoured only when signed by the VM's own host, for the
    destination that host's config names: beta cannot pull alpha's VM over."""
    c: Cluster = make_cluster()
    alpha, pid = alpha_runs_vm01(c)
    c.hosts["beta"].write_vm("vm01", kvm_host="alpha")
    c.worker("beta")
    evil = attacker(c)
    beta_key = trust.load_private_key(c.hosts["beta"].settings.host_key_file)
    alpha_key = trust.load_private_key(alpha.settings.host_key_file)

    def ask(key: Ed25519PrivateKey, src: str = "alpha", dst: str = "beta") -> str:
        due = time.time() + 300
        kwargs = {"vm": "vm01", "src": src, "dst": dst, "expires_at": due,
                  "sig": trust.sign(key, MOVE_PURPOSE, _move_fields("vm01", src, dst, due))}
        return str(evil.app.send_task("fcq.move_wanted", kwargs=kwargs,
                                      queue=CONTROLLER_QUEUE).id)

    forged = refused(c, ask(beta_key))  # beta speaks for alpha
    assert forged.fields["error"] == "Unauthorized" and "alpha's key" in forged.message
    # Signed by alpha (say, replayed from an earlier push), but alpha's config
    # keeps vm01: not moved.
    undeclared = refused(c, ask(alpha_key))
    assert "declares vm01 for 'alpha', not 'beta'" in undeclared.message
    assert running_pid(alpha) == pid
    assert c.hosts["beta"].qemu_processes() == []


def test_unsigned_requests_only_while_a_setting_says_so(make_cluster: ClusterFactory) -> None:
    """cluster.accept_unsigned (a rolling upgrade from an fcq that did not sign):
    a request without grant runs, and is logged; a bad grant is still refused."""
    c: Cluster = make_cluster(("alpha",), accept_unsigned=True)
    alpha, _ = alpha_runs_vm01(c)
    orch = c.orchestrator()
    stop = orch.app.send_task("fcq.stop", kwargs={"vm": "vm01", "host": "alpha"},
                              queue="host.alpha")
    assert orch.wait(str(stop.id), timeout=120)["status"] == "stopped"
    assert "unsigned-request-accepted" in events(alpha)
    granted = send_signed(orch, "start", "alpha", {"vm": "vm01", "host": "alpha",
                                                   "expires_at": time.time() + 300})
    assert orch.wait(granted, timeout=120)["status"] == "running"  # grants still work
    forged = orch.app.send_task("fcq.stop", kwargs={"vm": "vm01", "host": "alpha",
                                                    "grant": {"sig": "A" * 88}},
                                queue="host.alpha")
    assert refused(c, str(forged.id)).fields["error"] == "Unauthorized"
    assert alpha.agent("vm01").status()["status"] == "running"
    # The orchestrator side: a heartbeat without any signature (a host not
    # upgraded yet) counts; one with a wrong signature still does not.
    client = c.redis.client()
    record = json.loads(str(client.get("fcq:host:alpha")))
    old = {k: v for k, v in record.items() if k != "sig"}
    client.set("fcq:host:old", json.dumps({**old, "host": "old", "queue": "host.old"}), ex=60)
    client.set("fcq:host:bad", json.dumps({**record, "host": "bad", "queue": "host.bad"}),
               ex=60)
    hosts = orch.hosts()
    assert "old" in hosts and "bad" not in hosts and orch.untrusted == ["bad"]


def test_rotation_two_keys_listed_both_accepted(make_cluster: ClusterFactory,
                                                 tmp_path: Any) -> None:
    """While a key is rotated, hosts list the old and the new: both grant; a key
    no longer listed does not."""
    old = Ed25519PrivateKey.generate()
    new_key = tmp_path / "new.key"
    new = trust.generate_private_key(new_key)
    c: Cluster = make_cluster(("alpha",), orchestrator_keys=[
        trust.public_key_text(old), trust.public_key_text(new)],
        orchestrator_key_file=str(new_key))
    alpha, _ = alpha_runs_vm01(c)  # started with the new key
    orch = c.orchestrator()
    orch._signing_key = old  # the old key, still listed
    assert orch.wait(orch.submit("stop", "vm01"), timeout=120)["status"] == "stopped"
    orch._signing_key = Ed25519PrivateKey.generate()  # a key nobody listed
    err = refused(c, orch.submit("start", "vm01"))
    assert err.fields["error"] == "Unauthorized"
    assert alpha.qemu_processes() == []


def test_remote_control_is_off(make_cluster: ClusterFactory) -> None:
    """Celery's broadcast commands (cancel_consumer, shutdown) reach no worker:
    alpha keeps consuming its queue and stays up."""
    c: Cluster = make_cluster()
    alpha, pid = alpha_runs_vm01(c)
    evil = attacker(c)
    assert evil.app.control.ping(timeout=2) == []  # nobody answers the broadcast
    evil.app.control.cancel_consumer("host.alpha")
    evil.app.control.shutdown()
    time.sleep(3)
    orch = c.orchestrator()
    assert orch.wait(orch.ping("alpha"), timeout=30)["host"] == "alpha"
    assert running_pid(alpha) == pid


def test_grant_checks_in_process(tmp_path: Any) -> None:
    """grants.check on its own: what verifies, what does not, replays, ids."""
    key = Ed25519PrivateKey.generate()
    host = new_host("alpha", cluster={"orchestrator_keys": [trust.public_key_text(key)],
                                      "hosts_dir": str(tmp_path / "hosts")})
    s = host.settings
    due = time.time() + 60
    kwargs: dict[str, Any] = {"vm": "vm01", "host": "alpha", "expires_at": due}
    good = {**kwargs, "grant": grants.grant(key, "fcq.stop", "id-1", "alpha", kwargs)}
    assert grants.check(s, "fcq.stop", "id-1", good) is True
    for task, tid, changed in (("fcq.kill", "id-1", good), ("fcq.stop", "id-2", good),
                               ("fcq.stop", "id-1", {**good, "vm": "vm02"}),
                               ("fcq.stop", "id-1", {**good, "expires_at": 1e12})):
        with pytest.raises(Unauthorized, match="grant is not valid"):
            grants.check(s, task, tid, changed)
    with pytest.raises(Unauthorized, match="no grant"):
        grants.check(s, "fcq.stop", "id-1", kwargs)
    with pytest.raises(Exception, match="task_id"):
        grants.check(s, "fcq.stop", "../etc", {**kwargs, "grant": good["grant"]})
    grants.mark_spent(s, "id-1", due)
    with pytest.raises(grants.Replayed, match="already ran"):
        grants.check(s, "fcq.stop", "id-1", good)
    spent = s.state_dir / "grants" / "id-1"
    assert spent.stat().st_mode & 0o777 == 0o600
    shutil.rmtree(host.base)


def test_forged_heartbeats_and_results_are_not_believed(make_cluster: ClusterFactory) -> None:
    """beta writes records in Redis as alpha would: a heartbeat for a host 'gamma'
    it invented, one for alpha that claims room alpha does not have, and a
    result for alpha's task. The orchestrator believes none of them; alpha's
    own records still count, capped by the inventory's capacity."""
    c: Cluster = make_cluster()
    alpha_runs_vm01(c)
    c.worker("beta")
    orch = c.orchestrator()
    client = c.redis.client()
    record = json.loads(str(client.get("fcq:host:beta")))
    # A host the inventory does not know, with room for anything.
    client.set("fcq:host:gamma", json.dumps({**record, "host": "gamma", "queue": "host.gamma",
                                             "limit_mb": 10**7, "booked_mb": 0}), ex=60)
    # beta's own record, re-signed by nobody, claiming more room.
    client.set("fcq:host:beta", json.dumps({**record, "limit_mb": 10**7}), ex=60)
    hosts = orch.hosts()
    assert "gamma" not in hosts and set(orch.untrusted) >= {"gamma"}
    with pytest.raises(Exception, match="not signed"):
        orch.submit("ensure", "vm01", host="gamma")
    cli = c.fcq("hosts")
    assert "host gamma: its heartbeat is not signed" in cli.stderr
    # The inventory caps what a genuine heartbeat claims.
    records = c.redis.dir / "hosts" / "alpha.yaml"
    records.write_text(records.read_text() + "memory_mb: 300\n")
    assert orch.hosts()["alpha"]["limit_mb"] == 300

    # A result for a task sent to alpha, written by beta (signed with beta's key)
    # before alpha's own: the task is one alpha has not run yet.
    task_id = str(uuid.uuid4())
    orch._remember(task_id, "alpha", "fcq.ensure")
    forged: dict[str, Any] = {"vm": "vm01", "host": "alpha", "operation": "ensure",
                              "status": "stopped"}
    beta_key = trust.load_private_key(c.hosts["beta"].settings.host_key_file)
    forged["signature"] = {"host": "beta", "sig": trust.sign_document(
        beta_key, "fcq-result", dict(forged), id=task_id)}
    meta: dict[str, Any] = {"status": "SUCCESS", "result": forged, "traceback": None,
                            "children": [], "date_done": "2026-12-08T00:00:00",
                            "task_id": task_id}
    client.set(f"celery-task-meta-{task_id}", json.dumps(meta))
    with pytest.raises(RemoteError, match="not believed: it is signed by 'beta'"):
        orch.wait(task_id, timeout=30)
    # alpha's genuine result of another task (a ping) under that id: not the
    # answer to an ensure.
    ping_id = str(uuid.uuid4())
    orch._remember(ping_id, "alpha", "fcq.ensure")
    orch.app.send_task("fcq.ping", queue="host.alpha", task_id=ping_id)
    with pytest.raises(RemoteError, match=r"of fcq\.ping, and the task sent was fcq\.ensure"):
        orch.wait(ping_id, timeout=30)
    # alpha's genuine result, once it is written, verifies.
    genuine = orch.submit("ensure", "vm01")
    assert orch.wait(genuine, timeout=60)["host"] == "alpha"
    assert orch.state(genuine)[1]["signature"]["host"] == "alpha"


def test_copies_of_one_request_run_once_and_forged_callbacks_record_nothing(
        make_cluster: ClusterFactory) -> None:
    """beta pushes a genuine start twice at once (it read it from the queue): one
    runs, the copy is ignored. A finish_migration with made-up halves, and the
    controller's task sent to a host, are refused."""
    from tests.test_cluster import SLOW_CREATE_VM
    c: Cluster = make_cluster()
    alpha = c.hosts["alpha"]
    alpha.update_settings(create_vm=SLOW_CREATE_VM)  # the start takes 3 s
    alpha.write_vm("vm01")
    c.worker("alpha")
    orch = c.orchestrator()
    tid, kwargs = orch.signed("fcq.start", "alpha", {"vm": "vm01", "host": "alpha"})
    for _ in range(2):
        orch.app.send_task("fcq.start", kwargs=kwargs, queue="host.alpha", task_id=tid)
    assert orch.wait(tid, timeout=120)["status"] == "running"
    wait_for(lambda: "request-duplicate-ignored" in events(alpha), 30, "the copy to be seen")
    assert events(alpha).count("qemu-start") == 1

    made_up = [{"operation": "inmigrate", "host": "alpha", "status": "running"},
               {"operation": "outmigrate", "host": "beta", "status": "stopped"}]
    evil = attacker(c)
    fake = evil.app.send_task("fcq.finish_migration", args=(made_up,), queue=CONTROLLER_QUEUE,
                              kwargs={"vm": "vm01", "attempt": "a1b2c3", "src": "beta",
                                      "dst": "alpha"})
    err = refused(c, str(fake.id))
    assert "a half's result is not believed" in err.message
    for task in ("fcq.move_wanted", "fcq.finish_migration", "fcq.migration_failed"):
        sent = evil.app.send_task(task, kwargs={"vm": "vm01"}, queue="host.alpha")
        assert "does not run on a host" in refused(c, str(sent.id)).message


def test_an_old_genuine_heartbeat_is_not_believed(make_cluster: ClusterFactory) -> None:
    """alpha's own signed record, written again later by beta (to keep a dead alpha
    'alive'), is too old to count."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    key = trust.load_private_key(alpha.settings.host_key_file)
    old = {"host": "alpha", "queue": "host.alpha", "seen": time.time() - 3600,
           "booked_mb": 0, "limit_mb": 1024, "running": [], "vms": {}, "beat": "x:1"}
    old["sig"] = trust.sign_document(key, registry.HEARTBEAT_PURPOSE, dict(old))
    hosts_dir = c.redis.dir / "hosts"
    assert registry.trusted({"alpha": old}, hosts_dir) == {"alpha": old}  # signed, yes
    assert registry.trusted({"alpha": old}, hosts_dir, max_age=record_max_age(6)) == {}
    c.redis.client().set("fcq:host:alpha", json.dumps(old), ex=60)
    assert "alpha" not in c.orchestrator().hosts()
