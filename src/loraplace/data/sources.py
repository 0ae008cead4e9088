"""Read records (list of dicts) from local JSON / JSONL / CSV / Parquet files, HF datasets, or builtin tasks."""

from __future__ import annotations

import csv
import hashlib
import io
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
                    try:  # one JSON document over several lines (pretty-printed) under a .jsonl name: read it
                        whole = json.loads(text)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})",
                                        "one JSON object per line") from None
                    return whole if isinstance(whole, list) else [whole]
    return data


def _read_csv(path: Path, text: str) -> list[dict]:
    """Rows of a CSV file by its header. Read as one stream (newline=""), so a quoted field keeps its line breaks
    (GSM8K's answers span lines); strict, so an unclosed quote is an error, not one long field."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        return list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.reader.line_num}: invalid CSV ({exc})",
                        "check the quoting: a field with a comma, quote or line break is quoted, and a quote "
                        "inside it is doubled (\"\")") from None


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
            # a leading BOM is read, as pandas and datasets do; newline="": a CSV field keeps its own \r\n
            with open(path, encoding="utf-8-sig", newline="") as fh:
                text = fh.read()
            if suffix == ".csv":
                records = _read_csv(path, text)
            elif suffix in (".json", ".jsonl", ".ndjson"):
                records = _read_json(path, text)
            else:
                raise DataError(f"unsupported data file type {suffix!r}: {path}", "use .jsonl, .json, .csv or .parquet")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                        "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of objects (records), got a JSON {_json_type(records)}")
    bad = next((i for i, r in enumerate(records, 1) if not isinstance(r, dict)), None)
    if bad is not None:  # name the record, not just the file
        raise DataError(f"{path}: record {bad} is a JSON {_json_type(records[bad - 1])}, not an object",
                        'each record is one JSON object, e.g. {"question": "…", "answer": "…"}')
    if not records:
        raise DataError(f"{path} holds no records", "check the file is the one you meant")
    return records, fingerprint


def _json_type(value: object) -> str:
    """JSON's name for a parsed value's type (array, string, …), as the file's author wrote it."""
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


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
