"""What signed commands cost: the orchestrator's grant and the host's check, per task.

Measured in one process, interleaved (bench/stats.py): the orchestrator's
side (``Orchestrator.signed``: expiry, digest, Ed25519 signature) against
building the same kwargs unsigned, and the host's side (``grants.check``
plus remembering the id as spent, as a worker does for each request)
against what it did before for the same request (an expiry check only).
Both are reported in microseconds per task; a start or a migration takes
tens to hundreds of milliseconds (bench/lifecycle.py, bench/migrate.py),
so the ratio that matters is µs against those.

    python -m bench.grants [N]     (default 2000 tasks per sample)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import interleave, spread  # noqa: E402
from fcq_tasks import trust  # noqa: E402
from fcq_tasks.cluster import grants  # noqa: E402
from fcq_tasks.cluster.api import Orchestrator  # noqa: E402
from fcq_tasks.cluster.tasks import check_expiry  # noqa: E402
from tests.conftest import new_host  # noqa: E402

PAIRS = 7


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    base = Path(tempfile.mkdtemp(prefix="fcqb-grants-"))
    key_file = base / "orchestrator.key"
    key = trust.generate_private_key(key_file)
    host = new_host("alpha", prefix="fcqb-", cluster={
        "orchestrator_keys": [trust.public_key_text(key)],
        "orchestrator_key_file": str(key_file), "hosts_dir": str(base / "hosts")})
    orch = Orchestrator(host.settings)
    kwargs = {"vm": "vm01", "host": "alpha"}
    try:
        def sign() -> float:
            t = time.perf_counter()
            for _ in range(n):
                orch.signed("fcq.start", "alpha", kwargs)
            return (time.perf_counter() - t) / n

        def unsigned() -> float:
            t = time.perf_counter()
            for _ in range(n):
                # What the orchestrator did before: an id and an expiry.
                str(uuid.uuid4())
                dict(kwargs, expires_at=time.time() + 900)
            return (time.perf_counter() - t) / n

        requests = [orch.signed("fcq.start", "alpha", kwargs) for _ in range(n)]

        def verify() -> float:
            t = time.perf_counter()
            for task_id, signed in requests:
                grants.check(host.settings, "fcq.start", task_id, signed)
                check_expiry("vm01", "start", signed["expires_at"])
                grants.mark_spent(host.settings, task_id, signed["expires_at"])
            spent = host.settings.state_dir / "grants"
            shutil.rmtree(spent)  # the next sample's ids are fresh again
            return (time.perf_counter() - t) / n

        def expiry_only() -> float:
            t = time.perf_counter()
            for _, signed in requests:
                check_expiry("vm01", "start", signed["expires_at"])
            return (time.perf_counter() - t) / n

        orchestrator = interleave(sign, unsigned, PAIRS)
        worker = interleave(verify, expiry_only, PAIRS)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(host.base, ignore_errors=True)
    for label, pairs in (("orchestrator: grant a request", orchestrator),
                         ("host: verify a grant, remember its id", worker)):
        print(f"{label}: {spread(pairs.fcq, 1e6)} µs per task, before "
              f"{spread(pairs.bare, 1e6, '.1f')} µs: +{spread(pairs.gaps, 1e6)} µs "
              f"({len(pairs.fcq)} pairs, median [low-high])")


if __name__ == "__main__":
    main()
