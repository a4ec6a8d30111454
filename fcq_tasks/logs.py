"""Logging: structlog events as JSON lines to a file and text to a terminal.

Every event carries a local-time timestamp; the agent binds ``vm=`` and
``action=``. Writing a log line must never fail a VM operation: a full disk,
a closed stdout or a missing log directory costs the line, not the start or
stop that logged it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class TeeLogger:
    """Writes each event to a JSON-lines file and a text stream, best effort."""

    def __init__(self, json_file: Path | None, stream: TextIO | None) -> None:
        self.json_file = json_file
        self.stream = stream
        self._fh: TextIO | None = None

    def _json_out(self) -> TextIO | None:
        if self._fh is None and self.json_file is not None:
            try:
                self.json_file.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.json_file, "a", buffering=1)  # noqa: SIM115 - kept open
            except OSError:
                self.json_file = None  # give up on the file, keep the VM operation going
        return self._fh

    def msg(self, json_line: str, text_line: str) -> None:
        fh = self._json_out()
        # Disk full, file or pipe closed: lose the line, never the operation.
        if fh is not None:
            with contextlib.suppress(OSError, ValueError):
                fh.write(json_line + "\n")
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(text_line + "\n")
                self.stream.flush()

    debug = info = warning = warn = error = critical = exception = log = msg


def _render_both(console: structlog.dev.ConsoleRenderer) -> structlog.typing.Processor:
    # A tuple returned by the last processor is (args, kwargs) for the
    # logger method: TeeLogger.msg(json_line, text_line).
    def render(logger: Any, method: str,
               event: structlog.typing.EventDict) -> tuple[tuple[str, str], dict[str, Any]]:
        json_line = json.dumps(event, default=str, sort_keys=False)
        text_line = str(console(logger, method, dict(event)))
        return (json_line, text_line), {}
    return render


def configure(log_file: Path | None, level: str = "info",
              stream: TextIO | None = sys.stderr, colors: bool | None = None) -> None:
    """Set up structlog for this process (the CLI and the worker call it once)."""
    if colors is None:
        try:
            colors = bool(stream is not None and stream.isatty())
        except (OSError, ValueError):
            colors = False  # a closed stream: it won't be written to anyway
    console = structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=24)
    tee = TeeLogger(log_file, stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            _render_both(console),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *args: tee,
        cache_logger_on_first_use=False,
    )
