"""A throwaway Ceph cluster: one monitor, one memstore OSD, on 127.0.0.1.

For the tests, the demo and the benchmarks. Everything lives in one temp
directory; ports are chosen by the kernel; :meth:`CephCluster.stop` kills
both daemons and removes the directory, so nothing is left running. The
settings that make it start in about two seconds: a short Paxos propose
interval (the default 1 s costs ~7 s at start), pools of size 1, no
manager (its absence must not hold anything up), and no disk-space
warnings on a shared disk. Without a manager some CLI commands hang, so
every command here runs with a timeout.

Each simulated hypervisor host gets its own cephx identity
(``client.<host>``) with what a real host needs: ``profile rbd`` on the
monitors (which includes blocklisting other clients, the fencing) and
``profile rbd`` on the VM pools only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: Every ceph CLI call here is bounded: without a mgr some commands hang.
COMMAND_TIMEOUT = 60.0
POOL = "fcq"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: prctl(2), looked up here: between fork and exec the child must not load
#: anything (another thread may have held the loader's lock at the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (even by a crash).

    A test run that crashes never reaches stop(); its daemons must not
    outlive it.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class CephCluster:
    def __init__(self, pools: tuple[str, ...] = (POOL,), memory_mb: int = 3072) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fcq-ceph-", dir="/tmp"))
        self.conf = self.dir / "ceph.conf"
        self.admin_keyring = self.dir / "client.admin.keyring"
        self.pools = pools
        self.memory_mb = memory_mb
        self.port = _free_port()
        self.daemons: list[subprocess.Popen[bytes]] = []
        self._pools_made = 0

    # -- commands ---------------------------------------------------------

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run the ceph CLI as client.admin; its stdout."""
        return self._run(["ceph", "--conf", str(self.conf), "--keyring",
                          str(self.admin_keyring), "--connect-timeout", "20", *args], timeout)

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return self._run(["rbd", "--conf", str(self.conf), "--keyring",
                          str(self.admin_keyring), *args], timeout)

    def rados(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return self._run(["rados", "--conf", str(self.conf), "--keyring",
                          str(self.admin_keyring), *args], timeout)

    def _run(self, argv: list[str], timeout: float) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: "
                               f"{result.stderr.strip()[-2000:]}")
        return result.stdout

    # -- life cycle -------------------------------------------------------

    def start(self) -> CephCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        d = self.dir
        fsid = str(uuid.uuid4())
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.port}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.$pid.asok
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
mon mgr mkfs grace = 31536000
mon warn on pool no redundancy = false
paxos propose interval = 0.05
# A watch whose client stops answering expires after 5 s here (30 s by
# default): the tests of fencing a stalled holder wait that long, not 30 s.
osd client watch timeout = 5
osd objectstore = memstore
memstore device bytes = {self.memory_mb << 20}
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0

[mon.a]
mon data = {d}/mon.a
[osd.0]
osd data = {d}/osd.0
keyring = {d}/osd.0/keyring
""")
        for sub in ("run", "log", "osd.0"):
            (d / sub).mkdir()
        mon_keyring = d / "mon.keyring"
        tool = ["ceph-authtool"]
        self._run([*tool, "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *"], COMMAND_TIMEOUT)
        self._run([*tool, "--create-keyring", str(self.admin_keyring), "--gen-key", "-n",
                   "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                   "--cap", "mgr", "allow *"], COMMAND_TIMEOUT)
        self._run([*tool, str(mon_keyring), "--import-keyring", str(self.admin_keyring)],
                  COMMAND_TIMEOUT)
        monmap = d / "monmap"
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{self.port}]", str(monmap)], COMMAND_TIMEOUT)
        self._run(["ceph-mon", "--conf", str(self.conf), "--mkfs", "-i", "a", "--monmap",
                   str(monmap), "--keyring", str(mon_keyring)], COMMAND_TIMEOUT)
        self._daemon(["ceph-mon", "--conf", str(self.conf), "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"expected osd.0, got {osd_id!r}")
        osd_keyring = d / "osd.0" / "keyring"
        self._run([*tool, "--create-keyring", str(osd_keyring), "--gen-key", "-n", "osd.0"],
                  COMMAND_TIMEOUT)
        self.ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
                  "-i", str(osd_keyring))
        self._run(["ceph-osd", "--conf", str(self.conf), "-i", "0", "--mkfs",
                   "--osd-uuid", osd_uuid], COMMAND_TIMEOUT)
        self._daemon(["ceph-osd", "--conf", str(self.conf), "-f", "-i", "0"])
        for pool in self.pools:
            self.add_pool(pool)

    def add_pool(self, pool: str) -> None:
        self.ceph("osd", "pool", "create", pool, "8", "8")
        # Returns once the pool's PGs are active: the cluster's ready signal.
        self.rbd("pool", "init", pool)

    def new_pool(self) -> str:
        """A new pool with a name not used before in this cluster (a test's own)."""
        self._pools_made += 1
        pool = f"t{self._pools_made}"
        self.add_pool(pool)
        return pool

    def delete_pool(self, pool: str) -> None:
        self.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")

    def _daemon(self, argv: list[str]) -> None:
        self.daemons.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL,
                                             start_new_session=True,
                                             preexec_fn=_die_with_parent))

    def client(self, name: str, pools: tuple[str, ...] | None = None) -> Path:
        """A cephx identity ``client.<name>`` for one hypervisor host; its keyring file.

        The capabilities a real host gets: ``profile rbd`` on the monitors
        (it may blocklist other clients, which is how fcq fences) and
        ``profile rbd`` on the VM pools only.
        """
        keyring = self.dir / f"client.{name}.keyring"
        osd_caps = ", ".join(f"profile rbd pool={p}" for p in (pools or self.pools))
        keyring.write_text(self.ceph("auth", "get-or-create", f"client.{name}",
                                     "mon", "profile rbd", "osd", osd_caps))
        keyring.chmod(0o600)
        return keyring

    def read(self, pool: str, image: str, offset: int, length: int) -> bytes:
        """Bytes of an image as client.admin sees them (what really is on the OSDs)."""
        import rados
        import rbd
        conn = rados.Rados(conffile=str(self.conf), rados_id="admin",
                           conf={"keyring": str(self.admin_keyring)})
        conn.connect(timeout=20)
        try:
            with conn.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
                return bytes(img.read(offset, length))
        finally:
            conn.shutdown()

    def blocklist(self) -> list[str]:
        """The client addresses currently blocklisted."""
        out = self.ceph("osd", "blocklist", "ls")
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        for proc in self.daemons:
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + 10
        for proc in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        self.daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    """Start a cluster, print how long it took, stop it (a smoke check)."""
    t0 = time.monotonic()
    cluster = CephCluster().start()
    try:
        cluster.client("alpha")
        print(f"ceph up in {time.monotonic() - t0:.2f} s at {cluster.conf} (pid {os.getpid()})")
        print(cluster.ceph("-s"))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
