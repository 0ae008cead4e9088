"""Mixture-of-experts and the newer families: every weight of the blocks has a role or is listed, expert sites are
counted exactly as PEFT creates them, and the real configs of Mixtral-8x7B and Qwen3-30B-A3B plan as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import FIXTURES
from loraplace import models
from loraplace.errors import PlacementError
from loraplace.placement import map_architecture, meta_architecture, plan_for_model, resolve_placement
from loraplace.placement.roles import EXPERT_ROLES, ROUTER_ROLES, SHARED_ROLES

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
DENSE_NEW = ("gemma3_text", "olmo2", "granite", "cohere", "smollm3")
MIXTRAL = FIXTURES / "configs" / "mixtral-8x7b" / "config.json"
QWEN3_MOE = FIXTURES / "configs" / "qwen3-30b-a3b" / "config.json"


def _block_weights(model: nn.Module, arch) -> set[str]:
    """Every parameter with ≥ 2 dimensions inside the blocks, by full path."""
    return {name for name, p in model.named_parameters() if p.ndim >= 2 and name.startswith(arch.blocks_path + ".")}


def _accounted(arch) -> set[str]:
    """The weights the map accounts for: each site's weights (with gpt-oss's expert biases), and the unassigned."""
    out = set()
    for site in arch.sites.values():
        out.update(site.weight_paths)
        if site.parameter:
            out.add(f"{site.path}_bias")
    for path in arch.unassigned:
        out.add(path)
        out.add(f"{path}.weight")
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES + DENSE_NEW)
def test_every_block_weight_has_a_role_or_is_listed(family):
    model = models.load_model(f"tiny:{family}")
    arch = map_architecture(model)
    assert not arch.heuristic, f"{family} has an explicit table"
    assert arch.unassigned == []
    assert _block_weights(model, arch) <= _accounted(arch)
    for placement in ("attn", "mlp", "all"):
        assert plan_for_model(f"tiny:{family}", placement, rank=4).modules
    if family in MOE_FAMILIES:
        plan = plan_for_model(f"tiny:{family}", "moe.router", rank=2)
        assert {m.role for m in plan.modules} == {"moe.router"}
        if family in ("qwen2_moe", "deepseek_v3"):  # layer 0 is dense: routers where they exist, and said so
            assert {m.layer for m in plan.modules} == {1}
            assert any("absent at layers [0]" in w and "adapted where it exists" in w for w in plan.warnings)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_groups_on_moe_layers(family):
    arch = map_architecture(models.load_model(f"tiny:{family}"))
    plan = resolve_placement(arch, "all", rank=4)
    roles = {m.role for m in plan.modules}
    assert {"moe.experts.gate_up", "moe.experts.down"} <= roles  # fused experts, adapted per expert
    assert not roles & set(ROUTER_ROLES)  # the router only when named
    experts = [m for m in plan.modules if m.role in EXPERT_ROLES]
    assert all(m.experts == 4 and m.parameter for m in experts)
    mlp = {m.role for m in resolve_placement(arch, "mlp", rank=4).modules}
    assert mlp == roles - {r for r in roles if r.startswith("attn.")}  # mlp = experts + shared (+ dense MLPs)
    if family in ("qwen2_moe", "deepseek_v3"):  # shared experts, and a dense layer 0
        assert set(SHARED_ROLES) & roles - {"moe.shared.gate_up"}
        assert {m.layer for m in plan.modules if m.role.startswith("mlp.")} == {0}
        assert {m.layer for m in plan.modules if m.role.startswith("moe.")} == {1}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_trainable_count_is_what_peft_creates(family):
    from peft import get_peft_model

    for placement in ("all", "mlp", {"roles": ["all", "moe.router"], "layers": [1]},
                      {"groups": [{"roles": ["attn"], "rank": 2}, {"roles": ["moe"], "rank": 3}]}):
        model = models.load_model(f"tiny:{family}")
        plan = resolve_placement(map_architecture(model), placement)
        peft_model = get_peft_model(model, plan.to_lora_config())
        created = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert created == plan.trainable_params, (family, placement)


def test_deepseek_dense_and_shared_mlps_survive_peft_moe_conversion():
    """PEFT rewrites targets ending in .gate_proj/.up_proj/.down_proj for DeepSeek-V3 into the fused expert
    parameters (huggingface/peft#3711); the plan targets those linears through their weights instead."""
    plan = plan_for_model("tiny:deepseek_v3", "mlp", rank=4)
    config = plan.to_lora_config()
    assert not [t for t in config.target_modules if t.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert "model.layers.0.mlp.gate_proj.weight" in config.target_parameters
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in config.target_parameters


def test_per_expert_linears_resolve_to_the_same_roles():
    """Checkpoints and remote code from before fused experts: a ModuleList of experts with w1/w2/w3 linears and a
    linear router (Mixtral as transformers 4 built it)."""
    from peft import get_peft_model

    model = models.load_model("tiny:mixtral")
    hidden, inter, experts = 64, 128, 4
    for layer in model.model.layers:
        moe = nn.Module()
        moe.gate = nn.Linear(hidden, experts, bias=False)
        moe.experts = nn.ModuleList()
        for _ in range(experts):
            expert = nn.Module()
            expert.w1, expert.w3 = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
            expert.w2 = nn.Linear(inter, hidden, bias=False)
            moe.experts.append(expert)
        del layer.mlp
        layer.block_sparse_moe = moe
    arch = map_architecture(model)
    assert arch.unassigned == []
    site = arch.sites[(1, "moe.experts.gate")]
    assert site.experts == 4 and site.path == "model.layers.1.block_sparse_moe.experts.*.w1"
    assert site.expert_paths == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.w1" for e in range(4))
    assert {role for (_, role) in arch.sites} >= {"moe.experts.gate", "moe.experts.up", "moe.experts.down",
                                                  "moe.router"}
    plan = resolve_placement(arch, {"roles": ["moe.experts"], "ranks": {"moe.experts.down": 2}}, rank=4)
    assert plan.trainable_params == 2 * 4 * (4 * (hidden + inter) * 2 + 2 * (inter + hidden))
    peft_model = get_peft_model(model, plan.to_lora_config())
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == plan.trainable_params


def test_real_configs_total_and_active_params():
    mixtral = meta_architecture(str(MIXTRAL))
    assert mixtral.total_params == 46_702_792_704
    assert mixtral.active_params == 12_879_925_248  # the "12.9B active" of Mixtral's model card
    qwen = meta_architecture(str(QWEN3_MOE))
    assert qwen.total_params == 30_532_122_624
    assert qwen.active_params == 3_353_032_704  # "3.3B activated"
    for arch in (mixtral, qwen):
        assert arch.unassigned == [] and not arch.heuristic


@pytest.mark.parametrize(("config", "layers", "experts", "hidden", "expert_inter"),
                         [(MIXTRAL, 32, 8, 4096, 14336), (QWEN3_MOE, 48, 128, 2048, 768)])
def test_all_includes_every_expert(config, layers, experts, hidden, expert_inter):
    plan = plan_for_model(str(config), "all", rank=16)
    expert_sites = [m for m in plan.modules if m.role in EXPERT_ROLES]
    assert len(expert_sites) == 2 * layers and all(m.experts == experts for m in expert_sites)
    per_layer_experts = experts * 16 * ((hidden + 2 * expert_inter) + (expert_inter + hidden))
    attn = sum(m.params for m in plan.modules if m.role.startswith("attn."))
    assert plan.trainable_params == layers * per_layer_experts + attn
    assert {m.role for m in plan.modules if m.role.startswith("attn.")} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    assert plan.active_params is not None


def test_plan_states_active_and_total_params(cli):
    result = cli("plan", MIXTRAL, "--placement", "mlp", "--rank", "8")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "12,879,925,248 of 46,702,792,704 base params active per token" in text
    assert "moe.experts.gate_up" in text


def test_mlp_role_on_an_moe_model_points_to_the_expert_roles():
    with pytest.raises(PlacementError, match="mixture-of-experts MLPs.*moe.experts"):
        plan_for_model(str(MIXTRAL), "mlp.up")
    with pytest.raises(PlacementError, match=r"absent at layers \[0\].*dense layers"):
        plan_for_model("tiny:deepseek_v3", {"roles": ["moe.experts.down"], "layers": "0-1"})


def test_dropout_on_parameter_targets_is_refused():
    with pytest.raises(PlacementError, match="dropout"):
        plan_for_model("tiny:qwen3_moe", {"roles": ["moe.experts"], "dropout": 0.1}, rank=4)
    plan_for_model("tiny:qwen3_moe", {"roles": ["attn"], "dropout": 0.1}, rank=4)  # linears: fine


# ------------------------------------------------------------------------------------------------ unassigned


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj, self.self_attn.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(8, 4, bias=False)  # a linear router
        self.mlp.experts = nn.Module()
        self.mlp.experts.gate_up_proj = nn.Parameter(torch.zeros(4, 32, 8))
        self.mlp.experts.down_proj = nn.Parameter(torch.zeros(4, 8, 16))
        self.mlp.experts.scales = nn.Parameter(torch.zeros(4, 16))  # nothing claims this one
        self.norm = nn.LayerNorm(8)


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "brand_new_moe", "num_hidden_layers": 2,
                                       "num_experts_per_tok": 1})()
        self.layers = nn.ModuleList(_Block() for _ in range(2))
        self.lm_head = nn.Linear(8, 32)

    def get_output_embeddings(self):
        return self.lm_head


def test_unknown_moe_family_heuristic_and_unassigned_weights_refuse_groups():
    arch = map_architecture(_Unknown())
    assert arch.heuristic
    assert arch.sites[(0, "moe.experts.gate_up")].experts == 4
    assert arch.sites[(0, "moe.router")].path == "layers.0.mlp.gate"
    assert arch.unassigned == ["layers.0.mlp.experts.scales", "layers.1.mlp.experts.scales"]
    for group in ("all", "mlp", "moe"):
        with pytest.raises(PlacementError, match=r"silently leave out 2 weight.*layers\.0\.mlp\.experts\.scales.*"
                                                 r"FAMILY_TABLES\['brand_new_moe'\].*--allow-unassigned"):
            resolve_placement(arch, group, rank=2)
    resolve_placement(arch, "attn", rank=2)  # nothing unassigned under attention: attn means exactly what it says
    resolve_placement(arch, "moe.experts.down", rank=2)  # a named role is exact
    plan = resolve_placement(arch, {"roles": ["all"], "allow_unassigned": True}, rank=2)
    assert any(w.startswith("UNASSIGNED WEIGHTS NOT ADAPTED") and "scales" in w for w in plan.warnings)


def test_allow_unassigned_on_the_command_line(cli):
    refused = cli("plan", "x", "--model-config", "model_type=jamba,num_hidden_layers=2", "--placement", "all")
    assert refused.returncode == 2
    assert "--allow-unassigned" in refused.stderr and "mamba" in refused.stderr
    allowed = cli("plan", "x", "--model-config", "model_type=jamba,num_hidden_layers=2", "--placement", "all",
                  "--allow-unassigned")
    assert allowed.returncode == 0, allowed.stderr
    assert "UNASSIGNED WEIGHTS NOT ADAPTED" in " ".join(allowed.stdout.split())


def test_allow_unassigned_keeps_existing_trial_ids():
    """A field added later is left out of dumps at its default, so stored studies keep their trial ids."""
    from loraplace.placement import PlacementSpec

    assert "allow_unassigned" not in PlacementSpec(roles=["all"]).model_dump()
    assert PlacementSpec(roles=["all"], allow_unassigned=True).model_dump()["allow_unassigned"] is True
