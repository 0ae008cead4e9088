"""Where a command may create files, answered before any work and without touching anything.

A path such as ``runs/a/x.db`` is written by creating its missing folders first; what decides whether that can work
is the nearest part of the path that already exists. If that part is a *file* (``notes.txt/x.db``), the honest
message is "notes.txt is a file, not a folder" — not "permission denied" (what ``os.access`` on it says) and not
"does not exist" (what ``is_dir`` says). Every command that writes a store, a report or an ``--out`` asks here.
"""

from __future__ import annotations

import os
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (the file system root at worst)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be created in ``folder`` (its missing parents created as needed), or None if they can as far
    as can be told without writing: the nearest existing part of it is a file, or not writable by this process.
    The message names that part."""
    existing = nearest_existing(Path(folder))
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: permission denied"
    return None


def os_error_text(exc: OSError) -> str:
    """An OSError as ``PATH: reason`` (the OS's own words, e.g. "Not a directory"), for one-line messages."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or type(exc).__name__
    return f"{where}: {reason}" if where else reason
