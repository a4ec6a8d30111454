"""Ceph settings: the ``ceph:`` section of a host's settings (``storage: rbd``).

The host talks to Ceph under its own cephx identity (``client.<client_id>``);
QEMU opens the VM's images under the same identity. The key stays in the
keyring file: never in the settings, task arguments or logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fcq_tasks.config import validate as v
from fcq_tasks.errors import ConfigError

#: A week: a stalled host that wakes up later than this could write again,
#: were it not also stopped by its own next sweep. Entries are cheap.
DEFAULT_BLOCKLIST_SECONDS = 7 * 86400

CEPH_KEYS = frozenset({"conf", "client_id", "keyring", "pool", "blocklist_seconds",
                       "op_timeout", "pool_limits", "host_watch_timeout"})
LIMIT_KEYS = frozenset({"iops", "bps"})


@dataclass(frozen=True)
class Limits:
    """I/O limits per volume; 0: unlimited."""

    iops: int = 0
    bps: int = 0        # bytes per second


@dataclass(frozen=True)
class CephSettings:
    conf: Path
    client_id: str
    keyring: Path
    pool: str                       # default pool of VMs without rbd_pool
    blocklist_seconds: int          # how long a fenced client stays blocklisted
    op_timeout: float               # s: one monitor or OSD operation of fcq's own client
    pool_limits: dict[str, Limits]  # per pool: the default limits of its VMs' volumes
    #: s the worker's watch on fcq.host.<host> outlives the worker's silence
    #: (storage/hostwatch.py): must exceed cluster.registry_ttl.
    host_watch_timeout: int = 90

    def limits_for(self, pool: str) -> Limits:
        return self.pool_limits.get(pool, Limits())


#: What separates options in QEMU's ``rbd:pool/image:conf=…:keyring=…`` drive
#: string (``:``, and ``,`` between -drive options) or names a snapshot (``@``).
DRIVE_STRING_SEPARATORS = frozenset(":,@")


def _drive_path(f: str, field: str, value: object) -> Path:
    """An absolute path that can be pasted into QEMU's rbd: drive string unchanged."""
    path = v.check_abs_path(f, field, value)
    bad = sorted(DRIVE_STRING_SEPARATORS & set(path))
    if bad:
        raise ConfigError(f, field, f"must not contain {' '.join(repr(c) for c in bad)}: "
                          f"QEMU's rbd: drive string separates its options with them "
                          f"(got {path!r})")
    return Path(path)


def parse_ceph_settings(f: str, value: object, host: str) -> CephSettings:
    m = v.check_mapping(f, "ceph", {} if value is None else value)
    bad = v.unknown_keys(m, CEPH_KEYS, "ceph")
    if bad:
        raise ConfigError(f, bad[0], "unknown key; known: " + ", ".join(sorted(CEPH_KEYS)))
    client_id = v.check_name(f, "ceph.client_id", m.get("client_id", host))
    keyring = m.get("keyring", f"/etc/ceph/ceph.client.{client_id}.keyring")
    limits_raw = v.check_mapping(f, "ceph.pool_limits", m.get("pool_limits", {}))
    pool_limits = {}
    for pool, raw in limits_raw.items():
        name = v.check_pool(f, "ceph.pool_limits", pool)
        lm = v.check_mapping(f, f"ceph.pool_limits.{name}", raw)
        bad = v.unknown_keys(lm, LIMIT_KEYS, f"ceph.pool_limits.{name}")
        if bad:
            raise ConfigError(f, bad[0], "unknown key; known: bps, iops")
        pool_limits[name] = Limits(
            iops=v.check_int(f, f"ceph.pool_limits.{name}.iops", lm.get("iops", 0), 0, 10**7),
            bps=v.check_int(f, f"ceph.pool_limits.{name}.bps", lm.get("bps", 0), 0, 10**12))
    return CephSettings(
        conf=_drive_path(f, "ceph.conf", m.get("conf", "/etc/ceph/ceph.conf")),
        client_id=client_id,
        keyring=_drive_path(f, "ceph.keyring", keyring),
        pool=v.check_pool(f, "ceph.pool", m.get("pool", "rbd")),
        blocklist_seconds=v.check_int(f, "ceph.blocklist_seconds",
                                      m.get("blocklist_seconds", DEFAULT_BLOCKLIST_SECONDS),
                                      60, 10 * 365 * 86400),
        op_timeout=v.check_number(f, "ceph.op_timeout", m.get("op_timeout", 30), 1, 3600),
        pool_limits=pool_limits,
        host_watch_timeout=v.check_int(f, "ceph.host_watch_timeout",
                                       m.get("host_watch_timeout", 90), 5, 3600),
    )
