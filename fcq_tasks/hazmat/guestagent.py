"""Talk to qemu-guest-agent inside a VM over its virtio-serial socket.

The channel has no framing or session: a request a previous client left
behind is answered first. The protocol that works with qemu-ga (tried on the
test guest; anything less takes a stale queued answer for the new one) is to
send a 0xFF byte and ``guest-sync-delimited`` with a fresh random id, drop
input up to the guest's 0xFF, and accept only the answer carrying that id.
"""

from __future__ import annotations

import json
import random
import socket
import time
from types import TracebackType
from typing import Any

from fcq_tasks.errors import GuestAgentError


class GuestAgent:
    """One exchange session with a guest's agent, opened with ``with``."""

    def __init__(self, socket_path: str, timeout: float, vm: str) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.vm = vm
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as err:
            sock.close()
            raise GuestAgentError(f"{self.vm}: guest agent socket: {err}", vm=self.vm) from err
        self._sock = sock
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
        except OSError as err:
            raise GuestAgentError(f"{self.vm}: guest agent write: {err}", vm=self.vm) from err

    def _recv(self, deadline: float) -> None:
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestAgentError(f"{self.vm}: guest agent timed out after {self.timeout} s",
                                  vm=self.vm)
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError as err:
            raise GuestAgentError(f"{self.vm}: guest agent timed out after {self.timeout} s",
                                  vm=self.vm) from err
        except OSError as err:
            raise GuestAgentError(f"{self.vm}: guest agent read: {err}", vm=self.vm) from err
        if not chunk:
            raise GuestAgentError(f"{self.vm}: guest agent closed the channel", vm=self.vm)
        self._buf += chunk

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            self._recv(deadline)
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.strip()
        if not line:
            return self._read_message(deadline)
        try:
            msg = json.loads(line)
        except ValueError:
            return {}  # garbage from an earlier, interrupted exchange
        return msg if isinstance(msg, dict) else {}

    def sync(self) -> None:
        """Resynchronise the channel; afterwards answers belong to us."""
        deadline = time.monotonic() + self.timeout
        sync_id = random.randint(1, 2**31 - 1)
        self._buf = b""
        self._send(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
        while b"\xff" not in self._buf:
            self._recv(deadline)
        self._buf = self._buf.split(b"\xff", 1)[1]
        while True:
            msg = self._read_message(deadline)
            if msg.get("return") == sync_id:
                return

    def execute(self, command: str, **arguments: object) -> Any:
        """Sync, run *command* in the guest, and return its ``return`` value."""
        self.sync()
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        msg = self._read_message(time.monotonic() + self.timeout)
        if "error" in msg:
            raise GuestAgentError(f"{self.vm}: guest agent {command}: {msg['error']}",
                                  vm=self.vm, command=command)
        return msg.get("return")

    def ping(self) -> None:
        self.execute("guest-ping")
