"""What a study can get wrong, checked before its store is written: placements on the meta-device model, the
device, model and data, and a ``precision: auto`` store resumed where auto means another dtype."""

from __future__ import annotations

import collections
from pathlib import Path

from loraplace.errors import ConfigError
from loraplace.formatting import plural
from loraplace.study.resume import StudyChanged, stored_study
from loraplace.study.spec import StudySpec


def check_placements(study: StudySpec, force: bool = False) -> None:
    """Resolve every placement on the meta-device model (no weights) before anything is written or trained:
    an unknown or absent role, an empty layer selection, a fused-qkv request, a size given twice or adapters
    bigger than the model fail the whole spec at once. A budget too small for rank 1 fails only its own cells
    (the others still run) — unless it is every cell of the grid: then nothing could run, and the spec is refused."""
    from loraplace.errors import PlacementError
    from loraplace.placement import meta_architecture, resolve_placement

    arch = meta_architecture(study.model)
    problems: list[str] = []
    too_small: list[str] = []  # cells whose budget is below rank 1 on every site
    fixed_cells, auto = 0, False
    for name, placement in study.placement_specs().items():
        if placement.auto is not None:  # its sites are chosen by the probe when the trial runs
            auto = True
            if placement.auto.budget is None and study.budget is None and study.budgets is None:
                problems.append(f"placements.{name}: an auto placement needs a budget (auto: {{budget: N}} or the "
                                "study's budget:/budgets:)")
            continue
        for size in study.sizes():
            fixed_cells += 1
            try:
                plan = resolve_placement(arch, placement, model=study.model,
                                         rank=size.value if size.kind == "rank" else None,
                                         budget=size.value if size.kind == "budget" else None, fill=study.fill,
                                         check_budget_fits=False)
                plan.check_size(force)
            except PlacementError as exc:
                problem = f"placements.{name}: {exc}"
                if problem not in problems:
                    problems.append(problem)
                continue
            if size.kind == "budget" and plan.trainable_params > size.value:  # rank 1 everywhere is over it
                too_small.append(f"placements.{name}: budget {size.value:,} is smaller than rank 1 allows "
                                 f"({plan.trainable_params:,} trainable parameters)")
    if not problems and not auto and fixed_cells and len(too_small) == fixed_cells:
        problems = too_small + ["no cell of the grid can run: give a budget at least the smallest of these"]
    if problems:
        raise ConfigError(problems, f"placements that do not resolve on {study.model}",
                          f"see the roles of this model with: loraplace plan {study.model} --placement all")


def check_inputs(study: StudySpec) -> list[str]:
    """Everything a study can get wrong before a trial runs, checked before the store is written: the device,
    the model reference (its config), the data (readable, non-empty, a known format in every record, at least
    one trainable example in every split after tokenisation) and the placements.
    Returns warnings (e.g. eval examples that are also training examples)."""
    from loraplace.data import check_data, load_splits
    from loraplace.models import check_max_len, load_config, load_tokenizer
    from loraplace.train import resolve_device

    resolve_device(study.train.device)
    check_max_len(load_config(study.model), study.data.max_len, study.model)
    warnings = check_data(study.data)
    # Tokenised once here (cached on disk, so the trials read it back): data that leaves no trainable example,
    # e.g. every one longer than max_len, is refused now rather than failing every trial after the store exists.
    load_splits(study.data, load_tokenizer(study.model))
    return warnings


def check_precision(study: StudySpec, store_path: Path) -> None:
    """``precision: auto`` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere: a study started on one
    kind of machine and resumed on another would compare arms computed in different precisions (differences of the
    size the arms differ by). Refused, naming both, unless the spec pins the precision. Reads the store read-only."""
    stored = stored_study(study, store_path) if study.train.precision == "auto" else None
    if stored is None:
        return
    ran = [t.outcome.environment.dtype for t in stored[1]
           if t.status == "done" and t.outcome is not None and t.outcome.environment.dtype]
    here = auto_dtype_here(study)  # torch is imported only now, when there is a store to resume
    if ran and here not in ran:
        kinds = " and ".join(f"{d} ({plural(n, 'trial')})" for d, n in sorted(collections.Counter(ran).items()))
        raise StudyChanged(
            f"study {study.name!r} in {store_path}: its finished trials ran in {kinds} under precision: auto; on this "
            f"machine auto is {here}{' (this CPU has no native bf16)' if here == 'float32' else ''}, so the "
            "study would compare arms trained in different precisions",
            "resume it on a machine of the kind that started it; or run with --allow-mixed-precision (the report "
            "names both); a new study can pin train.precision: fp32 to run the same everywhere")


def auto_dtype_here(study: StudySpec) -> str | None:
    """What ``precision: auto`` resolves to on this machine ("float32" / "bfloat16"); None when it is pinned."""
    if study.train.precision != "auto":
        return None
    from loraplace.train import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device(study.train.device))).removeprefix("torch.")
