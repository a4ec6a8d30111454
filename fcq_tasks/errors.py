"""The one exception tree of fcq.

Every error fcq raises on purpose derives from :class:`FcqError` and carries
the fields an operator needs to act on it. The tree is short on purpose::

    FcqError
     ├── UserError                 the request or the config is wrong; retrying won't help
     │    ├── ConfigError          a file or field breaks a rule (file, field, rule)
     │    │    └── ConfigErrors     several of one file at once (errors)
     │    ├── BadRequest           a command/task argument breaks a rule (field, rule)
     │    ├── UnknownVM            no config for this VM on this host
     │    └── Refused              a safety rule forbids the operation now
     │         ├── VMBusy          another operation holds the VM's operation lock
     │         ├── MemoryLimitExceeded
     │         ├── ShrinkRefused   disks never shrink
     │         ├── LockedByOtherHost
     │         ├── Unauthorized  no valid orchestrator grant (signed commands)
     │         └── Inconsistent    what we observed needs an operator's decision
     └── SystemFailure              the machine failed us (QEMU, QMP, storage, commands)
          ├── QemuError
          │    ├── QmpError        the monitor did not answer (timeout, closed socket)
          │    ├── QemuRefused     the monitor answered: QEMU refused the command
          │    └── GuestAgentError
          │         ├── NoGuestAgent    no agent answers in the guest (not running, not installed)
          │         └── GuestAgentTimeout  a command got no answer within its named timeout
          └── StorageError

The CLI maps the branches to exit codes (see ``docs/cli.md``); the Celery
tasks put ``UserError`` subclasses into ``Task.throws`` so they are logged
without a traceback.
"""

from __future__ import annotations


class FcqError(Exception):
    """Root of every error fcq raises deliberately."""

    exit_code = 1

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe description for ``--json`` output and task results."""
        out: dict[str, object] = {"error": type(self).__name__, "message": self.message}
        out.update({k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                    for k, v in self.fields.items()})
        return out


class UserError(FcqError):
    """The request or the configuration is wrong; the system is fine."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file or one of its fields breaks a rule."""

    def __init__(self, file: str, field: str, rule: str) -> None:
        super().__init__(f"{file}: {field}: {rule}", file=file, field=field, rule=rule)
        self.file = file
        self.field = field
        self.rule = rule


class ConfigErrors(ConfigError):
    """Several mistakes of one file, each a ConfigError: reported together, not one by one."""

    def __init__(self, errors: list[ConfigError]) -> None:
        UserError.__init__(self, "\n".join(e.message for e in errors),
                           file=errors[0].fields.get("file"), count=len(errors))
        self.errors = errors

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["errors"] = [e.to_dict() for e in self.errors]
        return out


class BadRequest(UserError):
    """An argument of a command or task breaks a rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}", field=field, rule=rule)
        self.field = field
        self.rule = rule


class UnknownVM(UserError):
    """This host has no configuration for the VM."""

    def __init__(self, vm: str, config_dir: str) -> None:
        super().__init__(f"{vm}: no config in {config_dir}", vm=vm, config_dir=config_dir)
        self.vm = vm


class Refused(UserError):
    """A safety rule forbids the operation at this moment."""

    exit_code = 4


class VMBusy(Refused):
    """Another operation holds the VM's operation lock."""

    exit_code = 3

    def __init__(self, vm: str, holder: str = "") -> None:
        detail = f" ({holder})" if holder else ""
        super().__init__(f"{vm}: busy with another operation{detail}", vm=vm, holder=holder)
        self.vm = vm


class MemoryLimitExceeded(Refused):
    """Starting the VM would book more memory than vm-max-total-memory."""

    def __init__(self, vm: str, wanted_mb: int, booked_mb: int, limit_mb: int) -> None:
        super().__init__(
            f"{vm}: needs {wanted_mb} MB but {booked_mb} of {limit_mb} MB "
            "(vm_max_total_memory) are booked by running VMs",
            vm=vm, wanted_mb=wanted_mb, booked_mb=booked_mb, limit_mb=limit_mb)


class ShrinkRefused(Refused):
    """A disk would become smaller than it is."""

    def __init__(self, vm: str, volume: str, current: int, wanted: int) -> None:
        super().__init__(
            f"{vm}: {volume} is {current} bytes, config asks for {wanted}: disks never shrink",
            vm=vm, volume=volume, current_bytes=current, wanted_bytes=wanted)


class LockedByOtherHost(Refused):
    """A volume lock is held by another host, which may be alive."""

    def __init__(self, vm: str, volume: str, owner: str) -> None:
        super().__init__(f"{vm}: volume {volume} is locked by host {owner}",
                         vm=vm, volume=volume, owner=owner)
        self.owner = owner


class Unauthorized(Refused):
    """An imperative request without a valid grant of the orchestrator's key.

    Nothing was done: the host did not even look at the VM.
    """


class Inconsistent(Refused):
    """What fcq observed cannot be resolved safely without an operator."""

    def __init__(self, vm: str, found: str, why: str) -> None:
        super().__init__(f"{vm}: inconsistent state ({found}): {why}", vm=vm, found=found)


class SystemFailure(FcqError):
    """The machine failed us: a process, socket, command or disk."""


class QemuError(SystemFailure):
    """Starting, stopping or talking to a QEMU process failed."""


class QmpError(QemuError):
    """The monitor did not answer: connection refused or closed, or a timeout."""


class QemuRefused(QemuError):
    """The monitor answered, and QEMU refused the command (``error_class`` says why)."""

    def __init__(self, message: str, vm: str, command: str, error_class: str) -> None:
        super().__init__(message, vm=vm, command=command, error_class=error_class)
        self.error_class = error_class


class GuestAgentError(QemuError):
    """The guest agent did not answer as expected."""


class NoGuestAgent(GuestAgentError):
    """No agent runs in the guest: its port is closed, or it never answered the sync.

    Not a failure of the operation by itself: callers decide what a guest
    without an agent means (a snapshot without a freeze, no thaw needed).
    """

    def __init__(self, vm: str, why: str) -> None:
        super().__init__(f"{vm}: no guest agent: {why}", vm=vm)


class GuestAgentTimeout(GuestAgentError):
    """A guest agent command got no answer within the timeout named by *setting*."""

    def __init__(self, vm: str, command: str, seconds: float, setting: str) -> None:
        super().__init__(f"{vm}: guest agent {command} got no answer within {seconds:g} s "
                         f"({setting})", vm=vm, command=command, seconds=seconds,
                         setting=setting)


class StorageError(SystemFailure):
    """Creating, resizing, locking or removing a volume failed."""


class TaskError(Exception):
    """Base of what Celery tasks raise for an FcqError.

    Not an FcqError on purpose: Celery rebuilds a failed task's exception on
    the client as ``cls(*args)``, so the only argument is the JSON-safe dict
    of the original error (``FcqError.to_dict()``).
    """

    def __init__(self, info: dict[str, object]) -> None:
        super().__init__(info)
        self.info = info


class TaskRejected(TaskError):
    """The request broke a rule (a UserError): expected, logged without traceback."""


class TaskFailed(TaskError):
    """The host failed (a SystemFailure): logged with its traceback."""


class RemoteError(FcqError):
    """A task on a host ended in an FcqError; carries its original class name."""

    def __init__(self, info: dict[str, object]) -> None:
        fields = {k: v for k, v in info.items() if k not in ("message",)}
        super().__init__(str(info.get("message", info)), **fields)
        original = globals().get(str(info.get("error")))
        self.exit_code = getattr(original, "exit_code", 1)
