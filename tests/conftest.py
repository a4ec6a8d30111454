"""Shared fixtures: the tiny real guest, throwaway hosts, and process hygiene.

A "host" here is a set of directories and a HostSettings pointing at them,
exactly what a production host has, under a short temp path (unix socket
paths must stay under 107 bytes). Every QEMU a test starts is found by its
command line (which names the host's run directory) and killed afterwards,
so a failing test never leaves guests running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from fcq_tasks.config.settings import HostSettings, load_host_settings
from fcq_tasks.host import hostkeys
from fcq_tasks.host.agent import VMAgent

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "build" / "guest"


@pytest.fixture(scope="session")
def guest() -> Path:
    """Kernel and initramfs of the test guest (built once, cached in build/guest)."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "guest" / "build.py"), str(GUEST_DIR)],
                   check=True, stdout=subprocess.DEVNULL)
    return GUEST_DIR


def vm_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"id": 1000, "resource_group": "test", "online": True,
                              "kvm_host": "alpha", "disk": 1, "memory": 128, "cores": 1,
                              "nics": [{"srv": "02-00-00-00-00-01"}]}
    params.update(overrides)
    return params


@dataclass
class Host:
    base: Path
    settings: HostSettings
    settings_file: Path
    #: fcq processes fcq_async() started: a test that fails before it
    #: collects them would leave them running into the next test.
    children: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.settings.host

    def write_vm(self, name: str, **overrides: Any) -> Path:
        path = self.settings.vm_config_dir / f"{name}.cfg"
        params = vm_params(**{"kvm_host": self.name, **overrides})
        path.write_text(yaml.safe_dump({"name": name, "parameters": params}, sort_keys=False))
        return path

    def update_settings(self, **changes: Any) -> None:
        raw = yaml.safe_load(self.settings_file.read_text())
        raw.update(changes)
        self.settings_file.write_text(yaml.safe_dump(raw))
        self.settings = load_host_settings(self.settings_file)

    def agent(self, name: str) -> VMAgent:
        return VMAgent(self.settings, name)

    def fcq(self, *args: str, check: bool = False,
            local: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FCQ_CONFIG": str(self.settings_file)}
        flag = ["--local"] if local else []
        return subprocess.run([sys.executable, "-m", "fcq_tasks", *flag, *args], env=env, text=True,
                              capture_output=True, check=check, timeout=120)

    def fcq_async(self, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "FCQ_CONFIG": str(self.settings_file)}
        proc = subprocess.Popen([sys.executable, "-m", "fcq_tasks", "--local", *args], env=env,
                                text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.children.append(proc)
        return proc

    def wait_for_oplock_holder(self, vm: str, timeout: float = 30) -> None:
        """Wait until some process holds VM *vm*'s operation lock (probing with flock)."""
        path = self.settings.run_dir / f"{vm}.op.lock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    return
                finally:
                    os.close(fd)
            time.sleep(0.02)
        raise AssertionError(f"nobody took {vm}'s operation lock within {timeout} s")

    def qemu_processes(self) -> list[psutil.Process]:
        return processes_mentioning(str(self.settings.run_dir))


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live QEMU processes whose command line mentions *text*.

    While QEMU daemonizes, its parent waits for the child with the same
    command line; a parent whose child is also listed is not a second QEMU.
    """
    out = []
    for proc in psutil.process_iter(["cmdline", "status", "ppid"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in cmd) \
                and "qemu" in (cmd[0] if cmd else ""):
            out.append(proc)
    parents = {p.info["ppid"] for p in out}
    return [p for p in out if p.pid not in parents]


HostFactory = Callable[..., Host]


def direct_boot(guest: Path) -> dict[str, str]:
    return {"kernel": str(guest / "vmlinuz"), "initrd": str(guest / "initrd.gz"),
            "append": (guest / "cmdline").read_text().strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_host(name: str, prefix: str = "fcq-", **settings: Any) -> Host:
    """A host's directories and settings file under a short temp path."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    for d in ("vm", "run", "state"):
        (base / d).mkdir()
    raw: dict[str, Any] = {
        "host": name, "vm_config_dir": str(base / "vm"), "run_dir": str(base / "run"),
        "state_dir": str(base / "state"), "log_file": str(base / "fcq.log"),
        "nic_mode": "user", "shutdown_grace": 15, "accelerator": "auto",
        # Several workers on one machine: each host's /metrics on a port of its own.
        "metrics_port": free_port(), "host_key_file": str(base / "host.key"), **settings}
    settings_file = base / "host.yaml"
    settings_file.write_text(yaml.safe_dump(raw))
    loaded = load_host_settings(settings_file)
    if "cluster" in settings:
        # Its key, and its record where the cluster's other hosts read it.
        hostkeys.keygen(loaded, write_record=True)
    return Host(base, loaded, settings_file)


@pytest.fixture
def make_host(guest: Path) -> Iterator[HostFactory]:
    """Create throwaway hosts; kill their QEMUs and remove their files afterwards."""
    hosts: list[Host] = []

    def factory(name: str = "alpha", **settings: Any) -> Host:
        host = new_host(name, **{"direct_boot": direct_boot(guest), **settings})
        hosts.append(host)
        return host

    yield factory
    for host in hosts:
        for child in host.children:
            if child.poll() is None:
                child.kill()
            child.communicate()  # reaps it and closes its pipes
        for proc in host.qemu_processes():
            proc.kill()
        if not os.environ.get("FCQ_TEST_KEEP"):  # kept for a post-mortem
            shutil.rmtree(host.base, ignore_errors=True)


@pytest.fixture
def host(make_host: HostFactory) -> Host:
    return make_host()


@pytest.fixture(scope="session")
def ceph() -> Iterator[Any]:
    """One throwaway Ceph cluster (1 mon, 1 memstore OSD) for the whole session."""
    from fcq_tasks.storage import cephconn
    from tests.ceph import CephCluster
    cluster = CephCluster().start()
    yield cluster
    cephconn.shutdown_all()
    cluster.stop()


def rbd_settings(cluster: Any, host: str, pool: str = "fcq", **ceph: Any) -> dict[str, Any]:
    """Host settings for storage: rbd as *host*, with an identity that may use only *pool*."""
    client_id = host if pool == "fcq" else f"{host}-{pool}"
    keyring = cluster.client(client_id, pools=(pool,))
    return {"storage": "rbd", "ceph": {"conf": str(cluster.conf), "client_id": client_id,
                                       "keyring": str(keyring), "pool": pool, **ceph}}


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server with a password and AOF on a free port."""
    from tests.cluster import RedisServer
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def make_cluster(make_host: HostFactory, redis_server: Any,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Hosts alpha and beta sharing one Redis; services are stopped afterwards.

    ``storage="rbd"``: the hosts keep their VMs on the session's Ceph
    cluster, in a pool of this test's own (with identities that may use only
    it), so no test sees another's images or locks.
    """
    from tests.cluster import Cluster, make_cluster
    made: list[Cluster] = []
    pools: list[str] = []

    def factory(names: tuple[str, ...] = ("alpha", "beta"), storage: str = "local",
                **cluster: Any) -> Cluster:
        per_host = None
        if storage == "rbd":
            ceph = request.getfixturevalue("ceph")
            pool = ceph.new_pool()
            pools.append(pool)

            def per_host(name: str) -> dict[str, Any]:
                # The host watch outlasts the tests' 6 s heartbeat by 4 s.
                return rbd_settings(ceph, name, pool=pool, host_watch_timeout=10)
        c = make_cluster(make_host, redis_server, names, storage=per_host, **cluster)
        made.append(c)
        return c

    yield factory
    # Runs before redis_server's teardown (this fixture depends on it): every
    # cluster closes its orchestrators while their Redis still answers, even
    # if stopping an earlier cluster failed.
    with contextlib.ExitStack() as stack:
        for c in made:
            stack.callback(c.stop_all)
        for pool in pools:
            stack.callback(request.getfixturevalue("ceph").delete_pool, pool)
