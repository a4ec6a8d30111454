"""The destination's listening address, signed by the destination.

The address travels through Redis (key ``addr`` of the attempt), which
every host can write. The source sends the guest's memory only to an
address that

- is ``tcp:<IP>:<port>`` (never ``exec:``, ``unix:``, ``fd:`` or ``file:``),
- has the IP of the destination's record (``cluster.hosts_dir``), and
- carries the destination's signature over this VM, this attempt, these two
  hosts and this very address,

so a host that can write Redis can neither make the source run a command
nor send the guest anywhere the destination did not open for this attempt.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fcq_tasks import trust
from fcq_tasks.config.peers import Peer
from fcq_tasks.errors import FcqError, Refused
from fcq_tasks.hazmat.monitor import tcp_migration_uri

PURPOSE = "fcq-migration-address/1"
#: A signed address is about 200 bytes; a longer value is not one.
MAX_CHARS = 1024


class ForgedAddress(Refused):
    """The address in Redis is not one the destination published for this attempt."""


def _fields(vm: str, attempt: str, src: str, dst: str, uri: str) -> dict[str, str]:
    return {"vm": vm, "attempt": attempt, "src": src, "dst": dst, "uri": uri}


def signed(key: Ed25519PrivateKey, vm: str, attempt: str, src: str, dst: str, uri: str) -> str:
    """What the destination publishes: *uri* and its signature, as JSON."""
    sig = trust.sign(key, PURPOSE, _fields(vm, attempt, src, dst, uri))
    return json.dumps({"uri": uri, "sig": sig}, sort_keys=True)


def verified(raw: str, peer: Peer, vm: str, attempt: str, src: str) -> str:
    """The URI in *raw* if destination *peer* published it for this attempt; else refused."""
    def forged(why: str) -> ForgedAddress:
        return ForgedAddress(f"{vm}: migration address refused: {why}; nothing was sent",
                             vm=vm, attempt=attempt, dst=peer.name)
    data: Any = None
    if len(raw) <= MAX_CHARS:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
    if not isinstance(data, dict) or set(data) != {"uri", "sig"} or \
            not all(isinstance(x, str) for x in data.values()):
        raise forged(f"not a signed address (got {raw[:80]!r})")
    uri: str = data["uri"]
    sig: str = data["sig"]
    if not trust.verify(peer.public_key, PURPOSE, _fields(vm, attempt, src, peer.name, uri),
                        sig):
        raise forged(f"{uri[:80]!r} is not signed by {peer.name}'s key for attempt {attempt}")
    try:
        ip, _port = tcp_migration_uri(uri)
    except FcqError as err:
        raise forged(err.message) from err
    if ip != peer.migration_address:
        raise forged(f"{uri!r} is not {peer.name}'s migration address "
                     f"({peer.migration_address}, from its host record)")
    return uri
