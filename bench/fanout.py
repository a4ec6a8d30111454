"""Fan-out: how long beat takes to enqueue one sweep for every live host.

Simulated hosts: heartbeat records in a real Redis, written as workers
write them, with no worker behind them (what is measured is beat's side:
reading the registry and sending ``fcq.ensure_host`` to each host's
queue). fcq's beat scheduler (fcq_beat) is driven tick by tick in this
process, as ``celery beat`` drives it, from the moment the sweeps are due
until a tick finds nothing due; only the ticks are timed (counting the
queues afterwards is not beat's work). The bare counterpart sends the same
messages with Celery's own ``send_task`` in a loop. The two alternate
(bench/stats.py), PAIRS pairs per size; the target is a fan-out under
LIMIT seconds.

    python -m bench.fanout [HOSTS...]      (default 100 1000)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import interleave, line  # noqa: E402
from fcq_beat.scheduler import SweepScheduler  # noqa: E402
from fcq_tasks.cluster.celeryapp import configure, host_queue  # noqa: E402
from tests.cluster import RedisServer, cluster_settings  # noqa: E402
from tests.conftest import new_host  # noqa: E402

INTERVAL = 60
PAIRS = 5
#: Seconds: the target for one fan-out (the Speed issue: 1,000 hosts under 1 s).
LIMIT = 1.0


def simulate_hosts(client: Any, n: int) -> list[str]:
    names = [f"sim{i:05d}" for i in range(n)]
    pipe = client.pipeline()
    for name in names:
        pipe.set(f"fcq:host:{name}", json.dumps({
            "host": name, "queue": host_queue(name), "seen": time.time(), "booked_mb": 0,
            "limit_mb": 65536, "running": [], "vms": {}, "qemu_generation": 0,
            "generations": {}, "drained": None, "max_migrations": 1, "storage": "rbd"}),
            ex=3600)
    pipe.execute()
    return names


def queued(client: Any, names: list[str]) -> int:
    """How many of *names* have at least one message in their queue."""
    pipe = client.pipeline()
    for name in names:
        pipe.llen(host_queue(name))
    return sum(1 for n in pipe.execute() if n)


def clear(client: Any, names: list[str]) -> None:
    client.delete(*[host_queue(n) for n in names])


def bench_fanout(n: int) -> dict[str, Any]:
    redis = RedisServer()
    redis.start()
    try:
        host = new_host("beat", prefix="fcqb-", log_level="warning",
                        cluster=cluster_settings(redis, sweep_interval=INTERVAL,
                                                 visibility_timeout=3600))
        app = configure(host.settings)
        app.conf.fcq_settings = host.settings
        client = redis.client()
        names = simulate_hosts(client, n)
        sched = SweepScheduler(app=app, lazy=False)
        t0 = time.perf_counter()
        sched.refresh()  # what beat does at start: the registry, the new queues
        started = time.perf_counter() - t0

        def fan_out() -> float:
            # Every entry due now, as one interval later: the clock is moved,
            # not slept through (a fan-out slower than a short interval would
            # be due again while it runs), and Celery's heap, which holds each
            # entry's time, is rebuilt outside the timing.
            for entry in sched.schedule.values():
                assert entry.last_run_at is not None
                entry.last_run_at -= timedelta(seconds=INTERVAL)
            sched.populate_heap()
            spent = 0.0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                t = time.perf_counter()
                delay = sched.tick()
                spent += time.perf_counter() - t
                if delay > 0 and queued(client, names) == n:
                    break
            assert queued(client, names) == n, "beat did not reach every host"
            clear(client, names)
            return spent

        def loop() -> float:
            t = time.perf_counter()
            for name in names:
                app.send_task("fcq.ensure_host", kwargs={"host": name}, queue=host_queue(name),
                              expires=float(INTERVAL), ignore_result=True)
            spent = time.perf_counter() - t
            assert queued(client, names) == n
            clear(client, names)
            return spent

        first = fan_out()
        loop()  # its queues declared, like beat's at start
        pairs = interleave(fan_out, loop, PAIRS)
        sched.close()
        return {"hosts": n, "started": started, "first": first, "pairs": pairs}
    finally:
        redis.stop()


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [100, 1000]
    if len(sizes) > 1:
        # One process per size: Celery's app caches its broker connections,
        # and each size gets a Redis of its own.
        for n in sizes:
            subprocess.run([sys.executable, "-m", "bench.fanout", str(n)], cwd=ROOT, check=True)
        return
    for n in sizes:
        r = bench_fanout(n)
        print(line(f"fan-out to {n} hosts (fcq: beat's ticks; bare: send_task in a loop)",
                   r["pairs"], unit="s", scale=1.0, fmt=".3f", abs_limit=LIMIT), flush=True)
        print(f"      beat's start (registry read, {n} queues declared): {r['started']:.3f} s;"
              f" its first fan-out: {r['first']:.3f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
