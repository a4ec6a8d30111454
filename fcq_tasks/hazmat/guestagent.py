"""Talk to qemu-guest-agent inside a VM over its virtio-serial socket.

The channel has no framing or session: a request a previous client left
behind is answered first. The protocol that works with qemu-ga (tried on the
test guest; anything less takes a stale queued answer for the new one) is to
send a 0xFF byte and ``guest-sync-delimited`` with a fresh random id, drop
input up to the guest's 0xFF, and accept only the answer carrying that id.
That happens before every command.

Two fcq processes must never interleave on one agent (one's freeze answered
to the other's status question), so a session holds an ``flock`` on
``<vm>.ga.lock`` beside the socket for as long as it is open. QEMU accepts
one client on the socket at a time anyway; the lock makes the second one
wait visibly, for a bounded time, instead of hanging in the listen queue.

Every wait has a named timeout (:class:`AgentTimeouts`): an error says which
setting ran out. A guest that never answers the sync is :class:`NoGuestAgent`,
not a failure: most callers carry on without the agent.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fcq_tasks.errors import GuestAgentError, GuestAgentTimeout, NoGuestAgent

#: How often a session waiting for another one's lock looks again.
LOCK_RETRY = 0.05
#: The longest line fcq reads from a guest agent (its answers to fcq's few
#: commands are a few hundred bytes), and the most it reads for one answer.
MAX_MESSAGE_BYTES = 1 << 20
MAX_READ_BYTES = 8 << 20


@dataclass(frozen=True)
class AgentTimeouts:
    """Seconds each kind of wait may take; the names are the host settings' names."""

    call: float = 10.0      # guest_agent_timeout: sync and ordinary commands
    freeze: float = 120.0   # freeze_timeout: guest-fsfreeze-freeze (flushes every fs)
    thaw: float = 30.0      # thaw_timeout: guest-fsfreeze-thaw
    lock: float = 30.0      # another fcq process's session on the same agent

    def setting(self, kind: str) -> tuple[float, str]:
        names = {"call": "guest_agent_timeout", "freeze": "freeze_timeout",
                 "thaw": "thaw_timeout"}
        return float(getattr(self, kind)), names[kind]


def lock_path(socket_path: str) -> Path:
    """The session lock of the agent at *socket_path* (``x.ga.sock`` → ``x.ga.lock``)."""
    base = socket_path[:-5] if socket_path.endswith(".sock") else socket_path
    return Path(base + ".lock")


class GuestAgent:
    """One exchange session with a guest's agent, opened with ``with``."""

    def __init__(self, socket_path: str, timeout: float | AgentTimeouts, vm: str) -> None:
        self.socket_path = socket_path
        self.timeouts = timeout if isinstance(timeout, AgentTimeouts) \
            else AgentTimeouts(call=timeout, lock=timeout)
        self.vm = vm
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        self._lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeouts.call)
        try:
            sock.connect(self.socket_path)
        except OSError as err:
            sock.close()
            self._unlock()
            raise GuestAgentError(f"{self.vm}: guest agent socket: {err}", vm=self.vm) from err
        self._sock = sock
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlock()

    def _lock(self) -> None:
        path = lock_path(self.socket_path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeouts.lock
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise GuestAgentError(
                        f"{self.vm}: another fcq process has talked to the guest agent for "
                        f"more than {self.timeouts.lock:g} s; not interleaving with it",
                        vm=self.vm) from None
                time.sleep(LOCK_RETRY)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
        except OSError as err:
            raise GuestAgentError(f"{self.vm}: guest agent write: {err}", vm=self.vm) from err

    def _recv(self, deadline: float, command: str, kind: str) -> None:
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        seconds, setting = self.timeouts.setting(kind)
        if remaining <= 0:
            raise GuestAgentTimeout(self.vm, command, seconds, setting)
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError as err:
            raise GuestAgentTimeout(self.vm, command, seconds, setting) from err
        except OSError as err:
            raise GuestAgentError(f"{self.vm}: guest agent read: {err}", vm=self.vm) from err
        if not chunk:
            raise GuestAgentError(f"{self.vm}: guest agent closed the channel", vm=self.vm)
        self._buf += chunk
        if len(self._buf) > MAX_MESSAGE_BYTES:
            # Called only while what is buffered is not yet what fcq waits
            # for (a line's end, the sync marker). The guest is not fcq's to
            # trust: such a buffer would grow the worker's memory without bound.
            self._buf = b""
            raise GuestAgentError(f"{self.vm}: guest agent sent more than "
                                  f"{MAX_MESSAGE_BYTES} bytes without the end of an answer "
                                  f"to {command}: dropped", vm=self.vm)

    def _read_message(self, deadline: float, command: str, kind: str) -> dict[str, Any]:
        skipped = 0
        while True:
            while b"\n" not in self._buf:
                self._recv(deadline, command, kind)
            line, self._buf = self._buf.split(b"\n", 1)
            skipped += len(line) + 1
            if skipped > MAX_READ_BYTES:
                self._buf = b""
                raise GuestAgentError(f"{self.vm}: guest agent sent more than "
                                      f"{MAX_READ_BYTES} bytes without an answer to "
                                      f"{command}: the channel is flooded", vm=self.vm)
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # garbage from an earlier, interrupted exchange
            if isinstance(msg, dict):
                return msg

    def sync(self) -> None:
        """Resynchronise the channel; afterwards answers belong to us.

        No answer within guest_agent_timeout: :class:`NoGuestAgent`.
        """
        deadline = time.monotonic() + self.timeouts.call
        sync_id = random.randint(1, 2**31 - 1)
        self._buf = b""
        self._send(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
        try:
            while b"\xff" not in self._buf:
                self._recv(deadline, "guest-sync-delimited", "call")
            self._buf = self._buf.split(b"\xff", 1)[1]
            while True:
                msg = self._read_message(deadline, "guest-sync-delimited", "call")
                if msg.get("return") == sync_id:
                    return
        except GuestAgentTimeout as err:
            raise NoGuestAgent(self.vm, f"no answer to guest-sync-delimited within "
                               f"{self.timeouts.call:g} s (guest_agent_timeout)") from err

    def execute(self, command: str, **arguments: object) -> Any:
        """Sync, run *command* in the guest, and return its ``return`` value."""
        return self.call(command, "call", arguments)

    def call(self, command: str, kind: str, arguments: dict[str, object]) -> Any:
        """execute(), the answer waited for as long as timeout *kind* says.

        *kind*: "call", "freeze" or "thaw" (see :class:`AgentTimeouts`).
        """
        self.sync()
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        seconds, _ = self.timeouts.setting(kind)
        msg = self._read_message(time.monotonic() + seconds, command, kind)
        if "error" in msg:
            raise GuestAgentError(f"{self.vm}: guest agent {command}: {msg['error']}",
                                  vm=self.vm, command=command)
        return msg.get("return")

    def ping(self) -> None:
        self.execute("guest-ping")

    # -- file systems -------------------------------------------------------

    def freeze_status(self) -> str:
        """"thawed" or "frozen"."""
        return str(self.execute("guest-fsfreeze-status"))

    def freeze(self) -> int:
        """Freeze every file system of the guest; how many were frozen."""
        return int(self.call("guest-fsfreeze-freeze", "freeze", {}))

    def thaw(self) -> int:
        """Thaw every frozen file system; how many were thawed (0: none was frozen)."""
        return int(self.call("guest-fsfreeze-thaw", "thaw", {}))

    def write_file(self, path: str, content: bytes) -> None:
        """Write *content* to *path* in the guest (created or truncated)."""
        handle = self.execute("guest-file-open", path=path, mode="w")
        try:
            self.execute("guest-file-write", handle=handle,
                         **{"buf-b64": base64.b64encode(content).decode()})
        finally:
            self.execute("guest-file-close", handle=handle)
