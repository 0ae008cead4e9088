"""Replay a search policy on a stored grid: its decisions, ledger and answer, with no training.

A search continues each candidate's saved state on the full-horizon schedule, so its rung-k model *is* the grid
trial's model after k steps. A grid whose trials recorded their validation loss at step k on the first N
validation examples (``eval.at_steps``, ``eval.watch_examples``: :class:`loraplace.records.EvalPoint` with
``examples``) therefore answers every rung at a recorded step by lookup. :func:`replay` builds the search study a
user would run (the grid's spec with the policy as its ``search:``), feeds the recorded points through the same
rung loop a live search runs (:func:`loraplace.search.run_rungs`, :func:`~loraplace.search.decide`), takes the
finalists' full-horizon trials from the grid, and reads the answer as ``recommend`` reads a search store. The
grid's own answer is read the same way from the tuned design a user would run: every LR on the rung seed, each
placement's LR selected by validation loss there, the other seeds at that LR.

``rung_seed``: the seed the rungs run on (the search's first seed). A grid that ran every (placement, LR) at
every seed can be replayed with the rungs on each of them; the other seeds complete the answer's interval.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplace.analysis.core import analyze_records
from loraplace.analysis.recommend import recommend
from loraplace.analysis.search import SearchAnalysis, analyze_search
from loraplace.analysis.stats import paired
from loraplace.errors import LoraplaceError
from loraplace.records import Recommendation, RungDecision, RungResult
from loraplace.search import (
    Candidate,
    Rung,
    SearchSpec,
    SearchState,
    confirmed,
    hedge_candidates,
    run_rungs,
    rung_steps,
    rungs_of,
)
from loraplace.store import Store, StudyRecord, TrialRecord


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """One policy replayed on one grid with its rungs on one seed."""

    grid: str  # the grid study's name
    policy: SearchSpec
    rung_seed: int
    rungs: tuple[int, ...]  # the rungs' step counts
    decisions: tuple[RungDecision, ...]
    search: SearchAnalysis  # rungs, ledger, ratio (search steps / the tuned grid's training steps)
    answer: Recommendation  # what `recommend` answers on the search's finalists
    grid_answer: Recommendation  # what it answers on the tuned grid (selection on the rung seed)
    delta: float  # test loss: the search's answer − the grid's answer, seed-paired mean
    ci: tuple[float, float]  # its 95 % interval ((delta, delta) when both answers are the same trials)
    p_value: float | None
    seeds: tuple[int, ...]
    best_survived_first_rung: bool  # the grid's validation-best candidate (rung seed, full horizon) was kept at rung 1
    grid_best: str  # that candidate's label
    trials: tuple[str, ...] = ()  # the full-horizon trials the search runs (grid trial ids)

    @property
    def ratio(self) -> float:
        return self.search.ratio()

    def line(self, task: str) -> str:
        """The machine line of docs/replay.md and docs/search.md."""
        return (f"task={task} search_steps={self.search.search_steps():.0f} grid_steps={self.search.grid_steps} "
                f"ratio={self.ratio:.3f} answer={self.answer.chosen.placement} "
                f"grid_answer={self.grid_answer.chosen.placement} delta={self.delta:+.4f} ci_low={self.ci[0]:+.4f} "
                f"ci_high={self.ci[1]:+.4f}")


def replay_store(grid_store: str | Path, policy: SearchSpec, *, rung_seed: int | None = None,
                 name: str | None = None) -> ReplayResult:
    """Read a grid (read-only) and replay ``policy`` on it; see :func:`replay`."""
    with Store.open_readonly(grid_store) as store:
        study = store.study(name)
        records = store.trials(study.id)
    return replay(study, records, policy, rung_seed=rung_seed, store=str(grid_store))


def replay(grid: StudyRecord, records: list[TrialRecord], policy: SearchSpec, *, rung_seed: int | None = None,
           store: str = "") -> ReplayResult:
    from loraplace.study import StudySpec, candidates_of
    from loraplace.study.spec import study_from_store

    spec = study_from_store(grid.spec)
    problems = _replayable(spec, policy)
    seed = spec.seeds[0] if rung_seed is None else rung_seed
    if seed not in spec.seeds:  # said with the others: every problem at once
        problems.append(f"rung seed {seed} is not one of the grid's seeds ({', '.join(map(str, spec.seeds))})")
    elif spec.tune is not None and spec.tune.seeds is not None and seed not in spec.tune.seeds:
        # A tuned grid runs its other seeds only at each placement's selected LR: the rungs' candidates (every
        # placement × LR) exist only on tune.seeds. Said as such, not as trials the grid has yet to finish.
        problems.append(f"rung seed {seed} ran only at each placement's selected LR: the candidates (every "
                        f"placement × LR) ran on tune.seeds ({', '.join(map(str, spec.tune.seeds))})")
    if problems:
        raise LoraplaceError(f"cannot replay a search on {grid.name!r}: " + "; ".join(problems),
                             "a replayable grid is a tuned study (tune:) whose eval.at_steps include every rung "
                             "step and whose eval.watch_examples equal the policy's rung_examples (docs/replay.md)")
    seeds = [seed] + [s for s in spec.seeds if s != seed]
    # The study a user would run: the grid's spec, its rungs on `seed`, the policy as its search.
    searched = spec.model_copy(update={"search": policy, "seeds": seeds,
                                       "tune": spec.tune.model_copy(update={"seeds": None})})
    searched = StudySpec.model_validate(searched.model_dump(mode="json"))  # every check a live search gets
    candidates = candidates_of(searched)
    by_id = {r.id: r for r in records}
    missing = [c.label for c in candidates if c.key not in by_id or by_id[c.key].status not in ("done", "failed")]
    if missing:
        raise LoraplaceError(f"the grid has not finished the candidates' trials on seed {seed}: "
                             f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}",
                             "let the grid finish (it resumes), or replay on another rung seed")
    steps = rung_steps(policy, len(candidates), spec.train.steps, spec.train.warmup)
    recorded = set(spec.eval.at_steps or ())
    unrecorded = [s for s in steps if s not in recorded]
    if unrecorded:
        raise LoraplaceError(f"the policy's rungs at {', '.join(map(str, unrecorded))} steps were not recorded by "
                             f"the grid (eval.at_steps: {', '.join(map(str, sorted(recorded)))})",
                             "give the policy rungs: at recorded steps")
    rungs = rungs_of(steps)
    results: list[RungResult] = []
    decisions: list[RungDecision] = []

    def run(alive: list[Candidate], rung: Rung) -> Iterator[RungResult]:
        previous = rungs[rung.index - 1].steps if rung.index > 0 else 0
        for c in alive:
            yield _rung_result(by_id[c.key], rung, previous, spec.train.batch)

    finalists = run_rungs(candidates, rungs, policy, SearchState.of([], []), run, results.append, decisions.append)
    # As a live search goes on (study.search_run): the hedge bracket beside the finalists, all on the rung seed at
    # the full horizon; then every seed for all of them, or for the best `confirm` by their validation loss.
    hedge = [c for c in hedge_candidates(candidates, policy, seed) if c not in finalists]
    entrants = finalists + hedge
    compared = entrants
    if policy.confirm is not None or hedge:
        val = {c.key: by_id[c.key].metrics.val_loss if by_id[c.key].metrics is not None else None for c in entrants}
        compared = confirmed(entrants, val, policy)
    wanted = {(c.group, s) for c in entrants for s in ([seed] if c not in compared else seeds)}
    finalist_trials = [r for r in records if (r.labels.group, r.labels.seed) in wanted]
    incomplete = sorted({c.label for c in compared for s in seeds
                         if not any(r.labels.group == c.group and r.labels.seed == s and r.status == "done"
                                    for r in finalist_trials)})
    if incomplete:
        raise LoraplaceError(f"the grid lacks finished trials at every seed for the finalist(s) "
                             f"{', '.join(incomplete)}", "a replayable grid runs every (placement, LR) at every seed "
                             "(tune.seeds: all the seeds); let it finish")
    preset = next((c.placement for c in compared if c.preset), None)
    info = searched.info().model_copy(update={"versions": grid.info.versions})
    if preset is not None or compared:
        info = info.model_copy(update={"baseline": preset or compared[0].placement, "baseline_given": True})
    search_study = StudyRecord(id=grid.id, name=f"{grid.name} (replayed search)", spec=searched.model_dump(mode="json"),
                               info=info, created_at=grid.created_at)
    analysis = analyze_records(search_study, store, finalist_trials, _counts(finalist_trials))
    answer = recommend(analysis, {r.id: r.spec for r in finalist_trials})
    search = analyze_search(search_study.spec, info, results, decisions, finalist_trials)

    tuned_records = _tuned_design(records, spec, seed)
    tuned_info = grid.info.model_copy(update={"tune_seeds": (seed,)})
    tuned_study = dataclasses.replace(grid, info=tuned_info)
    grid_analysis = analyze_records(tuned_study, store, tuned_records, _counts(tuned_records))
    grid_answer = recommend(grid_analysis, {r.id: r.spec for r in tuned_records})

    def tests(rec: Recommendation, pool: list[TrialRecord]) -> dict[int, float]:
        return {r.labels.seed: r.metrics.eval_loss for r in pool if r.metrics is not None
                and r.labels.group.placement == rec.chosen.placement
                and math.isclose(float(dict(r.labels.group.axes)["lr"]), rec.chosen.lr)}

    ours, theirs = tests(answer, finalist_trials), tests(grid_answer, tuned_records)
    test = paired(ours, theirs)
    if test is None:
        raise LoraplaceError("the search's answer and the grid's share no seed")
    ci = (test.mean_diff, test.mean_diff) if test.ci_half is None else (test.mean_diff - test.ci_half,
                                                                       test.mean_diff + test.ci_half)
    full_val = {c.key: by_id[c.key].metrics.val_loss for c in candidates if by_id[c.key].metrics is not None}
    best = min((k for k, v in full_val.items() if v is not None), key=lambda k: full_val[k])
    labels = {c.key: c.label for c in candidates}
    return ReplayResult(grid.name, policy, seed, tuple(steps), tuple(decisions), search, answer, grid_answer,
                        test.mean_diff, ci, test.p_value, test.seeds, best in decisions[0].kept, labels[best],
                        tuple(sorted(r.id for r in finalist_trials)))


def _replayable(spec, policy: SearchSpec) -> list[str]:
    problems = []
    if spec.tune is None:
        problems.append("it is not a tuned study (no tune:): a search's candidates are placements × tune.lr")
    if not spec.eval.at_steps:
        problems.append("its trials recorded no rung points (eval.at_steps)")
    if policy.rung_examples != spec.eval.watch_examples:
        policy_reads = f"{policy.rung_examples}" if policy.rung_examples else "all of them (rung_examples: null)"
        if spec.eval.watch_examples:
            problems.append(f"its rung points read {spec.eval.watch_examples} validation examples but the policy's "
                            f"rungs read {policy_reads}: give the policy rung_examples: {spec.eval.watch_examples}")
        else:
            problems.append(f"its rung points read all the validation examples but the policy's rungs read "
                            f"{policy_reads}: leave the policy's rung_examples out")
    if len(spec.sizes()) > 1 or spec.axis_values(spec.axes):
        problems.append("it sweeps more than placements × LRs (sizes or axes): a search compares placements at one "
                        "setting")
    return problems


def _rung_result(trial: TrialRecord, rung: Rung, previous: int, batch: int) -> RungResult:
    """What a live rung would record for this candidate: its validation loss at ``rung.steps``, read from the
    grid trial's recorded point; the cost a live rung pays (the steps since the previous rung, its eval)."""
    added = rung.steps - previous
    if trial.status != "done" or trial.outcome is None:
        failure = trial.outcome.failure if trial.outcome is not None else None
        step = failure.step if failure is not None else None
        if step is not None and step > rung.steps:  # failed later than this rung: it was fine here
            failure = None
        if failure is not None:
            return RungResult(candidate=trial.id, rung=rung.index, steps=rung.steps, status="failed", failure=failure,
                              trained_steps=added, trained_examples=added * batch)
    point = next((e for e in (trial.outcome.evals if trial.outcome is not None else ())
                  if e.step == rung.steps and e.split == "validation"), None)
    if point is None:
        raise LoraplaceError(f"grid trial {trial.id} has no recorded validation loss at step {rung.steps}")
    init = (trial.outcome.init_examples or 0) if rung.index == 0 else 0  # EVA's SVD: the first injection only
    return RungResult(candidate=trial.id, rung=rung.index, steps=rung.steps, status="done", val_loss=point.eval_loss,
                      trained_steps=added, trained_examples=added * batch, eval_examples=point.examples or 0,
                      init_examples=init)


def _tuned_design(records: list[TrialRecord], spec, seed: int) -> list[TrialRecord]:
    """The trials of the tuned grid a user would run, from a grid that may have run more: every LR on ``seed``,
    the other seeds only at each placement's LR selected on ``seed`` (lowest validation loss)."""
    from loraplace.tuning import TrialResult, select_lrs

    results = [TrialResult(r.labels.group, r.labels.seed, r.metrics.val_loss if r.metrics is not None else None)
               for r in records if r.status in ("done", "failed")]
    selections = {}
    for placement in spec.placements:
        selections |= select_lrs([r for r in results if r.key.placement == placement],
                                 spec.tune.lrs_for(placement), [seed])
    chosen = {(cell.placement, s.lr) for cell, s in selections.items()}
    return [r for r in records if r.labels.seed == seed
            or (r.labels.group.placement, float(dict(r.labels.group.axes)["lr"])) in chosen]


def _counts(records: list[TrialRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def policy_of(value: dict[str, Any] | SearchSpec) -> SearchSpec:
    return value if isinstance(value, SearchSpec) else SearchSpec.model_validate(value)
