import pytest
from torch import nn

from loraplace.models import TINY_FAMILIES, load_model
from loraplace.placement.roles import ROLES, find_blocks, is_adaptable_linear, map_architecture

REQUIRED_FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt"]


def test_required_families_are_buildable():
    assert set(REQUIRED_FAMILIES) <= set(TINY_FAMILIES)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_every_block_linear_has_exactly_one_role(family):
    model = load_model(f"tiny:{family}")
    arch = map_architecture(model)
    assert not arch.heuristic
    blocks_path, blocks = find_blocks(model, model.config.num_hidden_layers)
    block_linears = [f"{blocks_path}.{i}.{rel}" for i, block in enumerate(blocks)
                     for rel, mod in block.named_modules() if rel and is_adaptable_linear(mod)]
    assert block_linears, "a transformer block without linear layers?"
    assigned = [s.path for s in arch.sites.values()]
    assert sorted(assigned) == sorted(block_linears)  # every linear, and each exactly once (dict keys unique)
    assert arch.unassigned == []
    assert all(site.role in ROLES for site in arch.sites.values())
    # Same role set in every layer.
    per_layer = [{r for (layer, r) in arch.sites if layer == i} for i in range(arch.num_layers)]
    assert all(p == per_layer[0] for p in per_layer)
    assert arch.head is not None and arch.head.path.endswith("lm_head")


@pytest.mark.parametrize(("family", "fused"), [("gpt2", True), ("gpt_neox", True), ("phi3", True), ("llama", False)])
def test_fused_qkv(family, fused):
    roles = map_architecture(load_model(f"tiny:{family}")).roles_present()
    assert ("attn.qkv" in roles) == fused
    assert ("attn.q" in roles) == (not fused)


def test_gpt2_conv1d_shapes():
    arch = map_architecture(load_model("tiny:gpt2"))
    qkv = arch.sites[(0, "attn.qkv")]
    assert qkv.conv1d and (qkv.in_features, qkv.out_features) == (64, 192)
    assert arch.sites[(1, "mlp.down")].path == "transformer.h.1.mlp.c_proj"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(8, 8)
        self.attention.wk = nn.Linear(8, 8)
        self.attention.wv = nn.Linear(8, 8)
        self.attention.dense = nn.Linear(8, 8)
        self.ffn = nn.Module()
        self.ffn.fc_in = nn.Linear(8, 16)
        self.ffn.c_proj = nn.Linear(16, 8)
        self.ffn.mystery = nn.Linear(8, 8)


class _Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery", "num_hidden_layers": 3})()
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.lm_head = nn.Linear(8, 32)

    def get_output_embeddings(self):
        return self.lm_head


def test_unknown_family_uses_heuristic_and_lists_unassigned():
    arch = map_architecture(_Mystery())
    assert arch.heuristic
    assert arch.sites[(0, "attn.q")].path == "layers.0.attention.wq"
    assert arch.sites[(2, "attn.o")].path == "layers.2.attention.dense"
    assert arch.sites[(1, "mlp.up")].path == "layers.1.ffn.fc_in"
    assert arch.sites[(1, "mlp.down")].path == "layers.1.ffn.c_proj"  # the parent's name settles 'c_proj'
    assert arch.unassigned == [f"layers.{i}.ffn.mystery" for i in range(3)]
    assert arch.head.path == "lm_head"
    assert arch.total_params == sum(p.numel() for p in _Mystery().parameters())
