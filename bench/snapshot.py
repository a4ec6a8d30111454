"""How long a snapshot keeps the guest frozen: fcq against the bare calls.

fcq: ``VMAgent.snapshot`` (freeze guard process, freeze, snapshot of root
and tmp, thaw, a last status check); the guest is frozen from the freeze
request until the thaw answered (its result's freeze_ms + frozen_ms).
Bare: one guest agent session doing guest-fsfreeze-freeze, the same two
storage snapshots without fcq (``cp`` of the image files, or librbd's
create_snap), guest-fsfreeze-thaw. Pairs run interleaved (fcq, bare, ...).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.stats import Pairs, line, spread
from fcq_tasks.hazmat.guestagent import GuestAgent
from fcq_tasks.host.agent import VMAgent
from tests.conftest import Host
from tests.helpers import wait_guest


def _bare_storage(host: Host, vm: str, name: str) -> None:
    s = host.settings
    if s.storage == "local":
        for vol in ("root", "tmp"):
            src = s.volume_dir / f"{vm}.{vol}"
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src),
                            str(s.volume_dir / f".bare-{vm}.{vol}@{name}")], check=True)
        return
    import rados
    import rbd
    ceph = s.ceph
    assert ceph is not None
    with rados.Rados(conffile=str(ceph.conf), rados_id=ceph.client_id,
                     conf={"keyring": str(ceph.keyring)}) as conn, \
            conn.open_ioctx(ceph.pool) as ioctx:
        for vol in ("root", "tmp"):
            with rbd.Image(ioctx, f"{vm}.{vol}") as img:
                img.create_snap(f"bare-{name}")


def bench_snapshot(host: Host, pairs: int = 5) -> dict[str, Any]:
    vm = "snap01"
    host.write_vm(vm, memory=256, disk=2, kvm_host=host.name)
    agent = VMAgent(host.settings, vm)
    agent.start()
    wait_guest(agent)
    time.sleep(2)  # let the guest settle after boot
    fcq_ms, bare_ms, total_ms = [], [], []
    try:
        for i in range(pairs):
            t0 = time.monotonic()
            result = agent.snapshot(f"b{i}")
            total_ms.append((time.monotonic() - t0) * 1000)
            fcq_ms.append(float(result["freeze_ms"]) + float(result["frozen_ms"]))
            with GuestAgent(str(agent.paths.ga), 30, vm) as ga:
                ga.sync()
                t1 = time.monotonic()
                ga.freeze()
                _bare_storage(host, vm, f"b{i}")
                ga.thaw()
                bare_ms.append((time.monotonic() - t1) * 1000)
    finally:
        agent.kill()
    return {"fcq": fcq_ms, "bare": bare_ms, "total": total_ms}


def report(label: str, r: dict[str, Any]) -> list[str]:
    return [line(f"snapshot on {label}, guest frozen (freeze request → thaw answered; bare: "
                 "the agent calls and storage snapshots)",
                 Pairs([ms / 1000 for ms in r["fcq"]], [ms / 1000 for ms in r["bare"]]),
                 fmt=".1f"),
            f"      whole fcq snapshot call (guard start, checks, listing): "
            f"{spread([ms / 1000 for ms in r['total']], 1000)} ms"]
