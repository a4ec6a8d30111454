"""The freeze guard: a small process that freezes a guest and always thaws it.

A guest must never be left frozen (fc.qemu shipped that bug three times).
A ``finally`` in the process that froze it is not enough: that process can
be killed (SIGKILL, the OOM killer), stopped (SIGSTOP, a hung NFS read, a
debugger) or stuck in a storage call for longer than any guest can stay
frozen. So the guest agent session that freezes is held by a separate
process, which thaws:

* when told to (the normal path, right after the snapshot);
* when its parent goes away (its stdin reaches EOF, whatever killed it);
* when the guest has been frozen for *max_frozen* seconds, even if the
  parent is alive but silent (stopped, or stuck in a storage call);
* when it is sent SIGTERM or SIGINT itself;
* after a freeze that failed or timed out (some file systems may be frozen).

If the guard itself is killed, the parent sees its pipe close and thaws
through a session of its own; if both die, the next ensure of the VM finds
the guest frozen and thaws it.

Protocol on stdin/stdout, one JSON object per line: the guard says
``{"ready": true}`` once it holds the agent (or ``{"ready": false, ...}``
with the error, e.g. no agent), then answers ``freeze`` and ``thaw`` with
``{"to": command, "ok": true, "count": n}`` or ``{"to": command, "ok": false,
"error": ..., "message": ...}``, and exits after a thaw.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from types import FrameType, TracebackType
from typing import Any

from fcq_tasks.errors import FcqError, GuestAgentError, GuestAgentTimeout, NoGuestAgent
from fcq_tasks.hazmat.guestagent import AgentTimeouts, GuestAgent

#: Thaw attempts the guard makes (a fresh session each) before it gives up.
THAW_ATTEMPTS = 3
#: Seconds the parent allows on top of the guard's own timeouts.
MARGIN = 5.0


class FreezeGuard:
    """Freeze and thaw VM *vm*'s guest through a guard process (see the module doc).

    Use with ``with``: leaving the block thaws, whatever happened inside.
    """

    def __init__(self, socket_path: str, vm: str, timeouts: AgentTimeouts,
                 max_frozen: float, agent_gone: Callable[[], bool] | None = None) -> None:
        """*agent_gone*: whether qemu-ga is known to have left (its port closed):
        then nothing is frozen any more and thawing stops trying."""
        self.agent_gone = agent_gone
        self.socket_path = socket_path
        self.vm = vm
        self.timeouts = timeouts
        self.max_frozen = max_frozen
        self.frozen = False   # a freeze was asked (some file systems may be frozen)
        self.frozen_at = 0.0  # monotonic time of the freeze request
        self._broken = False  # the guard stopped answering
        self._proc: subprocess.Popen[str] | None = None
        self._lines: LineReader | None = None

    def __enter__(self) -> FreezeGuard:
        args = json.dumps({"socket": self.socket_path, "vm": self.vm,
                           "timeouts": asdict(self.timeouts), "max_frozen": self.max_frozen})
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fcq_tasks.hazmat.freezeguard", args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, close_fds=True,
            # Its own session: a Ctrl-Z or Ctrl-C meant for fcq must not
            # stop the process whose job is to thaw.
            start_new_session=True)
        assert self._proc.stdout is not None
        self._lines = LineReader(self._proc.stdout.fileno())
        try:
            hello = self._read(self.timeouts.lock + self.timeouts.call + MARGIN, "start")
        except BaseException:
            self._end()
            raise
        if not hello.get("ready"):
            self._end()
            raise _error(self.vm, hello)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.frozen:
                self.thaw()
        finally:
            self._end()

    def freeze(self) -> int:
        """Freeze the guest's file systems; raises (after the guard thawed) if that failed."""
        self.frozen = True
        self.frozen_at = time.monotonic()
        try:
            reply = self._ask("freeze", self.timeouts.freeze + thaw_window(self.timeouts))
        except BaseException:
            # Silent, gone, or we were interrupted (SIGTERM) mid-wait: its
            # late answer could be mistaken for another; __exit__ thaws
            # without it.
            self._broken = True
            raise
        if not reply.get("ok"):
            # The guard tried to thaw before it answered; if it could not,
            # __exit__ tries again.
            self.frozen = not reply.get("thawed", False)
            raise _error(self.vm, reply)
        return int(reply.get("count", 0))

    def still_frozen(self) -> bool:
        """Whether the guard cannot have thawed on its own yet (max_frozen not reached).

        Both processes read the same monotonic clock; a snapshot finished
        after this turned False may have been taken of a thawed guest.
        """
        return self.frozen and time.monotonic() < self.frozen_at + self.max_frozen

    def thaw(self) -> int:
        """Thaw the guest; if the guard does not, thaw through a session of our own."""
        if not self._broken:
            try:
                reply = self._ask("thaw", thaw_window(self.timeouts))
                if reply.get("ok"):
                    self.frozen = False
                    return int(reply.get("count", 0))
            except FcqError:
                pass
        # The guard failed, hung or died: it must let go of the agent before
        # anyone else can talk to it (QEMU serves one client at a time).
        self._end(kill=True)
        count = thaw_directly(self.socket_path, self.vm, self.timeouts, self.agent_gone)
        self.frozen = False
        return count

    def _ask(self, command: str, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except OSError as err:
            raise GuestAgentError(f"{self.vm}: freeze guard is gone: {err}", vm=self.vm) from err
        deadline = time.monotonic() + timeout + MARGIN
        while True:
            reply = self._read(max(0.0, deadline - time.monotonic()), command)
            # A late answer to an earlier request (a freeze we stopped waiting
            # for) is not the answer to this one.
            if reply.get("to") == command:
                return reply

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        assert self._lines is not None
        line = self._lines.readline(timeout)
        if line is None:
            raise GuestAgentError(f"{self.vm}: freeze guard did not answer {what} within "
                                  f"{timeout:g} s", vm=self.vm)
        if not line:
            raise GuestAgentError(f"{self.vm}: freeze guard exited during {what}", vm=self.vm)
        try:
            reply = json.loads(line)
        except ValueError as err:
            raise GuestAgentError(f"{self.vm}: freeze guard said {line!r}", vm=self.vm) from err
        return reply if isinstance(reply, dict) else {}

    def _end(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: a guard still holding a freeze thaws and exits
        try:
            proc.wait(timeout=self.timeouts.thaw + MARGIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def thaw_window(timeouts: AgentTimeouts) -> float:
    """How long thawing keeps trying: a freeze in flight finishes first (qemu-ga is serial)."""
    return timeouts.freeze + timeouts.thaw * THAW_ATTEMPTS + timeouts.call


def thaw_directly(socket_path: str, vm: str, timeouts: AgentTimeouts,
                  agent_gone: Callable[[], bool] | None = None) -> int:
    """Thaw through a session of this process until the guest says thawed.

    An agent that does not answer may be busy finishing a freeze (it
    answers nothing else meanwhile): keep trying for thaw_window(), unless
    *agent_gone* says qemu-ga left. Raises if the guest may still be frozen.
    """
    deadline = time.monotonic() + thaw_window(timeouts)
    last: FcqError | None = None
    while True:
        try:
            with GuestAgent(socket_path, timeouts, vm) as ga:
                count = ga.thaw()
                if ga.freeze_status() == "thawed":
                    return count
        except FcqError as err:
            last = err
            if isinstance(err, NoGuestAgent) and agent_gone is not None and agent_gone():
                return 0  # qemu-ga is gone: it holds no freeze any more
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise GuestAgentError(f"{vm}: the guest may still be frozen: no thaw succeeded within "
                          f"{thaw_window(timeouts):.0f} s ({last.message if last else '?'}); "
                          "the next ensure tries again", vm=vm)


def _error(vm: str, reply: dict[str, Any]) -> FcqError:
    message = str(reply.get("message") or reply)
    if reply.get("error") == "NoGuestAgent":
        err: FcqError = NoGuestAgent(vm, message.split("no guest agent: ", 1)[-1])
    elif reply.get("error") == "GuestAgentTimeout":
        err = GuestAgentTimeout(vm, str(reply.get("command")), float(reply.get("seconds", 0)),
                                str(reply.get("setting")))
    else:
        err = GuestAgentError(message, vm=vm)
    return err


class LineReader:
    """Lines from a pipe's file descriptor, each waited for at most a timeout.

    Reads the descriptor itself: a buffered stream may hold a second line
    that select() on the descriptor cannot see, and a thaw request would
    then wait for the next timeout.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self._eof = False

    def readline(self, timeout: float | None) -> str | None:
        """One line ("" at EOF), or None when *timeout* passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf and not self._eof:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                self._eof = True
            self._buf += chunk
        if b"\n" not in self._buf:
            return ""  # EOF; a partial last line is not a command
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace") + "\n"


# -- the guard process --------------------------------------------------------


def _say(**reply: Any) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def _guard(socket_path: str, vm: str, timeouts: AgentTimeouts, max_frozen: float) -> None:
    frozen_at: float | None = None

    def thaw(ga: GuestAgent | None) -> dict[str, Any]:
        """Thaw until the guest says so; a freeze still in flight is waited out."""
        deadline = time.monotonic() + thaw_window(timeouts)
        last: FcqError | None = None
        while True:
            try:
                if ga is not None:
                    count = ga.thaw()
                    return {"ok": True, "count": count}
                with GuestAgent(socket_path, timeouts, vm) as again:
                    count = again.thaw()
                    if again.freeze_status() == "thawed":
                        return {"ok": True, "count": count}
            except FcqError as err:
                last = err
            if ga is not None:
                ga.__exit__(None, None, None)  # a fresh session next time
                ga = None
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        assert last is not None
        return {"ok": False, **last.to_dict()}

    commands = LineReader(sys.stdin.fileno())
    ga = GuestAgent(socket_path, timeouts, vm)
    try:
        ga.__enter__()
        ga.sync()
    except FcqError as err:
        ga.__exit__(None, None, None)
        _say(ready=False, **err.to_dict())
        return
    try:
        _say(ready=True)
        while True:
            # Before the freeze too: a parent gone silent frees the agent.
            wait = max_frozen if frozen_at is None \
                else frozen_at + max_frozen - time.monotonic()
            line = commands.readline(max(0.0, wait))
            command = (line or "").strip()
            if command == "freeze" and frozen_at is None:
                frozen_at = time.monotonic()  # from the request: a timed-out one may freeze
                try:
                    _say(to="freeze", ok=True, count=ga.freeze())
                except FcqError as err:
                    result = thaw(ga)
                    frozen_at = None
                    _say(to="freeze", ok=False, **err.to_dict(),
                         thawed=result.get("ok", False))
                    return
            elif command == "thaw":
                result = thaw(ga)
                frozen_at = None
                _say(to="thaw", **result)
                return
            else:
                # EOF (the parent is gone), the deadline, or nonsense: thaw, leave.
                if frozen_at is not None:
                    thaw(ga)
                    frozen_at = None
                return
    finally:
        if frozen_at is not None:  # a signal or an error in between: thaw on the way out
            thaw(ga)
        ga.__exit__(None, None, None)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    for stop in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(stop, signal.SIG_IGN)  # a guard that sleeps cannot thaw
    args = json.loads(argv[0])
    _guard(str(args["socket"]), str(args["vm"]), AgentTimeouts(**args["timeouts"]),
           float(args["max_frozen"]))
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
