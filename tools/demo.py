"""`make demo`: a small fcq cluster on one machine, with real VMs.

A throwaway Ceph cluster (one monitor, one in-memory OSD) holding the VMs'
disks as RBD images, a throwaway redis-server (password, AOF), `fcq worker`
for hosts alpha and beta (each with its own cephx identity and its own
config, run and state directories), `fcq beat` and `fcq flower` (basic
auth, generated password). The demo writes VM configs, enqueues work
through the orchestrator, shows the fleet, live-migrates a VM between the
hosts, snapshots and grows a disk, shows a lock conflict refused, lets a
sweep heal a QEMU killed behind fcq's back, drains a host for maintenance,
and stops everything it started, also when interrupted.
`make demo KEEP=1` keeps the cluster up until Ctrl-C.

Everything lives under /tmp/fcq-demo and /tmp/fcq-ceph-*; nothing touches
/etc or /run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcq_tasks.config.settings import load_host_settings  # noqa: E402
from fcq_tasks.host import hostkeys  # noqa: E402
from tests.ceph import CephCluster  # noqa: E402

GUEST = ROOT / "build" / "guest"
BASE = Path("/tmp/fcq-demo")
FCQ = [sys.executable, "-m", "fcq_tasks"]
HOSTS = ("alpha", "beta")
VMS = {  # name: (kvm_host, online, memory)
    "web01": ("alpha", True, 256),
    "web02": ("alpha", True, 192),
    "db01": ("beta", True, 384),
    "old01": ("beta", False, 256),
}
#: Migrated in the demo: its config is on both hosts, as a migration needs.
MIGRATED = "web02"
#: Configs on both hosts: what the drain of beta moves to alpha.
EVERYWHERE = (MIGRATED, "db01")
POOL = "fcq"
ceph: list[CephCluster] = []

processes: list[subprocess.Popen[bytes]] = []
#: beat, kept apart: it is stopped first, or its next sweep would start the
#: VMs (their configs say online) that the demo is stopping.
beat: list[subprocess.Popen[bytes]] = []


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(host: str) -> dict[str, str]:
    return {**os.environ, "FCQ_CONFIG": str(BASE / host / "host.yaml")}


def fcq(*args: str, host: str = "alpha", check: bool = True, show: bool = True) -> str:
    if show:
        print(f"$ fcq {' '.join(args)}", flush=True)
    proc = subprocess.run([*FCQ, *args], env=env_for(host), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False)
    if show:
        for line in proc.stdout.splitlines():
            print(f"  {line}")
        if proc.returncode:
            print(f"  (exit code {proc.returncode})", flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: 'fcq {' '.join(args)}' failed")
    return proc.stdout


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "wb") as fh:
        processes.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True))


def prepare() -> dict[str, Any]:
    if BASE.exists():
        shutil.rmtree(BASE)
    BASE.mkdir(mode=0o700)
    t0 = time.monotonic()
    cluster_ceph = CephCluster(pools=(POOL,))
    ceph.append(cluster_ceph)
    cluster_ceph.start()
    print(f"  ceph-mon and ceph-osd (memstore) up in {time.monotonic() - t0:.1f} s, pool {POOL}")
    port, flower_port = free_port(), free_port()
    password = secrets.token_urlsafe(18)
    (BASE / "redis.password").write_text(password + "\n")
    (BASE / "redis.password").chmod(0o600)
    flower_pw = secrets.token_urlsafe(9)
    (BASE / "flower.auth").write_text(f"admin:{flower_pw}\n")
    (BASE / "flower.auth").chmod(0o600)
    # The orchestrator's signing key. One machine plays the orchestrator and
    # both hosts here, so the shared cluster section names the key; on a real
    # fleet only the orchestrator side's settings do (docs/security.md).
    signer = hostkeys.orchestrator_keygen(BASE / "orchestrator.key")
    cluster = {"broker_url": f"redis://127.0.0.1:{port}/0",
               "orchestrator_keys": [signer["public_key"]],
               "orchestrator_key_file": signer["key_file"],
               "password_file": str(BASE / "redis.password"),
               "sweep_interval": 5, "registry_ttl": 10, "visibility_timeout": 120,
               "flower_port": flower_port, "flower_auth_file": str(BASE / "flower.auth"),
               "metrics_port": free_port(), "hosts_dir": str(BASE / "hosts")}
    worker_metrics: dict[str, int] = {}
    for host in HOSTS:
        d = BASE / host
        (d / "vm").mkdir(parents=True)
        settings = {
            # Within the demo's visibility timeout (120 s), as settings demand.
            "migration_timeout_max": 90, "migration_peer_grace": 20,
            "host": host, "vm_config_dir": str(d / "vm"), "run_dir": str(d / "run"),
            "state_dir": str(d / "state"), "log_file": str(d / "fcq.log"),
            "nic_mode": "user", "shutdown_grace": 20, "vm_max_total_memory": 2048,
            # Two workers on one machine: each its own /metrics port.
            "metrics_port": worker_metrics.setdefault(host, free_port()),
            "direct_boot": {"kernel": str(GUEST / "vmlinuz"), "initrd": str(GUEST / "initrd.gz"),
                            "append": (GUEST / "cmdline").read_text().strip()},
            "cluster": cluster,
            # Each host's own key; its record (address, public key) goes to
            # hosts_dir, where the other host reads it (fcq --local keygen).
            "host_key_file": str(d / "host.key"),
            # Each host its own cephx identity: mon 'profile rbd', osd
            # 'profile rbd pool=fcq' (what a real hypervisor gets).
            "storage": "rbd",
            "ceph": {"conf": str(cluster_ceph.conf), "client_id": host,
                     "keyring": str(cluster_ceph.client(host)), "pool": POOL,
                     "pool_limits": {POOL: {"iops": 2000}}},
        }
        (d / "host.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        hostkeys.keygen(load_host_settings(d / "host.yaml"), write_record=True)
    for i, (vm, (kvm_host, online, memory)) in enumerate(VMS.items()):
        spec = {"name": vm, "parameters": {
            "id": 100 + i, "resource_group": "demo", "online": online, "kvm_host": kvm_host,
            "disk": 2, "memory": memory, "cores": 1,
            "nics": [{"srv": f"02-00-00-00-01-{i:02x}"}]}}
        text = yaml.safe_dump(spec, sort_keys=False)
        for host in HOSTS if vm in EVERYWHERE else (kvm_host,):
            (BASE / host / "vm" / f"{vm}.cfg").write_text(text)
    return {"port": port, "password": password, "flower_port": flower_port,
            "flower_pw": flower_pw, "metrics": worker_metrics,
            "cluster_metrics": cluster["metrics_port"]}


def start_services(info: dict[str, Any]) -> None:
    (BASE / "redis").mkdir()
    # The password goes to redis-server on stdin (a config read from "-"),
    # not on its command line where `ps` would show it.
    redis = subprocess.Popen(
        ["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        start_new_session=True)
    assert redis.stdin is not None
    redis.stdin.write(f"port {info['port']}\nbind 127.0.0.1\nrequirepass {info['password']}\n"
                      f"dir {BASE / 'redis'}\nappendonly yes\nsave \"\"\n"
                      f"logfile {BASE / 'redis' / 'redis.log'}\n".encode())
    redis.stdin.close()
    processes.append(redis)
    for host in HOSTS:
        spawn([*FCQ, "worker"], BASE / host / "worker.log", env_for(host))
    spawn([*FCQ, "beat"], BASE / "beat.log", env_for("alpha"))
    spawn([*FCQ, "controller"], BASE / "controller.log", env_for("alpha"))
    beat.append(processes.pop())
    spawn([*FCQ, "flower"], BASE / "flower.log", env_for("alpha"))
    spawn([*FCQ, "metrics"], BASE / "metrics.log", env_for("alpha"))
    for _ in range(100):
        out = fcq("--json", "hosts", show=False, check=False)
        if '"alpha"' in out and '"beta"' in out:
            return
        time.sleep(0.2)
    raise SystemExit("demo: workers did not come up; see /tmp/fcq-demo/*/worker.log")


def show_metrics(port: int, prefixes: tuple[str, ...]) -> None:
    """A few lines of an endpoint, as `curl -s URL | grep` would show them."""
    url = f"http://127.0.0.1:{port}/metrics"
    print(f"$ curl -s {url} | grep -E '{'|'.join(p.rstrip('{') for p in prefixes)}'")
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as err:
        print(f"  (not answering: {err})")
        return
    for prefix in prefixes:  # a few of each: the counts that moved first
        lines = sorted((line for line in text.splitlines() if line.startswith(prefix)),
                       key=lambda line: line.endswith(" 0.0"))
        for line in lines[:4]:
            print(f"  {line}")


def stop_beat() -> None:
    for proc in beat:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)


def stop_everything() -> None:
    stop_beat()
    for vm, (host, _, _) in VMS.items():
        subprocess.run([*FCQ, "-q", "--local", "kill", vm], env=env_for(host),
                       capture_output=True, check=False)
    for proc in reversed(processes):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    # Safety net: no QEMU of the demo outlives it.
    for qemu in psutil.process_iter(["cmdline"]):
        if any(str(BASE) in arg for arg in qemu.info["cmdline"] or []):
            print(f"demo: killing leftover process {qemu.pid}", file=sys.stderr)
            qemu.kill()
    for cluster in ceph:
        cluster.stop()


def main() -> None:
    step("A cluster on one machine: Redis, workers for alpha and beta, beat, Flower")
    info = prepare()
    start_services(info)
    print(f"  redis-server on 127.0.0.1:{info['port']} (password in {BASE}/redis.password)")
    fcq("hosts")

    step("The desired state: one YAML file per VM, on the host that runs it")
    print((BASE / "alpha" / "vm" / "web01.cfg").read_text())

    step("The orchestrator enqueues to the VM's host queue and follows the task")
    fcq("start", "web01")
    fcq("start", "db01")
    job = fcq("ensure", "web02", "--no-wait", show=True).strip()
    fcq("wait", job)
    fcq("ls")
    fcq("hosts")

    step("Bad requests get a clear error and change nothing")
    fcq("start", "../etc/passwd", check=False)
    fcq("start", "nosuchvm", check=False)

    step("Disks are RBD images; each lock's cookie names the host holding it")
    for vm in ("web01", MIGRATED):
        print(f"$ rbd lock ls {POOL}/{vm}.root")
        for line in ceph[0].rbd("lock", "ls", f"{POOL}/{vm}.root").splitlines():
            print(f"  {line}")

    step(f"Live migration of {MIGRATED} from alpha to beta, with its progress")
    fcq("migrate", MIGRATED, "--to", "beta")
    fcq("ls")
    print(f"$ rbd lock ls {POOL}/{MIGRATED}.root")
    for line in ceph[0].rbd("lock", "ls", f"{POOL}/{MIGRATED}.root").splitlines():
        print(f"  {line}")

    step("A snapshot: the guest's file systems are frozen for it, and always thawed")
    fcq("snapshot", "web01", "before-upgrade")
    fcq("snapshot", "web01", "before-upgrade")  # the same name again: nothing to do
    fcq("snapshot", "--list", "web01")
    print("  and a disk grows while the guest runs; it never shrinks:")
    fcq("resize", "web01", "3G")
    fcq("resize", "web01", "1G", check=False)

    step("A lock conflict: beta is told web01 is its own, but alpha holds its locks")
    beta_copy = BASE / "beta" / "vm" / "web01.cfg"
    beta_copy.write_text((BASE / "alpha" / "vm" / "web01.cfg").read_text()
                         .replace("kvm_host: alpha", "kvm_host: beta"))
    fcq("--local", "start", "web01", host="beta", check=False)
    print("  and breaking the locks of a live holder is refused:")
    fcq("force-unlock", "web01", "--host", "beta", host="beta", check=False)
    beta_copy.unlink()

    step("A crash behind fcq's back: kill -9 web01's QEMU; beat's next sweep heals it")
    pid = int((BASE / "alpha" / "run" / "web01.pid").read_text())
    print(f"$ kill -9 {pid}")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while True:
        status = subprocess.run([*FCQ, "--local", "-q", "--json", "status", "web01"],
                                env=env_for("alpha"), capture_output=True, text=True).stdout
        if '"status": "running"' in status and f'"pid": {pid}' not in status:
            break
        if time.monotonic() - t0 > 60:
            raise SystemExit("demo: the sweep did not restart web01")
        time.sleep(0.5)
    print(f"  web01 running again after {time.monotonic() - t0:.1f} s (sweep every 5 s)")
    fcq("jobs", "--limit", "6")

    step("Maintenance: drain beta (it starts and receives nothing), its VMs move to alpha")
    fcq("drain", "beta", "--dry-run")
    fcq("drain", "beta")
    fcq("hosts")
    fcq("start", "old01", check=False)  # refused: beta is drained
    fcq("undrain", "beta")

    step("Where to look: Flower, and fcq's own metrics (Prometheus text format)")
    print(f"  Flower: http://127.0.0.1:{info['flower_port']}/  user admin, password "
          f"{info['flower_pw']} (its /metrics too)")
    for host, port in info["metrics"].items():
        print(f"  worker {host}: http://127.0.0.1:{port}/metrics")
    print(f"  cluster (fcq metrics): http://127.0.0.1:{info['cluster_metrics']}/metrics")
    show_metrics(info["metrics"]["alpha"], ("fcq_vms{", "fcq_migrations_total",
                                            "fcq_operation_duration_seconds_count{"))
    show_metrics(info["cluster_metrics"], ("fcq_hosts_alive", "fcq_queue_length"))
    print(f"  logs: {BASE}/<host>/fcq.log (JSON lines), {BASE}/<host>/worker.log, "
          f"{BASE}/beat.log")
    if os.environ.get("KEEP"):
        print("\nKEEP is set: the cluster stays up. Ctrl-C stops it.", flush=True)
        signal.pause()

    step("stop: beat first (its sweep would start the VMs again: their configs say online),"
         " then ACPI power-off through the queues")
    stop_beat()
    fcq("stop", "web01", MIGRATED, "db01")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        stop_everything()
