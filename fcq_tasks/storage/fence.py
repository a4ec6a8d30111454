"""Fencing: make sure an image's old writers can never write again.

An RBD advisory lock stops nobody: it is a note on the image. What writes
are rados clients, above all each QEMU's own librbd client, one per opened
image, which the image's *watchers* name. But a watch expires ~30 s after
its client stops answering: a QEMU on a host that is cut off or stalled
drops off the watcher list long before anyone would break its lock. So
every host records its QEMU's client addresses when it starts one (the
``fcq.writers.<image>`` object's omap, one key per host), and before fcq
breaks a lock it blocklists, on the OSDs, every client that could still
write the image:

- each recorded writer, except the caller's own host's (in a rescue, the
  destination's paused copy);
- each watcher, except this process's own client and the caller's own
  recorded writers;
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

import contextlib
import json
import time
from typing import Any

import rados
import structlog

from fcq_tasks import metrics
from fcq_tasks.config.cephsettings import CephSettings

PREFIXES = ("v1:", "v2:", "any:")


def client_addr(addr: str) -> str:
    """How blocklists name a client: ``127.0.0.1:0/123``, ``[fd00::1]:0/123``.

    Accepts ``v2:ADDR``, a list ``[v2:ADDR,v1:ADDR]`` (its first entry) and
    bare addresses, IPv6 ones in brackets included.
    """
    addr = addr.strip()
    if addr.startswith("[") and addr[1:].startswith(PREFIXES):
        addr = addr[1:].rstrip("]").split(",")[0]
    for prefix in PREFIXES:
        if addr.startswith(prefix):
            addr = addr[len(prefix):]
    return addr


def lockers(img: Any) -> list[tuple[str, str, str]]:
    """(client, cookie, address) of each lock on *img*.

    librbd's ``list_lockers()`` returns a dict with a ``lockers`` list, but
    an empty *list* for an image without a lock: read both.
    """
    found = img.list_lockers()
    if not isinstance(found, dict):
        return []
    return [(str(c), str(k), str(a)) for c, k, a in found.get("lockers") or []]


def writers_object(image: str) -> str:
    return f"fcq.writers.{image}"


def recorded(ioctx: Any, image: str) -> dict[str, list[str]]:
    """host -> the client addresses of the QEMU it last started on *image*."""
    try:
        with rados.ReadOpCtx() as op:
            vals, _ret = ioctx.get_omap_vals(op, "", "", 1000)
            ioctx.operate_read_op(op, writers_object(image))
            raw = dict(vals)
    except rados.ObjectNotFound:
        return {}
    out = {}
    for host, value in raw.items():
        try:
            out[str(host)] = [str(a) for a in json.loads(value).get("addrs", [])]
        except (ValueError, AttributeError):
            out[str(host)] = []
    return out


def record(ioctx: Any, image: str, host: str, instance: str, addrs: list[str]) -> None:
    """Remember *addrs* as the clients of *host*'s QEMU on *image*."""
    entry = json.dumps({"instance": instance, "addrs": sorted(addrs), "at": time.time()})
    with rados.WriteOpCtx() as op:
        ioctx.set_omap(op, (host,), (entry.encode(),))
        ioctx.operate_write_op(op, writers_object(image))


def forget(ioctx: Any, image: str, hosts: list[str]) -> None:
    if not hosts:
        return
    with contextlib.suppress(rados.ObjectNotFound), rados.WriteOpCtx() as op:
        ioctx.remove_omap_keys(op, tuple(hosts))
        ioctx.operate_write_op(op, writers_object(image))


def writers(conn: Any, img: Any, keep: frozenset[str] = frozenset(),
            keep_host: str | None = None) -> list[str]:
    """Addresses of every client that could write *img*, except ours and *keep*.

    *keep_host*: a host whose recorded writers are spared (and kept).
    """
    own = {client_addr(str(conn.get_addrs()))}
    notes = recorded(img.ioctx, img.name)
    keep = keep | frozenset(notes.get(keep_host, []) if keep_host else [])
    found: list[str] = [a for host, addrs in notes.items() if host != keep_host
                        for a in addrs]
    for watcher in img.watchers_list():
        found.append(client_addr(str(watcher["addr"])))
    for _client, _cookie, addr in lockers(img):
        found.append(client_addr(str(addr)))
    skip = own | {client_addr(k) for k in keep}
    return sorted({a for a in found if a and a not in skip})


def blocklisted(conn: Any, addrs: list[str]) -> list[str]:
    """Those of *addrs* the OSD blocklist names now (``osd blocklist ls``, ~ms)."""
    if not addrs:
        return []
    ret, out, err = conn.mon_command(json.dumps({"prefix": "osd blocklist ls",
                                                 "format": "json"}), b"")
    if ret != 0:
        raise rados.Error(f"osd blocklist ls: {err} ({ret})")
    # Pacific prints two JSON lists back to back (addresses, then ranges):
    # the first is the one with client addresses.
    entries, _end = json.JSONDecoder().raw_decode((out or b"[]").decode())
    listed = {client_addr(str(e.get("addr", ""))) for e in entries if isinstance(e, dict)}
    return sorted(a for a in addrs if client_addr(a) in listed)


def fence(ceph: CephSettings, conn: Any, img: Any, vm: str, volume: str,
          keep: frozenset[str] = frozenset(), keep_host: str | None = None) -> list[str]:
    """Blocklist every writer of *img* but ours and *keep*; wait until the OSDs know.

    Returns the fenced addresses; the fenced hosts' records are dropped.
    Raises what librados raises when the blocklist cannot be written: then
    no lock may be broken.
    """
    addrs = writers(conn, img, keep, keep_host)
    for addr in addrs:
        conn.blocklist_add(addr, ceph.blocklist_seconds)
        metrics.fencing("blocklist")
    if addrs:
        conn.wait_for_latest_osdmap()
        structlog.get_logger().warning("fenced", vm=vm, volume=volume, clients=addrs,
                                       seconds=ceph.blocklist_seconds, action="fence")
    forget(img.ioctx, img.name, [h for h in recorded(img.ioctx, img.name) if h != keep_host])
    return addrs
