"""The stock Celery command line: ``celery -A fcq_tasks worker|inspect|beat|flower``.

Real processes, as a Celery user would type them, with only FCQ_CONFIG set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster import Cluster, Service, free_port
from tests.helpers import scrape_until, series, value, wait_for

ClusterFactory = Any


def celery(c: Cluster, *args: str, host: str = "alpha") -> Service:
    """Start `celery -A fcq_tasks ARGS` for *host* (stopped with the cluster)."""
    log = c.hosts[host].base / f"celery-{len(c.services)}.log"
    env = {**os.environ, "FCQ_CONFIG": str(c.settings_file(host))}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "fcq_tasks", *args],
                                env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    service = Service(f"celery {args[0]}@{host}", proc, log)
    c.services.append(service)
    return service


def celery_run(c: Cluster, *args: str, host: str = "alpha") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FCQ_CONFIG": str(c.settings_file(host))}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "fcq_tasks", *args], env=env,
                          text=True, capture_output=True, timeout=60, check=False)


def test_stock_celery_worker_inspect_and_beat(make_cluster: ClusterFactory) -> None:
    c: Cluster = make_cluster(("alpha",), sweep_interval=2)
    alpha = c.hosts["alpha"]
    alpha.write_vm("vm01")
    worker = celery(c, "worker", "--loglevel", "INFO")
    c.wait_registered("alpha")  # fcq's heartbeat runs in the stock worker too
    orch = c.orchestrator()
    result = orch.wait(orch.submit("start", "vm01"), timeout=120)
    assert result["status"] == "running" and result["host"] == "alpha"
    # The stock worker serves fcq's metrics too, with the start counted.
    # Polled: Celery stores the result before task_postrun, where it is counted.
    counted = scrape_until(alpha.settings.metrics_port, {series(
        "fcq_operation_duration_seconds_count", host="alpha", operation="start",
        result="success", outcome="changed"): 1})
    assert value(counted, "fcq_operation_duration_seconds_count", host="alpha",
                 operation="start", result="success", outcome="changed") == 1
    # It consumes this host's queue, not Celery's default one.
    log = worker.log.read_text()
    assert "host.alpha" in log and "fcq.ping" in log, log[-2000:]
    # Celery's remote control is off on hosts (docs/security.md): inspect
    # reaches nobody, and fcq's own ping answers.
    ping = celery_run(c, "inspect", "ping", "--timeout", "3")
    assert ping.returncode != 0 and "No nodes replied" in ping.stderr, ping
    assert orch.wait(orch.ping("alpha"), timeout=30)["host"] == "alpha"
    # Beat from the stock command: fcq's sweep scheduler, sweeps reach the worker.
    celery(c, "beat", "--loglevel", "INFO")
    sweep_log = alpha.base / "fcq.log"
    wait_for(lambda: '"sweep-done"' in sweep_log.read_text(), 60, "a sweep sent by stock beat")


def test_stock_celery_worker_refuses_a_readable_metrics_secret(
        make_cluster: ClusterFactory) -> None:
    """The stock worker's init hook exits 2 with the reason, not a worker without metrics."""
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    loose = alpha.base / "metrics.auth"
    loose.write_text("prom:x\n")
    loose.chmod(0o644)
    alpha.update_settings(metrics_auth_file=str(loose))
    refused = celery_run(c, "worker", "--loglevel", "INFO")
    assert refused.returncode == 2, refused
    assert "metrics_auth_file" in refused.stderr and "mode 0644" in refused.stderr, refused


def test_stock_celery_flower_needs_the_password(make_cluster: ClusterFactory,
                                                tmp_path: Path) -> None:
    port = free_port()
    c: Cluster = make_cluster(("alpha",))
    alpha = c.hosts["alpha"]
    auth = alpha.base / "flower.auth"
    auth.write_text("ops:secret-flower\n")
    auth.chmod(0o600)
    import yaml
    raw = yaml.safe_load(alpha.settings_file.read_text())
    raw["cluster"] = {**raw["cluster"], "flower_auth_file": str(auth)}
    alpha.settings_file.write_text(yaml.safe_dump(raw))
    flower = celery(c, "flower", f"--port={port}", "--address=127.0.0.1")

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError):
            return 0
    wait_for(lambda: status(f"http://127.0.0.1:{port}/api/workers") == 401, 60,
             "stock Flower to answer, asking for the password")
    # Its metrics and health check are behind the same password.
    assert status(f"http://127.0.0.1:{port}/metrics") == 401
    assert status(f"http://127.0.0.1:{port}/healthcheck") == 401
    args = flower.proc.args
    assert isinstance(args, list) and "secret-flower" not in " ".join(map(str, args))
