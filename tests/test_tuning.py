"""Per-placement LR tuning: the selection pass, the follow-up seeds at the selected LR, and a selection that the
test split cannot influence."""

import json
import random

import pytest

from helpers import run_study_once
from loraplace.analysis import analyze_store
from loraplace.analysis.report import write_report
from loraplace.errors import ConfigError
from loraplace.records import GroupKey, Size
from loraplace.store import Store
from loraplace.study import StudyChanged, expand_grid, load_study
from loraplace.tuning import TrialResult, select_lrs

LRS = [1.0e-4, 3.0e-3, 3.0e-2]


def _write_splits(root, permute_test: bool = False):
    rng = random.Random(0)
    rows = []
    for _ in range(90):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"})
    test = rows[70:]
    if permute_test:  # the same prompts, their answers shuffled: a different test split, same train/validation
        answers = [r["completion"] for r in test]
        random.Random(1).shuffle(answers)
        test = [{"prompt": r["prompt"], "completion": a} for r, a in zip(test, answers, strict=True)]
    for name, part in (("train", rows[:55]), ("val", rows[55:70]), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def _spec(root) -> str:
    return f"""name: tuned
model: tiny:llama
data: {{train: {root}/train.jsonl, validation: {root}/val.jsonl, test: {root}/test.jsonl, max_len: 64}}
train: {{steps: 4, batch: 4, precision: fp32}}
placements: {{all: {{preset: all}}, attn: {{preset: attn}}}}
ranks: [2]
seeds: [0, 1]
tune: {{lr: {LRS}, seeds: [0]}}
baseline: all
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    stores = {}
    for permute in (False, True):
        root = tmp_path_factory.mktemp("tuned-permuted" if permute else "tuned")
        _write_splits(root, permute)
        stores[permute] = run_study_once(root, _spec(root))
    return stores


def test_selection_pass_then_other_seeds_at_the_selected_lr(tuned, tmp_path):
    with Store.open_readonly(tuned[False]) as store:
        trials = store.trials(store.study().id)
    assert all(t.status == "done" for t in trials)
    by_seed = {0: [t for t in trials if t.labels.seed == 0], 1: [t for t in trials if t.labels.seed == 1]}
    assert len(by_seed[0]) == 2 * len(LRS)  # every placement at every LR on the selection seed
    assert len(by_seed[1]) == 2  # the other seed only at each placement's selected LR
    analysis = analyze_store(tuned[False])
    assert set(analysis.selections) == {GroupKey(placement=p, size=Size(kind="rank", value=2)) for p in ("all", "attn")}
    for cell, sel in analysis.selections.items():
        seed1 = next(t for t in by_seed[1] if t.labels.group.placement == cell.placement)
        assert dict(seed1.labels.group.axes)["lr"] == sel.lr
        assert sel.lr == min(sel.val_loss_by_lr, key=sel.val_loss_by_lr.get)
    compared = analysis.compared
    assert len(compared) == 2 and all(g.n == 2 and g.selected for g in compared)  # each at its own LR, 2 seeds
    written = write_report(analysis, tmp_path / "report", ("md",))
    md = written["md"].read_text()
    assert "Learning rate selected per placement (validation split)" in md
    assert "![Learning-rate sensitivity](figures/lr.png)" in md
    assert "validation loss" in md and "which selected each placement's LR" in md


def test_the_test_split_cannot_move_the_selection(tuned):
    plain, permuted = analyze_store(tuned[False]), analyze_store(tuned[True])
    assert {c: s.lr for c, s in plain.selections.items()} == {c: s.lr for c, s in permuted.selections.items()}
    assert {c: s.val_loss_by_lr for c, s in plain.selections.items()} == \
        {c: s.val_loss_by_lr for c, s in permuted.selections.items()}
    test_plain = sorted(g.stats["eval_loss"].mean for g in plain.compared)
    test_permuted = sorted(g.stats["eval_loss"].mean for g in permuted.compared)
    assert test_plain != test_permuted  # the test split did change: only the reported numbers moved


def test_select_lrs_rule():
    cell = GroupKey(placement="a", size=Size(kind="rank", value=4))

    def at(lr):
        return cell.model_copy(update={"axes": (("lr", lr),)})

    results = [TrialResult(at(0.1), 0, 2.0), TrialResult(at(0.1), 1, 2.2), TrialResult(at(0.01), 0, 1.9),
               TrialResult(at(0.01), 1, None), TrialResult(at(0.001), 0, 2.1), TrialResult(at(0.001), 1, 2.05)]
    sel = select_lrs(results, [0.1, 0.01, 0.001], [0, 1])[cell]
    assert sel.lr == 0.001  # 0.01 lost a seed (failed): out, however good its other seed
    assert sel.at_edge
    assert select_lrs(results[:-1], [0.1, 0.01, 0.001], [0, 1]) == {}  # selection pass unfinished


def test_tune_spec_problems(tmp_path):
    base = "name: t\nmodel: tiny:llama\ntrain: {steps: 2}\nplacements: {all: {preset: all}}\nseeds: [0, 1]\n"
    (tmp_path / "a.yaml").write_text(base + "data: {train: 'builtin:arithmetic?n=40'}\ntune: {lr: [1.0e-3, 1.0e-2], "
                                     "seeds: [5]}\naxes: {lr: [1.0e-3]}\n")
    with pytest.raises(ConfigError) as err:
        load_study(tmp_path / "a.yaml")
    text = str(err.value)
    assert "validation split" in text and "axes.lr" in text and "tune.seeds [5]" in text
    (tmp_path / "b.yaml").write_text(base + "data: {train: 'builtin:arithmetic?n=40', validation_count: 5}\n"
                                     "tune: {lr: [1.0e-3, 1.0e-2]}\n")
    grid = expand_grid(load_study(tmp_path / "b.yaml"))
    assert len(grid) == 2 * 2  # no selections yet: the selection pass only (2 LRs × 2 seeds)


def test_extending_the_lr_grid_reselects(tuned, tmp_path):
    """--extend with one more LR: only the new (cell, LR) trials run, and selection then ranges over every LR."""
    import shutil

    from loraplace.study import run_study

    root = tuned[False].parent
    db = tmp_path / "s.db"
    shutil.copy(tuned[False], db)
    wider = _spec(root).replace(f"lr: {LRS}", f"lr: {LRS + [1.0e-5]}")
    (tmp_path / "wider.yaml").write_text(wider)
    with pytest.raises(StudyChanged, match="different spec"):
        run_study(load_study(tmp_path / "wider.yaml"), db)
    summary = run_study(load_study(tmp_path / "wider.yaml"), db, extend=True)
    assert summary.failed == 0 and summary.ran >= 2  # the new LR for each placement (+ follow-ups if it wins)
    analysis = analyze_store(db)
    assert all(1.0e-5 in sel.val_loss_by_lr for sel in analysis.selections.values())


def test_a_field_added_since_the_store_was_written_is_not_a_change(tuned, tmp_path):
    """A study stored before `execution` existed resumes; only its real changes are listed (regression: the
    validation study's follow-up seeds were refused with "execution: added")."""
    import shutil
    import sqlite3

    from loraplace.study import run_study, spec_differences
    from loraplace.study.resume import _as_read_now

    db = tmp_path / "s.db"
    shutil.copy(tuned[False], db)
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT spec_json FROM studies").fetchone()
        old = json.loads(stored)
        del old["execution"]  # as an older loraplace wrote it
        conn.execute("UPDATE studies SET spec_json = ?", (json.dumps(old),))
    conn.close()
    root = tuned[False].parent
    current = load_study(root / "spec.yaml").model_dump(mode="json")
    assert spec_differences(_as_read_now(old), current) == []
    assert spec_differences(old, current) == ['execution: added ({"fuse": "auto", "save_state_every": 600.0})']
    (tmp_path / "wider.yaml").write_text(_spec(root).replace(f"lr: {LRS}", f"lr: {LRS + [1.0e-5]}"))
    with pytest.raises(StudyChanged) as info:
        run_study(load_study(tmp_path / "wider.yaml"), db)
    assert "tune.lr" in str(info.value) and "execution" not in str(info.value)


def test_a_fused_tuned_study_selects_and_stores_what_the_sequential_one_does(tuned, tmp_path):
    """execution: {fuse: 4} — the selection pass (6 trials) and the follow-up seeds train fused; the validation
    losses that select each LR come from the fused eval, and select what the one-at-a-time study selected."""
    _write_splits(tmp_path)
    fused_store = run_study_once(tmp_path, _spec(tmp_path) + "execution: {fuse: 4}\n")
    plain, fused = analyze_store(tuned[False]), analyze_store(fused_store)
    assert {c: s.lr for c, s in fused.selections.items()} == {c: s.lr for c, s in plain.selections.items()}
    for cell, sel in fused.selections.items():
        assert sel.val_loss_by_lr == pytest.approx(plain.selections[cell].val_loss_by_lr, rel=1e-4)
    with Store.open_readonly(fused_store) as store:
        trials = store.trials(store.study().id)
    assert all(t.status == "done" for t in trials) and any(t.outcome.fused_with for t in trials)
    assert [g.stats["eval_loss"].mean for g in fused.compared] == pytest.approx(
        [g.stats["eval_loss"].mean for g in plain.compared], rel=1e-4)


def test_the_progress_total_of_a_tuned_study_counts_its_other_seeds(tmp_path, monkeypatch):
    """The selection pass, then the other seeds at the selected LR: every on_start sees a total that includes the
    trials still to come in this run (never "8/4")."""
    from helpers import tiny_study_yaml
    from loraplace.runner import RunHooks
    from loraplace.study import load_study, run_study

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    text = tiny_study_yaml("t", steps=1, seeds=[0, 1]).replace("eval_count: 8", "eval_count: 8, validation_count: 8")
    (tmp_path / "s.yaml").write_text(text + "tune: {lr: [1.0e-3, 3.0e-3], seeds: [0]}\n")
    seen = []
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db",
                        hooks=RunHooks(on_start=lambda _t, index, total: seen.append((index, total))))
    assert summary.ran == 6 and [i for i, _ in seen] == list(range(1, 7))
    assert all(i <= total for i, total in seen) and seen[-1][1] == 6


def test_each_placement_selects_from_its_own_lrs(tuned, tmp_path):
    """tune.lr as a list per placement (the horizon study's form): a stored one-list study extends to it, each
    placement trains and selects among its own LRs only, and the LR table leaves the others blank."""
    import shutil

    from loraplace.study import run_study

    root = tuned[False].parent
    db = tmp_path / "s.db"
    shutil.copy(tuned[False], db)
    own = {"all": LRS, "attn": LRS + [1.0e-1]}  # attn also tries 1e-1; `all` keeps the stored grid
    (tmp_path / "own.yaml").write_text(_spec(root).replace(f"lr: {LRS}", f"lr: {own}"))
    spec = load_study(tmp_path / "own.yaml")
    assert spec.tune.lrs_for("attn") == sorted(own["attn"]) and spec.tune.all_lrs() == sorted(own["attn"])
    assert len(expand_grid(spec)) == 3 + 4  # the selection pass: each placement its own LRs, seed 0
    summary = run_study(spec, db, extend=True)
    assert summary.failed == 0 and summary.ran >= 1  # attn at 1e-1 (+ its other seed if 1e-1 wins)
    analysis = analyze_store(db)
    by_placement = {c.placement: s for c, s in analysis.selections.items()}
    assert set(by_placement["all"].val_loss_by_lr) == set(LRS)  # never offered attn's extra LR
    assert set(by_placement["attn"].val_loss_by_lr) == set(own["attn"])
    with Store.open_readonly(db) as store:
        trials = store.trials(store.study().id)
    assert not [t for t in trials if t.labels.group.placement == "all" and dict(t.labels.group.axes)["lr"] == 1e-1]
    md = write_report(analysis, tmp_path / "report", ("md",))["md"].read_text()
    assert "Each placement tried its own LRs" in md


def test_per_placement_lrs_name_every_placement(tmp_path):
    base = ("name: t\nmodel: tiny:llama\ntrain: {steps: 2}\nplacements: {all: {preset: all}, attn: {preset: attn}}\n"
            "data: {train: 'builtin:arithmetic?n=40', validation_count: 5}\n")
    (tmp_path / "a.yaml").write_text(base + "tune: {lr: {all: [1.0e-3, 1.0e-2], mlp: [1.0e-3, 2.0e-3, 2.0e-3]}}\n")
    with pytest.raises(ConfigError) as err:
        load_study(tmp_path / "a.yaml")
    text = str(err.value)
    assert "tune.lr.mlp has duplicates" in text
    (tmp_path / "b.yaml").write_text(base + "tune: {lr: {all: [1.0e-3, 1.0e-2], mlp: [1.0e-3, 2.0e-3]}}\n")
    with pytest.raises(ConfigError) as err:
        load_study(tmp_path / "b.yaml")
    text = str(err.value)
    assert "none for attn" in text and "tune.lr names mlp" in text
    (tmp_path / "c.yaml").write_text(base + "tune: {lr: {all: [1.0e-3], attn: [1.0e-3, 2.0e-3]}}\n")
    with pytest.raises(ConfigError, match=r"tune.lr.all has 1 LR\(s\)"):
        load_study(tmp_path / "c.yaml")


def test_the_lr_past_an_edge_and_the_cells_lrs_follow_the_selections():
    from loraplace.tuning import cell_lrs, past_edge

    assert past_edge([1e-3, 3e-3, 1e-2], upward=True) == pytest.approx(3.33e-2)
    assert past_edge([1e-3, 3e-3, 1e-2], upward=False) == pytest.approx(3.33e-4)
    cell = GroupKey(placement="a", size=Size(kind="rank", value=4))

    def at(lr, loss, seed=0):
        return TrialResult(cell.model_copy(update={"axes": (("lr", lr),)}), seed, loss)

    base = [1e-3, 1e-2]
    # 1e-2 best → 1e-1 (the same ratio past it); 1e-1 worse → interior: stop, one extension used of three.
    results = [at(1e-3, 2.0), at(1e-2, 1.5), at(1e-1, 1.8)]
    assert cell_lrs(base, 3, results, [0]) == [1e-3, 1e-2, 1e-1]
    assert cell_lrs(base, 0, results, [0]) == base  # not asked: the list is the grid
    # The extension not run yet: planned, and nothing past it until its result is in.
    assert cell_lrs(base, 3, results[:2], [0]) == [1e-3, 1e-2, 1e-1]
    # Still the best at the new edge: one more, up to extend.
    better = [at(1e-3, 2.0), at(1e-2, 1.5), at(1e-1, 1.2), at(1.0, 1.1)]
    assert cell_lrs(base, 2, better, [0]) == [1e-3, 1e-2, 1e-1, 1.0]
    # The low edge extends downward.
    low = [at(1e-3, 1.0), at(1e-2, 1.5)]
    assert cell_lrs(base, 1, low, [0]) == [1e-4, 1e-3, 1e-2]
    # An unfinished selection pass (seed 1 missing) extends nothing yet.
    assert cell_lrs(base, 3, results, [0, 1]) == base


def test_tune_extend_runs_past_the_edge_then_the_other_seeds(tmp_path):
    """A grid whose selection lands on its highest LR: with tune.extend the cell tries the next LR past it (and on,
    while the edge moves, at most `extend` times), selects among them all, then runs its other seeds there; the
    analysis selects the same, and a rerun trains nothing."""
    from loraplace.study import run_study
    from loraplace.tuning import cell_lrs, extended_lrs

    _write_splits(tmp_path)
    text = _spec(tmp_path).replace(f"tune: {{lr: {LRS}, seeds: [0]}}", "tune: {lr: [1.0e-5, 1.0e-4], seeds: [0], "
                                   "extend: 2}").replace("attn: {preset: attn}", "q: {roles: [attn.q]}")
    (tmp_path / "s.yaml").write_text(text)
    study = load_study(tmp_path / "s.yaml")
    summary = run_study(study, tmp_path / "s.db")
    assert summary.failed == 0
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
        info = store.study().info
    assert info.tune_extend == 2
    lrs_of = extended_lrs(info, 2, trials)
    for cell, lrs in lrs_of.items():
        tried = sorted({dict(t.labels.group.axes)["lr"] for t in trials if t.labels.group.placement == cell.placement
                        and t.labels.seed == 0})
        assert tried == pytest.approx(lrs) and len(lrs) >= 3  # 1e-4 beats 1e-5 in 4 steps: at least 1e-3 ran
        assert lrs == cell_lrs([1e-5, 1e-4], 2, [r for r in _results(trials) if r.key.placement == cell.placement],
                               [0])
    analysis = analyze_store(tmp_path / "s.db")
    for cell, selection in analysis.selections.items():
        assert set(selection.val_loss_by_lr) == set(lrs_of[cell])
        other = [t for t in trials if t.labels.group.placement == cell.placement and t.labels.seed == 1]
        assert [dict(t.labels.group.axes)["lr"] for t in other] == [selection.lr]  # seed 1 at the selected LR
    again = run_study(study, tmp_path / "s.db")
    assert again.ran == 0


def _results(trials):
    return [TrialResult(t.labels.group, t.labels.seed, t.metrics.val_loss if t.metrics is not None else None)
            for t in trials]


def test_tune_extend_is_refused_in_a_search(tmp_path):
    _write_splits(tmp_path)
    text = _spec(tmp_path).replace(f"tune: {{lr: {LRS}, seeds: [0]}}", "tune: {lr: [1.0e-4, 1.0e-3], extend: 1}")
    (tmp_path / "s.yaml").write_text(text + "search: {}\n")
    with pytest.raises(ConfigError, match="tune.extend"):
        load_study(tmp_path / "s.yaml")


def test_a_search_compares_only_its_confirmed_entrants():
    """search.confirm: the confirmed entrant ran every seed, the others stopped at the first. The selection reads
    the confirmed ones only — also where an unconfirmed LR of the same placement scored better on its one seed than
    the confirmed LR's mean — and the placement with no confirmed trial is named as unconfirmed."""
    from types import SimpleNamespace

    from loraplace.records import StudyInfo, TrialLabels
    from loraplace.tuning import selections_of, tuned_cell, unconfirmed_finalists

    size = Size(kind="rank", value=4)

    def record(placement, lr, seed, val_loss, status="done"):
        group = GroupKey(placement=placement, size=size, axes=(("lr", lr),))
        return SimpleNamespace(labels=TrialLabels(group=group, seed=seed), status=status,
                               metrics=SimpleNamespace(val_loss=val_loss))

    info = StudyInfo(name="s", model="tiny:llama", placements=("a", "b"), baseline="a", baseline_given=True,
                     tune_lrs=(1e-3, 1e-2), tune_seeds=(0,), search=True)
    confirmed = [record("a", 1e-2, 0, 1.0), record("a", 1e-2, 1, 1.4), record("a", 1e-2, 2, 1.3)]
    records = confirmed + [record("a", 1e-3, 0, 1.1),  # hedge entrant: one seed, better than a@1e-2's mean
                           record("b", 1e-3, 0, 0.9)]  # a finalist not confirmed
    chosen = selections_of(info, records)
    assert {s.cell.placement: s.lr for s in chosen.values()} == {"a": 1e-2}
    assert {c.placement for c in unconfirmed_finalists(info, records)} == {"b"}
    # While the confirmation seeds are pending they count: the decision is already made.
    pending = [record("a", 1e-2, s, None, status="pending") for s in (1, 2)]
    assert {c.placement for c in unconfirmed_finalists(info, confirmed[:1] + pending + records[3:])} == {"b"}
    # The entrants' first-seed pass, before any confirmation: every cell selects among its LRs, none unconfirmed.
    first = [confirmed[0], *records[3:]]
    assert {s.cell.placement: s.lr for s in selections_of(info, first).values()} == {"a": 1e-2, "b": 1e-3}
    assert unconfirmed_finalists(info, first) == set()
    assert unconfirmed_finalists(info.model_copy(update={"search": False}), records) == set()
    assert tuned_cell(records[-1].labels.group) in unconfirmed_finalists(info, records)
