"""Resuming a study: what its store already holds (read-only), and the edited-spec checks — a spec whose trials
differ from the stored ones is refused with the differences (``--extend`` only adds cells, keeping every group one
configuration); a search resumes only under its own spec. Nothing here writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loraplace.errors import LoraplaceError
from loraplace.placement.spec import DEFAULT_AUTO_METHOD
from loraplace.records import GroupKey, TrialLabels, config_without_seed
from loraplace.search import SearchSpec
from loraplace.store import Store, StoreError, StudyRecord, TrialRecord
from loraplace.store.migrations import SEARCH_DEFAULTS_V4
from loraplace.study.grid import expand_grid
from loraplace.study.spec import StudySpec, spec_as_written
from loraplace.trial_spec import PlannedTrial
from loraplace.tuning import TUNED_AXIS, extended_lrs, selections_of


def stored_study(study: StudySpec, store_path: Path) -> tuple[StudyRecord, list[TrialRecord]] | None:
    """This study's record and trials as the store holds them (read-only), or None: no store, or no study of this
    name in it yet (a new one). The one read every resume check starts from."""
    if not store_path.exists():
        return None
    with Store.open_readonly(store_path) as store:
        try:
            record = store.study(study.name)
        except StoreError:
            return None
        return record, store.trials(record.id)


def stored_plan(study: StudySpec, store_path: Path) -> list[PlannedTrial]:
    """The grid as the store's results so far make it (read-only): a resumed tuned study plans its follow-up
    trials — the other seeds at each selection made, and the LRs past an edge that ``tune.extend`` earned."""
    stored = stored_study(study, store_path) if study.tune is not None else None
    return expand_grid(study) if stored is None else planned_from(study, stored[1])


def planned_from(study: StudySpec, records: list[TrialRecord]) -> list[PlannedTrial]:
    info = study.info()
    lrs = extended_lrs(info, info.tune_extend, records) if info.tune_extend else None
    return expand_grid(study, selections_of(info, records), lrs)


class StudyChanged(LoraplaceError):
    """The spec differs from the one the store's study was run with."""


def spec_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Every difference between two JSON-like specs, one line each: ``train.lr: 0.001 → 0.002``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{where}: removed (was {json.dumps(old[key])})")
            elif key not in old:
                out.append(f"{where}: added ({json.dumps(new[key])})")
            else:
                out += spec_differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} → {json.dumps(new)}"]


def _as_read_now(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as this loraplace reads it: a field added since it was stored takes its default, so an added
    field left at its default is not a change (a spec this version cannot read is compared as stored)."""
    try:
        return StudySpec.model_validate(stored).model_dump(mode="json")
    except ValidationError:
        return stored


def _auto_default_hint(differences: list[str]) -> str:
    """The likely cause when a stored ``auto`` arm read ``probe`` and the spec now reads the default: ``auto``
    without ``method`` meant ``probe`` until 2026-12-04 and means ``DEFAULT_AUTO_METHOD`` since."""
    moved = f'.auto.method: "probe" → "{DEFAULT_AUTO_METHOD}"'
    if not any(d.endswith(moved) for d in differences):
        return ""
    return (f"auto without method means {DEFAULT_AUTO_METHOD} since 2026-12-04 (it meant probe): if this spec's "
            "auto placements name no method, write method: probe in them to resume the stored study; ")


def _search_default_hint(stored: dict[str, Any], differences: list[str]) -> str:
    """The likely cause when a search stored with the defaults ``search: {}`` had until 2026-12-07 meets today's:
    since then ``search: {}`` is the policy chosen by replay (docs/replay.md)."""
    if stored.get("search") != SEARCH_DEFAULTS_V4 or not any(d.startswith("search.") for d in differences):
        return ""
    today = SearchSpec().model_dump()
    moved = {k: v for k, v in SEARCH_DEFAULTS_V4.items() if today[k] != v}  # what search: {} no longer says
    old = yaml.safe_dump(moved, default_flow_style=True, sort_keys=False, width=1000).strip()
    return (f"search: {{}} means the policy chosen by replay since 2026-12-07 (docs/replay.md); this search ran "
            f"with the defaults before it: write search: {old} to resume it; ")


def check_unchanged(study: StudySpec, store_path: Path, planned: list[PlannedTrial], extend: bool) -> None:
    """A study's identity is its resolved spec, i.e. its trials. Re-running a spec with the same trials resumes; a
    spec whose trials differ is refused with the differences, or with ``extend`` adds cells as long as no group
    would mix configurations (a group's trials may differ only by seed). Reads the store read-only: a refusal
    changes nothing."""
    stored = stored_study(study, store_path)
    if stored is None:
        return  # no study of this name yet: a new one
    record, existing = stored
    existing_ids, planned_ids = {t.id for t in existing}, {p.id for p in planned}
    if existing_ids == planned_ids:
        return  # the same trials: a resume (a change that touches no trial, e.g. the baseline, is kept)
    old = _as_read_now(spec_as_written(record.spec))
    differences = spec_differences(old, study.model_dump(mode="json"))
    if not differences and existing_ids <= planned_ids:
        return  # the same spec, its grid registered in part (another runner of it is starting right now)
    differences = differences or ["(the spec reads the same, but its trials resolve differently: another "
                                  "loraplace version? A budget study stored before budgets were filled exactly "
                                  "resumes with fill: uniform)"]
    shown = "\n".join(f"  {d}" for d in differences[:20]) + (f"\n  … {len(differences) - 20} more"
                                                            if len(differences) > 20 else "")
    if not extend:
        raise StudyChanged(f"study {study.name!r} in {store_path} was run with a different spec:\n{shown}",
                           _auto_default_hint(differences) + "to compare new settings, use a new store (--store) or "
                           "a new name:; to add placements, sizes, seeds or axis values to this study, run with "
                           "--extend")
    by_group: dict[GroupKey, dict[str, Any]] = {}
    for trial in existing:
        by_group.setdefault(trial.labels.group, config_without_seed(trial.spec))
    # group → (what its stored trials ran with, what this spec gives it), seed aside
    clashes = {p.labels.group.label: (by_group[p.labels.group], new)
               for p in planned if p.labels.group in by_group
               and by_group[p.labels.group] != (new := config_without_seed(p.spec.model_dump(mode="json")))}
    mixed = sorted(clashes)
    if mixed:
        # The trial-level difference can be a setting the spec never wrote (a field this version added, with a
        # default the stored trials did not run with): name it, not only the spec's own changes.
        clash = spec_differences(*clashes[mixed[0]])
        first = "\n".join(f"  {d}" for d in clash[:10])
        raise StudyChanged(f"--extend would mix configurations inside group(s) {', '.join(mixed[:8])}"
                           f"{' …' if len(mixed) > 8 else ''}: their stored trials were run with other settings "
                           f"than this spec gives them. In {mixed[0]}, stored → now:\n{first}\nChanges to the "
                           f"spec:\n{shown}",
                           _auto_default_hint(clash + differences) + "--extend only adds cells (placements, "
                           "sizes, seeds, axis values); to change settings, use a new store (--store) or a new name:")
    dropped = sorted({t.labels.group.label for t in existing if t.id not in planned_ids
                      and not _in_spec(study, t.labels)})
    if dropped:  # the store would keep arms the spec no longer names, and report and recommend them
        raise StudyChanged(f"--extend only adds cells, but this spec drops stored ones: group(s) "
                           f"{', '.join(dropped[:8])}{' …' if len(dropped) > 8 else ''} are in the store and not in "
                           f"the spec. Changes:\n{shown}",
                           "keep every stored placement, size, seed and axis value in the spec and add to it; to "
                           "compare a different set, use a new store (--store) or a new name:")


def _in_spec(study: StudySpec, labels: TrialLabels) -> bool:
    """Whether a stored trial's cell is still one the spec names (its placement, size, seed and axis values; a
    tuned LR among tune.lr). A tuned study's other seeds at a selected LR are planned only once selection is made,
    so a stored one that is not planned now (a new LR not yet run) is still in the spec."""
    group = labels.group
    sweep = study.axis_values(study.axes)
    if group.placement not in study.placements:
        return False
    tuned = study.tuned_lrs(group.placement) if study.tune is not None or study.search is not None else []
    return (group.size in study.sizes() and labels.seed in study.seeds
            and all((v in tuned) if (k == TUNED_AXIS and tuned) else v in sweep.get(k, []) for k, v in group.axes))


def check_data_unchanged(study: StudySpec, store_path: Path, fingerprints: dict[str, str]) -> None:
    """The data a study's trials were trained and tested on is part of what they are: a source whose content has
    changed since the study last ran (``DataSpec.fingerprints``) is refused like an edited spec, naming the file —
    a rerun would otherwise call the old trials done, and --extend would pair new-data seeds with old-data ones.
    A study stored before fingerprints were recorded is not checked (and records them on this run)."""
    stored = stored_study(study, store_path)
    if stored is None:
        return
    before = stored[0].info.data_fingerprints
    changed = [source for source, now in fingerprints.items() if source in before and before[source] != now]
    if changed:
        shown = "\n".join(f"  {source}: {before[source][:19]}… → {fingerprints[source][:19]}…" for source in changed)
        raise StudyChanged(f"study {study.name!r} in {store_path} ran on other data: the content of "
                           f"{len(changed)} source(s) has changed since:\n{shown}",
                           "its trials were trained and tested on the old content; put it back to continue the "
                           "study, or run the new data as a new study (--store or a new name:)")


NUMBER_FREE_SECTIONS = ("execution", "tracking")  # spec sections that change no trial's numbers


def check_search_unchanged(study: StudySpec, store_path: Path) -> None:
    """A search resumes only under the spec it was started with (its rung decisions were made under it) — except
    for the sections that change no number: how it runs (``execution``: state saves, fusion) and where it is logged
    (``tracking``); a killed search may gain state saving."""
    stored = stored_study(study, store_path)
    if stored is None:
        return
    record = stored[0]
    differences = [d for d in spec_differences(
        _as_read_now(spec_as_written(record.spec)), study.model_dump(mode="json"))
        if not d.startswith(NUMBER_FREE_SECTIONS)]
    if differences:
        shown = "\n".join(f"  {d}" for d in differences[:20])
        raise StudyChanged(f"search {study.name!r} in {store_path} was run with a different spec:\n{shown}",
                           _search_default_hint(record.spec, differences)
                           + "a search resumes only under its own spec: use a new store (--store) or a new name:")
