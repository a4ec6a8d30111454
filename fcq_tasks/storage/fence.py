"""Fencing: make sure an image's old writers can never write again.

An RBD advisory lock stops nobody: it is a note on the image. What writes
are rados clients, above all each QEMU's own librbd client, one per opened
image, which the image's *watchers* name. Before fcq breaks a lock it
blocklists, on the OSDs, every client that could still write the image:

- each watcher, except this process's own client and the clients the
  caller names as its own (a destination's paused copy during a rescue);
- each lock holder's client (a worker connection of the old host).

Exact client addresses (``IP:0/NONCE``) are blocklisted, never a whole IP:
one nonce is one client instance, so the fence hits the stalled process and
nothing that connects later from the same host. The entries expire after
``ceph.blocklist_seconds`` (a week by default). Then this process waits
for the OSD map that carries the entries, so every write that is issued
afterwards, by anyone, meets OSDs that already refuse the fenced clients.

A fenced QEMU that wakes up gets ``-108`` (ESHUTDOWN) on its next request
and its guest sees I/O errors; its host's next sweep finds the locks gone
and kills it.
"""

from __future__ import annotations

from typing import Any

import structlog

from fcq_tasks.config.cephsettings import CephSettings


def client_addr(addr: str) -> str:
    """``v2:127.0.0.1:0/123`` or ``[v2:…]`` -> ``127.0.0.1:0/123``: how blocklists name a client."""
    addr = addr.strip().strip("[]").split(",")[0]
    for prefix in ("v1:", "v2:", "any:"):
        if addr.startswith(prefix):
            addr = addr[len(prefix):]
    return addr


def writers(conn: Any, img: Any, keep: frozenset[str] = frozenset()) -> list[str]:
    """Addresses of every client that could write *img*, except ours and *keep*."""
    own = {client_addr(a) for a in str(conn.get_addrs()).split(",")}
    found: list[str] = []
    for watcher in img.watchers_list():
        found.append(client_addr(str(watcher["addr"])))
    for _client, _cookie, addr in img.list_lockers().get("lockers", []) or []:
        found.append(client_addr(str(addr)))
    skip = own | {client_addr(k) for k in keep}
    return sorted({a for a in found if a and a not in skip})


def fence(ceph: CephSettings, conn: Any, img: Any, vm: str, volume: str,
          keep: frozenset[str] = frozenset()) -> list[str]:
    """Blocklist every writer of *img* but ours and *keep*; wait until the OSDs know.

    Returns the fenced addresses. Raises what librados raises when the
    blocklist cannot be written: then no lock may be broken.
    """
    addrs = writers(conn, img, keep)
    for addr in addrs:
        conn.blocklist_add(addr, ceph.blocklist_seconds)
    if addrs:
        conn.wait_for_latest_osdmap()
        structlog.get_logger().warning("fenced", vm=vm, volume=volume, clients=addrs,
                                       seconds=ceph.blocklist_seconds, action="fence")
    return addrs
