"""Data: sources → records → (prompt, response) → token ids with prompt lengths, cached on disk; splits.

A tokenised example is ``ids`` (int32) and ``prompt_len``: labels are ``ids[t]`` for ``t >= prompt_len``
(``t >= 0`` with ``train_on_prompt``). Guards count empty, truncated and fully-truncated examples; examples
with no label token left are dropped, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from loraplace.data.formats import FORMATS, check_columns, detect_format, render
from loraplace.data.sources import read_records
from loraplace.errors import DataError
from loraplace.specs import StrictModel

CACHE_VERSION = 1


class TemplateSpec(StrictModel):
    prompt: str
    response: str


class DataSpec(StrictModel):
    train: str
    eval: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0, lt=1)
    eval_count: int | None = Field(default=None, gt=0)
    limit: int | None = Field(default=None, gt=0, description="use the first N training examples")
    eval_limit: int | None = Field(default=None, gt=0)
    format: Literal["auto", "alpaca", "gsm8k", "messages", "prompt_completion", "text"] = "auto"
    template: TemplateSpec | None = None
    max_len: int = Field(default=512, gt=8)
    train_on_prompt: bool = False
    split_seed: int = 0

    # A field validator (not a model validator), so this is reported together with type errors of other fields.
    @field_validator("eval_count")
    @classmethod
    def _one_split(cls, value: int | None, info: ValidationInfo) -> int | None:
        given = [k for k in ("eval", "eval_fraction") if info.data.get(k) is not None]
        given += ["eval_count"] if value is not None else []
        if len(given) > 1:
            raise ValueError(f"give one of eval, eval_fraction, eval_count (got {', '.join(given)})")
        return value


@dataclass
class TokenizedSet:
    """Examples as variable-length int32 id arrays plus where each response starts."""

    ids: list[np.ndarray]
    prompt_lens: np.ndarray
    answers: list[str]  # reference response text (for task accuracy); "" when not needed
    prompts: list[str]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray | list[int]) -> TokenizedSet:
        index = list(index)
        return TokenizedSet([self.ids[i] for i in index], self.prompt_lens[index], [self.answers[i] for i in index],
                            [self.prompts[i] for i in index], dict(self.stats))

    @property
    def label_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids) - self.prompt_lens.sum())


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.eos_token_id}|{tokenizer.bos_token_id}|{getattr(tokenizer, 'chat_template', '')}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def tokenize_records(records: list[dict], tokenizer, fmt: str, template: TemplateSpec | None, max_len: int,
                     train_on_prompt: bool) -> TokenizedSet:
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    check_columns(records, fmt)
    tmpl = (template.prompt, template.response) if template else None
    eos = tokenizer.eos_token_id
    stats = {"records": len(records), "empty": 0, "truncated": 0, "response_truncated_away": 0, "kept": 0}
    ids_out, plens, answers, prompts = [], [], [], []
    for record in records:
        prompt, response = render(record, fmt, tmpl, tokenizer)
        if not response.strip():
            stats["empty"] += 1
            continue
        p_ids = tokenizer(prompt)["input_ids"] if prompt else []
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if fmt != "messages" and eos is not None:
            r_ids = r_ids + [eos]  # TRL's convention: the model learns to stop
        ids = p_ids + r_ids
        if len(ids) > max_len:
            stats["truncated"] += 1
            ids = ids[:max_len]
        plen = 0 if train_on_prompt else len(p_ids)
        # Labels are ids[t] for t >= max(plen, 1): the first token is never predicted.
        if len(ids) <= max(plen, 1):
            stats["response_truncated_away"] += 1
            continue
        ids_out.append(np.asarray(ids, dtype=np.int32))
        plens.append(plen)
        answers.append(response)
        prompts.append(prompt)
    stats["kept"] = len(ids_out)
    stats["format"] = fmt  # type: ignore[assignment]
    return TokenizedSet(ids_out, np.asarray(plens, dtype=np.int64), answers, prompts, stats)


def _cache_path(key: dict) -> Path:
    from loraplace.models import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "tokenized" / f"{digest}.npz"


def load_tokenized(source: str, tokenizer, spec: DataSpec) -> tuple[TokenizedSet, bool]:
    """Tokenise a source, through the on-disk cache keyed by (tokenizer, content, format, template, max_len)."""
    records, fingerprint = read_records(source)
    key = {"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "src": fingerprint, "fmt": spec.format,
           "tmpl": spec.template.model_dump() if spec.template else None, "max_len": spec.max_len,
           "train_on_prompt": spec.train_on_prompt}
    path = _cache_path(key)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                offsets, flat = z["offsets"], z["flat"]
                meta = json.loads(str(z["meta"]))
                ids = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
                return TokenizedSet(ids, z["prompt_lens"], meta["answers"], meta["prompts"], meta["stats"]), True
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    data = tokenize_records(records, tokenizer, spec.format, spec.template, spec.max_len, spec.train_on_prompt)
    offsets = np.cumsum([0] + [len(x) for x in data.ids]).astype(np.int64)
    flat = np.concatenate(data.ids) if data.ids else np.zeros(0, np.int32)
    meta = json.dumps({"answers": data.answers, "prompts": data.prompts, "stats": data.stats})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, offsets=offsets, flat=flat, prompt_lens=data.prompt_lens, meta=np.asarray(meta))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data, False


def check_data(spec: DataSpec) -> list[str]:
    """Read every source of ``spec`` and check its format and columns, without a tokenizer: the problems a study
    must refuse before it writes anything. Returns warnings (e.g. eval examples that are also training examples)."""
    train, _ = read_records(spec.train)
    fmt = detect_format(train[0]) if spec.format == "auto" else spec.format
    check_columns(train, fmt)
    if spec.eval is None:
        return []
    held_out, _ = read_records(spec.eval)
    check_columns(held_out, detect_format(held_out[0]) if spec.format == "auto" else spec.format)
    seen = {json.dumps(r, sort_keys=True, default=str) for r in train}
    overlap = sum(json.dumps(r, sort_keys=True, default=str) in seen for r in held_out)
    if not overlap:
        return []
    same = " (the same data)" if overlap == len(held_out) else ""
    return [f"{overlap} of {len(held_out)} eval example(s) are also training examples{same}: the eval loss "
            "overstates how well a placement generalises"]


@dataclass
class Splits:
    train: TokenizedSet
    eval: TokenizedSet
    tokenize_s: float
    warnings: list[str]


def _guard_warnings(name: str, stats: dict) -> list[str]:
    out = []
    if stats.get("empty"):
        out.append(f"{name}: {stats['empty']} empty example(s) dropped")
    if stats.get("truncated"):
        out.append(f"{name}: {stats['truncated']} example(s) longer than max_len were truncated")
    if stats.get("response_truncated_away"):
        out.append(f"{name}: {stats['response_truncated_away']} example(s) dropped: no response token left after "
                   "truncation to max_len")
    return out


def _empty_error(name: str, stats: dict, spec: DataSpec) -> DataError:
    """Why every example was dropped, in words (never a silent empty set trained to a loss of 0.0)."""
    reasons = []
    if stats.get("response_truncated_away"):
        reasons.append(f"{stats['response_truncated_away']} too long: no response token left within "
                       f"max_len={spec.max_len}")
    if stats.get("empty"):
        reasons.append(f"{stats['empty']} empty")
    why = "; ".join(reasons) or "no examples"
    return DataError(f"the {name} set is empty after the guards ({why}; format {stats.get('format', '?')})",
                     "raise max_len, check the format/columns, or provide more data")


def load_splits(spec: DataSpec, tokenizer) -> Splits:
    t0 = time.perf_counter()
    train_all, _ = load_tokenized(spec.train, tokenizer, spec)
    if len(train_all) == 0:
        raise _empty_error("training", train_all.stats, spec)
    if spec.eval is not None:
        eval_set, _ = load_tokenized(spec.eval, tokenizer, spec)
        train_set = train_all
    else:
        n = len(train_all)
        n_eval = spec.eval_count if spec.eval_count is not None else max(1, round(n * (spec.eval_fraction or 0.1)))
        if n_eval >= n:
            raise DataError(f"eval split of {n_eval} leaves no training examples (only {n} usable)")
        order = np.random.default_rng(spec.split_seed).permutation(n)
        eval_set, train_set = train_all.subset(np.sort(order[:n_eval])), train_all.subset(np.sort(order[n_eval:]))
    if spec.limit is not None:
        train_set = train_set.subset(range(min(spec.limit, len(train_set))))
    if spec.eval_limit is not None:
        eval_set = eval_set.subset(range(min(spec.eval_limit, len(eval_set))))
    warnings = _guard_warnings("train", train_all.stats)
    if spec.eval is not None:
        warnings += _guard_warnings("eval", eval_set.stats) + check_data(spec)
    for name, part in (("training", train_set), ("eval", eval_set)):
        if len(part) == 0:
            raise _empty_error(name, part.stats, spec)
    return Splits(train_set, eval_set, time.perf_counter() - t0, warnings)


__all__ = ["DataSpec", "FORMATS", "Splits", "TemplateSpec", "TokenizedSet", "check_data", "load_splits",
           "load_tokenized", "tokenize_records"]
