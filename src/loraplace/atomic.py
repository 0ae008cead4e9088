"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of either.

Write to a temp file in the target's directory, fsync it, rename it over the target, fsync the directory (so the
rename itself survives a power cut). Every file loraplace writes outside the store goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a directory for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    # Reading the umask means setting it; doing that once, at import, keeps it off any thread's path.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file object (``mode`` "w" text, UTF-8, or "wb") whose content replaces ``path`` when the block ends without
    an error — fsynced, renamed over it, the directory fsynced — and is deleted when it ends with one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode an ordinary open() would (0666 less the umask), so a
        # report or a config can be read by whoever could read any other file the user writes.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))
