"""The guest's health as ensure keeps it: never left frozen, told its QEMU generation.

Everything here is best effort around a running guest: a guest without an
agent, or with one that does not answer, is reported and left alone: it
never fails the ensure that looked.

The agent is asked only when QEMU says a process in the guest holds the
agent's port open (``query-chardev``), so a guest without qemu-ga costs no
timeout. An agent that holds its port but does not answer is left alone for
:data:`AGENT_BACKOFF` seconds before it is asked again: a sweep over many
such guests must not wait a timeout for each, every time.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from fcq_tasks.errors import FcqError, NoGuestAgent, QemuError
from fcq_tasks.fileio import write_atomically
from fcq_tasks.hazmat.guestagent import AgentTimeouts, GuestAgent
from fcq_tasks.hazmat.qemu import boot_id

if TYPE_CHECKING:
    from fcq_tasks.host.steps import VMSteps

#: Seconds a silent agent is left alone before ensure asks it again.
AGENT_BACKOFF = 300.0
#: Seconds ensure's own questions to the agent may take (a frozen guest's
#: agent still answers at once: qemu-ga itself is not frozen).
PROBE_TIMEOUT = 2.0

#: Seconds after which the guest is told its generations again: a guest that
#: rebooted by itself (same QEMU) lost them with its /run.
RETELL_AFTER = 600.0

#: Where the guest finds its QEMU generations (the names fc.qemu used, so
#: guests that watch them keep working; docs/guest.md).
GENERATION_BOOTED = "/run/qemu-binary-generation-booted"
GENERATION_CURRENT = "/run/qemu-binary-generation-current"


def agent_timeouts(steps: VMSteps, probe: bool = False) -> AgentTimeouts:
    s = steps.settings
    call = min(PROBE_TIMEOUT, s.guest_agent_timeout) if probe else s.guest_agent_timeout
    return AgentTimeouts(call=call, freeze=s.freeze_timeout, thaw=s.thaw_timeout,
                         lock=call if probe else s.guest_agent_timeout * 3)


def agent_open(steps: VMSteps) -> bool:
    """Whether qemu-ga runs in the guest (QEMU's view of the port; no guest round trip)."""
    try:
        with steps.qemu.monitor() as mon:
            return mon.guest_agent_open()
    except QemuError:
        return False


def _backing_off(steps: VMSteps) -> bool:
    try:
        data = json.loads(steps.paths.agent_silent_mark.read_text())
        return bool(data["boot_id"] == boot_id()
                    and time.monotonic() - float(data["since"]) < AGENT_BACKOFF)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _agent(steps: VMSteps, port_open: bool) -> GuestAgent | None:
    """A session for ensure's questions, or None (no agent, or one in back-off)."""
    if not port_open or _backing_off(steps):
        return None
    return GuestAgent(str(steps.paths.ga), agent_timeouts(steps, probe=True), steps.name)


def _silent(steps: VMSteps, err: FcqError) -> None:
    steps.log.warning("guest-agent-silent", action="nothing", error=err.message,
                      detail=f"not asked again for {AGENT_BACKOFF:.0f} s")
    write_atomically(steps.paths.agent_silent_mark,
                     json.dumps({"boot_id": boot_id(), "since": time.monotonic()}))


def keep_healthy(steps: VMSteps, generation: int, port_open: bool) -> list[str]:
    """Thaw a frozen guest and tell it the QEMU generations; the actions taken.

    *generation*: the generation the running QEMU was started with;
    *port_open*: QEMU said qemu-ga holds its port (observe() asked).
    """
    ga = _agent(steps, port_open)
    if ga is None:
        return []
    done = []
    current = steps.settings.qemu_generation
    told = f"{generation} {current}"
    try:
        with ga:
            if ga.freeze_status() == "frozen":
                count = ga.thaw()
                # Loud: a frozen guest serves nobody, and someone froze it
                # (a crashed snapshot, a tool of the guest's own).
                steps.log.error("guest-thawed", action="thaw", filesystems=count,
                                detail="the guest was found frozen")
                done.append("thaw")
            if _told(steps) != told:
                ga.write_file(GENERATION_BOOTED, f"{generation}\n".encode())
                ga.write_file(GENERATION_CURRENT, f"{current}\n".encode())
                write_atomically(steps.paths.generation_told, told)
                steps.log.info("generation-told", action="tell-generation", booted=generation,
                               current=current)
            steps.paths.agent_silent_mark.unlink(missing_ok=True)
    except NoGuestAgent as err:
        _silent(steps, err)
    except FcqError as err:
        steps.log.warning("guest-check-failed", action="nothing", error=err.message)
    return done


def _told(steps: VMSteps) -> str:
    """What the guest was told, if recently: its /run is lost when it reboots by itself."""
    try:
        path = steps.paths.generation_told
        if time.time() - path.stat().st_mtime < RETELL_AFTER:
            return path.read_text()
    except OSError:
        pass
    return ""
