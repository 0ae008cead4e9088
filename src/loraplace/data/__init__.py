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
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from loraplace.data.formats import FORMATS, check_columns, detect_format, render
from loraplace.data.sources import file_sha256, read_records
from loraplace.errors import DataError
from loraplace.specs import StrictModel

# 2 (2026-12-07): a quoted CSV field keeps its line breaks; version 1 caches of such files hold them joined.
CACHE_VERSION = 2


class TemplateSpec(StrictModel):
    """A prompt/response template over a JSONL record's fields (``{field}`` placeholders)."""

    prompt: str = Field(description="the prompt, e.g. 'Q: {question}\\nA: ' (not trained on unless "
                        "train_on_prompt)")
    response: str = Field(description="the response the loss is computed on, e.g. '{answer}'")


def _at_most_one(earlier: tuple[str, ...], name: str, value: Any, info: ValidationInfo, message: str) -> None:
    """Refuse a split given twice: ``earlier`` fields (already validated) and ``name`` (being validated)."""
    given = [k for k in earlier if info.data.get(k) is not None] + ([name] if value is not None else [])
    if len(given) > 1:
        raise ValueError(f"{message} (got {', '.join(given)})")


def _same_source(a: str, b: str) -> bool:
    """Two data sources are the same: the same string, or paths to the same file."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


class DataSpec(StrictModel):
    """Where the examples come from and how they split into **train**, **validation** and **test**.

    The test split is what results are reported on; it is never used to select anything (a learning rate, a
    winner). The validation split is what selection uses (``tune:``). Each held-out split is a file (``test``,
    ``validation``) or is carved from ``train`` with ``split_seed``: by count or fraction. Carving takes the test
    examples first, then the validation ones, so adding a validation split never changes the test split.
    ``eval``/``eval_count``/``eval_fraction`` are the older names of the test split.
    """

    train: str = Field(description="training examples: a .jsonl/.json/.csv/.parquet/.txt file (relative to the "
                       "spec file), builtin:NAME, or hf:DATASET[:CONFIG][@SPLIT]")
    eval: str | None = Field(default=None, description="older name of test")
    eval_fraction: float | None = Field(default=None, gt=0, lt=1, description="older name of test_fraction")
    eval_count: int | None = Field(default=None, gt=0, description="older name of test_count")
    limit: int | None = Field(default=None, gt=0, description="use the first N training examples")
    eval_limit: int | None = Field(default=None, gt=0, description="use the first N test examples")
    format: Literal["auto", "alpaca", "gsm8k", "messages", "prompt_completion", "text"] = Field(
        default="auto", description="how a record reads as prompt and response; auto: from its keys")
    template: TemplateSpec | None = Field(default=None, description="prompt/response templates over the record's "
                                          "fields, instead of a format")
    max_len: int = Field(default=512, gt=8, description="token limit per example; longer ones are truncated "
                         "(counted and warned about)")
    train_on_prompt: bool = Field(default=False, description="also compute the loss on the prompt's tokens "
                                  "(default: the response only)")
    split_seed: int = Field(default=0, description="the shuffle that carves held-out splits from train")
    test: str | None = Field(default=None, description="test split: a file")
    test_fraction: float | None = Field(default=None, gt=0, lt=1, description="test split: carved, a fraction")
    test_count: int | None = Field(default=None, gt=0, validate_default=True,
                                   description="test split: carved, a count")
    validation: str | None = Field(default=None, description="validation split (selection only): a file")
    validation_fraction: float | None = Field(default=None, gt=0, lt=1, description="validation: a fraction")
    validation_count: int | None = Field(default=None, gt=0, validate_default=True,
                                         description="validation: carved, a count")

    added_fields = frozenset({"test", "test_fraction", "test_count", "validation", "validation_fraction",
                              "validation_count"})

    # Field validators (not a model validator), so these are reported together with type errors of other fields.
    # Each runs on the last field of its set, when the others have been validated.
    @field_validator("test_count")
    @classmethod
    def _one_test_split(cls, value: int | None, info: ValidationInfo) -> int | None:
        _at_most_one(("eval", "eval_fraction", "eval_count", "test", "test_fraction"), "test_count", value, info,
                     "give one of test, test_fraction, test_count (or the older eval, eval_fraction, eval_count)")
        return value

    @field_validator("validation_count")
    @classmethod
    def _one_validation_split(cls, value: int | None, info: ValidationInfo) -> int | None:
        _at_most_one(("validation", "validation_fraction"), "validation_count", value, info,
                     "give one of validation, validation_fraction, validation_count")
        test = info.data.get("test") or info.data.get("eval")
        validation = info.data.get("validation")
        if test is not None and validation is not None and _same_source(test, validation):
            raise ValueError(f"validation and test are the same source ({validation}): selection would read the "
                             "test split, and the test split would no longer be held out; give another file, or "
                             "carve one with validation_count")
        return value

    @property
    def test_file(self) -> str | None:
        return self.test if self.test is not None else self.eval

    def fingerprints(self) -> dict[str, str]:
        """Each split's source → what its content is: a file's SHA-256, or the source itself for builtin: and hf:
        data (a builtin source is its content; a hub dataset is named by its revision there). A study records these
        and refuses to resume on other content under the same path."""
        out = {}
        for source in dict.fromkeys(s for s in (self.train, self.test_file, self.validation) if s is not None):
            path = Path(source).expanduser()
            out[source] = f"sha256:{file_sha256(path)}" if ":" not in source.split("/")[0] and path.is_file() \
                else source
        return out

    def held_out_size(self, split: Literal["validation", "test"]) -> int | None:
        """Examples of a held-out split without tokenising: its count when carved by count, else the records of its
        file (``eval_limit`` applies to the test split); None when neither (a fraction, or a file not readable)."""
        count = self.validation_count if split == "validation" else self.test_count or self.eval_count
        if count:
            return count
        source = self.validation if split == "validation" else self.test_file
        if source is None:
            return None
        try:
            records, _ = read_records(source)
        except Exception:  # noqa: BLE001 - moved or unreadable: the caller says what it cannot count
            return None
        return min(len(records), self.eval_limit) if split == "test" and self.eval_limit else len(records)

    @property
    def has_validation(self) -> bool:
        return any(v is not None for v in (self.validation, self.validation_count, self.validation_fraction))

    def carved(self, n: int) -> tuple[int, int]:
        """(test, validation) example counts carved from ``n`` training examples (0 where a file gives it)."""
        n_test = 0
        if self.test_file is None:
            count = self.test_count if self.test_count is not None else self.eval_count
            fraction = self.test_fraction if self.test_fraction is not None else self.eval_fraction
            n_test = count if count is not None else max(1, round(n * (fraction or 0.1)))
        n_val = 0
        if self.validation is None and self.has_validation:
            n_val = self.validation_count if self.validation_count is not None else max(
                1, round(n * self.validation_fraction))
        return n_test, n_val


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

    def hf_row(self, i: int) -> dict[str, list[int]]:
        """Example ``i`` as Hugging Face code takes it: input_ids, attention_mask, and labels with -100 on the prompt
        (the first token never has a label: nothing precedes it)."""
        ids = self.ids[i].tolist()
        prompt = max(int(self.prompt_lens[i]), 1)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]}

    def first(self, n: int | None) -> TokenizedSet:
        """The first ``n`` examples (all of them when None or more than there are): what a search rung, a grid's
        ``eval.at_steps`` and ``limit`` read."""
        return self if n is None else self.subset(range(min(n, len(self))))

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
    if not records:
        raise DataError("no records to tokenise", "give a source with examples")
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
    if not records:
        raise DataError(f"{source} holds no records", "give a source with examples")
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
    if not train:
        raise DataError(f"{spec.train} holds no records", "give a source with examples")
    fmt = detect_format(train[0]) if spec.format == "auto" else spec.format
    check_columns(train, fmt, spec.train)
    n_test, n_val = spec.carved(len(train))
    if n_test + n_val >= len(train):  # the guards can only drop more: certain before any tokenisation
        raise DataError(f"held-out splits of {n_test + n_val} ({n_test} test, {n_val} validation) leave no training "
                        f"examples ({spec.train} holds {len(train)} records)",
                        "lower test_count / validation_count, or give the held-out splits as files")
    seen = {json.dumps(r, sort_keys=True, default=str) for r in train}
    warnings = []
    for name, source in (("test", spec.test_file), ("validation", spec.validation)):
        if source is None:
            continue
        held_out, _ = read_records(source)
        if not held_out:
            raise DataError(f"{source} ({name} split) holds no records", "give a source with examples")
        check_columns(held_out, detect_format(held_out[0]) if spec.format == "auto" else spec.format, source)
        overlap = sum(json.dumps(r, sort_keys=True, default=str) in seen for r in held_out)
        if overlap:
            same = " (the same data)" if overlap == len(held_out) else ""
            warnings.append(f"{overlap} of {len(held_out)} {name} example(s) are also training examples{same}: "
                            f"the {name} loss overstates how well a placement generalises")
    return warnings


@dataclass
class Splits:
    train: TokenizedSet
    eval: TokenizedSet  # the test split: what results are reported on
    tokenize_s: float
    warnings: list[str]
    validation: TokenizedSet | None = None  # what selection (tune:) reads; None when the spec gives none


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
    n = len(train_all)
    n_test, n_val = spec.carved(n)
    if n_test + n_val >= n:
        raise DataError(f"held-out splits of {n_test + n_val} ({n_test} test, {n_val} validation) leave no training "
                        f"examples (only {n} usable)")
    # One permutation: test first, then validation, then train (adding a validation split keeps the test split).
    order = np.random.default_rng(spec.split_seed).permutation(n)
    train_set = train_all.subset(np.sort(order[n_test + n_val:])) if n_test + n_val else train_all
    if spec.test_file is not None:
        eval_set, _ = load_tokenized(spec.test_file, tokenizer, spec)
    else:
        eval_set = train_all.subset(np.sort(order[:n_test]))
    validation = None
    if spec.validation is not None:
        validation, _ = load_tokenized(spec.validation, tokenizer, spec)
    elif n_val:
        validation = train_all.subset(np.sort(order[n_test:n_test + n_val]))
    if spec.limit is not None:
        train_set = train_set.first(spec.limit)
    if spec.eval_limit is not None:
        eval_set = eval_set.first(spec.eval_limit)
    warnings = _guard_warnings("train", train_all.stats)
    if spec.test_file is not None:
        warnings += _guard_warnings("test", eval_set.stats)
    if spec.validation is not None and validation is not None:
        warnings += _guard_warnings("validation", validation.stats)
    if spec.test_file is not None or spec.validation is not None:
        warnings += check_data(spec)
    parts = [("training", train_set), ("test", eval_set)] + ([("validation", validation)] if validation else [])
    for name, part in parts:
        if len(part) == 0:
            raise _empty_error(name, part.stats, spec)
    return Splits(train_set, eval_set, time.perf_counter() - t0, warnings, validation)


__all__ = ["DataSpec", "FORMATS", "Splits", "TemplateSpec", "TokenizedSet", "check_data", "load_splits",
           "load_tokenized", "tokenize_records"]
