"""A forged migration address never reaches QEMU; if one did, QEMU could not spawn.

The attacker is root on host beta: it has beta's settings, beta's own key
and the Redis password every host shares. It writes an attempt of its own
into Redis (the ``current`` key, a destination heartbeat, an address) and
sends ``fcq.outmigrate`` to alpha's queue, where vm01 runs. Real
redis-server, a real `fcq worker` for alpha, real QEMU; a 100 ms sampler
watches that no command ran and vm01 never stopped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fcq_tasks import trust
from fcq_tasks.config import peers
from fcq_tasks.errors import BadRequest, ConfigError, RemoteError
from fcq_tasks.hazmat.monitor import tcp_migration_uri
from fcq_tasks.host.migration import address
from fcq_tasks.host.migration.rendezvous import attempt_prefix, current_key
from tests.cluster import Cluster, send_signed
from tests.conftest import Host, HostFactory
from tests.helpers import wait_for, wait_guest

ClusterFactory = Any


class Listener:
    """A TCP port an attacker listens on: counts every connection made to it."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Sampler:
    """Every 100 ms: vm01's QEMU on alpha is the one it was, and *evidence* does not exist."""

    def __init__(self, alpha: Host, evidence: Path) -> None:
        self.alpha, self.evidence = alpha, evidence
        self.pid = alpha.agent("vm01").process().pid  # type: ignore[union-attr]
        self.bad: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples += 1
            if self.evidence.exists():
                self.bad.append(f"{self.evidence} exists: a command ran")
            pids = [p.pid for p in self.alpha.qemu_processes()]
            if pids != [self.pid]:
                self.bad.append(f"alpha's QEMUs are {pids}, not [{self.pid}]")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def victim(make_cluster: ClusterFactory) -> Iterator[Cluster]:
    """vm01 runs on alpha (alpha's worker only); beta exists as a host with a record."""
    c: Cluster = make_cluster(visibility_timeout=200)
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01", kvm_host="alpha", memory=256)
    c.worker("alpha")
    orch = c.orchestrator()
    orch.wait(orch.submit("start", "vm01"), timeout=120)
    wait_guest(alpha.agent("vm01"))
    yield c


def forge_attempt(c: Cluster, attempt: str, addr: str) -> redis.Redis:
    """What a host holding only the shared Redis password can write."""
    client = c.redis.client()
    prefix = attempt_prefix("vm01", attempt)
    client.set(current_key("vm01"), attempt, ex=300)
    client.set(prefix + "hb:dst", "1", ex=300)  # a destination that looks alive
    client.set(prefix + "addr", addr, ex=300)
    return client


def send_outmigrate(c: Cluster, attempt: str) -> str:
    """A genuine source half (granted by the orchestrator): the forgery is the address."""
    return send_signed(c.orchestrator(), "outmigrate", "alpha",
                       {"vm": "vm01", "attempt": attempt, "dst": "beta", "host": "alpha",
                        "expires_at": time.time() + 300})


def beta_key(c: Cluster) -> Ed25519PrivateKey:
    """The attacker is root on beta: it has beta's own key."""
    return trust.load_private_key(c.hosts["beta"].settings.host_key_file)


def signed(key: Ed25519PrivateKey, attempt: str, uri: str) -> str:
    return address.signed(key, "vm01", attempt, "alpha", "beta", uri)


def test_forged_addresses_are_refused_before_qemu_is_asked(victim: Cluster,
                                                           tmp_path: Path) -> None:
    """exec:, a foreign tcp:, a wrong IP, a stranger's signature, a replayed one: all
    refused by alpha with a clear error; no command runs, nobody receives a byte,
    vm01 runs on in the same QEMU (sampled every 100 ms)."""
    c = victim
    alpha = c.hosts["alpha"]
    evidence = tmp_path / "pwned"
    stranger = Ed25519PrivateKey.generate()
    listen_here = Listener("127.0.0.1")        # beta's own IP: only beta signs for it
    listen_elsewhere = Listener("127.0.0.2")   # not beta's migration address
    genuine_other_attempt = signed(beta_key(c), "att-earlier",
                                   f"tcp:127.0.0.1:{listen_here.port}")
    cases = {
        "att-exec-raw": (f"exec:id > {evidence}", "not a signed address"),
        "att-exec-signed": (signed(beta_key(c), "att-exec-signed", f"exec:id > {evidence}"),
                            "must be tcp:<IP>:<port>"),
        "att-unix": (signed(beta_key(c), "att-unix", f"unix:{tmp_path}/sock"),
                     "must be tcp:<IP>:<port>"),
        "att-stranger": (signed(stranger, "att-stranger", f"tcp:127.0.0.1:{listen_here.port}"),
                         "is not signed by beta's key"),
        "att-other-ip": (signed(beta_key(c), "att-other-ip",
                                f"tcp:127.0.0.2:{listen_elsewhere.port}"),
                         "is not beta's migration address (127.0.0.1"),
        "att-replayed": (genuine_other_attempt, "is not signed by beta's key for attempt "
                         "att-replayed"),
    }
    try:
        with Sampler(alpha, evidence) as sampler:
            for attempt, (addr, why) in cases.items():
                forge_attempt(c, attempt, addr)
                task_id = send_outmigrate(c, attempt)
                with pytest.raises(RemoteError) as info:
                    c.orchestrator().wait(task_id, timeout=60)
                assert info.value.fields.get("error") == "ForgedAddress", info.value.message
                assert "migration address refused" in info.value.message
                assert why in info.value.message, (attempt, info.value.message)
                assert "nothing was sent" in info.value.message
            time.sleep(1.5)  # anything late (a copy, a command) would show now
        assert sampler.samples > 10 and sampler.bad == []
        assert listen_here.connections == 0 and listen_elsewhere.connections == 0
        assert not evidence.exists()
        # vm01 is where it was, in the same state: nothing to converge.
        assert alpha.agent("vm01").ensure()["actions"] == ["nothing"]
        assert alpha.agent("vm01").status()["status"] == "running"
        log = alpha.settings.log_file.read_text()  # type: ignore[union-attr]
        refused = [json.loads(line) for line in log.splitlines()
                   if "migration-address-refused" in line]
        assert len(refused) == len(cases)
    finally:
        listen_here.close()
        listen_elsewhere.close()


def test_sandbox_stops_exec_even_when_the_check_is_bypassed(make_host: HostFactory,
                                                            tmp_path: Path) -> None:
    """With fcq's check removed (the raw QMP command sent by hand), QEMU's seccomp
    sandbox kills the QEMU instead of running the command; hazmat's own verb
    refuses exec: without asking QEMU at all."""
    host = make_host()
    host.write_vm("vm01", memory=256)
    agent = host.agent("vm01")
    agent.ensure()
    proc = agent.process()
    assert proc is not None
    assert "spawn=deny" in " ".join(proc.cmdline())
    evidence = tmp_path / "pwned"
    with agent.qemu.monitor() as mon:
        with pytest.raises(BadRequest, match="must be tcp:<IP>:<port>"):
            mon.migrate_to(f"exec:id > {evidence}", 300, 2**30)
        assert mon.runstate() == "running"  # fcq's verb sent nothing
        with contextlib.suppress(Exception):  # QEMU dies while answering
            mon._do("migrate", uri=f"exec:id > {evidence}")
    wait_for(lambda: agent.process() is None, 10, "QEMU killed by its sandbox")
    time.sleep(0.5)
    assert not evidence.exists()
    said = agent.qemu.paths.stderr_log.read_text()
    assert "pwned" not in said
    # The next ensure brings the guest back, as after any crash.
    assert agent.ensure()["status"] == "running"


@pytest.mark.parametrize("uri, rule", [
    ("exec:id", "must be tcp:<IP>:<port>"),
    ("unix:/tmp/x", "must be tcp:<IP>:<port>"),
    ("fd:3", "must be tcp:<IP>:<port>"),
    ("file:/tmp/x", "must be tcp:<IP>:<port>"),
    ("tcp:evil.example:4444", "must be tcp:<IP>:<port>"),
    ("tcp:127.0.0.1:4444,exec:id", "must be tcp:<IP>:<port>"),
    ("tcp:127.0.0.1:4444\n", "must be tcp:<IP>:<port>"),
    ("tcp:999.0.0.1:4444", "is not an IP address"),
    ("tcp:::1:4444", "must be tcp:<IP>:<port>"),
    ("tcp:[127.0.0.1]:4444", "an IPv6 address goes in brackets"),
    ("tcp:127.0.0.1:22", "port 22 is not in 1024-65535"),
    ("tcp:127.0.0.1:70000", "port 70000 is not in 1024-65535"),
    (None, "must be tcp:<IP>:<port>"),
])
def test_only_tcp_ip_port_passes(uri: object, rule: str) -> None:
    """Every other scheme, a name, a bad IP or a privileged port: refused, rule named."""
    with pytest.raises(BadRequest, match="migration address") as info:
        tcp_migration_uri(uri)
    assert rule in info.value.message


def test_tcp_addresses_are_normalised() -> None:
    assert tcp_migration_uri("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert tcp_migration_uri("tcp:[::1]:4444") == ("::1", 4444)
    assert tcp_migration_uri("tcp:[0:0::1]:4444") == ("::1", 4444)


def write_record(hosts_dir: Path, name: str, **fields: object) -> None:
    hosts_dir.mkdir(exist_ok=True)
    (hosts_dir / f"{name}.yaml").write_text(json.dumps(fields))


@pytest.mark.parametrize("fields, field, rule", [
    ({"migration_address": "beta.example", "public_key": "x"}, "migration_address",
     "must be an IP address"),
    ({"migration_address": "10.0.0.2", "public_key": "AAAA"}, "public_key", "must be 32 bytes"),
    ({"migration_address": "10.0.0.2", "public_key": "%%%"}, "public_key", "not base64"),
    ({"migration_address": "10.0.0.2"}, "public_key", "missing"),
    ({"migration_address": "10.0.0.2", "public_key": "x", "capacity": 1}, "capacity",
     "unknown field"),
])
def test_bad_host_records_are_refused(tmp_path: Path, fields: dict[str, object], field: str,
                                      rule: str) -> None:
    """A host record that breaks a rule: an error naming the file, the field and the rule."""
    write_record(tmp_path, "beta", **fields)
    with pytest.raises(ConfigError) as info:
        peers.load_peer(tmp_path, "beta")
    assert info.value.fields["field"] == field and rule in info.value.message
    assert "beta.yaml" in str(info.value.fields["file"])


def test_missing_record_and_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no record of host 'gamma'.*fcq --local keygen"):
        peers.load_peer(tmp_path, "gamma")
    with pytest.raises(ConfigError):
        peers.load_peer(tmp_path, "../etc/passwd")


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "host.key"
    trust.generate_private_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 0600"):
        trust.load_private_key(path)
