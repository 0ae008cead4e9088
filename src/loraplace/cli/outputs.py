"""Where a command writes: an output file or directory is never silently overwritten unless it holds an earlier
output of the same kind (or the user says --force)."""

from __future__ import annotations

from loraplace.errors import LoraplaceError
from loraplace.paths import folder_problem, nearest_existing


def output_file(path: str, kind: str, inputs: tuple[str, ...] = ()):
    """An --out file path that can be written: its directory exists, it is not a directory, not one of the
    command's ``inputs`` (the store, …), and not an existing file other than an earlier output of this ``kind``
    (``export``'s csv/json/parquet, ``export-placement``'s formats) — a command never writes over what it did not
    write itself."""
    from pathlib import Path

    from loraplace.store import SQLITE_MAGIC

    target = Path(path)
    if target.is_dir():
        raise LoraplaceError(f"--out {target} is a directory", f"give a file path, e.g. {_example_file(kind)}")
    if not target.parent.is_dir():
        existing = nearest_existing(target.parent)
        if not existing.is_dir():  # notes.txt/x.csv: the file in the way is the cause
            raise LoraplaceError(f"--out {target}: {existing} is a file, not a folder",
                                 f"give a file path inside a folder, e.g. {_example_file(kind)}")
        raise LoraplaceError(f"--out {target}: folder {target.parent} does not exist", "create it first")
    for given in inputs:
        if target.exists() and Path(given).exists() and target.samefile(given):
            raise LoraplaceError(f"--out {target} is this command's input", "give another file path")
    if target.exists():
        with open(target, "rb") as fh:
            head = fh.read(4096)
        what = "a loraplace store (or another SQLite database)" if head.startswith(SQLITE_MAGIC) else None
        if what is None and not _earlier_output(head, kind):
            what = "a file loraplace did not write"
        if what is not None:
            raise LoraplaceError(f"--out {target} exists and is {what}; it is not an earlier {kind} output of "
                                 "this command, so it is not overwritten", "give a new file name, or move that "
                                 "file away first")
    return target


def output_dir(path: str, owned: dict[str, str], *, what: str = "this command writes a directory there",
               option: str = "--out") -> None:
    """An --out directory a command can write into, checked before any work: not a file, nothing in the way of
    creating it, writable, and each entry the command writes there (``owned``: name → what it is) either absent
    or its own earlier output — a JSON record it wrote, a directory holding an adapter — never a file of someone
    else's. ``option`` names the directory in messages (a report's default folder is no option the user gave)."""
    from pathlib import Path

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LoraplaceError(f"{option} {target} is a file; {what}", "give a directory path (it is created if missing)")
    problem = folder_problem(target)  # notes.txt/run1, or a folder this process may not write
    if problem is not None:
        raise LoraplaceError(f"{option} {target}: {problem}", "give a directory path where you may write (it is "
                             "created if missing)")
    for name, what in owned.items():
        entry = target / name
        if not entry.exists():
            continue
        if what == "adapter":
            ours = entry.is_dir() and (entry / "adapter_config.json").is_file()
        else:
            with open(entry, "rb") as fh:
                head = fh.read(4096).decode("utf-8", errors="replace").lstrip()
            ours = entry.is_file() and head.startswith("{") and f'"{what}"' in head
        if not ours:
            raise LoraplaceError(f"--out {target}: {entry} exists and is not an earlier output of this command, "
                                 "so it is not overwritten", "give a new directory, or move that file away first")


def _example_file(kind: str) -> str:
    """A file name that fits what a command writes for ``kind``, for hints."""
    if kind in ("csv", "json", "parquet"):  # export's formats
        return f"trials.{kind}"
    from loraplace.exports import DEFAULT_FILENAMES  # export-placement's (that command loads the model anyway)

    return DEFAULT_FILENAMES.get(kind, "out.txt")


def _earlier_output(head: bytes, kind: str) -> bool:
    """Whether the first bytes of an existing file are what this command writes for ``kind``."""
    if kind == "parquet":
        return head.startswith(b"PAR1")
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if kind == "csv":
        return text.startswith("trial_id,")
    if kind == "json":
        return text.startswith("[") and ('"trial_id"' in text or text.rstrip() == "[]")
    if kind == "peft":
        return text.startswith("{") and '"peft_type"' in text
    return "loraplace export-placement" in text  # every other format names its writer near its top
