"""How fcq's task arguments read in Flower and in Celery's events."""

from __future__ import annotations

from typing import Any

#: Task arguments shown by name in Flower's task list, in this order; the rest
#: is summarised (a VM file's text by its size), never shown whole.
SHOWN_KWARGS = ("vm", "host", "name", "disk", "src", "dst", "dead", "drained", "attempt",
                "config_version")


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """How a task's arguments read in Flower and in Celery's events: ``vm=web01 host=alpha``.

    Celery shows ``kwargsrepr`` instead of the arguments themselves; fcq's
    tasks carry no secrets, and this keeps it that way for whatever is
    added later: only the names listed in SHOWN_KWARGS appear with values.
    """
    parts = [f"{k}={kwargs[k]}" for k in SHOWN_KWARGS if kwargs.get(k) is not None]
    if "config" in kwargs:
        parts.append(f"config=<{len(str(kwargs['config']))} bytes>")
    hidden = sorted(k for k in kwargs if k not in SHOWN_KWARGS and k != "config")
    parts += [f"{k}=…" for k in hidden if k not in ("expires_at", "version", "grant")]
    return " ".join(parts)
