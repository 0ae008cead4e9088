"""One trial: model + placement + rank + seed + data → train → evaluate → PEFT adapter + metrics.

:class:`Session` holds what trials can share — the loaded base model (frozen, in the compute dtype), the
tokenizer, the architecture map and tokenised data — so a study pays model load and tokenisation once.
Adapters are injected for a trial and removed afterwards (``unload``), leaving the base model untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from loraplace.data import DataSpec, Splits, TokenizedSet, load_splits
from loraplace.errors import PlacementError, TrialFailed
from loraplace.evaluate import eval_loss, perplexity, task_accuracy
from loraplace.placement import PlacementSpec, Plan, map_architecture, parse_placement, resolve_placement
from loraplace.specs import StrictModel
from loraplace.train import TrainOutcome, TrainSpec, resolve_device, resolve_dtype, seed_everything, train

if TYPE_CHECKING:
    from loraplace.probe import ProbeResult


class EvalSpec(StrictModel):
    batch: int = Field(default=16, gt=0)
    generate: int = Field(default=0, ge=0, description="greedy-generate N eval examples for task accuracy")
    max_new_tokens: int = Field(default=256, gt=0)
    every: int | None = Field(default=None, gt=0, description="also evaluate every N steps")


class TrialSpec(StrictModel):
    model: str
    data: DataSpec
    placement: PlacementSpec
    rank: int | None = Field(default=None, gt=0)
    budget: int | None = Field(default=None, gt=0)
    train: TrainSpec = TrainSpec(steps=20)
    eval: EvalSpec = EvalSpec()


# --------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: "5" resets the peak RSS (VmHWM) of this process
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    from loraplace import __version__

    return {"loraplace": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------- session


class Session:
    """A loaded base model shared by many trials (plus tokenised data keyed by spec)."""

    def __init__(self, model_ref: str, *, device: str = "auto", precision: str = "auto"):
        from loraplace.models import load_model, load_tokenizer

        self.model_ref = model_ref
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        t0 = time.perf_counter()
        # Frozen weights live in the compute dtype: autocast then never re-casts them step after step.
        self.model = load_model(model_ref, dtype=self.dtype, device=self.device)
        self.tokenizer = load_tokenizer(model_ref)
        self.arch = map_architecture(self.model)
        self.load_s = time.perf_counter() - t0
        self._data: dict[str, Splits] = {}
        self._probes: dict[tuple, ProbeResult] = {}
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def plan(self, placement, rank: int | None = None, budget: int | None = None,
             data: TokenizedSet | None = None, data_key: str = "", progress=None) -> Plan:
        """The exact plan; an ``auto`` placement is first scored by the probe on ``data`` (the training split)
        and compiled to ordinary groups, so it resolves like any other placement."""
        spec = parse_placement(placement)
        if spec.auto is None:
            return resolve_placement(self.arch, spec, model=self.model_ref, rank=rank, budget=budget)
        from loraplace.probe import compile_auto, unscored

        auto = spec.auto
        if auto.method == "random":  # the control: the same allocation with the ranking taken away; no probe
            scores = unscored(self.arch, auto.rank, self.model_ref)
        elif data is None:
            raise PlacementError("an auto placement needs training data for its probe", "pass --data (plan) or "
                                 "run it inside a study or trial")
        else:
            scores = self.auto_probe(auto, data, data_key, progress)
        target = budget if budget is not None else auto.budget
        compiled = compile_auto(spec, scores, target)
        plan = resolve_placement(self.arch, compiled, model=self.model_ref)
        described = {"label": f"auto:{auto.method if auto.method != 'probe' else auto.granularity}@{target:,}",
                     "compiled": compiled.model_dump(exclude_none=True, exclude_defaults=True)}
        return dataclasses.replace(plan, budget=target,
                                   placement=spec.model_dump(exclude_none=True, exclude_defaults=True) | described)

    def auto_probe(self, auto, data: TokenizedSet, data_key: str = "", progress=None) -> ProbeResult:
        """The (cached) probe an auto placement reads: its batches, batch size and rank on ``data``."""
        return self.probe(data, batches=auto.batches, batch=auto.batch, rank=auto.rank, key=data_key,
                          progress=progress)

    def probe(self, data: TokenizedSet, *, batches: int = 8, batch: int = 8, rank: int = 8, key: str = "",
              progress=None) -> ProbeResult:
        """Importance scores of every site on ``data``; computed once per (data, batches, batch, rank)."""
        from loraplace.probe import probe_model

        cache_key = (key or str(id(data)), batches, batch, rank)
        if cache_key not in self._probes:
            self._probes[cache_key] = probe_model(self.model, self.arch, data, model_ref=self.model_ref,
                                                  batches=batches, batch=batch, rank=rank, device=self.device,
                                                  dtype=self.dtype, pad_id=self.pad_id, progress=progress)
        return self._probes[cache_key]

    def data(self, spec: DataSpec) -> tuple[Splits, bool]:
        key = spec.model_dump_json()
        if key in self._data:
            return self._data[key], True
        splits = load_splits(spec, self.tokenizer)
        self._data[key] = splits
        return splits, False

    @contextlib.contextmanager
    def adapter(self, plan: Plan, seed: int):
        """Inject the plan's adapters (seeded init, fp32) for the duration of a trial, then remove them."""
        from peft import get_peft_model

        seed_everything(seed)
        peft_model = get_peft_model(self.model, plan.to_lora_config())
        for name, p in peft_model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # adapters train in fp32 (bf16 only in the autocast matmuls)
            if p.requires_grad and "lora_" not in name:
                raise TrialFailed(f"unexpected trainable parameter {name}")
        try:
            yield peft_model
        finally:
            self.model = peft_model.unload()
            for p in self.model.parameters():
                p.requires_grad_(False)


# --------------------------------------------------------------------------------------------- results


@dataclass
class TrialResult:
    status: str  # done | failed
    eval_loss: float | None = None
    perplexity: float | None = None
    accuracy: float | None = None
    trainable_params: int = 0
    trainable_percent: float = 0.0
    total_params: int = 0
    train_tokens: int = 0
    label_tokens: int = 0
    tokens_per_s: float = 0.0
    train_s: float = 0.0
    load_s: float = 0.0
    tokenize_s: float = 0.0
    eval_s: float = 0.0
    peak_mem_mb: float = 0.0
    adapter_dir: str | None = None
    adapter_bytes: int | None = None
    steps: int = 0
    error: str | None = None
    failed_step: int | None = None
    device: str = ""
    dtype: str = ""
    eval_tokens: int = 0
    curve: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    accuracy_detail: dict | None = None
    versions: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None  # importance-probe scores, for auto placements

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def store_payload(self) -> dict[str, Any]:
        """What a study store keeps: everything but the full plan, which is recomputable from the trial config;
        a compact site map (layer, role, rank) stays so reports can draw placements without the model."""
        payload = self.to_dict()
        plan = payload.pop("plan", None) or {}
        if payload.get("probe"):  # scores stay; the full spectra live in probe.json beside the adapter
            payload["probe"] = dict(payload["probe"], sites=[{k: v for k, v in site.items() if k != "spectrum"}
                                                             for site in payload["probe"]["sites"]])
        payload["sites"] = {
            "num_layers": plan.get("num_layers", 0),
            "roles": plan.get("roles_present", []),
            "sites": [[s["layer"], s["role"], s["rank"]] for s in plan.get("sites", [])],
        }
        return payload

    def summary(self) -> dict[str, Any]:
        """The scalar metrics (no curves, no plan)."""
        skip = {"curve", "evals", "plan", "accuracy_detail", "probe"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file in the same directory and rename: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_adapter_atomic(peft_model, target: Path, base_path: str | None) -> int:
    """PEFT-format adapter (adapter_config.json + adapter_model.safetensors), renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        if base_path:
            peft_model.peft_config["default"].base_model_name_or_path = base_path
        # The head's LoRA does not change the (tied) embedding matrix: never copy the base vocab weights.
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        size = 0
        for f in tmp.iterdir():  # on disk before the rename, so a crash never exposes an empty file
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            size += f.stat().st_size
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        return size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------- run


def run_trial(spec: TrialSpec, *, session: Session | None = None, out_dir: str | Path | None = None,
              progress=None, fault=None) -> TrialResult:
    """Run one trial. Failures inside training (non-finite loss, exceptions) return ``status="failed"``."""
    from loraplace.models import ModelRef, checkpoint_path

    placement = parse_placement(spec.placement)
    session = session or Session(spec.model, device=spec.train.device, precision=spec.train.precision)
    device, dtype = session.device, session.dtype
    splits, _cached = session.data(spec.data)
    data_key = spec.data.model_dump_json()  # probe cache key: the same data → the same probe, every seed
    plan = session.plan(placement, rank=spec.rank, budget=spec.budget, data=splits.train, data_key=data_key)
    result = TrialResult(status="running", trainable_params=plan.trainable_params,
                         trainable_percent=plan.trainable_percent, total_params=plan.total_params,
                         load_s=session.load_s, tokenize_s=splits.tokenize_s, device=str(device),
                         dtype=str(dtype).removeprefix("torch."), warnings=list(plan.warnings) + splits.warnings,
                         versions=library_versions(), plan=plan.to_dict())
    if placement.auto is not None and placement.auto.method == "probe":  # the probe that chose the sites
        result.probe = session.auto_probe(placement.auto, splits.train, data_key).to_dict()
    reset_peak_memory(device)
    with session.adapter(plan, spec.train.seed) as model:

        def evaluate_now() -> tuple[float, int]:
            return eval_loss(model, splits.eval, device=device, dtype=dtype, pad_id=session.pad_id,
                             batch=spec.eval.batch, packing=spec.train.packing)

        try:
            outcome: TrainOutcome = train(model, splits.train, spec.train, device=device, dtype=dtype,
                                          pad_id=session.pad_id, on_step=progress,
                                          eval_fn=lambda: evaluate_now()[0],
                                          eval_every=spec.eval.every, fault=fault)
        except TrialFailed as exc:
            result.status, result.error, result.failed_step = "failed", str(exc), exc.step
            result.peak_mem_mb = peak_memory_mb(device)
            return result
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the trial fails, the study goes on
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
            result.peak_mem_mb = peak_memory_mb(device)
            return result
        result.steps, result.train_s, result.curve = outcome.steps, outcome.train_s, outcome.curve
        result.train_tokens, result.label_tokens = outcome.real_tokens, outcome.label_tokens
        result.tokens_per_s, result.evals = outcome.tokens_per_s, outcome.evals
        t0 = time.perf_counter()
        result.eval_loss, result.eval_tokens = evaluate_now()
        result.perplexity = perplexity(result.eval_loss)
        if spec.eval.generate:
            detail = task_accuracy(model, session.tokenizer, splits.eval, spec.eval.generate, device=device,
                                   dtype=dtype, max_new_tokens=spec.eval.max_new_tokens)
            result.accuracy, result.accuracy_detail = detail["accuracy"], detail
        result.eval_s = time.perf_counter() - t0
        result.peak_mem_mb = peak_memory_mb(device)
        if out_dir is not None:
            out = Path(out_dir)
            ref = ModelRef.parse(spec.model)
            base_path = checkpoint_path(ref) if ref.kind in ("builtin", "local", "hub") else str(ref)
            result.adapter_bytes = save_adapter_atomic(model, out / "adapter", base_path)
            result.adapter_dir = str(out / "adapter")
    result.status = "done"
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "metrics.json", result.to_dict())
        if result.probe is not None:
            write_json_atomic(Path(out_dir) / "probe.json", result.probe)
    return result
