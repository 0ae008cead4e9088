"""Practical guidelines written from study stores, each with its evidence, and only where the evidence holds.

A guideline is a rule applied to :func:`loraplace.analysis.compare.cross_study`'s entries within a *scope* (every
study; studies on a 4-bit base; studies at a longer horizon than the shortest). For each placement against the
baseline, in the scope's studies (entries that repeat other trials counted once):

- worse in at least one study, better in none → "prefer the baseline over it";
- better in at least one, worse in none → "it beat the baseline";
- neither, in two or more studies → "no study told it from the baseline" (absence of a difference, said as such);
- better in some and worse in others → "it depends on the study";
- one study, no difference → nothing: one tie is not a guideline.

And one rule across placements: when no placement chosen by an importance probe (``auto:``) beat the best preset
of its study, that is said too. "Better"/"worse" mean the study's seed-paired 95 % interval on the test-loss
difference lies wholly below / above 0. Every guideline carries its evidence rows and how many tasks agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loraplace.analysis.compare import Column, CrossStudy, Entry, Pooled, pool
from loraplace.analysis.stats import Paired
from loraplace.formatting import plural


@dataclass(frozen=True)
class EvidenceRow:
    study: str  # the column's label
    task: str
    steps: int | None
    cell: str
    placement: str
    against: str  # the baseline, or the preset compared with
    delta: Paired  # test loss, seed-paired
    delta_pct: Paired | None  # the same in % of the baseline's mean (against the baseline only)


@dataclass(frozen=True)
class Guideline:
    scope: str
    text: str
    rows: tuple[EvidenceRow, ...]
    pooled: Pooled | None  # Δ % against the baseline, task as the unit (None: a rule against presets)
    tasks: int
    tasks_agreeing: int  # tasks on which every study's verdict is the guideline's


@dataclass(frozen=True)
class Scope:
    name: str
    keep: Callable[[Column, CrossStudy], bool]


def _nf4(column: Column, _cs: CrossStudy) -> bool:
    return "quantize=nf4" in column.cell or "quantize=fp4" in column.cell


def _longer(column: Column, cs: CrossStudy) -> bool:
    steps = [c.steps for c in cs.columns if c.steps is not None]
    return column.steps is not None and bool(steps) and column.steps >= 4 * min(steps)


SCOPES = (Scope("every study", lambda _c, _cs: True), Scope("on a 4-bit base (nf4/fp4)", _nf4),
          Scope("at a longer horizon (≥ 4× the shortest study's steps)", _longer))


def _verdict(d: Paired) -> str:
    return {"better": "better", "worse": "worse"}.get(d.verdict(), "tie")


def _rows(cs: CrossStudy, entries: list[Entry], vs_preset: bool = False) -> tuple[EvidenceRow, ...]:
    out = []
    for e in entries:
        c = cs.columns[e.column]
        d = e.delta_vs_preset if vs_preset else e.delta
        if d is None or d.ci is None:
            continue
        out.append(EvidenceRow(c.label, c.task, c.steps, c.cell, e.placement,
                               (e.vs_preset or "—") if vs_preset else c.baseline, d,
                               None if vs_preset else e.delta_pct))
    return tuple(out)


def _agreeing(rows: tuple[EvidenceRow, ...], verdict: str) -> tuple[int, int]:
    by_task: dict[str, set[str]] = {}
    for r in rows:
        by_task.setdefault(r.task, set()).add(_verdict(r.delta))
    return len(by_task), sum(1 for v in by_task.values() if v == {verdict})


def write_guidelines(cs: CrossStudy) -> list[Guideline]:
    """Every guideline the evidence supports, scope by scope (see the module docstring)."""
    out: list[Guideline] = []
    for scope in SCOPES:
        kept = {i for i, c in enumerate(cs.columns) if scope.keep(c, cs)}
        if not kept:
            continue
        counted = [e for e in cs.entries if e.column in kept and e.repeats is None]
        for placement in cs.placements:
            rows = _rows(cs, [e for e in counted if e.placement == placement and not e.is_baseline])
            if not rows:
                continue
            verdicts = [_verdict(r.delta) for r in rows]
            wins, losses, ties = verdicts.count("better"), verdicts.count("worse"), verdicts.count("tie")
            base = " / ".join(dict.fromkeys(r.against for r in rows))
            n = plural(len(rows), "study", "studies")
            if losses and not wins:
                text, verdict = (f"At equal budget, prefer `{base}` over `{placement}`: `{placement}` was worse in "
                                 f"{losses} of {n} and better in none."), "worse"
            elif wins and not losses:
                text, verdict = f"`{placement}` beat `{base}` in {wins} of {n} and was worse in none.", "better"
            elif wins and losses:
                text, verdict = (f"`{placement}` against `{base}` depends on the study: better in {wins}, worse in "
                                 f"{losses} of {n}."), "mixed"
            elif ties >= 2:
                text, verdict = (f"No study told `{placement}` from `{base}` ({n}, none better or worse): at equal "
                                 f"budget it is a substitute with no measured loss — and no measured gain."), "tie"
            else:
                continue
            by_task: dict[str, list[Paired]] = {}
            for r in rows:
                if r.delta_pct is not None and r.delta_pct.ci is not None:
                    by_task.setdefault(r.task, []).append(r.delta_pct)
            tasks, agreeing = _agreeing(rows, verdict)
            out.append(Guideline(scope.name, text, rows, pool(by_task) if by_task else None, tasks, agreeing))
        probed = sorted({e.placement for e in counted if e.spec is not None and e.spec.get("auto")})
        rows = _rows(cs, [e for e in counted if e.placement in probed], vs_preset=True)
        if len(rows) >= 2 and not any(_verdict(r.delta) == "better" for r in rows):
            worse = sum(_verdict(r.delta) == "worse" for r in rows)
            tasks, agreeing = _agreeing(rows, "tie") if not worse else _agreeing(rows, "worse")
            out.append(Guideline(
                scope.name, f"No placement chosen by an importance probe ({', '.join(f'`{p}`' for p in probed)}) "
                f"beat the best other preset of its study ({len(rows)} comparisons: {worse} worse, "
                f"{len(rows) - worse} not distinguishable): pick a preset first.", rows, None, tasks, agreeing))
    return out


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _how(pooled: Pooled) -> str:
    return "t over tasks" if pooled.interval == "tasks" else f"one task: {pooled.interval}"


def render_guidelines(cs: CrossStudy, guidelines: list[Guideline], command: str, stores: list[str]) -> str:
    """docs/guidelines.md: the command that wrote it, the guidelines with their evidence, what is not covered."""
    lines = ["# Placement guidelines", "",
             f"<!-- Generated by `{command}`; tests/analysis/test_committed_studies.py checks it against the "
             "stores. Do not edit by hand. -->", "",
             "Written from the committed study stores by the rules in `loraplace.analysis.guidelines`: a guideline "
             "appears only where the studies support it, each with its evidence — every study's seed-paired "
             "difference in test loss (95 % t-interval), the pooled Δ % (the task as the unit of replication: "
             "`loraplace compare`, README), and on how many tasks every study agreed.", "",
             "Stores: " + ", ".join(f"`{s}`" for s in stores) + f" — {plural(len(cs.columns), 'study column')} on "
             f"{plural(len(cs.tasks), 'task')} ({', '.join(cs.tasks)}).", ""]
    scope = None
    for i, g in enumerate(guidelines, start=1):
        if g.scope != scope:
            scope = g.scope
            lines += [f"## {scope[0].upper()}{scope[1:]}", ""]
        agree = f"tasks agreeing: {g.tasks_agreeing} of {g.tasks}"
        pooled = "" if g.pooled is None else (f"; pooled Δ {_signed(g.pooled.estimate)} % "
                                              f"[{_signed(g.pooled.ci_low)}, {_signed(g.pooled.ci_high)}] "
                                              f"({_how(g.pooled)})")
        lines += [f"**G{i}.** {g.text} ({agree}{pooled}.)", "",
                  "| study | task | steps | cell | placement | against | Δ test loss [95 % CI] | Δ % | verdict |",
                  "|:---|:---|---:|:---|:---|:---|---:|---:|:---|"]
        for r in g.rows:
            low, high = r.delta.ci
            pct = "—" if r.delta_pct is None else _signed(r.delta_pct.mean_diff)
            lines.append(f"| {r.study} | {r.task} | {r.steps} | {r.cell} | `{r.placement}` | `{r.against}` | "
                         f"{_signed(r.delta.mean_diff, 4)} [{_signed(low, 4)}, {_signed(high, 4)}] | {pct} | "
                         f"{_verdict(r.delta)} (n={r.delta.n}) |")
        lines.append("")
    if not guidelines:
        lines += ["No guideline: the studies support none yet.", ""]
    models = sorted({c.model for c in cs.columns})
    steps = sorted({c.steps for c in cs.columns if c.steps is not None})
    lines += ["## What the evidence does not cover", "",
              f"- Models: {', '.join(f'`{m}`' for m in models)} only — one model family and size; nothing here "
              "says how placements rank on larger models or other families.",
              f"- Tasks: {', '.join(cs.tasks)}; horizons: {', '.join(map(str, steps))} optimizer steps; sizes: "
              f"{', '.join(dict.fromkeys(c.cell for c in cs.columns))}. Other budgets, ranks and longer training "
              "are untested.",
              "- Test loss only (nats per token on each task's held-out split), not task accuracy or generation "
              "quality; two or three seeds per placement, so a \"tie\" is the absence of a measured difference, "
              "not evidence of equality.", ""]
    if cs.notes:
        lines += ["## Read with care", ""] + [f"- {n}" for n in cs.notes] + [""]
    return "\n".join(lines)
