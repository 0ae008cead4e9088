import json
import re

import pytest
from peft import get_peft_model

from helpers import GPT2_MEDIUM, needs_smollm2
from loraplace.errors import ConfigError, PlacementError
from loraplace.models import load_model
from loraplace.placement import map_architecture, plan_for_model, resolve_placement


def gpt2_medium(placement, **kw):
    cfg = dict(GPT2_MEDIUM)
    return plan_for_model("gpt2-medium", placement, model_type=cfg.pop("model_type"), model_config=cfg, **kw)


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("all", 6_291_456), ("seed-all", 6_291_456), ("attn", 2_359_296), ("mlp.up", 1_966_080),
     ("seed-attn-suffix", 4_325_376), ("mlp", 3_932_160)],
)
def test_gpt2_medium_seed_study_counts(placement, expected):
    plan = gpt2_medium(placement, rank=16)
    assert plan.trainable_params == expected
    assert plan.total_params == 354_823_168


def test_seed_attn_suffix_warns_about_mlp_c_proj():
    plan = gpt2_medium("seed-attn-suffix", rank=16)
    assert any("mlp.c_proj" in w and "crosses attention and MLP" in w for w in plan.warnings)
    assert "transformer.h.5.mlp.c_proj" in plan.rank_by_module
    assert "transformer.h.5.mlp.c_fc" not in plan.rank_by_module
    clean = gpt2_medium("attn", rank=16)
    assert not clean.warnings
    assert not any(p.endswith("mlp.c_proj") for p in clean.rank_by_module)


def test_layer_groups_and_per_group_ranks():
    plan = gpt2_medium({"groups": [{"roles": ["attn"], "layers": "bottom:50%", "rank": 8},
                                   {"roles": ["mlp"], "layers": "top:50%"}]}, rank=4)
    assert {m.layer for m in plan.modules if m.role.startswith("attn")} == set(range(12))
    assert {m.layer for m in plan.modules if m.role.startswith("mlp")} == set(range(12, 24))
    assert {m.rank for m in plan.modules if m.role.startswith("attn")} == {8}
    assert {m.rank for m in plan.modules if m.role.startswith("mlp")} == {4}
    assert plan.trainable_params == 12 * 8 * (4096 + 2048) + 12 * 4 * (5120 + 5120)


def test_per_role_ranks_and_alpha():
    plan = gpt2_medium({"roles": ["all"], "ranks": {"attn": 4, "mlp.down": 32}, "alpha": 16}, rank=8)
    by_role = {m.role: (m.rank, m.alpha) for m in plan.modules}
    assert by_role == {"attn.qkv": (4, 16), "attn.o": (4, 16), "mlp.up": (8, 16), "mlp.down": (32, 16)}
    default_alpha = gpt2_medium("attn", rank=8).modules[0].alpha
    assert default_alpha == 16.0  # alpha_ratio 2 × rank


@pytest.mark.parametrize("budget", [500_000, 1_000_000, 2_000_000])
@pytest.mark.parametrize("placement", ["all", "attn", "mlp.up"])
def test_budget_solves_largest_rank_under_budget(placement, budget):
    plan = gpt2_medium(placement, budget=budget)
    r = plan.modules[0].rank
    assert plan.trainable_params <= budget
    assert gpt2_medium(placement, rank=r + 1).trainable_params > budget
    assert plan.budget_deviation == pytest.approx((plan.trainable_params - budget) / budget)


@pytest.mark.parametrize(
    ("placement", "kw", "message"),
    [
        ("attn.q", {"rank": 8}, "use 'attn.qkv'"),
        ("mlp.gate", {"rank": 8}, "no 'mlp.gate'"),
        ("attn.z", {"rank": 8}, "unknown role 'attn.z'"),
        ({"roles": ["attn"], "layers": "top:99"}, {"rank": 8}, "only 24 layers"),
        ("all", {"rank": 0}, "rank must be a positive"),
        ("all", {"budget": 1000}, "smaller than rank 1 allows"),
        ({"target_modules": ["nope"]}, {"rank": 8}, "matches no linear module"),
        ({"groups": [{"roles": ["attn"]}, {"roles": ["attn.o"], "layers": "0"}]}, {"rank": 8}, "one group only"),
        ({"roles": ["all"], "ranks": {"attn": 4}}, {"budget": 10**6}, "remove the per-role"),
    ],
)
def test_placement_errors(placement, kw, message):
    with pytest.raises(PlacementError, match=message):
        gpt2_medium(placement, **kw)


def test_all_problems_reported_at_once():
    with pytest.raises(PlacementError) as info:
        gpt2_medium({"groups": [{"roles": ["attn.q"]}, {"roles": ["mlp.bogus"], "layers": "50"}]}, rank=8)
    text = str(info.value)
    assert "attn.qkv" in text and "mlp.bogus" in text


def test_spec_errors_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'roles'"):
        gpt2_medium({"rolez": ["attn"]}, rank=8)
    with pytest.raises(ConfigError, match="exactly one of"):
        gpt2_medium({"roles": ["attn"], "preset": "all"}, rank=8)


def _peft_trainable(model, plan):
    peft_model = get_peft_model(model, plan.to_lora_config())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A") and n.startswith("base_model.model."))
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
             if hasattr(m, "lora_A") and n.startswith("base_model.model.")}
    return trainable, adapted, ranks


PLACEMENTS = [
    "all", "attn", "mlp", "all+head",
    {"roles": ["attn.o", "mlp.down"], "layers": "odd"},
    {"groups": [{"roles": ["attn"], "layers": "0", "rank": 3}, {"roles": ["mlp"], "layers": "1", "rank": 5}]},
    {"roles": ["all"], "ranks": {"attn.o": 2}},
    {"roles": ["all"], "budget": 20_000},
]


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi", "phi3", "gpt_neox", "opt", "gemma2", "qwen3"])
@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: json.dumps(p) if isinstance(p, dict) else p)
def test_plan_counts_equal_peft_after_injection(family, placement):
    model = load_model(f"tiny:{family}")
    rank = None if isinstance(placement, dict) and ("budget" in placement or "groups" in placement) else 4
    plan = resolve_placement(map_architecture(model), placement, rank=rank)
    trainable, adapted, ranks = _peft_trainable(model, plan)
    assert trainable == plan.trainable_params
    assert adapted == sorted(plan.rank_by_module)
    assert ranks == plan.rank_by_module


def test_meta_plan_equals_loaded_tiny_plan():
    meta = plan_for_model("tiny:llama", "all", rank=8)
    loaded = resolve_placement(map_architecture(load_model("tiny:llama")), "all", model="tiny:llama", rank=8)
    assert meta.to_dict() == loaded.to_dict()


@pytest.mark.slow
@pytest.mark.slow
@needs_smollm2
def test_meta_plan_equals_loaded_builtin_plan():
    loaded_arch = map_architecture(load_model("builtin:smollm2-135m"))  # loaded once: ~10 s on a 2-core CPU
    for placement in ("all", "attn", {"roles": ["mlp"], "layers": "top:50%"}):
        meta = plan_for_model("builtin:smollm2-135m", placement, rank=16)
        loaded = resolve_placement(loaded_arch, placement, model="builtin:smollm2-135m", rank=16)
        assert meta.to_dict() == loaded.to_dict()
    assert meta.num_layers == 30 and meta.total_params == 134_515_008


def test_lora_config_is_exact():
    plan = gpt2_medium({"roles": ["attn"], "layers": "1", "ranks": {"attn.o": 2}}, rank=4)
    cfg = plan.to_lora_config()
    assert sorted(cfg.target_modules) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    assert cfg.fan_in_fan_out is True
    # The most common rank is the base r; on a tie, the first module's (Counter keeps first-seen order): c_attn.
    assert cfg.r == 4 and cfg.lora_alpha == 8
    assert cfg.rank_pattern == {re.escape("transformer.h.1.attn.c_proj"): 2}
    assert cfg.alpha_pattern == {re.escape("transformer.h.1.attn.c_proj"): 4.0}


@pytest.mark.parametrize("preset", ["all", "attn", "mlp", "mlp.up", "bottom-half", "top-half"])
def test_budget_exact_fill_lands_within_one_percent(preset):
    overrides = {k: v for k, v in GPT2_MEDIUM.items() if k != "model_type"}
    exact = plan_for_model("gpt2-medium", preset, budget=1_000_000, model_type="gpt2", model_config=overrides)
    uniform = plan_for_model("gpt2-medium", preset, budget=1_000_000, model_type="gpt2", model_config=overrides,
                             fill="uniform")
    assert -0.01 < exact.budget_deviation <= 0
    assert uniform.budget_deviation <= exact.budget_deviation
    assert len(set(uniform.rank_by_module.values())) == 1
    ranks = sorted(set(exact.rank_by_module.values()))
    assert ranks in ([ranks[0]], [ranks[0], ranks[0] + 1]) and ranks[0] == uniform.modules[0].rank
    again = plan_for_model("gpt2-medium", preset, budget=1_000_000, model_type="gpt2", model_config=overrides)
    assert again.rank_by_module == exact.rank_by_module  # deterministic


def test_exact_fill_spreads_the_extra_rank():
    from loraplace.placement.plan import spread_order

    assert sorted(spread_order(10)) == list(range(10))
    assert spread_order(8)[:4] == [0, 4, 2, 6]  # every prefix spread over the range
    overrides = {k: v for k, v in GPT2_MEDIUM.items() if k != "model_type"}
    plan = plan_for_model("gpt2-medium", "mlp.up", budget=1_000_000, model_type="gpt2", model_config=overrides)
    raised = sorted(m.layer for m in plan.modules if m.rank > min(plan.rank_by_module.values()))
    assert len(raised) >= 3 and raised[-1] - raised[0] >= 12  # spread over the depth, not the lowest layers


def test_a_dora_budget_counts_the_magnitudes_peft_creates():
    """DoRA trains a magnitude per output feature of each adapted linear: the solver pays for them first, so the
    plan stays within the budget, and its count is what PEFT creates."""
    plan = plan_for_model("tiny:llama", {"roles": ["all"], "variant": "dora"}, budget=6000)
    assert -0.01 < plan.budget_deviation <= 0
    assert sum(m.magnitude_params for m in plan.modules) == sum(m.out_features for m in plan.modules)
    model = get_peft_model(load_model("tiny:llama"), plan.to_lora_config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params
    with pytest.raises(PlacementError, match="of them DoRA's magnitudes"):
        plan_for_model("tiny:llama", {"roles": ["all"], "variant": "dora"}, budget=3000)
