"""Read records (list of dicts) from local JSON / JSONL / CSV / Parquet files, HF datasets, or builtin tasks."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from loraplace.data.builtin import load_builtin
from loraplace.errors import DataError
from loraplace.formatting import one_line


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path, text: str) -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    elif stripped.startswith("{") and path.suffix == ".json" and "\n{" not in stripped:
        data = json.loads(text)
        data = data.get("data", data.get("train", [data])) if isinstance(data, dict) else data
    else:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})", "one JSON object per line") from None
    return data


def read_records(source: str) -> tuple[list[dict], str]:
    """Records of ``source`` and a fingerprint that changes whenever its content does."""
    if source.startswith("builtin:"):
        return load_builtin(source)
    if source.startswith("hf:"):
        return _read_hf(source)
    path = Path(source).expanduser()
    if path.is_dir():  # not "not found": it is there, and it is not a file
        raise DataError(f"{source} is a directory, not a data file",
                        "give a .jsonl/.json/.csv/.parquet file inside it, hf:NAME[:CONFIG][@SPLIT] or "
                        "builtin:arithmetic")
    if not path.is_file():
        raise DataError(f"data file not found: {source}",
                        "give a .jsonl/.json/.csv/.parquet path, hf:NAME[:CONFIG][@SPLIT] or builtin:arithmetic")
    suffix = path.suffix.lower()
    fingerprint = f"file:{file_sha256(path)}"
    try:
        if suffix == ".parquet":
            records = _read_parquet(path)
        else:
            text = path.read_text(encoding="utf-8-sig")  # a leading BOM is read, as pandas and datasets do
            if suffix == ".csv":
                records = list(csv.DictReader(text.splitlines()))
            elif suffix in (".json", ".jsonl", ".ndjson"):
                records = _read_json(path, text)
            else:
                raise DataError(f"unsupported data file type {suffix!r}: {path}", "use .jsonl, .json, .csv or .parquet")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                        "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of objects (records)")
    if not records:
        raise DataError(f"{path} holds no records", "check the file is the one you meant")
    return records, fingerprint


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:  # not Parquet, or truncated: what pyarrow says, naming the file
        raise DataError(f"{path} is not a readable Parquet file ({one_line(str(exc), 200)})",
                        "check the file; a .parquet name with other content (CSV, JSON) needs its own suffix") from None


def _read_hf(source: str) -> tuple[list[dict], str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` through the real ``datasets`` hub loader (offline it fails clearly)."""
    spec = source.removeprefix("hf:")
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad config: one clear message
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {type(exc).__name__}: {str(exc)[:200]}",
                        "check the name and your network, or download it and pass the local file") from None
    fingerprint = f"hf:{name}:{config}@{split}:{getattr(ds, '_fingerprint', '')}"
    return ds.to_list(), fingerprint
