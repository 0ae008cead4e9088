"""Importance probe and auto placement on tiny models: the gradient it scores is the true weight gradient, the
scores are the top-r singular values, and auto placements compile to exact plans within their budget."""

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_study_yaml
from loraplace.data import DataSpec, load_tokenized
from loraplace.data.batching import batching_mode, make_batch
from loraplace.errors import PlacementError
from loraplace.placement import parse_placement
from loraplace.probe import allocate, probe_model, top_singular_energy, units
from loraplace.stepper import batch_order
from loraplace.train import loss_sum
from loraplace.trial import Session


@pytest.fixture(scope="module")
def session():
    return Session("tiny:llama", precision="fp32")


@pytest.fixture(scope="module")
def data(session):
    return load_tokenized("builtin:arithmetic?n=64", session.tokenizer, DataSpec(train="x", max_len=160))[0]


@pytest.fixture(scope="module")
def probe(session, data):
    return session.probe(data, batches=3, batch=4, rank=2, key="arith64")


def test_top_singular_energy_matches_svd():
    g = torch.randn(48, 20, dtype=torch.float64)
    assert torch.allclose(top_singular_energy(g), torch.linalg.svdvals(g) ** 2, atol=1e-9)
    assert torch.allclose(top_singular_energy(g.T), torch.linalg.svdvals(g) ** 2, atol=1e-9)


def test_scores_are_svd_of_the_true_weight_gradient(session, data, probe):
    # Reference: autograd weight gradients of the same loss over the same batches (every weight trainable).
    model = session.model
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        model.zero_grad()
        total = 0
        mode = batching_mode(model, True)
        for index in batch_order(len(data), 4, 3, 0):
            b = make_batch(data, index, mode, session.pad_id)
            loss_sum(model, b).backward()
            total += b.label_tokens
        modules = dict(model.named_modules())
        for site in probe.sites:
            g = modules[site.path].weight.grad.double() / total
            sigma = torch.linalg.svdvals(g)
            assert site.score == pytest.approx(float(sigma[:2].square().sum().sqrt()), rel=1e-4)
            assert site.grad_norm == pytest.approx(float(g.norm()), rel=1e-4)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    assert probe.label_tokens == total
    assert len(probe.sites) == 2 * 7 and probe.roles[0] == "attn.q"
    assert all(s.params == 2 * (s.in_features + s.out_features) for s in probe.sites)
    assert not any(p.requires_grad for p in model.parameters())  # the probe leaves the model frozen


def test_grouped_passes_give_the_same_scores(session, data, probe):
    small = probe_model(session.model, session.arch, data, batches=3, batch=4, rank=2, device=session.device,
                        dtype=session.dtype, pad_id=session.pad_id, memory_budget_bytes=64 * 64 * 4)
    assert small.passes > 3
    for a, b in zip(small.sites, probe.sites, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5)


def test_allocation_respects_the_budget_and_follows_marginal_efficiency(probe):
    pool = {u.key: u for u in units(probe, "site")}
    for budget in (200, 2000, 6000, 50_000):
        ranks = allocate(probe, budget, "site", step=2)
        spent = sum(pool[k].params(r) for k, r in ranks.items())
        assert spent <= budget and all(r % 2 == 0 for r in ranks.values())
        # nothing left out could still be afforded: the leftover is below the cheapest next move
        leftover = budget - spent
        assert all(pool[k].params(2) > leftover or ranks.get(k, 0) + 2 > max(pool[k].max_rank, 2) for k in pool)
    best = max(pool.values(), key=lambda u: u.value(2) / u.params(2))
    assert best.key in allocate(probe, 200, "site", step=2)
    # role granularity: one rank per role, shared by every layer
    assert all(k.startswith(("attn", "mlp")) for k in allocate(probe, 2000, "role", step=2))
    assert set(allocate(probe, 10**6, "layer", step=2)) == {"L0", "L1"}
    with pytest.raises(PlacementError, match="smaller than the cheapest"):
        allocate(probe, 10, "site", step=2)


def test_spectrum_prices_higher_ranks(probe):
    site = max(probe.sites, key=lambda s: s.score)
    assert site.value(2) == pytest.approx(site.score)
    assert site.value(4) >= site.value(2) and site.value(10**6) == pytest.approx(site.grad_norm, rel=1e-6)


@pytest.mark.parametrize("granularity", ["site", "role", "layer"])
def test_auto_placement_compiles_to_a_plan_within_budget(session, data, granularity):
    budget = 2500
    spec = parse_placement({"auto": {"budget": budget, "granularity": granularity, "batches": 3, "batch": 4,
                                     "rank": 2}})
    plan = session.plan(spec, data=data, data_key="arith64")
    assert 0 < plan.trainable_params <= budget
    assert plan.placement["label"] == f"auto:{granularity}@{budget:,}"
    compiled = parse_placement(plan.placement["compiled"])
    assert compiled.groups and plan.budget == budget
    # The compiled placement is an ordinary one: the same plan without any probe.
    again = session.plan(compiled)
    assert again.rank_by_module == plan.rank_by_module


def test_site_granularity_fills_the_budget_closely(session, data):
    budget = 6000
    plan = session.plan({"auto": {"budget": budget, "batches": 3, "batch": 4, "rank": 2}}, data=data,
                        data_key="arith64")
    smallest = min(2 * (s.in_features + s.out_features) for s in session.arch.sites.values())
    assert budget - smallest < plan.trainable_params <= budget  # per-site ranks fill what a uniform rank cannot
    assert len(set(plan.rank_by_module.values())) > 1


def test_auto_needs_data_and_a_budget(session, data):
    with pytest.raises(PlacementError, match="needs training data"):
        session.plan({"auto": {"budget": 1000}})
    with pytest.raises(PlacementError, match="needs a budget"):
        session.plan({"auto": {}}, data=data, data_key="arith64")


def test_auto_placement_in_a_study_and_its_report(tmp_path, monkeypatch):
    from loraplace.analysis import analyze_store
    from loraplace.analysis.report import write_report
    from loraplace.errors import ConfigError
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    text = tiny_study_yaml("auto", steps=2, size="budgets: [2100, 4500]", placements={
        "all": "{preset: all}", "auto": "{auto: {batches: 2, batch: 4, rank: 2}}"})
    (tmp_path / "s.yaml").write_text(text)
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
    assert (summary.done, summary.failed) == (8, 0)
    with Store(tmp_path / "s.db") as store:
        autos = [t for t in store.trials(store.study().id) if t.labels.group.placement == "auto"]
    for t in autos:
        budget = t.labels.group.size.value
        assert budget - 200 < t.outcome.trainable_params <= budget
        assert t.outcome.probe.rank == 2 and len(t.outcome.probe.sites) == 14
        assert t.outcome.probe.sites[0].spectrum == ()  # full spectra stay in probe.json
        spectra = json.loads((Path(t.outcome.adapter.path).parent / "probe.json").read_text())["sites"]
        assert len(spectra[0]["spectrum"]) > 0
    # Same budget, different seeds: the same sites (the probe reads fixed batches).
    by_budget = {}
    for t in autos:
        by_budget.setdefault(t.labels.group.size.value, set()).add(t.outcome.sites)
    assert all(len(v) == 1 for v in by_budget.values())
    written = write_report(analyze_store(tmp_path / "s.db"), tmp_path / "report", ["html"])
    assert (tmp_path / "report" / "figures" / "probe.png").is_file()
    assert 'id="fig-probe"' in written["html"].read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("budgets: [2100, 4500]", "ranks: [2]"))
    with pytest.raises(ConfigError, match="auto placement needs a budget"):
        run_study(load_study(tmp_path / "bad.yaml"), tmp_path / "bad.db")


def test_random_control_allocates_like_auto_without_the_ranking(session, probe):
    from loraplace.probe import allocate_random, unscored

    plan = session.plan({"auto": {"method": "random", "budget": 3000, "rank": 2}})  # no data needed: no probe
    assert 3000 - 2 * 192 < plan.trainable_params <= 3000
    assert set(plan.rank_by_module.values()) == {2}
    assert plan.placement["label"] == "auto:random@3,000"
    again = session.plan({"auto": {"method": "random", "budget": 3000, "rank": 2}})
    assert again.rank_by_module == plan.rank_by_module  # seeded
    blank = unscored(session.arch, 2)
    assert [s.path for s in blank.sites] == [s.path for s in probe.sites]
    assert allocate_random(probe, 3000, step=2) == allocate_random(blank, 3000, step=2)  # scores are ignored
