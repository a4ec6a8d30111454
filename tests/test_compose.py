"""docker-compose.yml, checked for what can be checked without a Docker engine.

No engine runs here, so the file is read, not run: every secret a service
names is defined, every fcq service has a settings file of its own role,
and no two workers share a directory, a settings file or a Redis user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def services() -> tuple[dict[str, Any], dict[str, Any]]:
    """(services, secrets) as the file defines them."""
    doc = yaml.safe_load(COMPOSE.read_text())
    return dict(doc["services"]), dict(doc["secrets"])


def test_every_secret_is_defined_and_every_service_has_its_settings() -> None:
    svcs, secrets = services()
    for name, svc in svcs.items():
        for ref in svc.get("secrets", []):
            source = ref["source"] if isinstance(ref, dict) else ref
            assert source in secrets, f"{name}: secret {source} is not defined"
        if name == "redis":
            continue
        settings = [v.split(":")[0] for v in svc.get("volumes", [])
                    if v.split(":")[1] == "/etc/fcq/host.yaml"]
        assert len(settings) == 1, f"{name}: no settings file of its own"
        assert any((r["target"] if isinstance(r, dict) else r) == "redis_password"
                   for r in svc.get("secrets", [])), f"{name}: no Redis password"


def test_workers_share_nothing_and_use_the_host_network() -> None:
    svcs, _ = services()
    workers = {n: s for n, s in svcs.items() if s.get("command", [None, None])[1] == "worker"}
    assert len(workers) == 2
    seen: dict[str, str] = {}
    for name, svc in workers.items():
        assert svc["network_mode"] == "host" and svc["pid"] == "host"
        own = [v.split(":")[0] for v in svc["volumes"] if not v.endswith(":ro")]
        own += [v.split(":")[0] for v in svc["volumes"] if v.endswith("/etc/fcq/host.yaml:ro")]
        own += [r["source"] for r in svc["secrets"] if isinstance(r, dict)]
        for thing in own:
            assert thing not in seen, f"{name} shares {thing} with {seen[thing]}"
            seen[thing] = name
