"""Host settings: one YAML file on top of built-in defaults.

The defaults below are the single place where a default lives (fc.qemu's
default.conf lesson). ``load_host_settings`` reads the operator's file, checks
every key, and returns a frozen :class:`HostSettings` that is passed
explicitly to everything that needs it.
"""

from __future__ import annotations

import os
import re
import socket
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcq_tasks.config import validate as v
from fcq_tasks.config.cephsettings import CephSettings, parse_ceph_settings
from fcq_tasks.config.clustersettings import ClusterSettings, parse_cluster_settings
from fcq_tasks.errors import ConfigError

#: Where the operator's file lives unless ``--config`` or ``FCQ_CONFIG`` say otherwise.
DEFAULT_SETTINGS_FILE = "/etc/fcq/host.yaml"

#: Memory kept back for the host itself when vm_max_total_memory is "auto".
HOST_RESERVED_MB = 2048

ADDRESS_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9.-]{0,252}\Z")

#: Longest run directory: 107 bytes of socket path - "/" - 63-char name - ".qmp.sock".
RUN_DIR_MAX = 107 - 1 - 63 - len(".qmp.sock")

DEFAULT_CREATE_VM = ("qemu-img", "create", "-q", "-f", "raw", "{path}", "{size}")
#: The rbd backend's default: an empty image (production puts an OS image's
#: clone here). Only layering: fcq's advisory locks must not meet librbd's
#: exclusive-lock feature, with which writes hang until the lock is free.
DEFAULT_CREATE_VM_RBD = ("rbd", "--conf", "{conf}", "--id", "{client_id}", "--keyring",
                         "{keyring}", "create", "--image-feature", "layering", "--size",
                         "{size_mib}", "{pool}/{image}")

DEFAULTS: dict[str, Any] = {
    "host": None,                       # short host name from the OS
    "vm_config_dir": "/etc/qemu/vm",
    "run_dir": "/run/fcq",
    "state_dir": "/var/lib/fcq",
    "log_file": "/var/log/fcq/fcq.log",
    "log_level": "info",
    "storage": "local",
    "qemu_binary": "qemu-system-x86_64",
    # Each QEMU in a cgroup of its own (hazmat/scope.py): auto, systemd,
    # cgroupfs or none. Never the worker's, or a restart of its service
    # powers off every guest.
    "qemu_scope": "auto",
    "accelerator": "auto",
    "vm_max_total_memory": "auto",
    "shutdown_grace": 60.0,
    "qmp_timeout": 5.0,
    "start_timeout": 30.0,
    "kill_silent_after": 120.0,
    "fence_check_interval": 5.0,        # s between the fence watch's looks (RBD); 0: off
    "guest_agent_timeout": 10.0,
    "freeze_timeout": 120.0,
    "thaw_timeout": 30.0,
    "snapshot_timeout": 300.0,
    "qemu_generation": 0,
    "upgrade_on_ensure": False,
    "operation_wait": 0.0,
    "template": None,                   # built-in fcq_tasks/hazmat/qemu.cfg.j2
    "create_vm": None,                  # DEFAULT_CREATE_VM or DEFAULT_CREATE_VM_RBD
    "nic_mode": "tap",
    "direct_boot": None,
    "migration_address": "127.0.0.1",
    "host_key_file": "/etc/fcq/host.key",   # Ed25519, 0600: signs what this host publishes
    "migration_downtime_ms": 300,
    "migration_bandwidth_mbps": 0,
    "migration_timeout_per_gib": 120.0,
    "migration_timeout_max": 1500.0,
    "migration_heartbeat_ttl": 10.0,
    "migration_peer_grace": 60.0,
    "max_migrations": 1,
    "sweep_concurrency": 4,
    "metrics_address": "127.0.0.1",     # the worker's /metrics (docs/operations.md)
    # 9741/9742: outside the ports of the common exporters (9100 node, 9187
    # postgres_exporter, ...), so a hypervisor already monitored does not clash.
    "metrics_port": 9741,               # 0: no endpoint
    "metrics_auth_file": None,          # user:password lines, 0600; required beyond loopback
    "cluster": None,                    # see clustersettings.CLUSTER_DEFAULTS
    "ceph": None,                       # see cephsettings (storage: rbd)
}

CREATE_VM_PLACEHOLDERS = {
    "local": frozenset({"name", "path", "size", "size_bytes", "size_mib", "volume"}),
    "rbd": frozenset({"name", "pool", "image", "size", "size_bytes", "size_mib", "volume",
                      "conf", "client_id", "keyring"}),
}


@dataclass(frozen=True)
class DirectBoot:
    """A kernel booted by QEMU itself instead of firmware (development, tests)."""

    kernel: str
    initrd: str
    append: str


@dataclass(frozen=True)
class HostSettings:
    host: str
    vm_config_dir: Path
    run_dir: Path
    state_dir: Path
    log_file: Path | None
    log_level: str
    storage: str
    qemu_binary: str
    accelerator: str
    vm_max_total_memory: int            # MB
    shutdown_grace: float               # s: ACPI power-off until "quit"
    qmp_timeout: float                  # s: one QMP connect or command
    start_timeout: float                # s: QEMU start until QMP answers
    kill_silent_after: float            # s: a silent monitor until ensure kills QEMU
    guest_agent_timeout: float          # s: one guest agent exchange
    operation_wait: float               # s: how long a busy VM is waited for
    template: Path | None
    create_vm: tuple[str, ...]
    nic_mode: str
    direct_boot: DirectBoot | None = None
    migration_address: str = "127.0.0.1"    # where this host listens for incoming migrations
    migration_downtime_ms: int = 300        # QEMU's downtime-limit
    migration_bandwidth_mbps: int = 0       # 0: unlimited
    migration_timeout_per_gib: float = 120.0  # s per GiB of guest memory (at least one GiB)
    migration_timeout_max: float = 1500.0   # s: no attempt takes longer, whatever its size
    migration_heartbeat_ttl: float = 10.0   # s: a half silent this long counts as gone
    migration_peer_grace: float = 60.0      # s: the other half has this long to show up
    max_migrations: int = 1                 # in or out, at once, on this host
    sweep_concurrency: int = 4              # VMs a sweep looks at side by side
    freeze_timeout: float = 120.0           # s: guest-fsfreeze-freeze may take (flushes)
    thaw_timeout: float = 30.0              # s: guest-fsfreeze-thaw may take
    snapshot_timeout: float = 300.0         # s: the storage snapshot may keep a guest frozen
    qemu_generation: int = 0                # generation of the installed QEMU binary
    qemu_scope: str = "auto"                # where QEMU's cgroup is (hazmat/scope.py)
    upgrade_on_ensure: bool = False         # ensure moves VMs of older generations to it
    metrics_address: str = "127.0.0.1"      # where the worker serves /metrics
    metrics_port: int = 9741                # 0: no endpoint
    host_key_file: Path = Path("/etc/fcq/host.key")  # this host's Ed25519 key (trust.py)
    fence_check_interval: float = 5.0   # s: the worker's fence watch (host/fencewatch.py)
    metrics_auth_file: Path | None = None   # basic auth credentials (user:password, 0600)
    cluster: ClusterSettings = field(
        default_factory=lambda: parse_cluster_settings("<defaults>", None))
    ceph: CephSettings | None = None        # with storage: rbd
    source: str = field(default="<defaults>", compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def volume_dir(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def lock_dir(self) -> Path:
        return self.state_dir / "locks"


def load_host_settings(path: str | os.PathLike[str] | None = None) -> HostSettings:
    """Read host settings from *path* (or the defaults alone when it is None)."""
    raw: dict[str, Any] = dict(DEFAULTS)
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(source, "(file)", f"cannot be read: {err.strerror}") from err
        data = v.parse_yaml(source, text)
        if data is not None:
            raw.update(v.check_mapping(source, "(top level)", data))
    return parse_host_settings(raw, source)


def parse_host_settings(raw: dict[str, Any], source: str) -> HostSettings:
    """Frozen settings from *raw*; every broken setting is reported, not only the first."""
    f = source
    warnings = tuple(f"{f}: {k}: unknown setting, ignored"
                     for k in v.unknown_keys(raw, frozenset(DEFAULTS), ""))
    host = raw["host"] if raw["host"] is not None else socket.gethostname().split(".")[0]
    log_file = raw["log_file"]
    template = raw["template"]
    m = v.Mistakes()
    # Other settings depend on these two: a broken one is reported, and the
    # rest is checked as if it had its default.
    storage = m.check(lambda: v.check_choice(f, "storage", raw["storage"], ("local", "rbd")))
    name = m.check(lambda: v.check_name(f, "host", host))
    if storage != "rbd" and raw["ceph"] is not None:
        m.check(lambda: _fail(ConfigError(f, "ceph", "is only used with storage: rbd")))
    storage = storage or "local"

    def num(key: str, lo: float, hi: float) -> float:
        return m.check(lambda: v.check_number(f, key, raw[key], lo, hi))

    def whole(key: str, lo: int, hi: int) -> int:
        return m.check(lambda: v.check_int(f, key, raw[key], lo, hi))

    def path(key: str) -> Path:
        return m.check(lambda: Path(v.check_abs_path(f, key, raw[key])))

    values: dict[str, Any] = {
        "host": name,
        "vm_config_dir": path("vm_config_dir"),
        "run_dir": m.check(lambda: _run_dir(f, raw["run_dir"])),
        "state_dir": path("state_dir"),
        "log_file": None if log_file is None else path("log_file"),
        "log_level": m.check(lambda: v.check_choice(f, "log_level", raw["log_level"],
                                                    ("debug", "info", "warning", "error"))),
        "storage": storage,
        "qemu_binary": m.check(lambda: v.check_str(f, "qemu_binary", raw["qemu_binary"])),
        "qemu_scope": m.check(lambda: v.check_choice(f, "qemu_scope", raw["qemu_scope"],
                                                     ("auto", "systemd", "cgroupfs", "none"))),
        "accelerator": m.check(lambda: v.check_choice(f, "accelerator", raw["accelerator"],
                                                      ("auto", "kvm", "tcg"))),
        "vm_max_total_memory": m.check(lambda: _memory_limit(f, raw["vm_max_total_memory"])),
        "shutdown_grace": num("shutdown_grace", 0, 3600),
        "qmp_timeout": num("qmp_timeout", 0.1, 600),
        "start_timeout": num("start_timeout", 1, 600),
        "kill_silent_after": num("kill_silent_after", 0, 86400),
        "fence_check_interval": num("fence_check_interval", 0, 3600),
        "guest_agent_timeout": num("guest_agent_timeout", 0.1, 600),
        "operation_wait": num("operation_wait", 0, 3600),
        "template": None if template is None else path("template"),
        "create_vm": m.check(lambda: _create_vm(f, raw["create_vm"], storage)),
        "nic_mode": m.check(lambda: v.check_choice(f, "nic_mode", raw["nic_mode"],
                                                   ("tap", "user", "none"))),
        "direct_boot": m.check(lambda: _direct_boot(f, raw["direct_boot"])),
        "migration_address": m.check(lambda: v.check_str(
            f, "migration_address", raw["migration_address"], ADDRESS_RE,
            "must be an IPv4 address or a host name")),
        "host_key_file": path("host_key_file"),
        "migration_downtime_ms": whole("migration_downtime_ms", 1, 60000),
        "migration_bandwidth_mbps": whole("migration_bandwidth_mbps", 0, 10**6),
        "migration_timeout_per_gib": num("migration_timeout_per_gib", 1, 86400),
        "migration_timeout_max": num("migration_timeout_max", 1, 86400),
        "migration_heartbeat_ttl": num("migration_heartbeat_ttl", 1, 600),
        "migration_peer_grace": num("migration_peer_grace", 1, 3600),
        "max_migrations": whole("max_migrations", 1, 64),
        "sweep_concurrency": whole("sweep_concurrency", 1, 64),
        "freeze_timeout": num("freeze_timeout", 0.01, 3600),
        "thaw_timeout": num("thaw_timeout", 1, 600),
        "snapshot_timeout": num("snapshot_timeout", 1, 3600),
        "qemu_generation": whole("qemu_generation", 0, 2**31),
        "upgrade_on_ensure": m.check(lambda: v.check_bool(f, "upgrade_on_ensure",
                                                          raw["upgrade_on_ensure"])),
        **_metrics(m, f, raw),
        "cluster": m.check(lambda: parse_cluster_settings(f, raw["cluster"])),
        "ceph": m.check(lambda: parse_ceph_settings(f, raw["ceph"], name or "host"))
        if storage == "rbd" else None,
        "source": source,
        "warnings": warnings,
    }
    m.raise_if_any()
    settings = HostSettings(**values)
    _check_migration_fits(f, settings)
    if settings.ceph is not None and \
            settings.ceph.host_watch_timeout <= settings.cluster.registry_ttl:
        raise ConfigError(f, "ceph.host_watch_timeout",
                          f"must be longer than cluster.registry_ttl "
                          f"({settings.cluster.registry_ttl} s): the storage side's sign of "
                          "a host's life must outlast its heartbeat (docs/ceph.md, Margins)")
    return settings


def _metrics(m: v.Mistakes, f: str, raw: dict[str, Any]) -> dict[str, Any]:
    checked = m.check(lambda: v.check_endpoint(f, "", raw["metrics_address"],
                                               raw["metrics_port"], raw["metrics_auth_file"]))
    if checked is None:  # reported; the rest is checked on
        return {}
    address, port, auth = checked
    return {"metrics_address": address, "metrics_port": port,
            "metrics_auth_file": None if auth is None else Path(auth)}


def _fail(err: ConfigError) -> None:
    raise err


def _check_migration_fits(f: str, s: HostSettings) -> None:
    # A migration half is an acks_late task: one that runs longer than the
    # broker's visibility timeout is delivered a second time while it runs.
    # fcq ignores such a duplicate, but the broker no longer waits for the
    # first one to be acknowledged, so a worker dying after that loses the
    # half's redelivery. Refuse settings that allow it.
    longest = s.migration_timeout_max + s.migration_peer_grace
    if longest >= s.cluster.visibility_timeout:
        raise ConfigError(f, "migration_timeout_max",
                          f"migration_timeout_max + migration_peer_grace ({longest:.0f} s) must "
                          "be shorter than cluster.visibility_timeout "
                          f"({s.cluster.visibility_timeout} s): a half that outlives it is "
                          "delivered again while it runs")
    if s.migration_heartbeat_ttl * 2 > s.migration_peer_grace:
        raise ConfigError(f, "migration_peer_grace",
                          f"must be at least twice migration_heartbeat_ttl "
                          f"({s.migration_heartbeat_ttl:.0f} s)")


def _run_dir(f: str, value: object) -> Path:
    path = v.check_abs_path(f, "run_dir", value)
    # QMP and agent sockets live here: <run_dir>/<63-char name>.qmp.sock must
    # fit the 107 bytes a unix socket path may have.
    if len(path.rstrip("/")) > RUN_DIR_MAX:
        raise ConfigError(f, "run_dir", f"must be at most {RUN_DIR_MAX} characters long: "
                          f"unix socket paths are limited to 107 bytes (got {len(path)})")
    return Path(path)


def _memory_limit(f: str, value: object) -> int:
    if value == "auto":
        # What psutil.virtual_memory().total reads, without importing psutil
        # into every fcq command (~30 ms).
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        return max(0, total_mb - HOST_RESERVED_MB)
    return v.check_int(f, "vm_max_total_memory", value, 0, 2**30)


def _create_vm(f: str, value: object, storage: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_CREATE_VM_RBD if storage == "rbd" else DEFAULT_CREATE_VM
    # An argv list, never a shell string: placeholders are filled per
    # argument, so a VM name can never become shell syntax.
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(f, "create_vm",
                          "must be a non-empty list of strings (an argv, not a shell line)")
    for arg in value:
        for _, name, _, _ in string.Formatter().parse(arg):
            known = CREATE_VM_PLACEHOLDERS[storage]
            if name is not None and name not in known:
                raise ConfigError(f, "create_vm", f"unknown placeholder {{{name}}} for "
                                  f"storage {storage}; known: " + ", ".join(sorted(known)))
    return tuple(value)


def _direct_boot(f: str, value: object) -> DirectBoot | None:
    if value is None:
        return None
    m = v.check_mapping(f, "direct_boot", value)
    bad = v.unknown_keys(m, frozenset({"kernel", "initrd", "append"}), "direct_boot")
    if bad:
        raise ConfigError(f, bad[0], "unknown key; known: kernel, initrd, append")
    append = m.get("append", "")
    if not isinstance(append, str) or "\n" in append or '"' in append:
        raise ConfigError(f, "direct_boot.append", "must be one line without double quotes")
    return DirectBoot(kernel=v.check_abs_path(f, "direct_boot.kernel", m.get("kernel")),
                      initrd=v.check_abs_path(f, "direct_boot.initrd", m.get("initrd")),
                      append=append)
