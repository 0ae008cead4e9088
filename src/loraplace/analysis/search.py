"""What a placement search did and what it cost: its rungs, their decisions, the ranking agreement between
consecutive rungs, and a compute ledger in training-step equivalents against the full tuned grid.

Cost rule (one home: :data:`FORWARD_COST`): a training example (forward + backward) counts 1, an example run
forward only (an eval, EVA's SVD) counts 1/3 — the 2N-vs-6N FLOP accounting; with a frozen base the backward pass
skips the weight gradients, so a forward costs *more* than 1/3 of a LoRA step in FLOPs (at most 1/2), and the
ledger also shows the ratio at 1/2. A step-equivalent is ``train.batch`` examples. A probe pass counts its batches
as training examples (it backpropagates). Measured seconds are shown beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loraplace.placement.spec import parse_placement
from loraplace.records import RungDecision, RungResult, StudyInfo
from loraplace.search import Candidate
from loraplace.store import TrialRecord

FORWARD_COST = 1 / 3  # an example run forward only, in training examples
FORWARD_COST_HIGH = 1 / 2  # the upper bound with a frozen base (backward without weight gradients)


@dataclass(frozen=True)
class CostItem:
    """One line of the ledger: examples trained (fwd+bwd) and run forward only, and measured seconds."""

    what: str
    trained_examples: int
    forward_examples: int
    seconds: float

    def steps(self, batch: int, forward_cost: float = FORWARD_COST) -> float:
        return (self.trained_examples + forward_cost * self.forward_examples) / batch


@dataclass(frozen=True)
class RungSummary:
    decision: RungDecision
    results: dict[str, RungResult]  # candidate → its result at this rung

    @property
    def cut(self) -> tuple[str, ...]:
        return tuple(k for k in self.decision.ranked if k not in self.decision.kept)


@dataclass(frozen=True)
class RankAgreement:
    """Kendall's tau between a rung's ranking and a later one's, over the candidates both measured."""

    rung: int  # the earlier rung, 0-based
    later_rung: int | None  # the later rung, 0-based; None: the finalists' full-horizon validation loss (seed 0)
    tau: float | None  # None: fewer than two candidates in both, or undefined
    candidates: int

    def against(self, total_steps: int, seed: int) -> str:
        return f"full horizon ({total_steps} steps, seed {seed})" if self.later_rung is None \
            else f"rung {self.later_rung + 1}"


@dataclass(frozen=True)
class SearchAnalysis:
    names: dict[str, Candidate]
    rungs: tuple[RungSummary, ...]
    pending: dict[int, dict[str, RungResult]]  # results of a rung not decided yet
    ledger: tuple[CostItem, ...]
    batch: int
    total_steps: int  # train.steps (the full horizon)
    grid_steps: int  # training steps of the full tuned grid of the same spec
    grid_trials: int
    finalists: tuple[str, ...]
    kendall: tuple[RankAgreement, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def search_steps(self, forward_cost: float = FORWARD_COST) -> float:
        return sum(item.steps(self.batch, forward_cost) for item in self.ledger)

    def ratio(self, forward_cost: float = FORWARD_COST) -> float:
        return self.search_steps(forward_cost) / self.grid_steps if self.grid_steps else math.nan

    @property
    def finished(self) -> bool:
        return bool(self.finalists)

    def curve(self, key: str) -> list[tuple[int, float]]:
        """(steps, validation loss) of a candidate at every rung it ran."""
        points = [(r.results[key].steps, r.results[key].val_loss) for r in self.rungs if key in r.results]
        points += [(res[key].steps, res[key].val_loss) for res in self.pending.values() if key in res]
        return [(s, v) for s, v in points if v is not None]

    def cut_at(self, key: str) -> int | None:
        """The rung (0-based) a candidate was cut at; None: it was kept to the end."""
        return next((r.decision.rung for r in self.rungs if key in r.cut), None)


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b of two paired lists (ties counted as scipy.stats.kendalltau counts them; pure Python, so
    reading a search's status needs no scipy), None when fewer than 2 pairs or undefined."""
    n = len(a)
    if n < 2:
        return None
    concordant = discordant = tied_a = tied_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0:
                tied_a += 1
            if db == 0:
                tied_b += 1
            if da and db:
                if (da > 0) == (db > 0):
                    concordant += 1
                else:
                    discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_a) * (pairs - tied_b))
    return (concordant - discordant) / denominator if denominator else None


def analyze_search(spec: dict[str, Any], info: StudyInfo, results: list[RungResult], decisions: list[RungDecision],
                   records: list[TrialRecord]) -> SearchAnalysis:
    """The search of a stored study: ``spec`` as stored, its rung results and decisions, its (finalist) trials."""
    from loraplace.study import candidates_of, expand_grid
    from loraplace.study.spec import study_from_store

    study = study_from_store(spec)
    names = {c.key: c for c in candidates_of(study)}
    by_rung: dict[int, dict[str, RungResult]] = {}
    for r in results:
        by_rung.setdefault(r.rung, {})[r.candidate] = r
    decided = {d.rung for d in decisions}
    rungs = tuple(RungSummary(d, by_rung.get(d.rung, {})) for d in sorted(decisions, key=lambda d: d.rung))
    pending = {k: v for k, v in by_rung.items() if k not in decided}
    batch = study.train.batch
    ledger, notes = _ledger(study, names, results, records)
    # The grid it replaces selects each placement's LR on the first seed, as the search does (a grid selecting on
    # every seed would cost more, and make the ratio look better than the fair one).
    no_search = study.model_copy(update={"search": None, "tune": None if study.tune is None else
                                         study.tune.model_copy(update={"seeds": [study.seeds[0]]})})
    grid = expand_grid(no_search, _all_selected(no_search))
    kendall = []
    for a, b in zip(rungs, rungs[1:], strict=False):
        both = [k for k in b.results if k in a.results and a.results[k].val_loss is not None
                and b.results[k].val_loss is not None]
        kendall.append(RankAgreement(a.decision.rung, b.decision.rung, kendall_tau(
            [a.results[k].val_loss for k in both], [b.results[k].val_loss for k in both]), len(both)))
    final_rung = rungs[-1] if rungs else None
    finalists = final_rung.decision.kept if final_rung is not None and _is_last(final_rung.decision, study,
                                                                                  len(names)) else ()
    if finalists:  # the last rung against the finalists' full-horizon validation loss (seed 0)
        # a finalist's first-seed trial has its candidate's key as its id
        full = {r.id: r.metrics.val_loss for r in records if r.id in final_rung.results and r.metrics is not None}
        both = [k for k in finalists if full.get(k) is not None and final_rung.results[k].val_loss is not None]
        kendall.append(RankAgreement(final_rung.decision.rung, None, kendall_tau(
            [final_rung.results[k].val_loss for k in both], [full[k] for k in both]), len(both)))
    return SearchAnalysis(names, rungs, pending, tuple(ledger), batch, study.train.steps,
                          len(grid) * study.train.steps, len(grid), tuple(finalists), tuple(kendall), tuple(notes))


def _is_last(decision: RungDecision, study, n: int) -> bool:
    """Whether a recorded decision is the search's last (a decision stored before ``RungDecision.last`` existed:
    from the spec's rung schedule)."""
    if "last" in decision.model_fields_set:
        return decision.last
    from loraplace.search import rung_steps

    return decision.rung == len(rung_steps(study.search, n, study.train.steps, study.train.warmup)) - 1


def _all_selected(study) -> dict:
    """Every cell of the tuned grid with a selection (which LR does not matter for counting its trials)."""
    from loraplace.records import GroupKey
    from loraplace.tuning import Selection

    if study.tune is None:
        return {}
    out = {}
    for pname in study.placements:
        for size in study.sizes():
            cell = GroupKey(placement=pname, size=size, axes=())
            out[cell] = Selection(cell, study.tune.lrs_for(pname)[0], {}, ())
    return out


def _ledger(study, names: dict[str, Candidate], results: list[RungResult],
            records: list[TrialRecord]) -> tuple[list[CostItem], list[str]]:
    notes: list[str] = []
    items: list[CostItem] = []
    for rung in sorted({r.rung for r in results}):
        at = [r for r in results if r.rung == rung]
        items.append(CostItem(f"rung {rung + 1}: training ({len(at)} candidates)",
                              sum(r.trained_examples for r in at), 0, sum(r.train_s for r in at)))
        items.append(CostItem(f"rung {rung + 1}: validation evals", 0, sum(r.eval_examples for r in at),
                              sum(r.eval_s for r in at)))
        inits = sum(r.init_examples for r in at)
        if inits:
            items.append(CostItem(f"rung {rung + 1}: EVA's SVD passes (forward)", 0, inits, 0.0))
    # One pass per distinct probe: methods probe and gradient read the same cached gradient probe.
    passes = {(p.auto.measure, p.auto.batches, p.auto.batch, p.auto.rank, p.auto.warmup_steps or 0,
               p.auto.warmup_lr or 0.0)
              for p in study.placements.values() if p.auto is not None and p.auto.method != "random"}
    for measure, batches, batch, _, warmup_steps, _ in sorted(passes):
        examples = batches * batch
        if measure == "nfn":  # forward only
            items.append(CostItem(f"nfn probe pass ({batches} batches of {batch}, forward)", 0, examples, 0.0))
        elif measure == "warmup":  # the all-linear warm-up trains, then its scoring batches run forward
            items.append(CostItem(f"warmup probe ({warmup_steps} training steps of {batch}, then {batches} batches "
                                  "forward)", warmup_steps * batch, examples, 0.0))
        else:
            items.append(CostItem(f"gradient probe pass ({batches} batches of {batch}, fwd+bwd)", examples, 0, 0.0))
    done = [r for r in records if r.outcome is not None and r.status == "done"]
    if done:
        trained = 0
        for r in done:
            # a finalist's first seed is a candidate (same trial id): it continued from its last rung
            start = max((res.steps for res in results if res.candidate == r.id and res.status == "done"), default=0)
            trained += (r.outcome.steps - start) * study.train.batch
        test_examples = sum(_examples(r, study) for r in done)
        val_size = study.data.held_out_size("validation")
        val_examples = len(done) * (val_size or 0)
        if not val_size:
            notes.append("the finalists' validation evals are not counted: the validation split is neither a count "
                         "nor a file")
        items.append(CostItem(f"finalists: training ({len(done)} trials at the full horizon)", trained, 0,
                              sum(r.metrics.train_s or 0.0 for r in done if r.metrics is not None)))
        items.append(CostItem("finalists: validation + test evals", 0, test_examples + val_examples,
                              sum(r.outcome.timings.eval_s for r in done)))
        measured = [r for r in done if r.outcome.init_examples is not None]
        if sum(r.outcome.init_examples or 0 for r in measured):
            items.append(CostItem(f"finalists: EVA's SVD passes (forward, {len(measured)} trials measured)", 0,
                                  sum(r.outcome.init_examples or 0 for r in measured), 0.0))
        # Not measured (fused, or an older store): each EVA finalist counted at the rungs' mean SVD pass.
        unmeasured = [r for r in done if r.outcome.init_examples is None
                      and parse_placement(r.spec["placement"]).variant == "eva"]
        per = [res.init_examples for res in results if res.init_examples]
        if unmeasured and per:
            items.append(CostItem(f"finalists: EVA's SVD passes ({len(unmeasured)} trials, not measured: as in the "
                                  "rungs)", 0, round(sum(per) / len(per)) * len(unmeasured), 0.0))
    return items, notes


def _examples(record: TrialRecord, study) -> int:
    """Test examples a finalist trial evaluated: the split's size (``DataSpec.held_out_size``), else estimated from its
    label tokens (per training example)."""
    count = study.data.held_out_size("test")
    if count:
        return count
    o = record.outcome
    per_example = o.label_tokens / max(o.steps * study.train.batch, 1)
    return round(o.eval_tokens / per_example) if per_example else 0


@dataclass(frozen=True)
class AgainstGrid:
    """One search candidate beside the full grid's trial of it (the same trial id: the grid's first seed)."""

    name: Candidate
    cut_at: int | None  # 0-based rung; None: a finalist
    rung_loss: float | None  # its validation loss at the rung that cut it (or at the last rung)
    grid_val_loss: float | None  # the grid's trial at the full horizon, first seed: validation loss
    grid_rank: int | None  # 1-based rank of that among the grid's first-seed trials (validation)
    grid_test_mean: float | None  # the grid's test loss over its seeds at this LR (None: the grid ran one seed)
    grid_seeds: int


def against_grid(search: SearchAnalysis, grid: list[TrialRecord]) -> list[AgainstGrid]:
    """Every candidate of a search beside the full tuned grid's result for it: where the search cut it, and what
    the grid measured for it at the full horizon — so a reader sees whether a cut ever removed the arm the grid
    found best."""
    by_id = {r.id: r for r in grid if r.metrics is not None}
    first_val = {k: by_id[k].metrics.val_loss for k in search.names if k in by_id}
    ranked = sorted((v, k) for k, v in first_val.items() if v is not None)
    rank = {k: i + 1 for i, (_, k) in enumerate(ranked)}
    out = []
    for key, name in search.names.items():
        tests = [r.metrics.eval_loss for r in grid if r.metrics is not None
                 and r.labels.group.placement == name.placement and dict(r.labels.group.axes).get("lr") == name.lr]
        cut = search.cut_at(key)
        curve = search.curve(key)
        rung_loss = next((r.results[key].val_loss for r in search.rungs if r.decision.rung == cut
                          and key in r.results), None) if cut is not None else (curve[-1][1] if curve else None)
        out.append(AgainstGrid(name, cut, rung_loss, first_val.get(key), rank.get(key),
                               sum(tests) / len(tests) if tests else None, len(tests)))
    return out
