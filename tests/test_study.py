from pathlib import Path

import pytest

from helpers import HAS_SMOLLM2, ROOT, tiny_study_yaml
from loraplace.analysis import analyze_store
from loraplace.errors import ConfigError
from loraplace.records import Size
from loraplace.store import Store
from loraplace.study import check_placements, expand_grid, load_study, run_study

EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_every_shipped_yaml_validates():
    assert {p.name for p in EXAMPLES} >= {"quickstart.yaml", "seed-study-gpt2-medium.yaml", "gsm8k.yaml",
                                          "search-quickstart.yaml", "gsm8k-search.yaml", "nl2bash-grid.yaml",
                                          "e2e-grid.yaml", "gsm8k-grid.yaml"}
    for path in EXAMPLES:
        study = load_study(path)
        if study.search is not None:  # candidates: every placement at every LR, the grid's first-seed trials
            from loraplace.search import rung_steps
            from loraplace.study import search_candidates

            candidates = search_candidates(study)
            assert len(candidates) == sum(len(study.tune.lrs_for(p)) for p in study.placements)  # own LRs
            assert {c.id for c in candidates} <= {t.id for t in expand_grid(study)}
            steps = rung_steps(study.search, len(candidates), study.train.steps, study.train.warmup)
            assert steps == sorted(set(steps)) and steps[-1] < study.train.steps
        grid = expand_grid(study)
        axes = 1
        for values in study.axis_values(study.axes).values():
            axes *= len(values)
        # tuned: the selection pass until its LRs are selected (every LR × the selection seeds)
        runs = (sum(len(study.tune.lrs_for(p)) for p in study.placements) * len(study.tune_seeds())
                if study.tune is not None else len(study.placements) * len(study.seeds))
        assert len(grid) == runs * len(study.sizes()) * axes
        assert len({t.id for t in grid}) == len(grid)
        assert study.baseline_placement() in study.placements
        if study.model.startswith("builtin:") and HAS_SMOLLM2:  # every placement resolves on the real model
            check_placements(study)


def test_grid_order_labels_and_default_size(write_study):
    study = load_study(write_study(size="", placements={"b": "{preset: attn}", "a": "{preset: all}"}, baseline=None,
                                   extra="axes: {lr: [1.0e-3, 2.0e-3]}\n"))
    grid = expand_grid(study)
    assert [(t.labels.group.placement, t.labels.seed, dict(t.labels.group.axes)["lr"]) for t in grid] == [
        ("b", 0, 1e-3), ("b", 0, 2e-3), ("b", 1, 1e-3), ("b", 1, 2e-3),
        ("a", 0, 1e-3), ("a", 0, 2e-3), ("a", 1, 1e-3), ("a", 1, 2e-3)]
    assert {t.labels.group.size for t in grid} == {Size(kind="rank", value=16)}  # the one default rank
    assert {t.spec.train.steps for t in grid} == {3} and grid[1].spec.train.lr == 2e-3


def test_trial_ids_are_stable_and_config_sensitive(write_study):
    a = expand_grid(load_study(write_study()))
    b = expand_grid(load_study(write_study()))
    assert [t.id for t in a] == [t.id for t in b]
    c = expand_grid(load_study(write_study(steps=4)))
    assert not {t.id for t in a} & {t.id for t in c}


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (tiny_study_yaml().replace("seeds:", "seedz:"), ["seedz: unknown key; did you mean 'seeds'?"]),
        (tiny_study_yaml().replace("lr: 0.001", "lr: fast").replace("ranks: [2]", "ranks: [-1]")
         .replace("baseline: all", "baseline: nope"),
         ["3 problems", "train.lr", "ranks[0]: Input should be greater than 0", "baseline 'nope'"]),
        ("name: x\nmodel: [unclosed\n", ["study.yaml:3:1", "YAML syntax error"]),
        (tiny_study_yaml().replace("all: {preset: all}", "all: {rolez: [attn]}"),
         ["placements.all.rolez: unknown key; did you mean 'roles'?"]),
    ],
)
def test_bad_specs_report_everything_and_write_nothing(tmp_path, cli, text, messages):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    for message in messages:
        assert message in str(info.value)
    done = cli("run", path, "--store", tmp_path / "s.db")
    assert done.returncode == 2 and "Traceback" not in done.stderr and messages[0] in done.stderr
    assert not (tmp_path / "s.db").exists()


class SteppingClock:
    """Stands in for loraplace.study's ``time`` module: every reading is ``step`` seconds after the one before."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_run_timeout_starts_nothing_after_it_and_exits_75_while_work_is_left(tmp_path, write_study, cli,
                                                                            monkeypatch):
    """--timeout 25m with a clock that moves 1000 s a reading: the run starts (reading 1), claims a trial
    (reading 2: 1000 s in), and at the next claim (2000 s in) stops; the next run continues with the rest, and a
    timeout that passes just as the last trial is claimed leaves nothing and says nothing."""
    import loraplace.study.run

    spec = write_study(seeds=[0])  # two trials: all and attn
    monkeypatch.setattr(loraplace.study.run, "time", SteppingClock(1000))
    first = cli("run", spec, "--store", tmp_path / "s.db", "--timeout", "25m")
    assert first.returncode == 75, first.stderr
    assert "--timeout 25m00s reached: nothing was started after it" in first.stderr
    assert "run the same command to continue" in first.stderr
    with Store.open_readonly(tmp_path / "s.db") as store:
        assert sorted(t.status for t in store.trials(store.study().id)) == ["done", "pending"]
    second = cli("run", spec, "--store", tmp_path / "s.db", "--timeout", "25m")
    assert second.returncode == 0 and "reached" not in second.stderr, second.stderr
    assert "ran 1 trial(s): 1 done, 0 failed; 1 already done" in second.stderr
    assert cli("run", spec, "--store", tmp_path / "s.db", "--timeout", "soon").returncode == 2


def test_a_timeout_shorter_than_loading_still_lets_the_first_trial_run(tmp_path, write_study, cli, monkeypatch):
    """--timeout 1s with a clock that moves 1000 s a reading: the first claim is long past the timeout, and it used
    to exit 75 having started nothing, on every call (a job loop never ended). The first unit always starts."""
    import loraplace.study.run

    spec = write_study(seeds=[0])  # two trials
    monkeypatch.setattr(loraplace.study.run, "time", SteppingClock(1000))
    runs = [cli("run", spec, "--store", tmp_path / "s.db", "--timeout", "1s") for _ in range(2)]
    assert [r.returncode for r in runs] == [75, 0], runs[-1].stderr
    with Store.open_readonly(tmp_path / "s.db") as store:
        assert [t.status for t in store.trials(store.study().id)] == ["done", "done"]


def test_run_then_resume_does_no_training(tmp_path, write_study):
    spec = load_study(write_study())
    first = run_study(spec, tmp_path / "s.db")
    assert (first.ran, first.done, first.failed) == (4, 4, 0)
    with Store(tmp_path / "s.db") as store:
        study = store.study("tiny")
        before = {t.id: t.outcome for t in store.trials(study.id)}
        assert all(t.status == "done" and t.completions == 1 for t in store.trials(study.id))
        assert all(Path(t.outcome.adapter.path).is_dir() for t in store.trials(study.id))
    again = run_study(spec, tmp_path / "s.db")
    assert (again.ran, again.skipped) == (0, 4)
    with Store(tmp_path / "s.db") as store:
        assert {t.id: t.outcome for t in store.trials(study.id)} == before


def test_without_baseline_the_first_placement_in_spec_order_is_the_baseline(tmp_path, write_study):
    # Alphabetically "all" comes first; the spec's own order says "mlp".
    spec = write_study(placements={"mlp": "{preset: mlp}", "attn": "{preset: attn}", "all": "{preset: all}"},
                       baseline=None, seeds=[0], steps=1)
    run_study(load_study(spec), tmp_path / "s.db")
    with Store.open_readonly(tmp_path / "s.db") as store:
        info = store.study().info
    assert (info.placements, info.baseline, info.baseline_given) == (("mlp", "attn", "all"), "mlp", False)
    analysis = analyze_store(tmp_path / "s.db")
    assert analysis.baseline == "mlp"
    assert [g.placement for g in analysis.groups if g.is_baseline] == ["mlp"]
    assert "comparing against the first placement, 'mlp'" in " ".join(analysis.warnings)


def test_a_failing_trial_does_not_stop_the_study(tmp_path, write_study):
    # tiny llama, per rank: attn = 2 layers × (128+96+96+128) = 896; all = 896 + 2 × 3 × 192 = 2048.
    # Budget 1000 fits rank 1 for attn but not for all → that trial fails, the other one runs.
    path = write_study(size="budget: 1000", seeds=[0], steps=2)
    summary = run_study(load_study(path), tmp_path / "s.db")
    with Store(tmp_path / "s.db") as store:
        trials = {t.labels.group.placement: t for t in store.trials(store.study().id)}
    failure = trials["all"].outcome.failure
    assert trials["all"].status == "failed" and failure.kind == "invalid" and "smaller than rank 1" in failure.message
    assert trials["attn"].status == "done"
    assert (summary.done, summary.failed) == (1, 1)


def test_resources_on_a_local_run_are_said_to_do_nothing_here(tmp_path, write_study):
    """resources: is what a trial asks of a Ray cluster; a local run uses the machine as it is. It says so (the
    same spec may go to a cluster later, so it is not refused); a spec without it hears nothing."""
    said = "is what a trial asks of a Ray cluster; this local run uses this machine as it is"
    plain = run_study(load_study(write_study("plain.yaml", seeds=[0], steps=1)), tmp_path / "plain.db")
    assert not any(said in w for w in plain.warnings)
    asked = run_study(load_study(write_study("asked.yaml", seeds=[0], steps=1, extra="resources: {gpus: 1}\n")),
                      tmp_path / "asked.db")
    assert asked.done == 2 and any(f"resources: (gpus) {said}" in w for w in asked.warnings), asked.warnings


def test_stored_studies_keep_their_trial_ids(tmp_path):
    """The v2 fixture store (a budget study) was written by an older loraplace, which filled budgets with one
    uniform rank. With ``fill: uniform`` the same spec expands to its trial ids: fields added to the specs since
    (``added_fields``) did not re-key it. With today's default exact fill its trials are new ones."""
    from helpers import FIXTURES

    with Store.open_readonly(FIXTURES / "store_v2.db") as store:
        stored = {t.id for t in store.trials(store.study().id)}
    (tmp_path / "uniform.yaml").write_text((FIXTURES / "store_v2.yaml").read_text() + "fill: uniform\n")
    assert {t.id for t in expand_grid(load_study(tmp_path / "uniform.yaml"))} == stored
    assert not {t.id for t in expand_grid(load_study(FIXTURES / "store_v2.yaml"))} & stored


def test_auto_without_method_is_the_default_method_and_a_store_of_probe_says_how_to_resume(tmp_path):
    """``auto`` without ``method`` meant probe when the v2 fixture was stored and means nfn now: its YAML as then
    written (no method) is refused, with the one-line fix, and never re-runs the arm as something else."""
    import shutil

    from helpers import FIXTURES
    from loraplace.placement.spec import DEFAULT_AUTO_METHOD
    from loraplace.study import StudyChanged

    assert DEFAULT_AUTO_METHOD == "nfn"
    as_written = (FIXTURES / "store_v2.yaml").read_text().replace("method: probe, ", "") + "fill: uniform\n"
    assert "auto: {auto: {batches" in as_written
    (tmp_path / "s.yaml").write_text(as_written)
    assert load_study(tmp_path / "s.yaml").placements["auto"].auto.method == "nfn"
    shutil.copy(FIXTURES / "store_v2.db", tmp_path / "s.db")
    with Store.open_readonly(tmp_path / "s.db") as store:
        before = {t.id: t.status for t in store.trials(store.study().id)}
    with pytest.raises(StudyChanged) as refused:
        run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
    assert 'placements.auto.auto.method: "probe" → "nfn"' in str(refused.value)
    assert "write method: probe in them to resume" in refused.value.hint
    with Store.open_readonly(tmp_path / "s.db") as store:
        assert {t.id: t.status for t in store.trials(store.study().id)} == before
    # Written out, the stored method resumes: nothing left to run.
    (tmp_path / "s.yaml").write_text(as_written.replace("{auto: {", "{auto: {method: probe, "))
    assert run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db").done == 0


def test_allow_unassigned_in_a_study(tmp_path):
    """A model whose blocks hold weights no role claims (Jamba's Mamba mixers): `all` is refused up front, unless
    the study allows it; then every trial's placement carries the flag (and new trial ids)."""
    from transformers import AutoConfig

    from loraplace.study import check_placements

    AutoConfig.for_model("jamba", num_hidden_layers=2, attn_layer_offset=1, attn_layer_period=2).save_pretrained(
        tmp_path / "jamba")
    text = tiny_study_yaml().replace("model: tiny:llama", f"model: {tmp_path / 'jamba' / 'config.json'}")
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"silently leave out .*mamba.*--allow-unassigned"):
        check_placements(load_study(tmp_path / "s.yaml"))
    (tmp_path / "allowed.yaml").write_text(text + "allow_unassigned: true\n")
    allowed = load_study(tmp_path / "allowed.yaml")
    check_placements(allowed)
    grid = expand_grid(allowed)
    assert all(t.spec.placement.allow_unassigned for t in grid)
    assert not {t.id for t in grid} & {t.id for t in expand_grid(load_study(tmp_path / "s.yaml"))}


def test_yaml_words_are_keys_as_written(tmp_path):
    """YAML 1.1 reads a bare on/off/yes/no as a boolean; as a key it is the word: `tune: {on: validation}` works
    as documented, and a placement may be named `off`."""
    from helpers import tiny_study_yaml

    text = tiny_study_yaml("words", placements={"off": "{preset: all}", "yes": "{preset: attn}"}, baseline="\"off\"")
    text = text.replace("eval_count: 8", "eval_count: 8, validation_count: 8")
    (tmp_path / "s.yaml").write_text(text + "tune: {lr: [1.0e-3, 3.0e-3], on: validation}\n")
    study = load_study(tmp_path / "s.yaml")
    assert list(study.placements) == ["off", "yes"] and study.tune.on == "validation"


def test_a_study_resumed_where_auto_means_another_precision_is_refused(tmp_path, monkeypatch, cli):
    """precision: auto is bf16 on CPUs with native bf16 and fp32 elsewhere: the GSM8K validation study (bf16, an
    AVX512-BF16 machine) resumed on an AVX2 one would have added fp32 arms to it. Refused, store untouched; with
    --allow-mixed-precision it runs and the report says the study mixes two dtypes."""
    import loraplace.train

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    text = tiny_study_yaml("p", steps=1, seeds=[0], placements={"all": "{preset: all}"}).replace(
        "precision: fp32", "precision: auto")
    (tmp_path / "s.yaml").write_text(text)
    monkeypatch.setattr(loraplace.train, "cpu_has_bf16", lambda: False)  # the machine that started it: fp32
    assert run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db").done == 1
    (tmp_path / "s.yaml").write_text(text.replace("seeds: [0]", "seeds: [0, 1]"))
    monkeypatch.setattr(loraplace.train, "cpu_has_bf16", lambda: True)  # resumed where auto is bf16
    before = (tmp_path / "s.db").read_bytes()
    refused = cli("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", "--extend", "-q")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    said = " ".join(refused.stderr.split())  # the message wraps at the terminal width
    assert "float32 (1 trial)" in said and "auto is bfloat16" in said
    assert "--allow-mixed-precision" in said and (tmp_path / "s.db").read_bytes() == before
    pinned = text.replace("precision: auto", "precision: fp32").replace("name: p", "name: q")
    (tmp_path / "q.yaml").write_text(pinned)  # pinned: the same dtype everywhere, nothing to check
    assert run_study(load_study(tmp_path / "q.yaml"), tmp_path / "s.db").done == 1
    ran = cli("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", "--extend", "-q", "--allow-mixed-precision")
    assert ran.returncode == 0, ran.stderr
    warnings = analyze_store(tmp_path / "s.db", "p").warnings
    assert any("bfloat16 and float32" in w for w in warnings)


@pytest.mark.parametrize(("fuse", "saved_at", "resumed_from"), [("off", 4, (5, 8)), (2, 5, (1, 3))],
                         ids=["alone", "fused"])
def test_a_trial_interrupted_mid_training_continues_from_its_saved_state(tmp_path, write_study, cli, fuse,
                                                                         saved_at, resumed_from):
    """execution.save_state_every: 0 saves the trial's state at every step read back. Interrupted when step 5 of 8
    is reported (alone: before that step's save; fused: after it), the rerun continues from the saved step — alone
    its first step is step 5 of 8, fused the group's first of the 3 left — and every trial records what the
    uninterrupted study records (the same curve and losses, bit for bit); each state is removed once its trial is
    done. ``status`` says where an interrupted trial continues."""
    from loraplace.runner import RunHooks
    from loraplace.stepper import TrainerState
    from loraplace.store import STATE_DIR, artifacts_dir, trial_dir

    extra = f"execution: {{save_state_every: 0, fuse: {fuse}}}\n"
    reference = run_study(load_study(write_study("ref.yaml", name="ref", steps=8, seeds=[0], extra=extra)),
                          tmp_path / "ref.db")
    assert reference.done == 2
    spec = load_study(write_study(steps=8, seeds=[0], extra=extra))
    db = tmp_path / "s.db"

    def interrupt(step, total, loss, tokens):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, db, hooks=RunHooks(progress=interrupt))
    with Store.open_readonly(db) as store:
        cut = [t.id for t in store.trials(store.study().id) if t.status == "interrupted"]
    assert len(cut) == (1 if fuse == "off" else 2)
    states = [trial_dir(artifacts_dir(db), tid) / STATE_DIR / TrainerState.FILE for tid in cut]
    assert [TrainerState.load(path).progress.steps for path in states] == [saved_at] * len(cut)
    shown = " ".join(cli("status", db).stdout.split())
    assert f"its state is saved at step {saved_at} of 8: the next run continues it from there" in shown

    seen = []
    again = run_study(spec, db, hooks=RunHooks(progress=lambda step, total, loss, tokens: seen.append((step, total))))
    assert again.done == 2 and seen[0] == resumed_from
    assert not any(path.parent.exists() for path in states)

    def outcomes(path):
        with Store.open_readonly(path) as store:
            return {str(t.labels.group.placement): t.outcome for t in store.trials(store.study().id)}
    ref, now = outcomes(tmp_path / "ref.db"), outcomes(db)
    for placement, outcome in now.items():
        assert [p.loss for p in outcome.curve] == [p.loss for p in ref[placement].curve], placement
        assert outcome.metrics.eval_loss == ref[placement].metrics.eval_loss, placement
        assert [p.step for p in outcome.curve] == list(range(1, 9))


def test_save_state_every_takes_a_duration_as_run_timeout_does():
    from loraplace.study import ExecutionSpec

    assert ExecutionSpec(save_state_every="10m").save_state_every_s == 600
    assert ExecutionSpec(save_state_every="1h30m").save_state_every_s == 5400
    assert ExecutionSpec(save_state_every=False).save_state_every_s is None  # YAML off
    assert ExecutionSpec(save_state_every="off").save_state_every_s is None


def test_a_data_file_whose_content_changed_is_refused_naming_it(tmp_path, write_study):
    """Its content was not part of what a trial is: a rerun after overwriting the file said "4 already done",
    and --extend paired new-data seeds with old-data ones. Now the study records each source's content and refuses
    to go on with other content under the same path; put back, it resumes; --reuse-from takes nothing over from a
    store that ran on the old content."""
    import json

    from loraplace.runner import RunHooks
    from loraplace.study import StudyChanged

    rows = [{"question": f"What is {a} + 2?", "answer": f"#### {a + 2}"} for a in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write_study(seeds=[0]).read_text().replace('"builtin:arithmetic?n=60"', str(data))
    (tmp_path / "s.yaml").write_text(spec)
    study = load_study(tmp_path / "s.yaml")
    assert run_study(study, tmp_path / "a.db").done == 2
    with Store.open_readonly(tmp_path / "a.db") as store:
        assert store.study().info.data_fingerprints[str(data)].startswith("sha256:")
    original = data.read_bytes()
    data.write_text("".join(json.dumps(r | {"answer": "#### 0"}) + "\n" for r in rows))
    for extend in (False, True):
        with pytest.raises(StudyChanged, match=r"ran on other data: the content of 1 source\(s\) has changed") as exc:
            run_study(study, tmp_path / "a.db", extend=extend)
        assert str(data) in str(exc.value) and "put it back" in exc.value.hint
    notes: list[str] = []
    other = run_study(study, tmp_path / "b.db", reuse_from=[tmp_path / "a.db"], hooks=RunHooks(on_note=notes.append))
    assert other.reused == 0 and other.done == 2
    assert any("ran on other content of" in w for w in other.warnings), other.warnings
    data.write_bytes(original)  # the old content back: the study resumes, nothing to train
    assert run_study(study, tmp_path / "a.db").ran == 0


def test_a_placement_s_own_rank_in_a_study_without_ranks_is_kept_and_labelled(tmp_path, write_study):
    """`placements: {a: {roles: [all], rank: 8}, b: {preset: attn}}` and no `ranks:` was refused ("the placement
    says rank 8 and the command line or study says rank 16"), though plan and train accept it; per-group ranks were
    labelled r=16. Now each placement keeps its own size (the others the default rank) in one compared cell."""
    from loraplace.analysis import analyze_store

    spec = write_study(placements={"a": "{roles: [all], rank: 8}", "b": "{preset: attn}",
                                   "c": "{groups: [{roles: [attn.q], rank: 4}]}"}, size="", baseline="b",
                       seeds=[0])
    study = load_study(spec)
    assert [s.label for s in study.sizes()] == ["own size"]
    summary = run_study(study, tmp_path / "s.db")
    assert summary.failed == 0 and summary.done == 3
    analysis = analyze_store(tmp_path / "s.db")
    ranks = {g.placement: {site.rank for site in g.sites.sites} for g in analysis.groups}
    assert ranks == {"a": {8}, "b": {16}, "c": {4}}
    assert {g.key.size_label for g in analysis.groups} == {"own size"}
    assert len({g.key.cell for g in analysis.groups}) == 1  # one cell: compared with each other
    # a study that gives ranks still refuses a placement whose own rank says otherwise
    clash = write_study("clash.yaml", placements={"a": "{roles: [all], rank: 8}", "b": "{preset: attn}"},
                        baseline="b", seeds=[0])
    from loraplace.errors import ConfigError

    with pytest.raises(ConfigError, match="rank 8"):
        run_study(load_study(clash), tmp_path / "clash.db")


def test_the_committed_schema_is_the_generated_one_and_every_example_points_at_it_and_validates(cli):
    """`loraplace schema` prints what docs/study.schema.json holds; each shipped spec's first line points an editor
    at it (relative to the spec) and the spec validates against it."""
    import json

    import jsonschema
    import yaml

    from loraplace.study.spec import SCHEMA_FILE

    committed = (ROOT / SCHEMA_FILE).read_text()
    done = cli("schema")
    assert done.returncode == 0 and done.stdout == committed, "run: loraplace schema -o docs/study.schema.json"
    schema = json.loads(committed)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in EXAMPLES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), path
        assert (path.parent / first.split("=", 1)[1]).resolve() == (ROOT / SCHEMA_FILE).resolve(), path
        spec = yaml.safe_load(path.read_text())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(spec)]
        assert not errors, (path, errors)
    # the schema checks what an editor can: an unknown key, a wrong type
    assert any(validator.iter_errors({"name": "x", "model": "m", "data": {"train": "t"}, "placements": {},
                                      "seedz": [0]}))
    assert any(validator.iter_errors({"name": "x", "model": "m", "data": {"train": "t", "max_len": "long"},
                                      "placements": {"a": {"preset": "all"}}}))


def test_every_field_of_the_study_spec_is_described():
    """The YAML reference is generated from these descriptions: a field without one would be a blank row."""
    from loraplace.study.spec import study_json_schema

    schema = study_json_schema()
    missing = [f"{name}.{key}" for name, model in [("StudySpec", schema), *schema["$defs"].items()]
               for key, prop in model.get("properties", {}).items() if "description" not in prop]
    assert not missing, missing


def test_a_stored_spec_reads_back_as_the_study_with_or_without_the_old_versions_key(write_study):
    """v1 and v2 stores kept the library versions inside the spec: every reader of a stored spec drops them."""
    from loraplace.study.spec import spec_as_written, study_from_store

    study = load_study(write_study())
    stored = study.model_dump(mode="json")
    assert study_from_store(stored) == study
    assert study_from_store(stored | {"versions": {"torch": "2.1.0"}}) == study
    assert spec_as_written(stored | {"versions": {}}) == stored
