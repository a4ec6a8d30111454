"""A small synchronous facade over QEMU's own ``qemu.qmp`` library.

Each :class:`QmpSession` owns a private event loop, so it is safe to use from
any thread (the Celery worker runs tasks in threads) and never touches a
loop that belongs to someone else. Every connect and command is bounded by
the host's ``qmp_timeout``; failures become :class:`QmpError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.qmp_client import NegotiationError

from fcq_tasks.errors import QemuRefused, QmpError

T = TypeVar("T")

#: Connects tried when the handshake lost a race with an event (below).
CONNECT_TRIES = 3


def _lost_to_an_event(err: QmpError) -> bool:
    """Whether a connect failed because an event came before qmp_capabilities' answer.

    QEMU may send an event (a migration's state change, the guest's STOP)
    right after it left negotiation mode and before it answers; the
    library expects the answer first and gives the handshake up. Nothing
    happened on QEMU's side: connecting again is safe.
    """
    cause = err.__cause__
    return isinstance(cause, ConnectError) and isinstance(cause.exc, NegotiationError)


class QmpSession:
    """One QMP connection to a VM's monitor socket, opened with ``with``."""

    def __init__(self, socket_path: str, timeout: float, vm: str) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.vm = vm
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        assert self._loop is not None
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))
        except ExecuteError as err:
            # An answer, not silence: the monitor works and QEMU said no.
            raise QemuRefused(f"{self.vm}: QEMU refused {what}: {err}", vm=self.vm,
                              command=what, error_class=str(err.error_class)) from err
        except TimeoutError as err:
            raise QmpError(f"{self.vm}: QMP {what} timed out after {self.timeout} s",
                           vm=self.vm, command=what) from err
        except (QMPError, OSError) as err:
            raise QmpError(f"{self.vm}: QMP {what} failed: {err}", vm=self.vm,
                           command=what) from err

    def __enter__(self) -> QmpSession:
        for attempt in range(1, CONNECT_TRIES + 1):
            self._loop = asyncio.new_event_loop()
            self._client = QMPClient(f"fcq.{self.vm}")
            try:
                self._run(self._client.connect(self.socket_path), "connect")
                return self
            except QmpError as err:
                self._close()
                if attempt == CONNECT_TRIES or not _lost_to_an_event(err):
                    raise
            except BaseException:
                self._close()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        if self._loop is None:
            return
        try:
            if self._client is not None:
                self._loop.run_until_complete(
                    asyncio.wait_for(self._client.disconnect(), self.timeout))
        except (TimeoutError, QMPError, OSError, EOFError):
            pass  # the peer may be gone already (quit, kill): nothing left to close
        finally:
            self._loop.close()
            self._loop = None
            self._client = None

    def execute(self, command: str, **arguments: object) -> Any:
        """Run one QMP command and return its ``return`` value."""
        assert self._client is not None, "use QmpSession as a context manager"
        return self._run(self._client.execute(command, arguments or None), command)

    def next_event(self, names: frozenset[str], timeout: float) -> dict[str, Any] | None:
        """The next event named in *names* QEMU sent on this connection, or None after *timeout*.

        Events QEMU sent since the connection opened wait in its queue, so
        one that came between two calls is not lost; other events are
        dropped.
        """
        assert self._client is not None and self._loop is not None, \
            "use QmpSession as a context manager"
        events = self._client.events

        async def wait() -> dict[str, Any]:
            while True:
                event = await events.get()
                if str(event.get("event")) in names:
                    return dict(event)
        try:
            return self._loop.run_until_complete(asyncio.wait_for(wait(), max(0.0, timeout)))
        except TimeoutError:
            return None
        except (QMPError, OSError) as err:
            raise QmpError(f"{self.vm}: QMP waiting for {sorted(names)} failed: {err}",
                           vm=self.vm, command="event") from err

    def runstate(self) -> str:
        status = self.execute("query-status")
        return str(status["status"])
