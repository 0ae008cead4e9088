"""One trial: model + placement + rank + seed + data → train → evaluate → PEFT adapter + metrics.

:class:`Session` holds what trials can share — the loaded base model (frozen, in the compute dtype), the
tokenizer, the architecture map and tokenised data — so a study pays model load and tokenisation once.
Adapters are injected for a trial and removed afterwards (``unload``), leaving the base model untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraplace.atomic import write_json_atomic
from loraplace.data import DataSpec, Splits, TokenizedSet, load_splits
from loraplace.errors import LoraplaceError, PlacementError, TrialFailed
from loraplace.evaluate import eval_loss, perplexity, task_accuracy
from loraplace.formatting import plural
from loraplace.models import check_max_len, pad_token_id
from loraplace.peft_io import TrainedAdapters, load_weights, site_parameters
from loraplace.placement import (
    PlacementSpec,
    Plan,
    map_architecture,
    parse_placement,
    rebuilt_plan,
    resolve_placement,
    resulting_plan,
)
from loraplace.placement.spec import DEFAULT_FILL, Fill
from loraplace.records import (
    Adapter,
    BuiltRanks,
    Environment,
    Failure,
    Metrics,
    ProbeScores,
    RungResult,
    Timings,
    TrialOutcome,
)
from loraplace.stepper import Continuation, TrainOutcome
from loraplace.train import (
    TrainSpec,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    seed_everything,
    train,
)
from loraplace.trial_spec import EvalSpec, TrialSpec, library_versions  # noqa: F401 - re-exported

# --------------------------------------------------------------------------------------------- session


class Session:
    """A loaded base model shared by many trials (plus tokenised data keyed by spec)."""

    def __init__(self, model_ref: str, *, device: str = "auto", precision: str = "auto", quantize: str = "none",
                 double_quant: bool = True, model=None, tokenizer=None):
        """Load ``model_ref`` (or hold ``model`` and ``tokenizer``, built in memory: a random config for
        benchmarks, named ``model_ref``) on ``device`` in the compute dtype of ``precision``."""
        from loraplace.models import load_model, load_tokenizer

        self.model_ref = model_ref
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        t0 = time.perf_counter()
        if model is None:
            # Frozen weights live in the compute dtype: autocast then never re-casts them step after step.
            # Quantized (QLoRA): the blocks' linears are bitsandbytes layers computing in that dtype; PEFT's bnb LoRA
            # layers sit on them.
            model = load_model(model_ref, dtype=self.dtype, device=self.device, quantize=quantize,
                               double_quant=double_quant)
            tokenizer = load_tokenizer(model_ref)
        else:
            model = model.to(device=self.device, dtype=self.dtype)
        self.model, self.tokenizer, self.load_s = model, tokenizer, time.perf_counter() - t0
        self.quantization = (quantize, double_quant)  # (TrainSpec.quantize, its double quantization) of the base
        self.arch = map_architecture(self.model)
        self._data: dict[str, Splits] = {}
        self._probes: dict[tuple, ProbeScores] = {}
        self.init_forward_examples = 0  # examples a data-driven init (EVA) has run forward, over the session
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_model(cls, model, tokenizer, *, name: str, device: str = "auto", precision: str = "auto") -> Session:
        """A session over a model built in memory (e.g. a randomly initialised config, for benchmarks)."""
        return cls(name, device=device, precision=precision, model=model, tokenizer=tokenizer)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def plan(self, placement, rank: int | None = None, budget: int | None = None, fill: Fill = DEFAULT_FILL,
             data: TokenizedSet | None = None, data_key: str = "", progress=None) -> Plan:
        """The exact plan; an ``auto`` placement is first scored by the probe on ``data`` (the training split)
        and compiled to ordinary groups, so it resolves like any other placement."""
        spec = parse_placement(placement)
        if spec.auto is None:
            return resolve_placement(self.arch, spec, model=self.model_ref, rank=rank, budget=budget, fill=fill)
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
        plan = resolve_placement(self.arch, compiled, model=self.model_ref, fill=fill)
        method = auto.granularity if auto.method == "probe" else (
            f"{auto.method}:top{auto.top}-{auto.granularity}" if auto.top is not None else auto.method)
        described = {"label": f"auto:{method}@{target:,}",
                     "compiled": compiled.model_dump(exclude_none=True, exclude_defaults=True)}
        return dataclasses.replace(plan, budget=target,
                                   placement=spec.model_dump(exclude_none=True, exclude_defaults=True) | described)

    def auto_probe(self, auto, data: TokenizedSet, data_key: str = "", progress=None) -> ProbeScores:
        """The (cached) probe an auto placement reads: its measure, batches, batch size and rank on ``data``."""
        return self.probe(data, batches=auto.batches, batch=auto.batch, rank=auto.rank, key=data_key,
                          progress=progress, measure=auto.measure, warmup_steps=auto.warmup_steps,
                          warmup_lr=auto.warmup_lr)

    def probe(self, data: TokenizedSet, *, batches: int = 8, batch: int = 8, rank: int = 8, key: str = "",
              progress=None, measure: str = "gradient", warmup_steps: int | None = None,
              warmup_lr: float | None = None) -> ProbeScores:
        """Scores of every site on ``data`` (``measure``: gradient energy, PLoP's forward-only normalized feature
        norm, or the relative update after a warm-up); computed once per (data, measure, batches, batch, rank,
        warm-up)."""
        from loraplace.probe import nfn_model, probe_model

        cache_key = (key or str(id(data)), measure, batches, batch, rank, warmup_steps, warmup_lr)
        if cache_key not in self._probes:
            if measure == "warmup":
                if warmup_steps is None or warmup_lr is None:
                    raise PlacementError("the warmup probe needs warmup_steps and warmup_lr")
                self._probes[cache_key] = self._warmup_probe(data, batches=batches, batch=batch, rank=rank,
                                                             steps=warmup_steps, lr=warmup_lr, progress=progress)
            else:
                score = nfn_model if measure == "nfn" else probe_model
                self._probes[cache_key] = score(self.model, self.arch, data, model_ref=self.model_ref,
                                                batches=batches, batch=batch, rank=rank, device=self.device,
                                                dtype=self.dtype, pad_id=self.pad_id, progress=progress)
        return self._probes[cache_key]

    def _warmup_probe(self, data: TokenizedSet, *, batches: int, batch: int, rank: int, steps: int, lr: float,
                      progress=None) -> ProbeScores:
        """Rank-``rank`` adapters on every linear site, trained ``steps`` steps at a constant ``lr`` by our own loop
        (seed 0, the probe's batch size), then scored by :func:`loraplace.probe.warmup_scores`; the adapters are
        removed afterwards, so the base is as it was."""
        from loraplace.placement.spec import SiteGroup
        from loraplace.probe import warmup_scores, warmup_sites

        roles = sorted({s.role for s in warmup_sites(self.arch)})
        plan = resolve_placement(self.arch, PlacementSpec(groups=[SiteGroup(roles=roles)], rank=rank),
                                 model=self.model_ref)
        spec = TrainSpec(steps=steps, lr=lr, batch=batch, schedule="constant", seed=0)
        t0 = time.perf_counter()
        # Progress: the warm-up's steps, then the scoring batches, as one count.
        on_step = None if progress is None else (lambda step, _total, _loss, _tokens: progress(step, steps + batches))
        with self.adapter(plan, seed=0) as peft_model:
            train(peft_model, data, spec, device=self.device, dtype=self.dtype, pad_id=self.pad_id, on_step=on_step)
            return warmup_scores(peft_model, self.arch, data, model_ref=self.model_ref, batches=batches, batch=batch,
                                 rank=rank, device=self.device, dtype=self.dtype, pad_id=self.pad_id,
                                 warmup_steps=steps, warmup_lr=lr, train_seconds=time.perf_counter() - t0,
                                 progress=None if progress is None else
                                 (lambda done, _total: progress(steps + done, steps + batches)))

    def data(self, spec: DataSpec) -> Splits:
        """The tokenised splits of ``spec``, loaded once per session."""
        key = spec.model_dump_json()
        if key not in self._data:
            check_max_len(self.model.config, spec.max_len, self.model_ref)  # not an IndexError mid-forward
            self._data[key] = load_splits(spec, self.tokenizer)
        return self._data[key]

    @contextlib.contextmanager
    def adapter(self, plan: Plan, seed: int, init_data: TokenizedSet | None = None, *, initialise: bool = True,
                state: Continuation | None = None):
        """Inject the plan's adapters (seeded init, fp32) for the duration of a trial, then remove them.

        Variants run PEFT's own initialisation: PiSSA rewrites the adapted base weights to their residual (they are
        restored afterwards, so the next trial sees the base model); EVA reads ``init_data`` (the training split)
        and may move rank between sites — :func:`~loraplace.placement.resulting_plan` gives the plan as it ended
        up. ``initialise=False``: the adapters are about to be overwritten with trained ones, so EVA's SVD is
        skipped — ``plan`` must then be the plan EVA built (its ranks), injected as it is.

        ``state``: where the trial keeps its training state. EVA's chosen ranks are saved there
        (:class:`~loraplace.records.BuiltRanks`) right after its init, before any state is; when a state is
        already saved there, the adapters are injected at the saved ranks without the SVD — the state is about to
        overwrite them."""
        from peft import EvaConfig, get_peft_model

        built = Path(state.path) / BuiltRanks.FILE if state is not None and plan.variant == "eva" else None
        if built is not None and initialise and state.file.is_file() and built.is_file():
            saved_ranks = BuiltRanks.model_validate_json(built.read_text())
            plan, initialise = rebuilt_plan(plan, saved_ranks.ranks, saved_ranks.alphas), False
        seed_everything(seed)
        saved = self._snapshot(plan) if plan.variant == "pissa" else {}
        eva = plan.variant == "eva" and initialise
        # Without EVA's init the adapters start as plain LoRA's (at EVA's ranks); the config says eva again
        # afterwards, as PEFT's own EVA leaves it, so the saved adapter still says how it was initialised.
        config = plan.to_lora_config() if eva or plan.variant != "eva" else plan.to_lora_config(
            init_lora_weights=True, eva_config=None)
        peft_model = get_peft_model(self.model, config, low_cpu_mem_usage=eva)
        try:
            if eva:
                self._eva_init(peft_model, init_data)
                if built is not None:  # before training saves a state that needs these ranks to load
                    made = resulting_plan(peft_model, plan)
                    write_json_atomic(built, BuiltRanks(
                        variant=plan.variant, ranks={m.path: m.rank for m in made.modules},
                        alphas={m.path: m.alpha for m in made.modules}).model_dump(mode="json"))
            elif plan.variant == "eva":
                peft_model.peft_config["default"].init_lora_weights = "eva"
                peft_model.peft_config["default"].eva_config = EvaConfig(rho=plan.eva_rho)
            expected = resulting_plan(peft_model, plan)
            for name, p in peft_model.named_parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()  # adapters train in fp32 (bf16 only in the autocast matmuls)
                if p.requires_grad and "lora_" not in name:
                    raise TrialFailed(f"unexpected trainable parameter {name}")
            created = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            if created != expected.trainable_params:  # PEFT adapted other than the plan: never train that
                raise TrialFailed(f"PEFT created {created:,} trainable parameters where the plan has "
                                  f"{expected.trainable_params:,}: it did not adapt exactly the planned sites "
                                  f"({plural(len(plan.modules), 'site')}, family {plan.family})")
            yield peft_model
        finally:
            self.model = peft_model.unload()
            with torch.no_grad():
                for path, weight in saved.items():
                    self.model.get_parameter(path).copy_(weight)
            for p in self.model.parameters():
                p.requires_grad_(False)

    def _snapshot(self, plan: Plan) -> dict[str, torch.Tensor]:
        """Copies of the base weights a PiSSA init will overwrite."""
        return {f"{t}.weight": self.model.get_parameter(f"{t}.weight").detach().clone()
                for m in plan.modules for t in m.module_targets}

    def _eva_init(self, peft_model, data: TokenizedSet | None) -> None:
        """PEFT's EVA: SVD of each adapted layer's inputs over batches of the training split (padding and prompt
        tokens masked), cycled until the components converge."""
        from peft import initialize_lora_eva_weights

        if data is None or len(data) == 0:
            raise PlacementError("variant eva needs training data for its SVD", "run it as a trial or in a study")
        batches = hf_batches(data, EVA_BATCH, EVA_BATCHES, self.pad_id, self.device)

        def count(module, args, kwargs) -> None:  # EVA cycles the batches until its SVDs converge
            self.init_forward_examples += int(kwargs["input_ids"].shape[0]) if "input_ids" in kwargs else 0

        handle = peft_model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
        finally:
            handle.remove()


EVA_BATCH = 8  # examples per batch of EVA's input SVD
EVA_BATCHES = 8  # distinct batches it cycles through (the first ones of the training split)


def hf_batches(data: TokenizedSet, batch: int, batches: int, pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    """The first ``batches`` batches of ``data`` as padded Hugging Face batches (:meth:`TokenizedSet.hf_row`;
    padding: ``pad_id``, attention 0, label -100)."""
    out = []
    for start in range(0, min(len(data), batch * batches), batch):
        rows = [data.hf_row(i) for i in range(start, min(start + batch, len(data)))]
        width = max(len(r["input_ids"]) for r in rows)
        pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
        out.append({key: torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows],
                                      dtype=torch.long, device=device) for key, fill in pads.items()})
    return out


# --------------------------------------------------------------------------------------------- artifacts


def save_adapter_atomic(peft_model, target: Path, base_path: str | None, pissa_init: Path | None = None) -> int:
    """PEFT-format adapter (adapter_config.json + adapter_model.safetensors), renamed into place; returns its size.

    ``pissa_init``: the PiSSA adapter as initialised; PEFT then saves the trained one converted to a plain LoRA
    (rank 2r) that applies to the *original* base weights, so vanilla PEFT loads it on the unmodified model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        if base_path:
            peft_model.peft_config["default"].base_model_name_or_path = base_path
        # The head's LoRA does not change the (tied) embedding matrix: never copy the base vocab weights.
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False,
                                   path_initial_model_for_weight_conversion=str(pissa_init) if pissa_init else None)
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
              progress=None, fault=None, trained_in_group: TrainedAdapters | None = None,
              continuation: Continuation | None = None, notes: tuple[str, ...] = ()) -> TrialOutcome:
    """Run one trial. It never raises for a failure of its own: a bad placement for this model (kind
    ``invalid``), a non-finite loss (``non_finite``, with its step) or any exception while training, evaluating or
    saving (``error``, e.g. out of memory) is a ``failed`` :class:`TrialOutcome`. Only ``KeyboardInterrupt`` (and
    ``SystemExit``) propagate: an interruption belongs to the run, not to the trial.

    ``trained_in_group``: this trial's adapters, trained in a fused group (``fused.train_fused``) — this run loads
    them into its PEFT model instead of training, then evaluates and saves as usual. ``continuation``: train from
    its saved state (if any) to its ``stop_after`` and save the state there; the outcome is the trial's at that
    step (evaluated there). ``notes``: more warnings for the outcome (e.g. why a group ran unfused)."""
    known: dict[str, Any] = {}  # what the trial learnt before it failed (its size, where its adapters were)
    try:
        return _run_trial(spec, session, out_dir, progress, fault, known, trained_in_group, continuation, notes)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this trial fails, a study goes on
        return TrialOutcome.failed(failure_of(exc), **known)


def run_rung(spec: TrialSpec, *, session: Session, state_dir: Path, steps: int, candidate: str, rung: int,
             val_examples: int | None = None, from_steps: int = 0, progress=None) -> RungResult:
    """One rung of a placement search for one candidate: continue the trial's saved state in ``state_dir`` (or
    start it) up to ``steps`` of its full-horizon schedule, save the state there, and evaluate the validation
    split (its first ``val_examples``). The test split is never looked at; nothing else is saved. Never raises
    for the candidate's own failure (a failed :class:`RungResult`), like :func:`run_trial`. The result counts
    the steps from ``from_steps`` (the previous rung's) on: what the rung costs uninterrupted, however much of it
    a killed run had already trained (a state saved at ``steps`` is only evaluated) or had to redo."""
    state = Continuation(Path(state_dir), stop_after=steps)
    saved = state.saved()
    before = saved.progress.steps if saved is not None else 0
    known: dict[str, Any] = {"trained_steps": max(before - from_steps, 0)}
    try:
        splits = session.data(spec.data)
        if splits.validation is None:
            raise LoraplaceError("a search judges candidates on the validation split; the data has none",
                                 "give data.validation, validation_count or validation_fraction")
        watched = splits.validation.first(val_examples)
        plan = plan_of(session, spec)
        init_before = session.init_forward_examples
        with session.adapter(plan, spec.train.seed, init_data=splits.train, state=state) as model:
            plan = resulting_plan(model, plan)  # EVA: the ranks it chose (or chose before this state was saved)
            trained = train(model, splits.train, spec.train, device=session.device, dtype=session.dtype,
                            pad_id=session.pad_id, on_step=progress, params=site_parameters(model, plan),
                            continuation=state)
            known["trained_steps"] = max(trained.steps - from_steps, 0)
            known["train_s"] = trained.train_s - (saved.progress.train_s if saved is not None else 0.0)
            t0 = time.perf_counter()
            val_loss = eval_loss(model, watched, device=session.device, dtype=session.dtype, pad_id=session.pad_id,
                                 batch=spec.eval.batch, packing=spec.train.packing)[0]
            eval_s = time.perf_counter() - t0
        return RungResult(candidate=candidate, rung=rung, steps=steps, status="done", val_loss=val_loss,
                          trained_steps=known["trained_steps"],
                          trained_examples=known["trained_steps"] * spec.train.batch,
                          eval_examples=len(watched), init_examples=session.init_forward_examples - init_before,
                          train_s=max(known["train_s"], 0.0), eval_s=eval_s)
    except Exception as exc:  # noqa: BLE001 - the candidate fails (and is cut), the search goes on
        return RungResult(candidate=candidate, rung=rung, steps=steps, status="failed", failure=failure_of(exc),
                          trained_steps=known["trained_steps"],
                          trained_examples=known["trained_steps"] * spec.train.batch)


def plan_of(session: Session, spec: TrialSpec) -> Plan:
    """The trial's exact plan on this session's model (an auto placement probes the training split, cached)."""
    return session.plan(parse_placement(spec.placement), rank=spec.rank, budget=spec.budget, fill=spec.fill,
                        data=session.data(spec.data).train, data_key=spec.data.model_dump_json())


def failure_of(exc: Exception) -> Failure:
    """The typed failure of an exception raised while running a trial."""
    if isinstance(exc, TrialFailed):
        return Failure(kind="non_finite" if exc.step is not None else "error", message=exc.args[0], step=exc.step,
                       hint=exc.hint)
    if isinstance(exc, LoraplaceError):
        return Failure(kind="invalid", message=exc.args[0], hint=exc.hint)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
    return Failure(kind="error", message=f"{type(exc).__name__}: {exc}")


def _run_trial(spec: TrialSpec, session: Session | None, out_dir: str | Path | None, progress, fault,
               known: dict[str, Any], grouped: TrainedAdapters | None, continuation: Continuation | None,
               notes: tuple[str, ...]) -> TrialOutcome:
    from loraplace.models import ModelRef, checkpoint_path

    placement = parse_placement(spec.placement)
    session = session or Session(spec.model, device=spec.train.device, precision=spec.train.precision,
                                 quantize=spec.train.quantize, double_quant=spec.train.bnb_4bit_use_double_quant)
    wanted = spec.train.base
    if session.quantization[0] != wanted[0] or (wanted[0] in ("nf4", "fp4") and session.quantization != wanted):
        raise LoraplaceError(f"this trial trains on a base quantized {wanted[0]}, the session holds one quantized "
                             f"{session.quantization[0]}", "run it in a session loaded with its quantize setting")
    device, dtype = session.device, session.dtype
    splits = session.data(spec.data)
    data_key = spec.data.model_dump_json()  # probe cache key: the same data → the same probe, every seed
    # Trained in a group: the plan as PEFT built it there (EVA's ranks), so its init is not redone.
    plan = grouped.plan if grouped is not None else plan_of(session, spec)
    known.update(trainable_params=plan.trainable_params, total_params=plan.total_params, sites=plan.site_map())
    if grouped is not None and grouped.failure is not None:  # failed in its group: nothing to inject or evaluate
        raise grouped.failure
    probe = None
    if placement.auto is not None and placement.auto.method != "random":  # the scores that chose the sites
        probe = session.auto_probe(placement.auto, splits.train, data_key)
    reset_peak_memory(device)
    init_before = session.init_forward_examples
    with session.adapter(plan, spec.train.seed, init_data=splits.train, initialise=grouped is None,
                         state=continuation) as model:
        plan = resulting_plan(model, plan)  # EVA: the ranks it chose
        known.update(trainable_params=plan.trainable_params, sites=plan.site_map())
        pissa_init = None
        if plan.variant == "pissa" and out_dir is not None:  # kept to convert the trained adapter on save
            pissa_init = Path(out_dir) / "pissa_init"  # its name becomes a PEFT adapter name: no dots
            shutil.rmtree(pissa_init, ignore_errors=True)
            # PEFT's recipe: mark the config as a plain init first, so loading this adapter never redoes the SVD
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(pissa_init, safe_serialization=True, save_embedding_layers=False)

        def evaluate_on(split) -> tuple[float, int]:
            return eval_loss(model, split, device=device, dtype=dtype, pad_id=session.pad_id,
                             batch=spec.eval.batch, packing=spec.train.packing)

        # Losses during training read the validation split when there is one: the test split is looked at once.
        watched = splits.validation if splits.validation is not None else splits.eval
        watched_early = watched.first(spec.eval.watch_examples)  # during training
        if grouped is not None:  # trained in a fused group (loraplace.fused): its weights, its curve
            load_weights(model, grouped.weights)
            trained: TrainOutcome = grouped.outcome
        else:
            trained = train(model, splits.train, spec.train, device=device, dtype=dtype, pad_id=session.pad_id,
                            on_step=progress, eval_fn=lambda: evaluate_on(watched_early)[0],
                            eval_every=spec.eval.every, eval_at=spec.eval.at_steps or (),
                            eval_split="validation" if splits.validation is not None else "test",
                            eval_examples=spec.eval.watch_examples and len(watched_early), fault=fault,
                            params=site_parameters(model, plan), continuation=continuation)
        t0 = time.perf_counter()
        fused_evals = grouped.eval_losses if grouped is not None else {}  # evaluated in the fused pass
        val_loss = None
        if splits.validation is not None:
            val_loss = fused_evals["validation"][0] if "validation" in fused_evals \
                else evaluate_on(splits.validation)[0]
        loss, eval_tokens = fused_evals["test"] if "test" in fused_evals else evaluate_on(splits.eval)
        detail = None
        if spec.eval.generate:
            detail = task_accuracy(model, session.tokenizer, splits.eval, spec.eval.generate, device=device,
                                   dtype=dtype, max_new_tokens=spec.eval.max_new_tokens)
        eval_s = time.perf_counter() - t0 + (grouped.eval_s if grouped is not None else 0.0)
        # A fused trial's peak is its group's (it trained there), or its own re-injection and eval if higher.
        peak_mb = max(peak_memory_mb(device), grouped.peak_mem_mb if grouped is not None else 0.0)
        adapter = None
        if out_dir is not None:
            ref = ModelRef.parse(spec.model)
            base_path = checkpoint_path(ref) if ref.kind in ("builtin", "local", "hub") else str(ref)
            target = Path(out_dir) / "adapter"
            adapter = Adapter(path=str(target), bytes=save_adapter_atomic(model, target, base_path, pissa_init))
            if pissa_init is not None:
                shutil.rmtree(pissa_init, ignore_errors=True)
    outcome = TrialOutcome(
        status="done",
        metrics=Metrics(eval_loss=loss, perplexity=perplexity(loss), val_loss=val_loss,
                        accuracy=None if detail is None else detail.accuracy, tokens_per_s=trained.tokens_per_s,
                        train_s=trained.train_s, peak_mem_mb=peak_mb),
        **known, steps=trained.steps, train_tokens=trained.real_tokens, label_tokens=trained.label_tokens,
        eval_tokens=eval_tokens, curve=tuple(trained.curve), evals=tuple(trained.evals),
        probe=None if probe is None else probe.without_spectra(),  # full spectra: probe.json
        accuracy_detail=detail,
        timings=Timings(load_s=session.load_s, tokenize_s=splits.tokenize_s, eval_s=eval_s,
                        first_step_s=trained.first_step_s),
        environment=Environment(device=str(device), dtype=str(dtype).removeprefix("torch."),
                                versions=library_versions(), quantize=session.quantization[0]),
        adapter=adapter, warnings=tuple(plan.warnings) + tuple(splits.warnings) + tuple(trained.notes) + notes,
        fused_with=0 if grouped is None else grouped.group_size - 1,
        init_examples=session.init_forward_examples - init_before if grouped is None else None)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "metrics.json", outcome.model_dump(mode="json"))
        if probe is not None:
            write_json_atomic(Path(out_dir) / "probe.json", probe.to_dict())
    return outcome
