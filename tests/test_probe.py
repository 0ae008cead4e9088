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
    spec = parse_placement({"auto": {"method": "probe", "budget": budget, "granularity": granularity, "batches": 3,
                                     "batch": 4, "rank": 2}})
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
    plan = session.plan({"auto": {"method": "probe", "budget": budget, "batches": 3, "batch": 4, "rank": 2}},
                        data=data, data_key="arith64")
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
        "all": "{preset: all}", "auto": "{auto: {method: probe, batches: 2, batch: 4, rank: 2}}"})
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


# --------------------------------------------------------------------------------------------- nfn, gradient


def test_nfn_equals_the_formula_on_real_tokens_only(session):
    """PLoP's NFN of every site from one padded batch of examples of unequal lengths equals the formula computed
    from each example's own forward (no padding at all): so padding never enters it."""
    from loraplace.probe import nfn_model

    data = load_tokenized("builtin:arithmetic?n=16", session.tokenizer, DataSpec(train="x", max_len=1024))[0]
    scores = nfn_model(session.model, session.arch, data, batches=1, batch=4, rank=2, device=session.device,
                       dtype=session.dtype, pad_id=session.pad_id)
    index = batch_order(len(data), 4, 1, 0)[0]
    assert len({len(data.ids[i]) for i in index}) > 1  # the batch is padded
    inputs: dict[str, list[torch.Tensor]] = {}
    modules = dict(session.model.named_modules())
    hooks = [modules[s.path].register_forward_hook(
        lambda _m, args, _o, path=s.path: inputs.setdefault(path, []).append(args[0][0].detach()))
        for s in scores.sites]
    try:
        with torch.no_grad():
            for i in index:  # one example at a time: every position is a real token
                session.model(input_ids=torch.as_tensor(data.ids[i], dtype=torch.long)[None])
    finally:
        for h in hooks:
            h.remove()
    for site in scores.sites:
        z = torch.cat(inputs[site.path]).double()  # [real tokens, d_in]
        w = modules[site.path].weight.double()
        w_hat = w / w.pow(2).mean().sqrt()
        z_hat = z / z.norm(dim=1, keepdim=True)
        actual = float((z_hat @ w_hat.T).norm(dim=1).mean() / z.shape[1] ** 0.5)
        assert site.actual == pytest.approx(actual, rel=1e-4), site.path
        # The Gaussian baseline: E‖Ŵu‖ ≈ √(‖Ŵ‖²_F / d_in) for a unit Gaussian u, over √d_in.
        expected_random = (w_hat.pow(2).sum() / z.shape[1]).sqrt().item() / z.shape[1] ** 0.5
        assert site.random == pytest.approx(expected_random, rel=0.1), site.path
        assert site.score == pytest.approx(site.actual / site.random, rel=1e-9)
    assert scores.measure == "nfn" and scores.label_tokens == sum(
        len(data.ids[i]) - int(data.prompt_lens[i]) for i in index)


def test_the_gradient_method_ranks_a_useful_large_matrix_above_a_small_one():
    """A planted pair: the large site's gradient energy is 3× the small one's but it is 4× larger. Today's probe
    (energy per parameter) spends the budget on the small site; ``gradient`` ranks the large one first."""
    from loraplace.probe import ranked_units
    from loraplace.records import ProbeScores, ProbeSite

    def site(role, d_out, score):
        return ProbeSite(layer=0, role=role, path=f"m.{role}", in_features=64, out_features=d_out, score=score,
                         grad_norm=score, rank=2, spectrum=(score ** 2, 0.0))

    large, small = site("mlp.up", 448, 3.0), site("attn.k", 64, 1.0)
    probe = ProbeScores(model="planted", rank=2, batches=1, label_tokens=1, seconds=0.0, passes=1, num_layers=1,
                        roles=("attn.k", "mlp.up"), sites=(small, large))
    assert small.efficiency > large.efficiency
    assert allocate(probe, small.params, "site") == {"L0 attn.k": 2}  # per parameter: the small one
    assert [u.key for u, _ in ranked_units(probe, "site", "gradient")] == ["L0 mlp.up", "L0 attn.k"]
    with pytest.raises(PlacementError, match="ranks nfn scores"):
        ranked_units(probe, "role", "nfn")


@pytest.mark.parametrize("method", ["nfn", "gradient", "warmup"])
def test_top_methods_adapt_their_top_roles_and_fill_the_budget_exactly(session, data, method):
    from loraplace.probe import ranked_units

    budget = 3000
    warmup = {"warmup_steps": 2, "warmup_lr": 1e-2} if method == "warmup" else {}
    plan = session.plan({"auto": {"method": method, "budget": budget, "batches": 2, "batch": 4, "rank": 2,
                                  "top": 2} | warmup}, budget=None, data=data, data_key="arith64")
    scores = session.probe(data, batches=2, batch=4, rank=2, key="arith64",
                           measure="gradient" if method == "gradient" else method, **warmup)
    want = {u.key for u, _ in ranked_units(scores, "role", method)[:2]}
    assert {m.role for m in plan.modules} == want
    assert all(len({m.layer for m in plan.modules if m.role == role}) == session.arch.num_layers for role in want)
    assert abs(plan.trainable_params - budget) / budget < 0.1  # exact fill: one rank over the chosen sites, +1 on some
    assert plan.placement["label"] == f"auto:{method}:top2-role@{budget:,}"
    # PLoP's defaults: roles, three of them.
    default = parse_placement({"auto": {"method": method}}).auto
    assert (default.granularity, default.top) == ("role", 3)
    if method == "nfn":  # auto's default method, with the same defaults
        assert parse_placement({"auto": {}}).auto == default
    with pytest.raises(PlacementError, match="only"):
        session.plan({"auto": {"method": method, "budget": budget, "batches": 2, "batch": 4, "rank": 2,
                               "top": 99}}, data=data, data_key="arith64")


def test_top_is_refused_where_it_cannot_take_effect():
    from loraplace.errors import ConfigError

    with pytest.raises(ConfigError, match="top applies to method nfn, gradient, warmup"):
        parse_placement({"auto": {"method": "probe", "top": 2}})
    with pytest.raises(ConfigError, match="warmup_steps applies to method warmup"):
        parse_placement({"auto": {"method": "nfn", "warmup_steps": 5}})
    # probe placements dump as before (trial ids of stored studies do not move)
    dumped = parse_placement({"auto": {"method": "probe"}}).model_dump()["auto"]
    assert not {"top", "warmup_steps", "warmup_lr"} & set(dumped)
    warmup = parse_placement({"auto": {"method": "warmup"}}).auto
    assert (warmup.granularity, warmup.top, warmup.warmup_steps, warmup.warmup_lr) == ("role", 3, 10, 1e-3)


def test_warmup_scores_equal_a_direct_computation_on_real_tokens(session):
    """The warm-up measure of every site, from padded batches of examples of unequal lengths, equals
    mean ‖s·B·A·x‖ and mean ‖W·x + b‖ computed from each example's own forward (no padding at all), and the score
    is their ratio. The adapters carry planted random B (as if trained), so every update is non-zero."""
    from loraplace.placement import resolve_placement
    from loraplace.probe import warmup_scores

    data = load_tokenized("builtin:arithmetic?n=16", session.tokenizer, DataSpec(train="x", max_len=1024))[0]
    plan = resolve_placement(session.arch, {"roles": ["all"], "rank": 2})
    order = batch_order(len(data), 4, 2, 0)
    assert any(len({len(data.ids[i]) for i in index}) > 1 for index in order)  # the batches are padded
    with session.adapter(plan, seed=0) as peft_model:
        torch.manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        scores = warmup_scores(peft_model, session.arch, data, batches=2, batch=4, rank=2, device=session.device,
                               dtype=session.dtype, pad_id=session.pad_id, warmup_steps=1, warmup_lr=1e-3)
        layers = dict(peft_model.get_base_model().named_modules())
        inputs: dict[str, list[torch.Tensor]] = {}
        hooks = [layers[s.path].base_layer.register_forward_hook(
            lambda _m, args, _o, path=s.path: inputs.setdefault(path, []).append(args[0][0].detach()))
            for s in scores.sites]
        try:
            with torch.no_grad():
                for index in order:
                    for i in index:  # one example at a time: every position is a real token
                        peft_model(input_ids=torch.as_tensor(data.ids[i], dtype=torch.long)[None])
        finally:
            for h in hooks:
                h.remove()
        for site in scores.sites:
            layer = layers[site.path]
            x = torch.cat(inputs[site.path]).double()  # [real tokens, d_in]
            with torch.no_grad():
                delta = layer.scaling["default"] * (layer.lora_B["default"].weight.double()
                                                    @ layer.lora_A["default"].weight.double())  # [d_out, d_in]
            base = layer.base_layer
            out = x @ base.weight.double().T + (0 if base.bias is None else base.bias.double())
            assert site.update_norm == pytest.approx(float((x @ delta.T).norm(dim=1).mean()), rel=1e-4), site.path
            assert site.output_norm == pytest.approx(float(out.norm(dim=1).mean()), rel=1e-4), site.path
            assert site.score == pytest.approx(site.update_norm / site.output_norm, rel=1e-9)
    assert scores.measure == "warmup" and (scores.warmup_steps, scores.warmup_lr) == (1, 1e-3)


def test_the_warmup_probe_refuses_expert_sites_before_it_trains():
    """A MoE's experts are fused stacks (one adapter per expert, no per-site module to read): refused with the
    methods that can score them, before any adapter is injected."""
    moe = Session("tiny:qwen3_moe", precision="fp32")
    data = load_tokenized("builtin:arithmetic?n=8", moe.tokenizer, DataSpec(train="x", max_len=160))[0]
    with pytest.raises(PlacementError, match="warmup scores linear modules") as refused:
        moe.probe(data, batches=1, batch=2, rank=2, measure="warmup", warmup_steps=1, warmup_lr=1e-3)
    assert "method probe or gradient" in refused.value.hint
    assert not any(p.requires_grad for p in moe.model.parameters())


def test_the_warmup_probe_trains_then_leaves_the_base_as_it_was(session, data):
    """Session.probe(measure="warmup") trains adapters on every linear (their updates are non-zero: B starts at 0)
    and removes them: the base's outputs are bit-identical afterwards and nothing is left trainable. Cached."""
    ids = torch.as_tensor(data.ids[0], dtype=torch.long)[None]
    with torch.no_grad():
        before = session.model(input_ids=ids).logits
    scores = session.probe(data, batches=2, batch=4, rank=2, key="arith64", measure="warmup", warmup_steps=2,
                           warmup_lr=1e-2)
    with torch.no_grad():
        assert torch.equal(session.model(input_ids=ids).logits, before)
    assert not any(p.requires_grad for p in session.model.parameters())
    assert {(s.layer, s.role) for s in scores.sites} == set(session.arch.sites)
    assert all(s.update_norm > 0 and s.output_norm > 0 for s in scores.sites)
    assert scores.seconds > 0 and scores.warmup_steps == 2
    assert session.probe(data, batches=2, batch=4, rank=2, key="arith64", measure="warmup", warmup_steps=2,
                         warmup_lr=1e-2) is scores


def test_nfn_and_gradient_arms_in_a_study_and_their_probe_passes_in_a_search_ledger(tmp_path, monkeypatch):
    """Each method is a study arm (its scores kept with the trial) and, in a search, its probe pass is counted
    once per distinct probe: forward only for nfn, forward and backward for probe and gradient (shared)."""
    from loraplace.analysis.search import _ledger
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    auto = "batches: 2, batch: 4, rank: 2"
    text = tiny_study_yaml("methods", steps=2, size="budgets: [2100]", seeds=[0], placements={
        "all": "{preset: all}", "nfn": f"{{auto: {{method: nfn, top: 2, {auto}}}}}",
        "grad": f"{{auto: {{method: gradient, top: 2, {auto}}}}}", "probe": f"{{auto: {{{auto}}}}}",
        "warm": f"{{auto: {{method: warmup, top: 2, warmup_steps: 2, warmup_lr: 0.01, {auto}}}}}"})
    (tmp_path / "s.yaml").write_text(text)
    study = load_study(tmp_path / "s.yaml")
    summary = run_study(study, tmp_path / "s.db")
    assert (summary.done, summary.failed) == (5, 0)
    with Store(tmp_path / "s.db") as store:
        by_arm = {t.labels.group.placement: t.outcome for t in store.trials(store.study().id)}
    assert by_arm["nfn"].probe.measure == "nfn" and by_arm["grad"].probe.measure == "gradient"
    assert by_arm["warm"].probe.measure == "warmup" and by_arm["warm"].probe.warmup_steps == 2
    assert {s.role for s in by_arm["nfn"].sites.sites} != {s.role for s in by_arm["all"].sites.sites}
    for arm in ("nfn", "grad", "warm"):
        assert 2100 * 0.9 < by_arm[arm].trainable_params <= 2100 * 1.01
    items, _ = _ledger(study, {}, [], [])
    assert [(i.what, i.trained_examples, i.forward_examples) for i in items] == [
        ("gradient probe pass (2 batches of 4, fwd+bwd)", 8, 0), ("nfn probe pass (2 batches of 4, forward)", 0, 8),
        ("warmup probe (2 training steps of 4, then 2 batches forward)", 8, 8)]
