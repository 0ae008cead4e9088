"""The numbers docs/validation.md and docs/probe.md quote are what `loraplace report` computes from the stores."""

import re
from pathlib import Path

import pytest

from helpers import ROOT, load_script
from loraplace.analysis import analyze_store

STORE = ROOT / "docs" / "validation" / "validation.db"
DOC = ROOT / "docs" / "validation.md"


def _section(heading: str) -> str:
    """The text of docs/validation.md's section whose heading starts with ``heading``, up to the next one."""
    return DOC.read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def _row(label: str, text: str) -> list[str]:
    """The cells of the result table's row for arm ``label`` (its first cell is `label`)."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].startswith(f"`{label}`"):
            return cells
    raise AssertionError(f"no row for {label} in {DOC}")


def _check_result_table(store: Path, text: str, trials: int) -> None:
    """Every compared arm's row in ``text``: selected LR, trainable params, test loss ± CI, validation loss ± CI,
    and (but for the baseline) its seed-paired Δ to the baseline ± CI and p."""
    analysis = analyze_store(store)
    assert analysis.counts["done"] == trials and analysis.counts["failed"] == 0
    for group in analysis.compared:
        cells = _row(group.placement, text)
        lr = dict(group.key.axes)["lr"]
        stats = group.stats["eval_loss"]
        assert float(cells[1].split()[0]) == pytest.approx(lr), group.placement
        assert cells[2].startswith(f"{group.trainable_params:,}"), group.placement
        mean, ci = (float(x) for x in re.findall(r"[0-9.]+", cells[3].replace("*", ""))[:2])
        assert (mean, ci) == (round(stats.mean, 4), round(stats.ci_half, 4)), group.placement
        val = group.stats["val_loss"]
        assert cells[4] == f"{val.mean:.4f} ± {val.ci_half:.4f}", group.placement
        if group.is_baseline:
            assert cells[5] == "baseline", group.placement
            continue
        d = group.comparison.delta_loss
        delta_mean, delta_ci = (float(x) for x in re.findall(r"[-+−][0-9.]+|[0-9.]+", cells[5].replace("−", "-"))[:2])
        assert (delta_mean, delta_ci) == (round(d.mean_diff, 4), round(d.ci_half, 4)), group.placement
        assert float(cells[6]) == pytest.approx(d.p_value, abs=6e-4), group.placement


def _pair_as_written(pairs: dict, first: str, other: str, written: tuple[str, str, str]):
    """The report's difference between ``first`` and ``other``, checked against a doc row that writes it as
    first − other: mean, interval low, interval high (the report's delta is better − other, so the sign may turn)."""
    d = pairs[frozenset((first, other))]
    sign = -1 if d.better.placement == other else 1
    delta = d.delta_loss
    assert [float(x.replace("−", "-")) for x in written] == pytest.approx(
        [sign * delta.mean_diff, *sorted(sign * x for x in delta.ci)], abs=6e-5), (first, other)
    return d


@pytest.mark.skipif(not STORE.is_file(), reason="the validation study's store is not in this checkout")
def test_the_validation_table_is_the_store_s_analysis():
    _check_result_table(STORE, _section("Result"), trials=36)


@pytest.mark.skipif(not STORE.is_file(), reason="the validation study's store is not in this checkout")
def test_the_validation_pairs_are_the_report_s_pair_table():
    """docs/validation.md's "`auto` against the others" rows: the report's pairwise differences, sign turned so
    that positive means `auto` worse."""
    pairs = {frozenset((d.better.placement, d.other.placement)): d for d in analyze_store(STORE).pairwise}
    number = r"([+−-][0-9.]+)"
    rows = re.findall(rf"^\| auto − ([\w-]+)[^|]*\| \**{number} \[{number}, {number}\]\** \| ([0-9.]+) \|",
                      DOC.read_text(), re.MULTILINE)
    assert len(rows) == 5
    for other, mean, low, high, p in rows:
        d = _pair_as_written(pairs, "auto", other, (mean, low, high))
        assert float(p) == pytest.approx(d.delta_loss.p_value, abs=6e-3 if d.delta_loss.p_value > 0.1 else 6e-4), other


FP32_STORE = ROOT / "docs" / "validation-fp32" / "validation-fp32.db"
FP32_SECTION = "New probe arms"


@pytest.mark.skipif(not FP32_STORE.is_file(), reason="the fp32 probe study's store is not in this checkout")
def test_the_fp32_probe_table_is_the_store_s_analysis():
    """docs/validation.md's fp32 study (nfn and warmup against all, ff-up and EVA): every arm's row is what the
    committed store gives."""
    _check_result_table(FP32_STORE, _section(FP32_SECTION), trials=30)


@pytest.mark.skipif(not FP32_STORE.is_file(), reason="the fp32 probe study's store is not in this checkout")
def test_the_fp32_probe_pairs_are_the_report_s_pair_table():
    """Its comparison rows (new method − other: Δ [interval], p, p Holm) are the report's pairwise differences,
    sign turned to read as written."""
    _check_pair_rows(FP32_STORE, _section(FP32_SECTION), {("nfn", "ff-up"), ("nfn", "eva"), ("warmup", "ff-up"),
                                                          ("warmup", "eva"), ("nfn", "warmup")})


def _check_pair_rows(store: Path, text: str, expected: set[tuple[str, str]]) -> None:
    """The comparison rows of ``text`` (`| a − b | Δ [low, high] | p | p (Holm) |`) are exactly the pairs
    ``expected``, each the report's pairwise difference of the store, sign turned to read as written."""
    pairs = {frozenset((d.better.placement, d.other.placement)): d for d in analyze_store(store).pairwise}
    number = r"([+−-][0-9.]+)"
    rows = re.findall(rf"^\| ([\w-]+) − ([\w-]+) \| {number} \[{number}, {number}\] \| ([0-9.]+) \| ([0-9.]+) \|",
                      text, re.MULTILINE)
    assert {(a, b) for a, b, *_ in rows} == expected
    for first, other, mean, low, high, p, p_holm in rows:
        d = _pair_as_written(pairs, first, other, (mean, low, high))
        assert float(p) == pytest.approx(d.delta_loss.p_value, abs=6e-4), (first, other)
        assert float(p_holm) == pytest.approx(d.p_holm, abs=6e-4), (first, other)


PROBE_STORE = ROOT / "docs" / "probe-validation" / "probe-validation.db"
PROBE_DOC = ROOT / "docs" / "probe.md"


@pytest.mark.skipif(not PROBE_STORE.is_file(), reason="the probe-validation study's store is not in this checkout")
def test_the_probe_validation_table_is_the_store_s_analysis():
    """docs/probe.md's result table — every arm's parameters and eval loss at both budgets, the nfn and warmup
    arms added with --extend included — is what the committed store gives."""
    analysis = analyze_store(PROBE_STORE)
    assert analysis.counts["done"] == 60 and analysis.counts["failed"] == 0
    rows = {}
    for line in PROBE_DOC.read_text().split("## Result", 1)[1].splitlines():
        cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1][:1].isdigit():
            rows[cells[0].split()[0]] = cells
    for group in analysis.compared:
        cells = rows[group.placement]
        params, loss = (1, 2) if group.key.size.value == 620_000 else (4, 5)
        stats = group.stats["eval_loss"]
        assert cells[params] == f"{group.trainable_params:,}", group.key.label
        assert cells[loss] == f"{stats.mean:.4f} ± {stats.ci_half:.4f}", group.key.label
    assert {"nfn", "warmup", "auto", "all"} <= set(rows)


QLORA_STORE = ROOT / "docs" / "qlora" / "qlora.db"
QLORA_DOC = ROOT / "docs" / "qlora.md"


@pytest.mark.skipif(not QLORA_STORE.is_file(), reason="the QLoRA study's store is not in this checkout")
def test_the_qlora_table_is_the_store_s_analysis():
    """docs/qlora.md's placement table — each placement's test loss (± CI), validation loss and selected LR on
    the full-precision and the nf4 base, its Δ to `all` on each, and the nf4 − full-precision effect — is what
    the committed store gives."""
    analysis = analyze_store(QLORA_STORE)
    assert analysis.counts["done"] == 36 and analysis.counts["failed"] == 0
    table = QLORA_DOC.read_text().split("## Result", 1)[1].split("Every LR", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[cells[0].split("`")[1]] = cells

    def numbers(text: str) -> list[float]:
        return [float(x) for x in re.findall(r"[-+]?[0-9]*\.[0-9]+", text.replace("−", "-"))]

    for group in analysis.compared:
        axes = dict(group.key.axes)
        cells = rows[group.placement]
        loss, delta = (1, 2) if axes["quantize"] == "none" else (3, 4)
        stats, val = group.stats["eval_loss"], group.stats["val_loss"]
        assert numbers(cells[loss])[:3] == [round(stats.mean, 4), round(stats.ci_half, 4), round(val.mean, 4)]
        assert cells[loss].endswith(f"at {axes['lr']:.0e}".replace("e-0", "e-")), group.key.label
        if not group.is_baseline:
            d = group.comparison.delta_loss
            mean, ci, p = numbers(cells[delta])[:3]
            assert (mean, ci) == (round(d.mean_diff, 4), round(d.ci_half, 4)), group.key.label
            assert p == pytest.approx(d.p_value, abs=0.005), group.key.label  # as written: 2 significant digits
    for effect in analysis.axis_effects:
        d = effect.delta_loss
        mean, ci, pct, p = numbers(rows[effect.group.placement][5])[:4]
        assert (mean, ci, pct) == (round(d.mean_diff, 4), round(d.ci_half, 4), round(effect.delta_loss_pct, 1))
        assert p == pytest.approx(d.p_value, abs=0.0005), effect.group.label


HORIZON_STORE = ROOT / "docs" / "horizon" / "horizon.db"


@pytest.mark.skipif(not HORIZON_STORE.is_file(), reason="the horizon study's store is not in this checkout")
def test_the_horizon_s_trial_table_is_the_store_s_done_trials():
    """docs/validation.md's 160-step table lists every finished trial of the horizon study — arm, LR, seed — with
    the test and validation loss the store holds, and nothing the store does not."""
    analysis = analyze_store(HORIZON_STORE)
    stored = {(t.placement, dict(t.key.axes)["lr"], t.seed): t.metrics for t in analysis.trials
              if t.status == "done"}
    written = {}
    for line in _section("Longer horizon").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[3] == "160":
            written[(cells[0].strip("`"), float(cells[1]), int(cells[2]))] = (float(cells[4]), float(cells[5]))
    assert written.keys() == stored.keys()
    for key, (test, val) in written.items():
        assert (test, val) == (round(stored[key]["eval_loss"], 4), round(stored[key]["val_loss"], 4)), key


@pytest.mark.skipif(not HORIZON_STORE.is_file(), reason="the horizon study's store is not in this checkout")
def test_the_horizon_result_table_is_the_store_s_analysis():
    """docs/validation.md's 160-step result table (each arm at the LR its two seeds' validation loss selected) and
    its `nfn` comparison rows are what the committed store gives, all 16 trials in."""
    section = _section("Longer horizon")
    _check_result_table(HORIZON_STORE, section, trials=16)
    _check_pair_rows(HORIZON_STORE, section, {("nfn", "mlp"), ("nfn", "all"), ("nfn", "attn"), ("mlp", "all")})


def test_the_guidelines_are_what_the_stores_give_today():
    """docs/guidelines.md is regenerated from the committed stores by the command written at its top: a guideline
    whose numbers (or whose very existence) no longer follow from the stores fails here."""
    import os

    text = (ROOT / "docs" / "guidelines.md").read_text()
    command = re.search(r"Generated by `([^`]+)`", text).group(1)
    assert command == "python scripts/write_guidelines.py"
    module = load_script("scripts/write_guidelines.py")
    here = os.getcwd()
    try:
        assert module.guidelines_text() == text
    finally:
        os.chdir(here)
    assert "**G1.**" in text and "## What the evidence does not cover" in text


def test_the_readme_s_opening_quotes_the_stores():
    """The README's sentences on the evidence: attn's range against all per task, over how many studies; that no
    study told mlp from all; that ff-up tied on GSM8K and E2E and was worse on NL→bash."""
    import os

    from loraplace.analysis.compare import compare_stores

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        cross = compare_stores(load_script("scripts/write_guidelines.py").STORES)  # the guidelines' studies
    finally:
        os.chdir(here)
    task = dict(enumerate(c.task for c in cross.columns))
    attn = [e for e in cross.entries if e.placement == "attn" and e.repeats is None and e.delta_pct]
    assert all(e.delta_pct.verdict() == "worse" for e in attn)
    gsm8k = [e.delta_pct.mean_diff for e in attn if task[e.column] == "gsm8k"]
    nl2bash = [e.delta_pct.mean_diff for e in attn if task[e.column] == "nl2bash"]
    e2e = [e.delta_pct.mean_diff for e in attn if task[e.column] == "e2e"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert len(set(task.values())) == 3
    assert f"in all {len(attn)} studies on three tasks (GSM8K: +{min(gsm8k):.1f} % to +{max(gsm8k):.1f} %," in readme
    assert len(nl2bash) == 1 and f"NL→bash: +{nl2bash[0]:.1f} %;" in readme
    assert len(e2e) == 1 and f"E2E data-to-text: +{e2e[0]:.1f} %)" in readme
    mlp = [e.delta for e in cross.entries if e.placement == "mlp" and e.delta is not None]
    assert mlp and all(d.verdict() == "not distinguishable" for d in mlp)
    assert "`mlp` could not be told from `all` in any study" in readme
    ff_up = {task[e.column]: e for e in cross.entries if e.placement == "ff-up" and e.delta is not None}
    assert ff_up["gsm8k"].delta.verdict() == ff_up["e2e"].delta.verdict() == "not distinguishable"
    assert ff_up["nl2bash"].delta.verdict() == "worse"
    assert "`ff-up` (MLP up only) tied on GSM8K and E2E but was worse" in readme
    assert f"worse on NL→bash (+{ff_up['nl2bash'].delta_pct.mean_diff:.1f} %)" in readme


REPLAY_DOC = ROOT / "docs" / "replay.md"
REPLAY_BLOCKS = re.findall(r"<!-- replay:([a-z0-9+-]+) -->", REPLAY_DOC.read_text())


@pytest.fixture(scope="module")
def replays():
    """What benchmarks/replay_policies.py prints from the committed grids of some tasks ("nl2bash+e2e" → both),
    each set replayed once for the tests of this module."""
    import contextlib
    import io

    module = load_script("benchmarks/replay_policies.py")
    printed: dict[str, str] = {}

    def of(block: str) -> str:
        if block not in printed:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                module.main([str(ROOT / "docs" / "replay" / task / "grid.db") for task in block.split("+")])
            printed[block] = out.getvalue()
        return printed[block]

    return module, of


@pytest.mark.parametrize("block", REPLAY_BLOCKS)
def test_each_replay_table_is_what_the_replays_give_today(block, replays):
    """Each replay block of docs/replay.md (``<!-- replay:nl2bash -->``, ``<!-- replay:nl2bash+e2e -->``: the
    tasks whose grids it replays) — the tables of every policy × task × rung seed and the summary per policy, and
    the machine lines — is what benchmarks/replay_policies.py prints from the committed grids today: a changed
    store or a changed replay fails here."""
    tasks = block.split("+")
    module, printed = replays
    text = REPLAY_DOC.read_text().split(f"<!-- replay:{block} -->", 1)[1].split(f"<!-- /replay:{block} -->", 1)[0]
    expected = [line for line in printed(block).splitlines() if line.startswith(("|", "task="))]
    written = [line for line in text.splitlines() if line.startswith(("|", "task="))]
    policies, seeds = len(module.POLICIES), 3
    # every replay, two table headers, one summary row a policy, one machine line a policy and task
    assert len(expected) == policies * seeds * len(tasks) + 2 + 2 + policies + policies * len(tasks)
    assert written == expected


def test_the_replay_doc_has_its_nl2bash_block():
    assert "nl2bash" in REPLAY_BLOCKS  # the parametrized test above cannot pass by finding no block


def _search_lines() -> list[str]:
    """The lines of docs/search.md's ``search-lines`` block (one per task), unindented."""
    text = (ROOT / "docs" / "search.md").read_text().split("<!-- search-lines -->", 1)[1].split(
        "<!-- /search-lines -->", 1)[0]
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_default_search_s_task_lines_of_docs_search_md_are_what_the_replays_give_today(replays):
    """docs/search.md's line per replay task for the chosen default (docs/replay.md's rule, rungs on seed 0) is
    what benchmarks/replay_policies.py prints for that policy from the committed grids; and search: {} is the
    policy the rule chose (the one place that equality is checked: here the choice is derived from the stores)."""
    module, printed = replays
    lines = printed("nl2bash+e2e").splitlines()
    chosen = next(line.split(": ", 1)[1].split()[0] for line in lines if line.startswith("chosen default: "))
    expected = [line.removesuffix(f" policy={chosen}") for line in lines
                if line.startswith("task=") and line.endswith(f" policy={chosen}")]
    written = [line for line in _search_lines() if line.startswith("task=")]
    assert len(expected) == 2 and written[:2] == expected
    # and search: {} is that policy, its rungs as fractions of the grids' 40 steps
    from loraplace.search import DEFAULT_RUNGS, SearchSpec, given_rung_steps

    policy = module.policy_spec(chosen)
    assert SearchSpec().model_dump() == policy.model_dump() | {"rungs": list(DEFAULT_RUNGS)}
    assert given_rung_steps(list(DEFAULT_RUNGS), 40) == policy.rungs


def test_the_search_line_of_docs_search_md_is_what_the_stores_give_today():
    """docs/search.md's run-2 line is benchmarks/search_vs_grid.py's last lines on the committed search and grid:
    a changed store or a changed computation fails here (the pattern the live GSM8K line of docs/replay.md's
    chosen default is checked by, too)."""
    import contextlib
    import io

    module = load_script("benchmarks/search_vs_grid.py")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert module.main([str(ROOT / "docs" / "search" / "search.db"), str(ROOT / "docs" / "validation" /
                                                                              "validation.db"), "--task", "gsm8k"]) == 0
    *_, old_format, task_line = printed.getvalue().splitlines()
    assert f"`{old_format}`" in (ROOT / "docs" / "search.md").read_text()
    # the same figures in the replays' format; docs/search.md says the answer is the grid's best arm, ff-up
    assert task_line == "task=gsm8k " + old_format.replace("answer=ff-up delta_vs_grid_best=",
                                                           "answer=ff-up grid_answer=ff-up delta=")


def test_the_gsm8k_line_of_docs_search_md_is_the_live_search_against_its_grid(capsys):
    """docs/search.md's gsm8k line (the chosen default run live on GSM8K, which took no part in the choice) is
    benchmarks/search_vs_grid.py's task line on the committed search and grid — or, while the committed grid is
    unfinished, says it is pending, and the script refuses to give a line (an unfinished grid's answer can still
    change)."""
    module = load_script("benchmarks/search_vs_grid.py")
    replay = ROOT / "docs" / "replay" / "gsm8k"
    code = module.main([str(replay / "search.db"), str(replay / "grid.db"), "--task", "gsm8k"])
    printed = capsys.readouterr()
    written = [line for line in _search_lines() if line.startswith("task=gsm8k")]
    assert len(written) == 1
    if code == 0:
        assert written[0] == printed.out.splitlines()[-1]
    else:
        assert code == 2 and "unfinished" in printed.err and "pending" in written[0]


def test_a_grid_with_a_trial_left_or_a_placement_not_compared_has_no_answer_yet():
    unfinished = load_script("benchmarks/search_vs_grid.py").unfinished_grid
    done = {"done": 30, "pending": 0, "running": 0, "failed": 0, "interrupted": 0}
    assert unfinished(done, {"all", "mlp"}, ("all", "mlp")) is None
    assert unfinished(done | {"done": 29, "failed": 1}, {"all", "mlp"}, ("all", "mlp")) == \
        "unfinished: 29 trials done, 1 failed"
    assert unfinished(done, {"all"}, ("all", "mlp")) == "no placement compared for mlp"
