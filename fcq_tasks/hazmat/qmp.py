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

from qemu.qmp import ExecuteError, QMPClient, QMPError

from fcq_tasks.errors import QemuRefused, QmpError

T = TypeVar("T")


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
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"fcq.{self.vm}")
        try:
            self._run(self._client.connect(self.socket_path), "connect")
        except BaseException:
            self._close()
            raise
        return self

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

    def runstate(self) -> str:
        status = self.execute("query-status")
        return str(status["status"])
