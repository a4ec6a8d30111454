"""Per-VM desired state: one YAML file per VM, parsed into a frozen VMSpec.

The file format is fc.qemu's seed format (``name`` plus ``parameters``).
Every field is checked; broken ones raise :class:`ConfigError` (one) or
:class:`ConfigErrors` (several, all of them) naming the file, each field
and its rule. Keys fcq does not know are kept as
warnings (inventory systems write more keys than a hypervisor needs), and
``fcq config check --strict`` turns them into errors.

The optional top-level ``version`` (a whole number, absent = 0) orders the
pushes of one VM's file (``fcq apply-config``): a host keeps its file when a
push has a lower version. It is written into the file, so it survives
copies and checkouts, unlike a modification time; fcq's own rewrites of a
file (:func:`rewrite_vm_parameters`) keep it.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fcq_tasks.config import validate as v
from fcq_tasks.errors import ConfigError, UnknownVM
from fcq_tasks.fileio import write_atomically

GiB = 2**30
MiB = 2**20

NET_RE = re.compile(r"^[a-z][a-z0-9]{0,7}\Z")
NET_RULE = "network names are 1-8 characters of a-z and 0-9, starting with a letter"

KNOWN_TOP = frozenset({"name", "version", "parameters"})
KNOWN_PARAMETERS = frozenset({
    "id", "resource_group", "online", "kvm_host", "disk", "memory", "cores", "nics",
    "rbd_pool", "iops", "bps", "snapshot_keep", "snapshot_keep_days",
})

#: The largest ``version``: YAML integers are unbounded; an inventory's
#: counter, or even a timestamp in nanoseconds, fits comfortably.
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class Nic:
    net: str
    mac: str


@dataclass(frozen=True)
class VMSpec:
    name: str
    id: int
    resource_group: str
    online: bool
    kvm_host: str | None
    disk_gib: int
    memory_mb: int
    cores: int
    nics: tuple[Nic, ...]
    rbd_pool: str | None = None
    # I/O limits per volume; None: the pool's default (host settings), 0: none.
    iops: int | None = None
    bps: int | None = None              # bytes per second
    # Retention of the snapshots fcq names itself (auto-…); None: kept until removed.
    snapshot_keep: int | None = None    # the newest N
    snapshot_keep_days: float | None = None  # those younger than D days
    # Orders pushes of this file; not part of the desired state itself.
    version: int = field(default=0, compare=False)
    source: str = field(default="<memory>", compare=False)
    mtime: float = field(default=0.0, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def disk_bytes(self) -> int:
        return self.disk_gib * GiB

    @property
    def swap_bytes(self) -> int:
        """Swap grows with memory only up to 2 GiB: big VMs don't need huge swap."""
        return min(max(self.memory_mb * MiB, 256 * MiB), 2 * GiB)

    @property
    def tmp_bytes(self) -> int:
        """tmp is a quarter of the root disk, at least 1 GiB and at most 16 GiB.

        xfs refuses file systems of 300 MB or less, hence the floor.
        """
        return min(max(self.disk_bytes // 4, 1 * GiB), 16 * GiB)


def spec_path(config_dir: Path, name: str) -> Path:
    return config_dir / f"{name}.cfg"


#: path -> (file version, spec) of VM files parsed by this process (see load_vm_spec).
_parsed: dict[str, tuple[tuple[int, ...], VMSpec]] = {}

#: Seconds a file's last change (mtime, or ctime, which no one can set back)
#: must lie in the past before its parse is remembered. Time stamps are
#: coarse (a kernel tick): a same-size rewrite in place within one tick of an
#: earlier write would keep the version, so a file that young is parsed
#: again at the next look (git's "racily clean" rule).
SETTLED_AFTER = 2.0


def file_version(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's content may have: replaced (inode), written (times, size)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_vm_spec(config_dir: Path, name: str) -> VMSpec:
    """The spec of VM *name* from this host's config directory.

    The parse is remembered per file version: a sweep over hundreds of
    unchanged files costs one stat each instead of a YAML parse (~1 ms)
    each, here and in the heartbeat. Every write of the file changes its
    version (fcq replaces the file, which gives a new inode; an editor's
    write in place changes size or times), and a file written less than
    :data:`SETTLED_AFTER` seconds ago is always parsed again. A file that
    does not parse is never remembered: its error is raised at every look.
    """
    v.check_name("(request)", "vm", name)
    path = spec_path(config_dir, name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnknownVM(name, str(config_dir)) from None
    except OSError:
        return parse_vm_file(path)  # raises ConfigError naming the problem
    version = file_version(st)
    key = str(path)
    cached = _parsed.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    if not path.exists():
        raise UnknownVM(name, str(config_dir))
    spec = parse_vm_file(path)
    if time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_AFTER:
        _parsed[key] = (version, spec)
    else:
        _parsed.pop(key, None)
    return spec


def parse_vm_file(path: Path) -> VMSpec:
    return read_vm_file(path)[1]


def read_vm_file(path: Path) -> tuple[str, VMSpec]:
    """The text of a VM file and its spec, from one read (what is sent is what was checked)."""
    f = str(path)
    try:
        text = path.read_text()
        mtime = os.stat(path).st_mtime
    except OSError as err:
        raise ConfigError(f, "(file)", f"cannot be read: {err.strerror}") from err
    spec = parse_vm_text(text, f, mtime=mtime)
    if path.suffix == ".cfg" and path.stem != spec.name:
        raise ConfigError(f, "name", f"must match the file name {path.stem!r} (got {spec.name!r})")
    return text, spec


def vm_file_version(path: Path) -> int | None:
    """The ``version`` of the VM file at *path*; None if there is no file.

    Reads only that key, so the version of a file that is broken elsewhere
    is still known. Raises ConfigError when the version itself cannot be
    read (not YAML, not a mapping, not a whole number ≥ 0).
    """
    f = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f, "(file)", f"cannot be read: {err.strerror}") from err
    data = v.parse_yaml(f, text)
    return _version(f, v.check_mapping(f, "(top level)", data))


def _version(f: str, top: Mapping[str, object]) -> int:
    return v.check_int(f, "version", top.get("version", 0), 0, MAX_VERSION)


def parse_vm_text(text: str, source: str, mtime: float = 0.0) -> VMSpec:
    data = v.parse_yaml(source, text)
    return parse_vm_data(data, source, mtime)


def parse_vm_data(data: object, source: str, mtime: float = 0.0) -> VMSpec:
    """The spec of a parsed VM file; every broken field is reported, not only the first."""
    f = source
    top = v.check_mapping(f, "(top level)", data)
    m = v.Mistakes()
    warnings = [f"{f}: {k}: unknown key, ignored" for k in v.unknown_keys(top, KNOWN_TOP, "")]
    name = m.check(lambda: v.check_name(f, "name", top.get("name")))
    version = m.check(lambda: _version(f, top))
    p = m.check(lambda: v.check_mapping(f, "parameters", top.get("parameters")))
    if p is None:
        m.raise_if_any()
    warnings += [f"{f}: {k}: unknown key, ignored"
                 for k in v.unknown_keys(p, KNOWN_PARAMETERS, "parameters")]

    def need(key: str) -> object:
        if key not in p:
            raise ConfigError(f, f"parameters.{key}", "is required")
        return p[key]

    kvm_host = p.get("kvm_host")
    rbd_pool = p.get("rbd_pool")
    keep_days = p.get("snapshot_keep_days")
    spec = VMSpec(
        name=name,
        id=m.check(lambda: v.check_int(f, "parameters.id", need("id"), 0, 2**31 - 1)),
        resource_group=m.check(lambda: v.check_name(f, "parameters.resource_group",
                                                    need("resource_group"))),
        online=m.check(lambda: v.check_bool(f, "parameters.online", need("online"))),
        kvm_host=(None if kvm_host in (None, "")
                  else m.check(lambda: v.check_name(f, "parameters.kvm_host", kvm_host))),
        disk_gib=m.check(lambda: v.check_int(f, "parameters.disk", need("disk"), 1, 65536)),
        memory_mb=m.check(lambda: v.check_int(f, "parameters.memory", need("memory"), 32,
                                              4 * 2**20)),
        cores=m.check(lambda: v.check_int(f, "parameters.cores", need("cores"), 1, 255)),
        nics=m.check(lambda: _nics(f, p.get("nics", []))),
        rbd_pool=None if rbd_pool is None else m.check(
            lambda: v.check_pool(f, "parameters.rbd_pool", rbd_pool)),
        iops=m.check(lambda: _limit(f, "iops", p.get("iops"), 10**7)),
        bps=m.check(lambda: _limit(f, "bps", p.get("bps"), 10**12)),
        snapshot_keep=m.check(lambda: _limit(f, "snapshot_keep", p.get("snapshot_keep"),
                                             10**4, lo=1)),
        snapshot_keep_days=None if keep_days is None else m.check(lambda: v.check_number(
            f, "parameters.snapshot_keep_days", keep_days, 0.001, 36500)),
        version=version,
        source=source,
        mtime=mtime,
        warnings=tuple(warnings),
    )
    m.raise_if_any()
    return spec


def _limit(f: str, key: str, value: object, hi: int, lo: int = 0) -> int | None:
    return None if value is None else v.check_int(f, f"parameters.{key}", value, lo, hi)


def _nics(f: str, value: object) -> tuple[Nic, ...]:
    # Seed format: a list of one-key mappings {net: mac}; a mapping of
    # net -> mac is accepted too because inventory systems emit both.
    if isinstance(value, Mapping):
        items: list[tuple[object, object]] = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise ConfigError(f, f"parameters.nics[{i}]",
                                  "must be a one-key mapping like {srv: 02-00-00-00-00-01}")
            items.extend(entry.items())
    else:
        raise ConfigError(f, "parameters.nics", "must be a list of {network: MAC} mappings")
    nics: list[Nic] = []
    seen_nets: set[str] = set()
    seen_macs: set[str] = set()
    for net, mac in items:
        field_name = f"parameters.nics.{net}"
        net_s = v.check_str(f, field_name, net, NET_RE, NET_RULE)
        mac_s = v.check_mac(f, field_name, mac)
        if net_s in seen_nets:
            raise ConfigError(f, field_name, "each network may appear only once")
        if mac_s in seen_macs:
            raise ConfigError(f, field_name, f"MAC {mac_s} is used twice")
        seen_nets.add(net_s)
        seen_macs.add(mac_s)
        nics.append(Nic(net_s, mac_s))
    return tuple(nics)


def vm_document(spec: VMSpec) -> dict[str, object]:
    """*spec* in the seed format, as a mapping (name, version, parameters)."""
    params: dict[str, object] = {
        "id": spec.id, "resource_group": spec.resource_group, "online": spec.online,
        "kvm_host": spec.kvm_host, "disk": spec.disk_gib, "memory": spec.memory_mb,
        "cores": spec.cores, "nics": [{n.net: n.mac.replace(":", "-")} for n in spec.nics],
    }
    if spec.rbd_pool is not None:
        params["rbd_pool"] = spec.rbd_pool
    if spec.iops is not None:
        params["iops"] = spec.iops
    if spec.bps is not None:
        params["bps"] = spec.bps
    if spec.snapshot_keep is not None:
        params["snapshot_keep"] = spec.snapshot_keep
    if spec.snapshot_keep_days is not None:
        params["snapshot_keep_days"] = spec.snapshot_keep_days
    top: dict[str, object] = {"name": spec.name}
    if spec.version:
        top["version"] = spec.version
    top["parameters"] = params
    return top


def dump_vm_spec(spec: VMSpec) -> str:
    """The seed-format YAML of *spec* (used by the demo and tests to write configs)."""
    return yaml.safe_dump(vm_document(spec), sort_keys=False)


def rewrite_vm_parameters(path: Path, **changes: object) -> VMSpec:
    """Set ``parameters.<key>`` of the VM file at *path*, its version kept (see update_vm_file)."""
    return update_vm_file(path, changes)


def update_vm_file(path: Path, changes: Mapping[str, object],
                   bump_version: bool = False) -> VMSpec:
    """Set ``parameters.<key>`` of the VM file at *path*; keep every other key as it is.

    For fcq's own edits of a file (a migration points ``kvm_host`` at the
    VM's new host): ``version`` stays what the file says, so such an edit
    never makes a concurrent push of the same version look newer or older.
    *bump_version*: the change is the VM's new desired state, decided on
    this host (a resize): ``version`` goes up by one, so a later push of
    the file as it was cannot undo it. Only keys fcq knows can be changed;
    the result is validated before it is written, and written atomically
    (readers see the old file or the new one), so a bad value leaves the
    file untouched. YAML comments are not
    kept. Call it under the VM's operation lock: it reads, then writes.
    Returns the new spec.
    """
    f = str(path)
    bad = sorted(k for k in changes if k not in KNOWN_PARAMETERS)
    if bad:
        raise ConfigError(f, f"parameters.{bad[0]}",
                          "is not a parameter fcq knows; known: " + ", ".join(
                              sorted(KNOWN_PARAMETERS)))
    try:
        text = path.read_text()
        mode = stat.S_IMODE(os.stat(path).st_mode)  # who may read it stays as it was
    except OSError as err:
        raise ConfigError(f, "(file)", f"cannot be read: {err.strerror}") from err
    data = v.parse_yaml(f, text)
    top = dict(v.check_mapping(f, "(top level)", data))
    top["parameters"] = {**v.check_mapping(f, "parameters", top.get("parameters")), **changes}
    if bump_version:
        top["version"] = _version(f, top) + 1
    spec = parse_vm_data(top, f)
    if path.suffix == ".cfg" and path.stem != spec.name:
        raise ConfigError(f, "name", f"must match the file name {path.stem!r} (got {spec.name!r})")
    write_atomically(path, yaml.safe_dump(top, sort_keys=False), mode=mode)
    return spec
