"""Roles and their resolution to exact module paths, per architecture.

A *site* is one (layer, role) pair, e.g. (3, ``attn.o``), and maps to exactly one linear module path
(``model.layers.3.self_attn.o_proj``). Known families have an explicit table (module path relative to the
block → role); unknown families fall back to a heuristic on module names and report what stayed unassigned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is inspected, so placement specs load without it (fast CLI)
    from torch import nn

ATTN_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")
MLP_ROLES = ("mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
HEAD_ROLE = "head"
ROLES = ATTN_ROLES + MLP_ROLES + (HEAD_ROLE,)
ROLE_GROUPS = {"attn": ATTN_ROLES, "mlp": MLP_ROLES, "all": ATTN_ROLES + MLP_ROLES}


def grid_roles(roles) -> tuple[str, ...]:
    """The roles a layers × roles grid shows: every per-layer role (the head is not a per-layer site)."""
    return tuple(r for r in roles if r != HEAD_ROLE)

_LLAMA_LIKE = {
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
}
# model_type → {module path relative to the transformer block: role}
FAMILY_TABLES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE, "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE, "granite": _LLAMA_LIKE, "smollm3": _LLAMA_LIKE,
    "phi": {
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.dense": "attn.o", "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down",
    },
    "phi3": {
        "self_attn.qkv_proj": "attn.qkv", "self_attn.o_proj": "attn.o",
        "mlp.gate_up_proj": "mlp.gate_up", "mlp.down_proj": "mlp.down",
    },
    "gpt2": {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"},
    "gpt_neox": {
        "attention.query_key_value": "attn.qkv", "attention.dense": "attn.o",
        "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down",
    },
    "opt": {
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.o", "fc1": "mlp.up", "fc2": "mlp.down",
    },
}

# Heuristic for unknown families: leaf name → role; ambiguous leaves are settled by their parent's name.
_LEAF_ROLES = {
    "q_proj": "attn.q", "query": "attn.q", "q": "attn.q", "wq": "attn.q", "q_lin": "attn.q",
    "k_proj": "attn.k", "key": "attn.k", "k": "attn.k", "wk": "attn.k", "k_lin": "attn.k",
    "v_proj": "attn.v", "value": "attn.v", "v": "attn.v", "wv": "attn.v", "v_lin": "attn.v",
    "qkv_proj": "attn.qkv", "c_attn": "attn.qkv", "query_key_value": "attn.qkv", "wqkv": "attn.qkv",
    "qkv": "attn.qkv", "w_pack": "attn.qkv",
    "o_proj": "attn.o", "out_proj": "attn.o", "out_lin": "attn.o",
    "gate_proj": "mlp.gate", "w1": "mlp.gate", "wi_0": "mlp.gate",
    "up_proj": "mlp.up", "c_fc": "mlp.up", "fc1": "mlp.up", "fc_in": "mlp.up", "dense_h_to_4h": "mlp.up",
    "w3": "mlp.up", "wi_1": "mlp.up", "wi": "mlp.up",
    "down_proj": "mlp.down", "fc2": "mlp.down", "fc_out": "mlp.down", "dense_4h_to_h": "mlp.down",
    "w2": "mlp.down",
    "gate_up_proj": "mlp.gate_up",
}
_AMBIGUOUS_LEAVES = {"c_proj": ("attn.o", "mlp.down"), "dense": ("attn.o", "mlp.down"), "wo": ("attn.o", "mlp.down"),
                     "proj": ("attn.o", "mlp.down")}
_ATTN_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARENT = re.compile(r"mlp|ffn|feed_forward|feedforward", re.IGNORECASE)


def is_adaptable_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2 style Conv1D (weight stored as (in, out): PEFT needs ``fan_in_fan_out=True``)."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, is_conv1d) of an adaptable linear layer."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    # transformers' Conv1D: weight is (nx, nf) = (in, out)
    return int(module.weight.shape[0]), int(module.weight.shape[1]), True


@dataclass(frozen=True)
class AdaptableModule:
    """One module that can carry an adapter: where it is (layer, role) and its exact path and shape."""

    layer: int | None  # None for the head
    role: str
    path: str
    in_features: int
    out_features: int
    conv1d: bool = False


@dataclass
class ArchitectureMap:
    """Every adaptable site of a model, by (layer, role)."""

    family: str
    num_layers: int
    blocks_path: str
    sites: dict[tuple[int, str], AdaptableModule]
    head: AdaptableModule | None
    heuristic: bool = False
    unassigned: list[str] = field(default_factory=list)
    linear_paths: list[str] = field(default_factory=list)  # every adaptable linear in the model, in order
    total_params: int = 0

    def roles_present(self) -> list[str]:
        present = {role for (_, role) in self.sites}
        if self.head is not None:
            present.add(HEAD_ROLE)
        return [r for r in ROLES if r in present]

    def grid_roles(self) -> tuple[str, ...]:
        return grid_roles(self.roles_present())

    def site_by_path(self) -> dict[str, AdaptableModule]:
        by_path = {s.path: s for s in self.sites.values()}
        if self.head is not None:
            by_path[self.head.path] = self.head
        return by_path


def find_blocks(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks: the one whose length is the config's layer count
    (largest ModuleList otherwise)."""
    from torch import nn

    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if num_layers:
        exact = [(n, m) for n, m in candidates if len(m) == num_layers]
        if exact:
            # Shallowest path wins (a block may contain a ModuleList of experts of the same length).
            return min(exact, key=lambda nm: nm[0].count("."))
    if not candidates:
        raise ValueError("no ModuleList of transformer blocks found")
    return max(candidates, key=lambda nm: len(nm[1]))


def _heuristic_role(rel_path: str) -> str | None:
    parts = rel_path.split(".")
    leaf = parts[-1].lower()
    if leaf in _LEAF_ROLES:
        return _LEAF_ROLES[leaf]
    if leaf in _AMBIGUOUS_LEAVES:
        parent = ".".join(parts[:-1])
        attn_role, mlp_role = _AMBIGUOUS_LEAVES[leaf]
        if _ATTN_PARENT.search(parent):
            return attn_role
        if _MLP_PARENT.search(parent):
            return mlp_role
    return None


def map_architecture(model: nn.Module, config=None) -> ArchitectureMap:
    """Assign every adaptable linear inside the transformer blocks a role; find the LM head.

    Raises ``ValueError`` only when two modules of one block claim the same role (a table bug).
    """
    from loraplace.models import count_params

    config = config if config is not None else getattr(model, "config", None)
    family = getattr(config, "model_type", "unknown") if config is not None else "unknown"
    num_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    blocks_path, blocks = find_blocks(model, num_layers)
    table = FAMILY_TABLES.get(family)
    sites: dict[tuple[int, str], AdaptableModule] = {}
    unassigned: list[str] = []
    for layer, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if not rel or not is_adaptable_linear(module):
                continue
            role = table.get(rel) if table is not None else _heuristic_role(rel)
            path = f"{blocks_path}.{layer}.{rel}"
            if role is None:
                unassigned.append(path)
                continue
            if (layer, role) in sites:
                raise ValueError(f"{path} and {sites[(layer, role)].path} both resolve to role {role}")
            fan_in, fan_out, conv1d = linear_shape(module)
            sites[(layer, role)] = AdaptableModule(layer, role, path, fan_in, fan_out, conv1d)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    linear_paths = []
    for name, module in model.named_modules():
        if is_adaptable_linear(module):
            linear_paths.append(name)
            if out_emb is not None and module is out_emb:
                fan_in, fan_out, conv1d = linear_shape(module)
                head = AdaptableModule(None, HEAD_ROLE, name, fan_in, fan_out, conv1d)
    return ArchitectureMap(family=family, num_layers=len(blocks), blocks_path=blocks_path, sites=sites, head=head,
                           heuristic=table is None, unassigned=unassigned, linear_paths=linear_paths,
                           total_params=count_params(model))
