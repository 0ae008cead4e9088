"""Finished trials taken over from other stores (``loraplace run --reuse-from OTHER.db``).

A trial's id is the hash of its resolved spec (model, data and splits, placement and ranks, LR, schedule, seed,
precision, quantization, …), so a finished trial in another store under the same id was trained from exactly this
trial's configuration, and on one machine kind a rerun reproduces it bit for bit. Taking its outcome over saves
that compute — e.g. a new study whose baseline arm another study already ran. Per trial:

* the source's trial is ``done`` and its stored spec equals this one's (the id says so; the spec is compared too);
* under ``precision: auto`` it ran in the dtype auto means on this machine — otherwise it is left to train here,
  with a warning: the rule for resuming such a study on another machine kind (``study._check_precision``);
* its files (adapter, metrics.json, probe.json; never a saved training state) are copied next to this store and
  the outcome points at the copy; a source whose files are gone (a store committed without its ``_artifacts``)
  gives an outcome without an adapter, with a warning.

The outcome keeps every measurement — timings too, measured where it ran — and says where it came from
(:attr:`TrialOutcome.reused_from`). It goes through the store's lifecycle like a trained one (claimed, then
recorded by its claimant), so two runners never take the same trial. Trackers do not see reused trials: they log
what a run trains.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from loraplace.errors import LoraplaceError
from loraplace.records import Adapter, TrialOutcome
from loraplace.runner import PlannedTrial
from loraplace.store import STATE_DIR, Owner, Store, StoreError, TrialRecord, artifacts_dir, trial_dir


@dataclass(frozen=True)
class Reused:
    """What :func:`reuse_finished` took over: trial ids by source store, and why others were not taken."""

    taken: dict[Path, tuple[str, ...]]
    warnings: tuple[str, ...]

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.taken.values())


def check_sources(sources: list[Path], store_path: Path) -> None:
    """Every source is an existing loraplace store other than the one being run (read-only; before any work)."""
    for source in sources:
        if source.is_dir():
            raise LoraplaceError(f"--reuse-from {source} is a directory, not a store file",
                                 "give the path of another study's .db file")
        if not source.is_file():
            raise LoraplaceError(f"--reuse-from {source}: no such file", "give the path of another study's store")
        if source.resolve() == store_path.resolve():
            raise LoraplaceError(f"--reuse-from {source} is the store being run",
                                 "its finished trials are kept anyway; --reuse-from names another store")
        Store.open_readonly(source).close()  # refuses what is not a loraplace store, naming it


def reuse_finished(store: Store, study_id: int, planned: dict[str, PlannedTrial], sources: list[Path],
                   artifacts: Path, *, dtype_here: str | None, retry_failed: bool = False,
                   fingerprints: dict[str, str] | None = None) -> Reused:
    """Record, as done, every unfinished trial of ``planned`` that a source store finished under the same id.

    ``dtype_here``: what ``precision: auto`` means on this machine (``"float32"`` / ``"bfloat16"``), or None when
    the dtype is pinned by the spec (then it is part of the id) or mixing was allowed. Failed trials are taken
    over only with ``retry_failed``, as they would only then be trained again. ``fingerprints``: this study's data
    (``DataSpec.fingerprints``): a source store whose studies ran on other content of a file takes over nothing."""
    claimable = ("pending", "interrupted") + (("failed",) if retry_failed else ())
    wanted = [t.id for t in store.trials(study_id) if t.id in planned and t.status in claimable]
    taken: dict[Path, tuple[str, ...]] = {}
    warnings: list[str] = []
    owner = Owner.current()
    for source in sources:
        if not wanted:
            break
        with Store.open_readonly(source) as other:
            found = [(trial_id, record) for trial_id in wanted if (record := _done(other, trial_id)) is not None]
            theirs = {fp for study in other.studies() for fp in study.info.data_fingerprints.items()}
        # The same ids, but trained on other content under the same path: not the same trials.
        moved = {source_file for source_file, now in (fingerprints or {}).items()
                 if any(k == source_file and v != now for k, v in theirs)}
        if moved and found:
            warnings.append(f"{source}: its trials ran on other content of {', '.join(sorted(moved))}; "
                            f"{len(found)} trial(s) of the same id not reused (trained here instead)")
            continue
        ids = []
        for trial_id, record in found:
            if record.spec != planned[trial_id].spec.model_dump(mode="json"):
                warnings.append(f"{source}: trial {trial_id} has this id but another spec; not reused")
                continue
            assert record.outcome is not None  # a done trial has its outcome
            ran_in = record.outcome.environment.dtype
            if dtype_here is not None and ran_in and ran_in != dtype_here:
                warnings.append(f"{source}: trial {trial_id} ran in {ran_in} under precision: auto, which is "
                                f"{dtype_here} here; not reused (trained here instead)")
                continue
            if store.claim_trial(study_id, owner, retry_failed=retry_failed, only={trial_id}) is None:
                continue  # another runner took it meanwhile
            outcome, note = _copied(record.outcome, trial_dir(artifacts_dir(source), trial_id),
                                    trial_dir(artifacts, trial_id))
            if note:
                warnings.append(f"{source}: trial {trial_id}: {note}")
            store.record_outcome(trial_id, outcome.model_copy(update={"reused_from": str(source)}), owner)
            ids.append(trial_id)
        if ids:
            taken[source] = tuple(ids)
            wanted = [t for t in wanted if t not in ids]
    return Reused(taken, tuple(warnings))


def _done(other: Store, trial_id: str) -> TrialRecord | None:
    try:
        record = other.trial(trial_id)
    except StoreError:  # no trial of that id there
        return None
    return record if record.status == "done" and record.outcome is not None else None


def _copied(outcome: TrialOutcome, source_dir: Path, target_dir: Path) -> tuple[TrialOutcome, str | None]:
    """The outcome with its files copied from ``source_dir`` (the source store's artifacts of the trial) to
    ``target_dir``, and a note when its adapter could not be."""
    if source_dir.is_dir():
        shutil.copytree(source_dir, target_dir, ignore=shutil.ignore_patterns(STATE_DIR), dirs_exist_ok=True)
    shutil.rmtree(target_dir / STATE_DIR, ignore_errors=True)  # a state this store saved for it is obsolete now
    if outcome.adapter is None:
        return outcome, None
    recorded = Path(outcome.adapter.path)
    # The recorded path is absolute where it was trained; a moved or cloned store has it beside the store.
    candidates = [recorded, source_dir / recorded.name]
    origin = next((p for p in candidates if p.is_dir()), None)
    if origin is None:
        return outcome.model_copy(update={"adapter": None}), (
            f"its adapter ({recorded}) is not on disk; reused without one (export needs it: train it here to get "
            "one)")
    copy = target_dir / recorded.name
    if not copy.is_dir():  # outside the source's artifacts: copy it in
        shutil.copytree(origin, copy)
    return outcome.model_copy(update={"adapter": Adapter(path=str(copy), bytes=outcome.adapter.bytes)}), None
