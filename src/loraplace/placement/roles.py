"""Roles and their resolution to exact module and parameter paths, per architecture.

A *site* is one (layer, role) pair, e.g. (3, ``attn.o``). It is one of

* one linear module (``model.layers.3.self_attn.o_proj``): PEFT ``target_modules``;
* one 2-D or 3-D ``nn.Parameter`` (``model.layers.3.mlp.experts.gate_up_proj`` [E, out, in], a router's
  ``weight``): PEFT ``target_parameters``, which gives a 3-D parameter one rank-r LoRA pair *per expert*;
* the same linear of every expert in a ``ModuleList`` of experts (``…experts.0.w1`` … ``experts.7.w1``, the layout
  of checkpoints and remote code written before transformers fused experts): one ``target_modules`` entry each.

Known families have an explicit table (path relative to the block → role: a module path for linears, a parameter
path for parameters; ``experts.*.`` stands for any expert index). Unknown families fall back to a heuristic on
names. Either way, every weight matrix (every parameter with ≥ 2 dimensions) inside the blocks is accounted
for: it belongs to a site, or it is listed in ``ArchitectureMap.unassigned`` — a group such as ``all`` then
refuses to resolve rather than silently adapt less than it says (see ``plan.resolve_placement``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplace.records import lora_params

if TYPE_CHECKING:  # torch is imported where a model is inspected, so placement specs load without it (fast CLI)
    from torch import nn

# MLA (DeepSeek-V2/V3): q_a/q_b are the low-rank query down/up projections, kv_a the joint compressed KV (+ rope
# key) projection, kv_b its up projection to per-head keys and values.
ATTN_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "attn.o")
MLP_ROLES = ("mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
EXPERT_ROLES = ("moe.experts.gate", "moe.experts.up", "moe.experts.gate_up", "moe.experts.down")
SHARED_ROLES = ("moe.shared.gate", "moe.shared.up", "moe.shared.gate_up", "moe.shared.down")
# Routing weights: adapted only when named (a LoRA on the router changes which experts see which token).
ROUTER_ROLES = ("moe.router", "moe.shared_gate")
HEAD_ROLE = "head"
ROLES = ATTN_ROLES + MLP_ROLES + EXPERT_ROLES + SHARED_ROLES + ROUTER_ROLES + (HEAD_ROLE,)
# Most specific first: a per-role rank keyed by a group is looked up in this order.
ROLE_GROUPS = {
    "moe.experts": EXPERT_ROLES,
    "moe.shared": SHARED_ROLES,
    "moe": EXPERT_ROLES + SHARED_ROLES,
    "attn": ATTN_ROLES,
    "mlp": MLP_ROLES + EXPERT_ROLES + SHARED_ROLES,  # on an MoE layer, its experts and shared experts
    "all": ATTN_ROLES + MLP_ROLES + EXPERT_ROLES + SHARED_ROLES,  # never the router, never the head
}


def grid_roles(roles) -> tuple[str, ...]:
    """The roles a layers × roles grid shows: every per-layer role (the head is not a per-layer site)."""
    return tuple(r for r in roles if r != HEAD_ROLE)


def short_role(role: str) -> str:
    """A column label for layers × roles figures: unique across groups (``down``, ``exp.down``, ``sh.down``)."""
    for prefix, short in (("moe.experts.", "exp."), ("moe.shared.", "sh."), ("attn.", ""), ("mlp.", ""),
                          ("moe.", "")):
        if role.startswith(prefix):
            return short + role.removeprefix(prefix)
    return role


def role_group_of(role: str) -> str:
    """The coarse group a role belongs to, for messages: attn, mlp, moe or the role itself."""
    if role in ATTN_ROLES:
        return "attn"
    if role in MLP_ROLES:
        return "mlp"
    if role in EXPERT_ROLES + SHARED_ROLES:
        return "moe"
    return role


_LLAMA_ATTN = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
               "self_attn.o_proj": "attn.o"}
_LLAMA_MLP = {"mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}
_LLAMA_LIKE = _LLAMA_ATTN | _LLAMA_MLP
_MLA_ATTN = {"self_attn.q_proj": "attn.q", "self_attn.q_a_proj": "attn.q_a", "self_attn.q_b_proj": "attn.q_b",
             "self_attn.kv_a_proj_with_mqa": "attn.kv_a", "self_attn.kv_b_proj": "attn.kv_b",
             "self_attn.o_proj": "attn.o"}
_MLP_LEAVES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
               "gate_up_proj": "gate_up"}


def _moe(attn: dict[str, str], *, block: str = "mlp", router: str = "gate", shared: str | None = None,
         shared_gate: str | None = None, dense_mlp: bool = False) -> dict[str, str]:
    """The table of an MoE family: fused experts (transformers ≥ 5) and per-expert linears (older checkpoints),
    the router as a parameter (a TopKRouter module) or a linear, shared experts, and plain MLPs on dense layers."""
    table = dict(attn)
    for leaf, kind in _MLP_LEAVES.items():
        table[f"{block}.experts.{leaf}"] = f"moe.experts.{kind}"  # fused 3-D parameter [E, out, in] (or [E, in, out])
        table[f"{block}.experts.*.{leaf}"] = f"moe.experts.{kind}"  # nn.Linear per expert
        if shared is not None:
            table[f"{block}.{shared}.{leaf}"] = f"moe.shared.{kind}"
        if dense_mlp:
            table[f"{block}.{leaf}"] = f"mlp.{kind}"
    table[f"{block}.{router}.weight"] = "moe.router"
    table[f"{block}.{router}"] = "moe.router"
    if shared_gate is not None:
        table[f"{block}.{shared_gate}"] = "moe.shared_gate"
    return table


# model_type → {path relative to the transformer block: role}
FAMILY_TABLES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE, "gemma3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE, "olmo2": _LLAMA_LIKE, "olmo3": _LLAMA_LIKE, "granite": _LLAMA_LIKE, "smollm3": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE, "cohere2": _LLAMA_LIKE,
    "mixtral": _moe(_LLAMA_ATTN) | _moe(_LLAMA_ATTN, block="block_sparse_moe"),
    "qwen2_moe": _moe(_LLAMA_ATTN, shared="shared_expert", shared_gate="shared_expert_gate", dense_mlp=True),
    "qwen3_moe": _moe(_LLAMA_ATTN, dense_mlp=True),
    "olmoe": _moe(_LLAMA_ATTN),
    "gpt_oss": _moe(_LLAMA_ATTN, router="router"),
    "deepseek_v2": _moe(_MLA_ATTN, shared="shared_experts", dense_mlp=True),
    "deepseek_v3": _moe(_MLA_ATTN, shared="shared_experts", dense_mlp=True),
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
    "q_a_proj": "attn.q_a", "q_b_proj": "attn.q_b", "kv_a_proj_with_mqa": "attn.kv_a", "kv_b_proj": "attn.kv_b",
    "o_proj": "attn.o", "out_lin": "attn.o",
    "gate_proj": "mlp.gate", "w1": "mlp.gate", "wi_0": "mlp.gate",
    "up_proj": "mlp.up", "c_fc": "mlp.up", "fc1": "mlp.up", "fc_in": "mlp.up", "dense_h_to_4h": "mlp.up",
    "w3": "mlp.up", "wi_1": "mlp.up", "wi": "mlp.up",
    "down_proj": "mlp.down", "fc2": "mlp.down", "fc_out": "mlp.down", "dense_4h_to_h": "mlp.down",
    "w2": "mlp.down",
    "gate_up_proj": "mlp.gate_up",
}
# (role under an attention parent, role under an MLP parent); None: no role there (an SSM mixer's out_proj)
_AMBIGUOUS_LEAVES: dict[str, tuple[str, str | None]] = {
    "c_proj": ("attn.o", "mlp.down"), "dense": ("attn.o", "mlp.down"), "wo": ("attn.o", "mlp.down"),
    "proj": ("attn.o", "mlp.down"), "out_proj": ("attn.o", None)}
_ATTN_PARENT = re.compile(r"attn|attention", re.IGNORECASE)


def under_attention(path: str) -> bool:
    """Whether a module or parameter path sits inside an attention module (by its parents' names)."""
    return bool(_ATTN_PARENT.search(path.rpartition(".")[0]))
_MLP_PARENT = re.compile(r"mlp|ffn|feed_forward|feedforward|moe", re.IGNORECASE)
_SHARED_PARENT = re.compile(r"shared_experts?$|shared_mlp$", re.IGNORECASE)
_ROUTER_LEAVES = ("gate", "router", "wg")
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")


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


def parameter_shape(owner: nn.Module, param) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a parameter, as PEFT's ``ParamWrapper`` reads it: a 2-D weight is
    [out, in]; a 3-D expert stack is [E, out, in], or [E, in, out] when its module says ``is_transposed``
    (gpt-oss)."""
    shape = tuple(param.shape)
    if len(shape) == 2:
        return 1, int(shape[1]), int(shape[0])
    experts, first, second = (int(d) for d in shape)
    if getattr(owner, "is_transposed", False):
        return experts, first, second
    return experts, second, first


@dataclass(frozen=True)
class AdaptableModule:
    """One site that can carry an adapter: where it is (layer, role), its exact path and its shape per expert.

    ``path`` is a module path (a linear), a parameter path (``parameter=True``: PEFT ``target_parameters``), or,
    for per-expert linears, the expert linears' common path with ``*`` for the index (their paths are in
    ``expert_paths``). ``experts`` > 1 means one LoRA pair of the site's rank per expert.
    """

    layer: int | None  # None for the head
    role: str
    path: str
    in_features: int
    out_features: int
    conv1d: bool = False
    experts: int = 1
    parameter: bool = False
    expert_paths: tuple[str, ...] = ()

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of a rank-``rank`` adapter here (every expert counted)."""
        return self.experts * lora_params(rank, self.in_features, self.out_features)

    @property
    def module_targets(self) -> tuple[str, ...]:
        """PEFT ``target_modules`` entries of this site."""
        if self.parameter:
            return ()
        return self.expert_paths or (self.path,)

    @property
    def weight_paths(self) -> tuple[str, ...]:
        """The base weights this site adapts (a linear's ``.weight``, the parameter itself, each expert's)."""
        if self.parameter:
            return (self.path,)
        return tuple(f"{p}.weight" for p in self.module_targets)


@dataclass
class ArchitectureMap:
    """Every adaptable site of a model, by (layer, role); every weight matrix in the blocks without a role."""

    family: str
    num_layers: int
    blocks_path: str
    sites: dict[tuple[int, str], AdaptableModule]
    head: AdaptableModule | None
    heuristic: bool = False
    unassigned: list[str] = field(default_factory=list)  # module (linear) or parameter paths, with no role
    linear_paths: list[str] = field(default_factory=list)  # every adaptable linear in the model, in order
    site_order: list[str] = field(default_factory=list)  # every site path in model order (plans are sorted by it)
    total_params: int = 0
    active_params: int | None = None  # per token, for MoE (experts not routed to excluded); None when dense

    def roles_present(self) -> list[str]:
        present = {role for (_, role) in self.sites}
        if self.head is not None:
            present.add(HEAD_ROLE)
        return [r for r in ROLES if r in present]

    def grid_roles(self) -> tuple[str, ...]:
        return grid_roles(self.roles_present())

    def site_by_path(self) -> dict[str, AdaptableModule]:
        by_path = {s.path: s for s in self.sites.values()}
        for site in self.sites.values():
            by_path.update({p: site for p in site.expert_paths})
        if self.head is not None:
            by_path[self.head.path] = self.head
        return by_path


def find_blocks(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks: the one whose length is the config's layer count
    (largest ModuleList otherwise)."""
    from torch import nn

    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)
                  and not _EXPERT_INDEX.search(f"{name}.0.")]
    if num_layers:
        exact = [(n, m) for n, m in candidates if len(m) == num_layers]
        if exact:
            # Shallowest path wins (a vision tower may have as many layers, deeper in the tree).
            return min(exact, key=lambda nm: nm[0].count("."))
    if not candidates:
        raise ValueError("no ModuleList of transformer blocks found")
    return max(candidates, key=lambda nm: len(nm[1]))


def _heuristic_role(rel: str, is_parameter: bool) -> str | None:
    """Role of a block-relative path (``experts.<i>.`` already written ``experts.*.``) by its names."""
    parts = rel.split(".")
    leaf, parent = parts[-1].lower(), ".".join(parts[:-1])
    parent_leaf = parts[-2].lower() if len(parts) > 1 else ""
    if is_parameter:
        if parent_leaf == "experts" and leaf in _MLP_LEAVES:  # fused expert stack
            return f"moe.experts.{_MLP_LEAVES[leaf]}"
        if leaf == "weight" and parent_leaf in _ROUTER_LEAVES and _MLP_PARENT.search(parent):
            return "moe.router"
        return None
    if ".experts.*." in f".{rel}" and leaf in _MLP_LEAVES:
        return f"moe.experts.{_MLP_LEAVES[leaf]}"
    if _SHARED_PARENT.search(parent_leaf) and leaf in _MLP_LEAVES:
        return f"moe.shared.{_MLP_LEAVES[leaf]}"
    if leaf == "shared_expert_gate":
        return "moe.shared_gate"
    if leaf in _ROUTER_LEAVES and (_MLP_PARENT.search(parent) or parent_leaf in _ROUTER_LEAVES):
        return "moe.router"
    if leaf in _LEAF_ROLES:
        return _LEAF_ROLES[leaf]
    if leaf in _AMBIGUOUS_LEAVES:
        attn_role, mlp_role = _AMBIGUOUS_LEAVES[leaf]
        if _ATTN_PARENT.search(parent):
            return attn_role
        if _MLP_PARENT.search(parent):
            return mlp_role  # may be None: an SSM mixer's out_proj stays unassigned, and is listed
    return None


def _experts_per_token(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _claim(claimed: dict[str, str], prefix: str, role: str, rel_pattern: str) -> None:
    """One path (pattern) per role and block; a second one is a table bug."""
    if role in claimed and claimed[role] != rel_pattern:
        raise ValueError(f"{prefix}.{rel_pattern} and {prefix}.{claimed[role]} both resolve to role {role}")
    claimed[role] = rel_pattern


def map_architecture(model: nn.Module, config=None) -> ArchitectureMap:
    """Assign every weight matrix inside the transformer blocks a role (or list it as unassigned); find the head.

    Raises ``ValueError`` only when two different paths of one block claim the same role (a table bug).
    """
    from loraplace.models import count_params

    config = config if config is not None else getattr(model, "config", None)
    family = getattr(config, "model_type", "unknown") if config is not None else "unknown"
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None) if text_config is not None else None
    blocks_path, blocks = find_blocks(model, num_layers)
    table = FAMILY_TABLES.get(family)

    def role_of(rel: str, is_parameter: bool) -> str | None:
        generic = _EXPERT_INDEX.sub(lambda m: f"{m.group(1)}experts.*.", rel)
        return table.get(generic) if table is not None else _heuristic_role(generic, is_parameter)

    sites: dict[tuple[int, str], AdaptableModule] = {}
    unassigned: list[str] = []
    site_order: list[str] = []
    expert_params = 0  # parameters of routed experts (all layers), for the active-parameter count
    for layer, block in enumerate(blocks):
        prefix = f"{blocks_path}.{layer}"
        modules = dict(block.named_modules())
        covered: set[str] = set()  # block-relative parameter names already accounted for (a site, or listed)
        expert_linears: dict[str, list[tuple[str, nn.Module]]] = {}  # role → [(rel, linear)] of per-expert linears
        claimed: dict[str, str] = {}  # role → the block-relative path (pattern) that claimed it

        for rel, module in modules.items():
            if not rel or not is_adaptable_linear(module):
                continue
            role = role_of(rel, False)
            if role is None:  # listed once, by module path (its weight and bias are not listed again)
                unassigned.append(f"{prefix}.{rel}")
                covered.update(f"{rel}.{name}" for name, _ in module.named_parameters())
                continue
            covered.update(f"{rel}.{name}" for name, _ in module.named_parameters())
            if _EXPERT_INDEX.search(f".{rel}"):
                expert_linears.setdefault(role, []).append((rel, module))
                continue
            _claim(claimed, prefix, role, rel)
            fan_in, fan_out, conv1d = linear_shape(module)
            sites[(layer, role)] = AdaptableModule(layer, role, f"{prefix}.{rel}", fan_in, fan_out, conv1d)
            site_order.append(f"{prefix}.{rel}")
        for role, linears in expert_linears.items():
            pattern = _EXPERT_INDEX.sub(lambda m: f"{m.group(1)}experts.*.", linears[0][0])
            _claim(claimed, prefix, role, pattern)
            fan_in, fan_out, conv1d = linear_shape(linears[0][1])
            sites[(layer, role)] = AdaptableModule(layer, role, f"{prefix}.{pattern}", fan_in, fan_out, conv1d,
                                                   experts=len(linears),
                                                   expert_paths=tuple(f"{prefix}.{rel}" for rel, _ in linears))
            site_order.append(f"{prefix}.{pattern}")
            if role in EXPERT_ROLES:
                expert_params += sum(p.numel() for _, lin in linears for p in lin.parameters())
        params = dict(block.named_parameters())
        for rel, param in params.items():
            if rel in covered:
                continue
            owner_rel = rel.rpartition(".")[0]
            owner = modules.get(owner_rel, block)
            role = role_of(rel, True) if param.ndim >= 2 else None
            if role is None:
                is_stack_bias = rel.endswith("_bias") and rel.removesuffix("_bias") in covered  # gpt-oss
                if param.ndim >= 2 and not is_stack_bias:
                    unassigned.append(f"{prefix}.{rel}")
                continue
            _claim(claimed, prefix, role, rel)
            covered.add(rel)
            experts, fan_in, fan_out = parameter_shape(owner, param)
            sites[(layer, role)] = AdaptableModule(layer, role, f"{prefix}.{rel}", fan_in, fan_out,
                                                   experts=experts, parameter=True)
            site_order.append(f"{prefix}.{rel}")
            if role in EXPERT_ROLES:
                bias = params.get(f"{rel}_bias")
                expert_params += param.numel() + (bias.numel() if bias is not None else 0)
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
    if head is not None:
        site_order.append(head.path)
    total = count_params(model)
    active = None
    experts_total = max((s.experts for s in sites.values() if s.role in EXPERT_ROLES), default=0)
    top_k = _experts_per_token(config) if config is not None else None
    if experts_total > 1 and top_k is not None:
        active = total - round(expert_params * (experts_total - min(top_k, experts_total)) / experts_total)
    return ArchitectureMap(family=family, num_layers=len(blocks), blocks_path=blocks_path, sites=sites, head=head,
                           heuristic=table is None, unassigned=unassigned, linear_paths=linear_paths,
                           site_order=site_order, total_params=total, active_params=active)
