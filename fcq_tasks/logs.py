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
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class TeeLogger:
    """Writes each event to a JSON-lines file and a text stream, best effort.

    The file is opened again when it was moved or removed (logrotate): the
    check is one stat() per line, as logging's WatchedFileHandler does;
    without it a rotated log would be written forever under its old name.
    """

    def __init__(self, json_file: Path | None, stream: TextIO | None) -> None:
        self.json_file = json_file
        self.stream = stream
        self._fh: TextIO | None = None
        self._ident: tuple[int, int] | None = None  # (dev, ino) of the open file
        self._lock = threading.Lock()

    def _rotated(self) -> bool:
        assert self.json_file is not None
        try:
            st = os.stat(self.json_file)
        except OSError:
            return True  # moved away or removed: a new file at the path
        return (st.st_dev, st.st_ino) != self._ident

    def _json_out(self) -> TextIO | None:
        if self.json_file is None:
            return None
        if self._fh is not None and not self._rotated():
            return self._fh
        with self._lock:
            if self._fh is not None and not self._rotated():
                return self._fh  # another thread reopened it meanwhile
            try:
                self.json_file.parent.mkdir(parents=True, exist_ok=True)
                fh = open(self.json_file, "a", buffering=1)  # noqa: SIM115 - kept open
                st = os.fstat(fh.fileno())
            except OSError:
                # Give up on the file, keep the VM operation going.
                self.json_file, self._fh = None, None
                return None
            # The old file is not closed here: another thread may be writing
            # its line to it right now; it closes when the last one lets go.
            self._fh, self._ident = fh, (st.st_dev, st.st_ino)
            return fh

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
