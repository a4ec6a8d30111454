"""Fan-out: how long beat takes to enqueue one sweep for every live host.

Simulated hosts: heartbeat records in a real Redis, written as workers
write them, with no worker behind them (what is measured is beat's side:
reading the registry and sending ``fcq.ensure_host`` to each host's
queue). fcq's beat scheduler (fcq_beat) is driven tick by tick in this
process, as ``celery beat`` drives it, from the moment the sweeps are due
until every host's queue holds its sweep. The bare counterpart sends the
same messages with Celery's own ``send_task`` in a loop.

    python -m bench.fanout [HOSTS...]      (default 100 1000)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcq_beat.scheduler import SweepScheduler  # noqa: E402
from fcq_tasks.cluster.celeryapp import configure, host_queue  # noqa: E402
from tests.cluster import RedisServer, cluster_settings  # noqa: E402
from tests.conftest import new_host  # noqa: E402

INTERVAL = 2


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


def bench_fanout(n: int) -> dict[str, float]:
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
        sched.refresh()
        rounds = []
        for _ in range(2):  # the first after beat started, then one as every later one
            time.sleep(INTERVAL + 0.1)  # every entry is due now
            t0 = time.perf_counter()
            deadline = t0 + 120
            ticks = 0
            while time.perf_counter() < deadline:
                sched.tick()
                ticks += 1
                # Counting is not beat's work: looked at every 50 ticks only.
                if ticks % 50 == 0 and queued(client, names) == n:
                    break
            rounds.append(time.perf_counter() - t0)
            done = queued(client, names)
            clear(client, names)
        sched.close()
        clear(client, names)
        # The same sends in a loop, after a first loop (its queues declared,
        # like the second round of beat's).
        bare = []
        for _ in range(2):
            t0 = time.perf_counter()
            for name in names:
                app.send_task("fcq.ensure_host", kwargs={"host": name}, queue=host_queue(name),
                              expires=float(INTERVAL), ignore_result=True)
            bare.append(time.perf_counter() - t0)
            assert queued(client, names) == n
            clear(client, names)
        return {"hosts": n, "beat_first": rounds[0], "beat_s": rounds[1], "bare_s": bare[1],
                "reached": done}
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
        print(f"  fan-out to {n} hosts: beat enqueued a sweep for {r['reached']:.0f} of them "
              f"in {r['beat_s']:.2f} s vs {r['bare_s']:.2f} s for the same sends in a loop "
              f"(ratio {r['beat_s'] / r['bare_s']:.1f}x; the first fan-out after beat "
              f"started, queues declared: {r['beat_first']:.2f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
