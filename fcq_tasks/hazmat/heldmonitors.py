"""Monitor connections a worker keeps open between sweeps, one per running VM.

A converged VM's sweep asks QEMU one thing: its run state. A QMP session
opened for that (connect, greeting, ``qmp_capabilities``, the question,
close) costs the worker about 2 ms of CPU per VM, most of a sweep; the same
question on a connection that is already open is one round trip.

A QMP socket serves one client at a time, so these connections go to a
monitor of their own, ``<vm>.swp.sock``: never fcq's (``qmp.sock``, which
fcq's steps, migrations and ``fcq monitor`` need) nor the observers'. Only
the worker's sweep uses it; a second process that tried would wait for a
greeting that never comes, and fall back after :data:`CONNECT_TIMEOUT`.

One thread runs one event loop for every connection: one descriptor per VM
(a loop each would cost three more). A connection is keyed by the QEMU
instance it was opened to (pid and start time): another QEMU behind the same
path is asked on a new connection, never on the old one. Any failure closes
the connection and answers None; the caller then asks the way it always
did, on fcq's monitor, so a hung, dying or replaced QEMU is judged exactly
as without this module. A QEMU without the socket (started by an older fcq,
or from a template without the monitor) is simply always asked that way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass

import structlog
from qemu.qmp import QMPClient

log = structlog.get_logger()

#: Seconds a connect may take before the sweep asks the usual way instead.
CONNECT_TIMEOUT = 1.0
#: Seconds one question may take; a QEMU slower than that is asked anew on
#: fcq's monitor, with the host's qmp_timeout (hung QEMUs are judged there).
ASK_TIMEOUT = 2.0

#: Seconds a QEMU whose held connection failed is asked the usual way only:
#: a hung QEMU would otherwise cost every sweep CONNECT_TIMEOUT more.
RETRY_AFTER = 60.0

#: (pid, start ticks) of the QEMU a connection was opened to.
Instance = tuple[int, int]


def _no_event(_: object) -> bool:
    return False


@dataclass
class _Held:
    instance: Instance
    client: QMPClient


class HeldMonitors:
    """The open sweep-monitor connections of one process; safe to call from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        # Touched only on the loop's thread: no lock needed.
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[Instance, float]] = {}
        # One descriptor per connection: leave the process most of its
        # limit (Redis, Celery, QEMU starts, Ceph need theirs).
        self.capacity = max(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - 64)
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="fcq-held-monitors", daemon=True)
        self._thread.start()

    def runstate(self, vm: str, socket: str, instance: Instance) -> str | None:
        """QEMU *instance*'s run state, asked on the held connection; None if not answered."""
        if self._loop.is_closed():
            return None
        future = asyncio.run_coroutine_threadsafe(self._runstate(vm, socket, instance),
                                                  self._loop)
        try:
            return future.result(CONNECT_TIMEOUT + ASK_TIMEOUT + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None
        except Exception as err:  # a bug here must not cost the VM its sweep
            log.warning("held-monitor-failed", vm=vm, error=repr(err))
            return None

    def keep_only(self, vms: set[str]) -> None:
        """Forget every VM not in *vms* (its file gone): its connection and its failures."""
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._keep_only(vms), self._loop).result(
                ASK_TIMEOUT + 1)

    def held(self) -> dict[str, Instance]:
        """VM → the QEMU instance its connection is open to (for tests and `status`)."""
        if self._loop.is_closed():
            return {}

        async def snapshot() -> dict[str, Instance]:
            return {vm: h.instance for vm, h in self._held.items()}
        return asyncio.run_coroutine_threadsafe(snapshot(), self._loop).result(ASK_TIMEOUT)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(self._keep_only(set()), self._loop).result(
                ASK_TIMEOUT + 1)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(ASK_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    # -- on the loop's thread ---------------------------------------------

    async def _runstate(self, vm: str, socket: str, instance: Instance) -> str | None:
        async with self._locks.setdefault(vm, asyncio.Lock()):
            held = self._held.get(vm)
            if held is not None and held.instance != instance:
                await self._drop(vm)  # another QEMU now: never ask the old connection
                held = None
            if held is None:
                failed = self._failed.get(vm)
                if failed is not None and failed[0] == instance and \
                        time.monotonic() - failed[1] < RETRY_AFTER:
                    return None
                if len(self._held) >= self.capacity:
                    return None
                held = await self._connect(vm, socket, instance)
                if held is None:
                    self._failed[vm] = (instance, time.monotonic())
                    return None
                self._failed.pop(vm, None)
            try:
                status = await asyncio.wait_for(held.client.execute("query-status"),
                                                ASK_TIMEOUT)
                assert isinstance(status, dict)
                return str(status["status"])
            except Exception as err:  # gone, hung, cut: all are asked anew elsewhere
                log.info("held-monitor-dropped", vm=vm, error=repr(err))
                await self._drop(vm)
                self._failed[vm] = (instance, time.monotonic())
                return None

    async def _connect(self, vm: str, socket: str, instance: Instance) -> _Held | None:
        if not os.path.exists(socket):
            return None  # a QEMU without the monitor: asked the usual way
        client = QMPClient(f"fcq.held.{vm}")
        # Nobody reads this connection's events: the library's default
        # listener (which cannot be removed) would queue every one of them
        # for as long as the connection lives.
        client.events.event_filter = _no_event
        try:
            await asyncio.wait_for(client.connect(socket), CONNECT_TIMEOUT)
        except Exception as err:  # held by another process, QEMU gone, …
            log.info("held-monitor-unavailable", vm=vm, error=repr(err))
            await self._disconnect(client)
            return None
        held = _Held(instance, client)
        self._held[vm] = held
        return held

    async def _drop(self, vm: str) -> None:
        held = self._held.pop(vm, None)
        if held is not None:
            await self._disconnect(held.client)

    async def _disconnect(self, client: QMPClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), ASK_TIMEOUT)

    async def _keep_only(self, vms: set[str]) -> None:
        for vm in [vm for vm in self._held if vm not in vms]:
            await self._drop(vm)
        for vm in [vm for vm in self._failed if vm not in vms]:
            del self._failed[vm]
