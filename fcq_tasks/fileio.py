"""Atomic file writes: readers see the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str, mode: int = 0o600, durable: bool = True) -> None:
    """Write *text* to *path* via a temp file in the same directory and rename.

    The rename alone is what makes the write atomic for readers and against
    a crash of the writing process. *durable* adds an fsync, so that the
    new content also survives a power loss; it costs ~10 ms per file on a
    busy disk and is pointless for files that describe processes a power
    loss ends anyway (QEMU's rendered config, seed, identity: the identity
    records the boot id, and a file from an earlier boot never names a live
    process).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
