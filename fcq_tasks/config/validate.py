"""Small checks shared by every parser of outside input (files, CLI, tasks).

Each check either returns the value converted to its Python type or raises
:class:`ConfigError` naming the file, the field and the rule it broke. The
parsers call them field by field, so a broken file is rejected as a whole
before anything acts on it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

import yaml

from fcq_tasks.errors import ConfigError, ConfigErrors

T = TypeVar("T")

#: VM and host names end up in file names, socket paths, QEMU arguments and
#: queue names, so they are held to the hostname alphabet: no "/", "..",
#: spaces or shell metacharacters can get through.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: "$" would let "vm01\n" through
NAME_RULE = "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([-:])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}\Z")


def check_name(file: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(file, field, f"{NAME_RULE} (got {value!r})")
    return value


#: Ceph pool names as fleets name them ("rbd", "rbd.ssd"): no "/" or "@",
#: which would change the meaning of a pool/image@snap spec.
POOL_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,99}\Z")


def check_pool(file: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not POOL_RE.match(value):
        raise ConfigError(file, field, "must be a Ceph pool name: 1-100 characters of "
                          f"letters, digits, '.', '_' and '-' (got {value!r})")
    return value


def check_int(file: str, field: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass; "online: true" must not pass as memory: 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(file, field, f"must be a whole number (got {value!r})")
    if not lo <= value <= hi:
        raise ConfigError(file, field, f"must be between {lo} and {hi} (got {value})")
    return value


def check_number(file: str, field: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(file, field, f"must be a number (got {value!r})")
    if not lo <= value <= hi:
        raise ConfigError(file, field, f"must be between {lo} and {hi} (got {value})")
    return float(value)


def check_bool(file: str, field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(file, field, f"must be true or false (got {value!r})")
    return value


def check_str(file: str, field: str, value: object, pattern: re.Pattern[str] | None = None,
              rule: str = "") -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(file, field, f"must be a non-empty string (got {value!r})")
    if pattern is not None and not pattern.match(value):
        raise ConfigError(file, field, f"{rule} (got {value!r})")
    return value


def check_choice(file: str, field: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(file, field, f"must be one of {', '.join(choices)} (got {value!r})")
    assert isinstance(value, str)
    return value


def check_abs_path(file: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(file, field, f"must be an absolute path (got {value!r})")
    if any(part == ".." for part in value.split("/")):
        raise ConfigError(file, field, f"must not contain '..' (got {value!r})")
    return value


def is_loopback(address: str) -> bool:
    """Whether *address* only listens to this machine (a name other than localhost: no)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_endpoint(file: str, prefix: str, address: object, port: object,
                   auth_file: object) -> tuple[str, int, str | None]:
    """A metrics endpoint's address, port (0: off) and auth file, as one rule.

    Beyond loopback, an endpoint without authentication would show the
    fleet's shape to the network: a non-loopback address needs an auth file.
    """
    addr = check_str(file, f"{prefix}metrics_address", address)
    num = check_int(file, f"{prefix}metrics_port", port, 0, 65535)
    auth = None if auth_file is None else check_abs_path(file, f"{prefix}metrics_auth_file",
                                                         auth_file)
    if num and auth is None and not is_loopback(addr):
        raise ConfigError(file, f"{prefix}metrics_auth_file",
                          f"is required when {prefix}metrics_address is not a loopback "
                          f"address (got {addr!r}): a file with user:password lines, mode 0600")
    return addr, num, auth


def check_mac(file: str, field: str, value: object) -> str:
    """Return the MAC in QEMU's colon form; refuse multicast addresses."""
    if not isinstance(value, str) or not MAC_RE.match(value):
        raise ConfigError(file, field,
                          f"must be a MAC address like 02-00-00-00-00-01 (got {value!r})")
    mac = value.replace("-", ":").lower()
    if int(mac[:2], 16) & 1:
        raise ConfigError(file, field,
                          f"must be a unicast MAC: the first octet is even (got {value!r})")
    return mac


def check_mapping(file: str, field: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(file, field, f"must be a mapping (got {type(value).__name__})")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(file, f"{field}.{key!r}", "keys must be strings")
    return value


def unknown_keys(value: Mapping[str, object], known: frozenset[str], prefix: str) -> list[str]:
    """Dotted names of the keys a parser does not know, for warnings."""
    dot = f"{prefix}." if prefix else ""
    return sorted(f"{dot}{k}" for k in value if k not in known)


#: libyaml's safe loader where PyYAML has it (~10x faster: the sweep parses
#: every VM file each time), else the pure-Python one. Same safe subset.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(file: str, text: str) -> object:
    """*text* as YAML data; not YAML is a ConfigError naming *file*."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        raise ConfigError(file, "(file)", f"is not valid YAML: {err}") from err


class Mistakes:
    """Collects every ConfigError of one file instead of stopping at the first.

    ``check(fn)`` runs one field's check; a broken field is recorded and a
    placeholder returned, never used: ``raise_if_any()`` comes first.
    """

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def check(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ConfigErrors as many:
            self.errors.extend(many.errors)
        except ConfigError as err:
            self.errors.append(err)
        return cast(T, None)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)
