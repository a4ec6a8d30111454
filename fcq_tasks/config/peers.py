"""Host records: what every host trusts about the others.

``<cluster.hosts_dir>/<host>.yaml`` holds a host's migration address (an IP
literal) and its Ed25519 public key. The records come from the inventory
(or whoever sets hosts up), never from Redis: they are how one host tells
another's words from anyone else's (docs/security.md).

    migration_address: 192.0.2.11
    public_key: 9mQv…=        # fcq --local keygen prints the record
    memory_mb: 262144         # optional: what placement may book there at most

``memory_mb`` is the inventory's word on the host's capacity: placement
(``fcq drain``, ``fcq evacuate``) books a host up to the lower of it and
what the host's heartbeat claims, so a host cannot draw VMs to itself by
claiming room it does not have.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fcq_tasks import trust
from fcq_tasks.config import validate as v
from fcq_tasks.errors import ConfigError

#: A record is two short lines; anything much longer is not one.
MAX_RECORD_BYTES = 4096
REQUIRED = frozenset({"migration_address", "public_key"})
FIELDS = REQUIRED | {"memory_mb"}


@dataclass(frozen=True)
class Peer:
    name: str
    migration_address: str           # an IP address, normalised (ipaddress's text form)
    public_key: Ed25519PublicKey
    memory_mb: int | None = None     # the inventory's capacity, if it says


def record_path(hosts_dir: Path, name: str) -> Path:
    return hosts_dir / f"{v.check_name(str(hosts_dir), 'host', name)}.yaml"


def ip_text(source: str, field: str, value: object) -> str:
    """*value* as an IP address in its normal text form; a host name is refused."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(source, field, f"must be an IP address (got {value!r}): a name "
                          "would be resolved at every migration") from None


def load_peer(hosts_dir: Path, name: str) -> Peer:
    """Host *name*'s record; ConfigError naming the file and the field if it breaks a rule."""
    path = record_path(hosts_dir, name)
    src = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as err:
        raise ConfigError(src, "cluster.hosts_dir", f"no record of host {name!r}: "
                          f"{err.strerror or err} (write it from `fcq --local keygen` "
                          f"on {name})") from err
    if len(data) > MAX_RECORD_BYTES:
        raise ConfigError(src, "record", f"longer than {MAX_RECORD_BYTES} bytes")
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(src, "record", f"is not YAML: {err}") from err
    given = v.check_mapping(src, "record", raw)
    bad = v.unknown_keys(given, FIELDS, "")
    if bad:
        raise ConfigError(src, bad[0], "unknown field; known: " + ", ".join(sorted(FIELDS)))
    for key in sorted(REQUIRED - set(given)):
        raise ConfigError(src, key, "missing")
    memory = given.get("memory_mb")
    return Peer(name, ip_text(src, "migration_address", given["migration_address"]),
                trust.parse_public_key(src, "public_key", given["public_key"]),
                None if memory is None else v.check_int(src, "memory_mb", memory, 0, 2**40))


def cached_peer(hosts_dir: Path, name: str) -> Peer:
    """load_peer, read again only when the record's file changed (readers of every heartbeat)."""
    path = record_path(hosts_dir, name)
    try:
        st = os.stat(path)
    except OSError:
        return load_peer(hosts_dir, name)  # raises, naming the file
    return _cached_peer(str(hosts_dir), name, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4096)
def _cached_peer(hosts_dir: str, name: str, mtime_ns: int, inode: int) -> Peer:
    return load_peer(Path(hosts_dir), name)


def record_text(migration_address: str, public_key: str) -> str:
    return yaml.safe_dump({"migration_address": migration_address, "public_key": public_key},
                          sort_keys=True)
