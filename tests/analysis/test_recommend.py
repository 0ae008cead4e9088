"""loraplace recommend: the best placement, its runner-up, and the cheaper one when the two cannot be told apart."""

import json
from dataclasses import replace

import pytest

from loraplace.analysis.core import analyze_records
from loraplace.analysis.recommend import recommend, recommend_from_store
from loraplace.analysis.stats import summarize
from loraplace.errors import LoraplaceError
from loraplace.placement import plan_for_model
from loraplace.store import Store


def _analysis_and_specs(store_path):
    with Store.open_readonly(store_path) as store:
        study = store.study()
        records = store.trials(study.id)
        counts = store.counts(study.id)
    return analyze_records(study, str(store_path), records, counts), {r.id: r.spec for r in records}


def _with_losses(analysis, losses: dict[str, list[float]]):
    """The same groups with chosen per-seed test losses (seeds in order)."""
    groups = []
    for g in analysis.groups:
        seeds = sorted(g.by_seed["eval_loss"])
        by_seed = dict(g.by_seed) | {"eval_loss": dict(zip(seeds, losses[g.placement], strict=True))}
        groups.append(replace(g, by_seed=by_seed, stats=dict(g.stats) | {
            "eval_loss": summarize(losses[g.placement])}))
    return replace(analysis, groups=tuple(groups))


def test_a_distinguishable_winner_is_recommended(study_store):
    analysis, specs = _analysis_and_specs(study_store)
    analysis = _with_losses(analysis, {"all": [1.0, 1.1], "attn": [1.5, 1.6], "top": [2.0, 2.1]})
    rec = recommend(analysis, specs)
    assert rec.chosen.placement == "all" and rec.runner_up.placement == "attn"
    assert rec.distinguishable is True and rec.difference == pytest.approx(-0.5)
    assert rec.chosen.value == pytest.approx(1.05) and "excludes 0" in rec.reason


def test_indistinguishable_best_gives_way_to_the_cheaper(study_store):
    analysis, specs = _analysis_and_specs(study_store)
    analysis = _with_losses(analysis, {"all": [1.0, 1.1], "attn": [1.2, 0.95], "top": [2.0, 2.1]})
    params = {g.placement: g.trainable_params for g in analysis.groups}
    assert params["attn"] < params["all"]
    rec = recommend(analysis, specs)
    assert rec.distinguishable is False
    assert rec.chosen.placement == "attn" and rec.runner_up.placement == "all"  # all had the better mean
    assert "not distinguishable" in rec.reason and "fewer trainable parameters" in rec.reason


def test_budget_and_metric_limits(study_store):
    analysis, specs = _analysis_and_specs(study_store)
    smallest = min(analysis.groups, key=lambda g: g.trainable_params)
    rec = recommend(analysis, specs, budget=smallest.trainable_params)
    assert rec.chosen.placement == smallest.placement and rec.runner_up is None
    with pytest.raises(LoraplaceError, match="fits a budget") as info:
        recommend(analysis, specs, budget=smallest.trainable_params - 1)
    assert f"{smallest.trainable_params:,}" in info.value.hint
    with pytest.raises(LoraplaceError, match="accuracy") as info:
        recommend(analysis, specs, metric="accuracy")
    assert "generate" in info.value.hint


def test_the_recommended_spec_reproduces_the_measured_sites(study_store):
    rec = recommend_from_store(study_store)
    analysis, _ = _analysis_and_specs(study_store)
    group = next(g for g in analysis.groups if g.placement == rec.chosen.placement)
    plan = plan_for_model("tiny:llama", rec.placement_spec)
    assert plan.trainable_params == rec.chosen.trainable_params == group.trainable_params
    assert plan.site_map().sites == group.sites.sites


def test_recommend_command(cli, study_store):
    text = cli("recommend", str(study_store))
    assert text.returncode == 0 and "recommended:" in text.stdout and "runner-up:" in text.stdout
    assert "export-placement --from" in text.stdout
    assert "trained adapter (seed" in text.stdout and "PeftModel.from_pretrained" in text.stdout
    data = json.loads(cli("recommend", str(study_store), "--json").stdout)
    for key in ("placement", "size", "metric", "value", "interval", "runner_up", "distinguishable", "adapter"):
        assert key in data
    from pathlib import Path

    assert (Path(data["adapter"]) / "adapter_config.json").is_file()
    assert data["metric"] == "eval_loss" and data["placement"] in ("all", "attn", "top")
    exported = cli("export-placement", "--from", str(study_store), "--to", "peft")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["peft_type"] == "LORA"


def test_an_eva_arm_exports_the_ranks_it_was_measured_at(cli, tmp_path, monkeypatch):
    """A budget-matched EVA arm ends with the ranks its SVD chose; recommend and export-placement --from give those
    (rho 1: PEFT's EVA then keeps every site at its rank), not the starting rank 16 of the bare placement."""
    from peft import LoraConfig, get_peft_model, initialize_lora_eva_weights

    from helpers import tiny_study_yaml
    from loraplace.data import DataSpec
    from loraplace.models import load_model
    from loraplace.trial import Session, hf_batches

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(tiny_study_yaml("eva", steps=1, seeds=[0], size="budget: 6000", placements={
        "eva": "{roles: [all], variant: eva}"}, baseline="eva"))
    assert cli("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", "-q").returncode == 0
    analysis, specs = _analysis_and_specs(tmp_path / "s.db")
    (eva,) = analysis.groups
    assert eva.trainable_params != 6000  # EVA moved rank between sites (and may have dropped some)
    data = json.loads(cli("recommend", tmp_path / "s.db", "--json").stdout)
    plan = plan_for_model("tiny:llama", data["placement_spec"])
    assert plan.trainable_params == eva.trainable_params and plan.site_map().sites == eva.sites.sites
    assert plan.eva_rho == 1.0
    exported = cli("export-placement", "--from", tmp_path / "s.db", "--to", "peft")
    assert exported.returncode == 0, exported.stderr
    config = json.loads(exported.stdout)
    config = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    # PEFT's EVA from the exported config keeps exactly the measured ranks.
    session = Session("tiny:llama", precision="fp32")
    train = session.data(DataSpec.model_validate(next(iter(specs.values()))["data"])).train
    model = get_peft_model(load_model("tiny:llama"), config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(model, hf_batches(train, 8, 8, session.pad_id, "cpu"), show_progress_bar=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == eva.trainable_params


def test_recommend_before_any_lr_is_selected_says_what_will_select_it(tmp_path, monkeypatch):
    """A tuned study interrupted after its first trial: a trial is done, but no placement has an LR yet."""
    from helpers import tiny_study_yaml
    from loraplace.analysis.recommend import recommend_from_store
    from loraplace.runner import RunHooks
    from loraplace.study import load_study, run_study

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    text = tiny_study_yaml("tuned", steps=1, seeds=[0]).replace("eval_count: 8", "eval_count: 8, validation_count: 8")
    (tmp_path / "s.yaml").write_text(text + "tune: {lr: [1.0e-3, 3.0e-3]}\n")

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db", hooks=RunHooks(on_end=stop))
    with pytest.raises(LoraplaceError, match="no learning rate is selected yet") as info:
        recommend_from_store(tmp_path / "s.db")
    assert "loraplace run SPEC --store" in info.value.hint


def test_at_recommends_on_one_value_of_a_swept_axis(cli, tmp_path):
    """A study over quantize [none, nf4]: without --at the recommendation is across both bases and says so; with
    --at quantize=nf4 it is the best placement on the 4-bit base. An axis or value the study does not sweep is one
    clear error."""
    from loraplace.records import GroupKey, Metrics, Site, SiteMap, Size, StudyInfo, TrialLabels, TrialOutcome
    from loraplace.store import StudyRecord, TrialRecord

    loss = {("none", "all"): 1.00, ("none", "attn"): 1.10, ("nf4", "all"): 1.30, ("nf4", "attn"): 1.20}
    records = []
    for quantize in ("none", "nf4"):
        for placement in ("all", "attn"):
            for seed in (0, 1, 2):
                metrics = Metrics(eval_loss=loss[quantize, placement] + 0.01 * seed, perplexity=2.0)
                outcome = TrialOutcome(status="done", trainable_params=100, total_params=10_000, metrics=metrics,
                                       sites=SiteMap(num_layers=1, roles=("attn.q",),
                                                     sites=(Site(layer=0, role="attn.q", rank=2),)))
                group = GroupKey(placement=placement, size=Size(kind="rank", value=2),
                                 axes=(("quantize", quantize),))
                records.append(TrialRecord(f"{quantize}{placement}{seed}", 1, 0, TrialLabels(group=group, seed=seed),
                                           {"placement": {"preset": placement}, "train": {"quantize": quantize}},
                                           "done", 1, 1, None, None, None, None, None, None, None, outcome))
    info = StudyInfo(name="q", model="tiny:llama", placements=("all", "attn"), baseline="all", baseline_given=True)
    analysis = analyze_records(StudyRecord(1, "q", {"name": "q"}, info, 0.0), "q.db", records, {"done": 12})
    specs = {r.id: r.spec for r in records}
    across = recommend(analysis, specs)
    assert (across.chosen.placement, across.at) == ("all", {}) and "quantize=none" in across.chosen.size
    assert "The study sweeps quantize (none, nf4)" in across.reason and "--at quantize=nf4" in across.reason
    on_nf4 = recommend(analysis, specs, at={"quantize": "nf4"})
    assert on_nf4.chosen.placement == "attn" and "quantize=nf4" in on_nf4.chosen.size
    assert on_nf4.runner_up.placement == "all" and on_nf4.distinguishable and "sweeps" not in on_nf4.reason
    assert on_nf4.trial_spec["train"]["quantize"] == "nf4"  # what export-placement --from carries on
    assert (on_nf4.quantize, across.quantize) == ("nf4", "none")
    # How to load the adapter: onto the base quantized as it was trained (a fp32-base one: plainly).
    from rich.console import Console

    from loraplace.report_terminal import print_recommendation

    def said(result) -> str:
        console = Console(record=True, width=400)
        print_recommendation(result.model_copy(update={"adapter": "/a/adapter", "adapter_seed": 0}), "q.db", console)
        return " ".join(console.export_text().split())
    assert ("from_pretrained(BASE, quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True" in said(on_nf4))
    assert "quantization_config" not in said(across) and "from_pretrained(BASE), '/a/adapter')" in said(across)
    with pytest.raises(LoraplaceError, match="does not sweep 'lora_rank'.*sweeps quantize"):
        recommend(analysis, specs, at={"lora_rank": "8"})
    with pytest.raises(LoraplaceError, match="quantize takes none, nf4"):
        recommend(analysis, specs, at={"quantize": "int8"})
    bad = cli("recommend", str(tmp_path / "x.db"), "--at", "quantize")
    assert bad.returncode == 2 and "is not axis=value" in bad.stderr


def test_an_answer_from_an_unfinished_study_says_what_is_left(study_store):
    """recommend (and export-placement --from, which prints the same) on a study with trials left: it answered
    with no word that the study was not finished."""
    analysis, specs = _analysis_and_specs(study_store)
    assert recommend(analysis, specs).incomplete is None  # finished: nothing to say
    left = replace(analysis, counts=dict(analysis.counts) | {"pending": 2, "running": 1})
    rec = recommend(left, specs)
    assert rec.incomplete.startswith(f"3 of {sum(left.counts.values())} trials not finished (2 pending, 1 running)")
    assert rec.incomplete.endswith("the answer may change once the study finishes")
    one = {"all": 1.0, "attn": 1.5, "top": 2.0}  # one seed measured of the spec's two
    short = replace(analysis, groups=tuple(
        replace(g, stats=dict(g.stats) | {"eval_loss": summarize([one[g.placement]])}) for g in analysis.groups))
    assert "the chosen placement has 1 of its 2 seeds" in recommend(short, specs).incomplete
    # a failed trial is finished: only --retry-failed can change the answer (it said "once the study finishes")
    failed = replace(analysis, counts=dict(analysis.counts) | {"failed": 1})
    assert recommend(failed, specs).incomplete == ("1 failed: the answer may change only if the failed trials are "
                                                   "run again (loraplace run SPEC --retry-failed)")
    both = replace(left, counts=dict(left.counts) | {"failed": 1})
    assert recommend(both, specs).incomplete.endswith("once the study finishes and its failed trials are run again "
                                                      "(--retry-failed)")
