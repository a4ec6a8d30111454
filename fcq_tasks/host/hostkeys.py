"""This host's key and record: made once, at set-up (``fcq --local keygen``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcq_tasks import trust
from fcq_tasks.config import peers
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.fileio import write_atomically


def keygen(settings: HostSettings, write_record: bool = False) -> dict[str, Any]:
    """Make host_key_file unless it exists (a key is never replaced), and give the record.

    The record (migration address, public key) belongs in
    ``<cluster.hosts_dir>/<host>.yaml`` on every host; *write_record* writes
    it there on this machine only.
    """
    path = settings.host_key_file
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = trust.generate_private_key(path)
    else:
        key = trust.load_private_key(path)
    address = peers.ip_text(settings.source, "migration_address", settings.migration_address)
    record = peers.record_text(address, trust.public_key_text(key))
    record_file = peers.record_path(settings.cluster.hosts_dir, settings.host)
    if write_record:
        record_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_atomically(record_file, record, mode=0o644)
    return {"host": settings.host, "key_file": str(path), "created": created,
            "record_file": str(record_file), "record": record, "written": write_record}


def orchestrator_keygen(path: Path) -> dict[str, Any]:
    """Make the orchestrator's signing key at *path* unless it exists; give its public half.

    Run on the orchestrator side, never on a hypervisor: the key signs
    every imperative request (cluster/grants.py).
    """
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = trust.generate_private_key(path)
    else:
        key = trust.load_private_key(path, "--orchestrator")
    return {"key_file": str(path), "created": created,
            "public_key": trust.public_key_text(key)}
