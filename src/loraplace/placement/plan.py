"""Resolve a placement spec against an architecture into an exact plan, and compile it to a PEFT LoraConfig.

A :class:`Plan` lists every adapted module by full path with its rank and alpha, so the LoraConfig it compiles to
leaves nothing to PEFT's suffix matching: ``target_modules`` are full paths and deviating ranks go to
``rank_pattern`` / ``alpha_pattern`` keyed by escaped full paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loraplace.errors import PlacementError
from loraplace.placement.presets import PRESETS
from loraplace.placement.roles import (
    HEAD_ROLE,
    ROLE_GROUPS,
    ROLES,
    AdaptableModule,
    ArchitectureMap,
    grid_roles,
    role_group_of,
    under_attention,
)
from loraplace.placement.selectors import SelectorError, select_layers
from loraplace.placement.spec import DEFAULT_FILL, DEFAULT_RANK, Fill, PlacementSpec, SiteGroup, Variant
from loraplace.records import Site, SiteMap, lora_params

ADAPTER_BYTES_PER_PARAM = 4  # adapters are trained and saved in fp32
# AdamW keeps two fp32 moments per trainable parameter, plus the fp32 gradient.
OPTIMIZER_BYTES_PER_PARAM = 8
GRAD_BYTES_PER_PARAM = 4


@dataclass(frozen=True)
class PlannedModule:
    """One adapted site: a linear, a parameter (``parameter``; PEFT ``target_parameters``) or the same linear of
    every expert (``expert_paths``). ``in_features``/``out_features`` are per expert; ``experts`` LoRA pairs."""

    path: str
    layer: int | None
    role: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    conv1d: bool = False
    experts: int = 1
    parameter: bool = False
    expert_paths: tuple[str, ...] = ()
    magnitude: bool = False  # DoRA: a trainable magnitude per output feature as well

    @property
    def params(self) -> int:
        return self.params_at(self.rank)

    @property
    def magnitude_params(self) -> int:
        """DoRA's magnitudes: one per output feature of each adapted linear (0 without DoRA), whatever the rank."""
        return self.experts * self.out_features if self.magnitude else 0

    def params_at(self, rank: int) -> int:
        """Trainable parameters of this site at ``rank``: every expert's LoRA pair, and DoRA's magnitudes."""
        return self.experts * lora_params(rank, self.in_features, self.out_features) + self.magnitude_params

    @property
    def module_targets(self) -> tuple[str, ...]:
        return () if self.parameter else (self.expert_paths or (self.path,))


@dataclass(frozen=True)
class Plan:
    """The exact set of adapted modules; immutable."""

    model: str
    family: str
    num_layers: int
    placement: dict[str, Any]
    modules: tuple[PlannedModule, ...]
    total_params: int
    roles_present: tuple[str, ...]
    dropout: float = 0.0
    budget: int | None = None
    warnings: tuple[str, ...] = ()
    heuristic: bool = False
    unassigned: tuple[str, ...] = field(default_factory=tuple)
    active_params: int | None = None  # MoE: base parameters one token passes through (None: dense)
    variant: Variant = "lora"
    eva_rho: float = 2.0

    @property
    def trainable_params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def rank_by_module(self) -> dict[str, int]:
        return {m.path: m.rank for m in self.modules}

    @property
    def budget_deviation(self) -> float | None:
        """(achieved − budget) / budget; ≤ 0 because the solved rank never exceeds the budget."""
        return None if self.budget is None else (self.trainable_params - self.budget) / self.budget

    @property
    def sites(self) -> dict[tuple[int | None, str], int]:
        """(layer, role) → rank."""
        return {(m.layer, m.role): m.rank for m in self.modules}

    def memory_estimate(self, base_bytes_per_param: int = 2) -> dict[str, int]:
        n = self.trainable_params
        return {
            "adapter_weights_bytes": n * ADAPTER_BYTES_PER_PARAM,
            "gradient_bytes": n * GRAD_BYTES_PER_PARAM,
            "optimizer_state_bytes": n * OPTIMIZER_BYTES_PER_PARAM,
            "trainable_total_bytes": n * (ADAPTER_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM + OPTIMIZER_BYTES_PER_PARAM),
            "base_weights_bytes": self.total_params * base_bytes_per_param,  # every expert is held, active or not
        }

    def adapter_size_bytes(self) -> int:
        """Size of adapter_model.safetensors: fp32 tensors plus the JSON header (≈ 2 entries per module)."""
        header = sum(2 * (len(path) + 90) for m in self.modules for path in (m.module_targets or (m.path,))) + 16
        return self.trainable_params * ADAPTER_BYTES_PER_PARAM + header

    def to_lora_config(self, **overrides):
        """An exact PEFT ``LoraConfig``: full-path ``target_modules`` (each expert's linear listed) and
        ``target_parameters`` (fused expert stacks, router weights), per-target rank/alpha patterns where they
        differ."""
        from peft import LoraConfig

        ranks = Counter(m.rank for m in self.modules)
        base_rank = ranks.most_common(1)[0][0]
        alphas = Counter(m.alpha for m in self.modules if m.rank == base_rank)
        base_alpha = alphas.most_common(1)[0][0]

        renamed = peft_renamed_leaves(self.family)

        def targets(m: PlannedModule) -> list[tuple[bool, str]]:
            """(is a parameter target, name) of every PEFT target of ``m``. A linear PEFT would rename (see
            :func:`peft_renamed_leaves`) is targeted through its weight parameter: the same LoRA, untouched."""
            if m.parameter:
                return [(True, m.path)]
            return [(True, f"{t}.weight") if t.rpartition(".")[2] in renamed else (False, t) for t in m.module_targets]

        # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name) against module paths and parameter
        # paths alike: escape so a path is literal.
        rank_pattern = {re.escape(t): m.rank for m in self.modules if m.rank != base_rank for _, t in targets(m)}
        alpha_pattern = {re.escape(t): m.alpha for m in self.modules if m.alpha != base_alpha for _, t in targets(m)}
        parameters = [t for m in self.modules for is_param, t in targets(m) if is_param]
        kwargs = dict(
            r=base_rank,
            lora_alpha=base_alpha,
            target_modules=[t for m in self.modules for is_param, t in targets(m) if not is_param],
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            lora_dropout=self.dropout,
            bias="none",
            task_type="CAUSAL_LM",
            # GPT-2's Conv1D stores weights (in, out); PEFT still flips it per layer for nn.Linear targets.
            fan_in_fan_out=any(m.conv1d for m in self.modules),
        )
        if parameters:
            kwargs["target_parameters"] = parameters
        if self.variant == "rslora":
            kwargs["use_rslora"] = True
        elif self.variant == "dora":
            kwargs["use_dora"] = True
        elif self.variant == "pissa":
            kwargs["init_lora_weights"] = "pissa"
        elif self.variant == "eva":
            from peft import EvaConfig

            kwargs["init_lora_weights"] = "eva"
            kwargs["eva_config"] = EvaConfig(rho=self.eva_rho)
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    def grid_roles(self) -> tuple[str, ...]:
        return grid_roles(self.roles_present)

    def check_size(self, force: bool = False) -> None:
        """Refuse adapters larger than the base model itself (a rank far above the layer widths), unless forced."""
        if self.total_params and self.trainable_params > self.total_params and not force:
            raise PlacementError(f"the adapters would have {self.trainable_params:,} trainable parameters, "
                                 f"{self.trainable_percent:,.0f}% of the {self.total_params:,}-parameter base model",
                                 "lower the rank (a rank ≥ the layer width buys nothing), or pass --force")

    def site_map(self) -> SiteMap:
        """Where the adapters are, as the typed record trials and stores keep."""
        return SiteMap(num_layers=self.num_layers, roles=self.roles_present,
                       sites=tuple(Site(layer=m.layer, role=m.role, rank=m.rank) for m in self.modules))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.family,
            "num_layers": self.num_layers,
            "roles_present": list(self.roles_present),
            "placement": self.placement,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": round(self.trainable_percent, 6),
            "budget": self.budget,
            "budget_deviation": self.budget_deviation,
            "modules": [m.path for m in self.modules],
            "rank_by_module": self.rank_by_module,
            "sites": [
                {"layer": m.layer, "role": m.role, "path": m.path, "rank": m.rank, "alpha": m.alpha,
                 "in_features": m.in_features, "out_features": m.out_features, "experts": m.experts,
                 "target": "parameter" if m.parameter else "modules", "params": m.params}
                for m in self.modules
            ],
            "adapter_size_bytes": self.adapter_size_bytes(),
            "memory_estimate": self.memory_estimate(),
            "warnings": list(self.warnings),
            "heuristic_roles": self.heuristic,
            "unassigned": list(self.unassigned),
            "active_params": self.active_params,
        }


def resulting_plan(peft_model, plan: Plan) -> Plan:
    """The inverse of :meth:`Plan.to_lora_config`: the plan as PEFT built it, each site's rank and alpha read back
    from its LoRA layer. EVA moves rank between sites and may drop a site to rank 0 (the result says so in its
    warnings); for every other variant this is ``plan`` itself."""
    if plan.variant != "eva":
        return plan
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and "default" in r:
            path = name.removeprefix("base_model.model.")
            ranks[path], alphas[path] = int(r["default"]), float(module.lora_alpha["default"])
    return rebuilt_plan(plan, ranks, alphas)


def rebuilt_plan(plan: Plan, ranks: dict[str, int], alphas: dict[str, float]) -> Plan:
    """``plan`` with the ranks and alphas an EVA init chose (site path → value; a site missing or at rank 0 was
    dropped), its warnings saying so — the same plan whether read back from the model (:func:`resulting_plan`) or
    from a saved :class:`~loraplace.records.BuiltRanks`."""
    modules = tuple(dataclasses.replace(m, rank=ranks[m.path], alpha=alphas[m.path])
                    for m in plan.modules if ranks.get(m.path, 0) > 0)
    if modules == plan.modules and any(w.startswith("eva redistributed") for w in plan.warnings):
        return plan  # already the plan PEFT built, re-injected as it is
    dropped = [m.path for m in plan.modules if ranks.get(m.path, 0) == 0]
    note = (f"eva redistributed ranks (rho {plan.eva_rho:g}): {plan.trainable_params:,} → "
            f"{sum(m.params for m in modules):,} trainable parameters"
            + (f"; {len(dropped)} site(s) dropped to rank 0, e.g. {dropped[0]}" if dropped else ""))
    return dataclasses.replace(plan, modules=modules, warnings=plan.warnings + (note,))


def peft_renamed_leaves(family: str) -> frozenset[str]:
    """Module names that PEFT rewrites in ``target_modules`` of this family whenever it injects or loads an adapter.

    PEFT (≥ 0.18 with transformers 5) converts adapter configs written for transformers 4 MoE layouts: a target
    ending in ``.gate_proj``/``.up_proj``/``.down_proj`` (or ``.w1``/``.w3``/``.w2``, ``.gate``) becomes the fused
    expert *parameter* ``gate_up_proj``/``down_proj``/``gate.weight``. It does so for fully qualified paths too,
    so a dense-layer or shared-expert MLP of DeepSeek-V3 (and kin) would silently turn into a second adapter on
    the experts, and a saved adapter would not load back (huggingface/peft#3711). Such linears are targeted
    through their weight parameter instead (``target_parameters``), which that conversion leaves alone: the same
    LoRA pair, the same count, and a plain ``PeftModel.from_pretrained`` loads it.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a PEFT or transformers without that conversion: nothing is renamed
        return frozenset()
    base = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(family)
    if base is None or get_checkpoint_conversion_mapping(family) is None:
        return frozenset()
    return frozenset(getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(base, {}))


# --------------------------------------------------------------------------------------------- resolution


def _expand_roles(names: list[str], arch: ArchitectureMap, problems: list[str]) -> dict[str, bool]:
    """Role names/groups → {role present in this architecture: named explicitly}. A named role must exist at every
    selected layer; a group's roles are taken where each layer has them (a model with dense and MoE layers has
    mlp.* on some and moe.* on others). Every problem is appended, none raised."""
    present = set(arch.roles_present())
    out: dict[str, bool] = {}
    for name in names:
        if name in ROLE_GROUPS:
            expanded = [r for r in ROLE_GROUPS[name] if r in present]
            if not expanded:
                problems.append(f"role group {name!r} matches nothing in {arch.family}")
            for role in expanded:
                out.setdefault(role, False)
            continue
        if name not in ROLES:
            close = difflib.get_close_matches(name, list(ROLES) + list(ROLE_GROUPS), n=1)
            problems.append(f"unknown role {name!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                           f"; roles: {', '.join(ROLES)}; groups: "
                                                           f"{', '.join(ROLE_GROUPS)}"))
            continue
        if name not in present:
            problems.append(_absent_role_message(name, arch, present))
            continue
        out[name] = True
    return out


def _unassigned_for(names: list[str], arch: ArchitectureMap) -> list[str]:
    """The unassigned weights a role group could mean: ``all`` every one; ``attn`` those under an attention
    module; ``mlp`` / ``moe*`` the others. Named roles are exact and never mean an unassigned weight."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out += arch.unassigned
        elif name == "attn":
            out += [p for p in arch.unassigned if under_attention(p)]
        elif name in ROLE_GROUPS:
            out += [p for p in arch.unassigned if not under_attention(p)]
    return list(dict.fromkeys(out))


def _absent_role_message(role: str, arch: ArchitectureMap, present: set[str]) -> str:
    available = ", ".join(r for r in ROLES if r in present)
    if role in ("attn.q", "attn.k", "attn.v") and "attn.qkv" in present:
        return (f"{arch.family} fuses q, k and v into one projection: role {role!r} does not exist there; "
                f"use 'attn.qkv' (roles here: {available})")
    if role == "attn.qkv" and {"attn.q", "attn.k", "attn.v"} & present:
        return f"{arch.family} has separate attn.q/attn.k/attn.v, no fused 'attn.qkv' (roles here: {available})"
    if role.startswith("mlp.") and any(r.startswith("moe.") for r in present):
        return (f"{arch.family} has mixture-of-experts MLPs: {role!r} does not exist there; use "
                f"'moe.experts.*' roles, 'moe.experts' or 'mlp' (= experts + shared experts) (roles here: {available})")
    if role.startswith("moe.") and not any(r.startswith("moe.") for r in present):
        return f"{arch.family} has no mixture-of-experts layers (roles here: {available})"
    if role in ("mlp.gate", "mlp.up") and "mlp.gate_up" in present:
        return (f"{arch.family} fuses gate and up into one projection: role {role!r} does not exist there; "
                f"use 'mlp.gate_up' (roles here: {available})")
    if role == "mlp.gate_up" and {"mlp.gate", "mlp.up"} & present:
        return f"{arch.family} has separate mlp.gate/mlp.up, no fused 'mlp.gate_up' (roles here: {available})"
    if role == HEAD_ROLE:
        return f"{arch.family} has no adaptable linear LM head"
    return f"{arch.family} has no {role!r} projection (roles here: {available})"


def _site_rank(role: str, group: SiteGroup | None, spec: PlacementSpec, rank: int | None) -> int | None:
    if group is not None and group.rank is not None:
        return group.rank
    if spec.ranks:  # the role itself, then its groups, most specific first
        for key in (role, *[g for g, members in ROLE_GROUPS.items() if role in members]):
            if key in spec.ranks:
                return spec.ranks[key]
    return rank


def _unused_rank_keys(spec: PlacementSpec, picked: list[tuple[AdaptableModule, SiteGroup | None]],
                      arch: ArchitectureMap, rank: int | None) -> list[str]:
    """Per-role ranks and a top-level rank must each set the rank of at least one selected site."""
    problems = []
    for key in spec.ranks or {}:
        if key not in ROLES and key not in ROLE_GROUPS:
            close = difflib.get_close_matches(key, list(ROLES) + list(ROLE_GROUPS), n=1)
            problems.append(f"ranks.{key}: unknown role" + (f"; did you mean {close[0]!r}?" if close else ""))
            continue
        members = ROLE_GROUPS.get(key, (key,))
        placed = [(site, group) for site, group in picked if site.role in members]
        if not placed:
            problems.append(f"ranks.{key}: the placement adapts no {key!r} site, so this rank would do nothing")
        elif all(group is not None and group.rank is not None for _, group in placed):
            problems.append(f"ranks.{key}: every {key!r} site already has its group's rank, so this rank would do "
                            "nothing; give the rank in one place")
    if spec.rank is not None and picked and all(
            _site_rank(site.role, group, spec, None) is not None for site, group in picked):
        problems.append(f"rank {spec.rank}: every site already has a per-group or per-role rank, so this rank would "
                        "do nothing")
    return problems


def _preset_spec(spec: PlacementSpec) -> PlacementSpec:
    if spec.preset is None:
        return spec
    preset = PRESETS.get(spec.preset)
    if preset is None:
        close = difflib.get_close_matches(spec.preset, list(PRESETS), n=1)
        raise PlacementError(f"unknown preset {spec.preset!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                             f"presets: {', '.join(PRESETS)}")
    data = spec.model_dump(exclude_none=True, exclude_defaults=True)
    data.pop("preset")
    return PlacementSpec.model_validate({**preset.spec, **data})


def _select(spec: PlacementSpec, arch: ArchitectureMap, problems: list[str],
            warnings: list[str]) -> list[tuple[AdaptableModule, SiteGroup | None]]:
    """Every selected site with the group that selected it; a site selected twice is a problem. A named role
    missing at layers the user selected is a problem; with the default ``layers: all`` it means "wherever the
    role exists" (a router on the MoE layers of a model whose first layers are dense), and the plan says so."""
    groups = spec.groups if spec.groups is not None else [SiteGroup(roles=spec.roles or [], layers=spec.layers)]
    chosen: dict[str, tuple[AdaptableModule, SiteGroup | None]] = {}
    for gi, group in enumerate(groups):
        label = f"groups[{gi}]" if spec.groups is not None else "placement"
        roles = _expand_roles(group.roles, arch, problems)
        layer_roles = [r for r in roles if r != HEAD_ROLE]
        if not spec.allow_unassigned:
            hidden = _unassigned_for(group.roles, arch)
            if hidden:
                problems.append(_unassigned_message(group.roles, hidden, arch))
        layers: list[int] = []
        if layer_roles:
            try:
                layers = select_layers(group.layers, arch.num_layers)
            except SelectorError as exc:
                problems.append(f"{label}.layers: {exc}")
        picked: list[AdaptableModule] = []
        for role in layer_roles:
            missing = [layer for layer in layers if (layer, role) not in arch.sites]
            if missing and roles[role]:
                where = f"role {role!r} is absent at layers {missing}" + (
                    " (dense layers: their MLP is mlp.*)" if role.startswith("moe.") else "")
                if group.layers == "all":
                    warnings.append(f"{label}: {where}; it is adapted where it exists")
                else:
                    problems.append(f"{label}: {where}")
            picked.extend(arch.sites[(layer, role)] for layer in layers if (layer, role) in arch.sites)
        if layers and layer_roles and not any((layer, r) in arch.sites for layer in layers for r in layer_roles):
            problems.append(f"{label}: {'+'.join(group.roles)} has no site in the selected layers {layers}")
        if HEAD_ROLE in roles and arch.head is not None:
            picked.append(arch.head)
        for site in picked:
            if site.path in chosen and chosen[site.path][1] is not group:
                problems.append(f"{label}: {site.path} ({site.role}, layer {site.layer}) is already selected by "
                                "another group; a site may belong to one group only")
            chosen[site.path] = (site, group if spec.groups is not None else None)
    return list(chosen.values())


def _unassigned_message(names: list[str], hidden: list[str], arch: ArchitectureMap) -> str:
    shown = ", ".join(hidden[:6]) + (f" … ({len(hidden)} in all)" if len(hidden) > 6 else "")
    return (f"{'+'.join(names)} would silently leave out {len(hidden)} weight(s) of the {arch.family!r} blocks "
            f"that no role claims: {shown}. Extend the role table (loraplace.placement.roles.FAMILY_TABLES"
            f"[{arch.family!r}]) or open an issue with `print(model)`; to adapt only what has a role, pass "
            "--allow-unassigned (allow_unassigned: true in a placement)")


def spread_order(n: int) -> list[int]:
    """0 … n−1 in van der Corput (bit-reversed) order: every prefix is spread evenly over the range, so "the first
    k" sites are k sites spread across layers and roles, not the k lowest ones."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def _exact_fill(sites: list[AdaptableModule], ranks: dict[str, int], budget: int) -> dict[str, int]:
    """Spend what a uniform rank leaves of ``budget``: rank r+1 on sites taken in :func:`spread_order` of the
    plan (model order), each while it still fits. Deterministic; lands within one site's rank-1 cost of the
    budget (a fraction of a percent for any budget of a few ranks)."""
    ordered = sorted(sites, key=lambda s: (s.layer if s.layer is not None else 1 << 30, s.path))
    left = budget - sum(site.lora_params(ranks[site.path]) for site in sites)
    out = dict(ranks)
    for i in spread_order(len(ordered)):
        cost = ordered[i].lora_params(1)
        if cost <= left:
            out[ordered[i].path] += 1
            left -= cost
    return out


def _suffix_match(spec: PlacementSpec, arch: ArchitectureMap, problems: list[str],
                  warnings: list[str]) -> list[AdaptableModule]:
    """PEFT's own rule for a list of names: ``name == t or name.endswith('.' + t)`` — reproduced on purpose."""
    by_path = arch.site_by_path()
    out: dict[str, AdaptableModule] = {}
    for target in spec.target_modules or []:
        matched = [p for p in arch.linear_paths if p == target or p.endswith("." + target)]
        if not matched:
            problems.append(f"target_modules entry {target!r} matches no linear module")
            continue
        roles_hit: dict[str, list[str]] = {}
        for path in matched:
            site = by_path.get(path)
            if site is None:
                problems.append(f"{path} (matched by {target!r}) has no role; it cannot be planned")
                continue
            if site.expert_paths and not set(site.expert_paths) <= set(matched):
                problems.append(f"{target!r} matches some experts of {site.path} but not all; adapt experts by "
                                f"role ({site.role})")
                continue
            roles_hit.setdefault(site.role, []).append(path)
            out[path] = site
        groups_hit = {role_group_of(r) for r in roles_hit}
        if len(roles_hit) > 1:
            detail = "; ".join(f"{role}: {len(paths)} modules, e.g. {paths[0]}" for role, paths in roles_hit.items())
            cross = " — it crosses attention and MLP" if {"attn", "mlp"} <= groups_hit else ""
            warnings.append(f"suffix match {target!r} adapts modules of {len(roles_hit)} roles{cross} ({detail}); "
                            "use roles for an exact placement")
    warnings.append("target_modules are suffix-matched like PEFT; prefer roles, which resolve to exact paths")
    return list(out.values())


def resolve_placement(arch: ArchitectureMap, spec: PlacementSpec | dict | str, *, model: str = "",
                      rank: int | None = None, budget: int | None = None, check_budget_fits: bool = True,
                      fill: Fill = DEFAULT_FILL) -> Plan:
    """The exact plan of ``spec`` on ``arch``. ``rank``/``budget`` come from the command line or a study's grid;
    the placement itself may say ``rank``, ``ranks``, per-group ranks or ``budget``. Every given key must take
    effect: a size given twice (rank and budget, a CLI rank and the placement's) or a per-role rank that no site
    uses is refused, never silently dropped. ``check_budget_fits=False`` skips "budget below rank 1" (a study
    checks structure up front; that is one trial's failure). ``fill`` says how a budget is spent (see
    :func:`_exact_fill`).

    Raises :class:`PlacementError` with every problem at once when anything is unmatched, empty or ambiguous.
    """
    from loraplace.placement.spec import parse_placement

    requested = parse_placement(spec)
    spec = _preset_spec(requested)
    if spec.auto is not None:
        raise PlacementError("auto placements are resolved by Session.plan: their probe needs model weights",
                             "plan them with loraplace plan MODEL --placement '{auto: ...}' (it loads the model)")
    problems: list[str] = []
    warnings: list[str] = []
    if rank is not None and rank <= 0:
        problems.append(f"rank must be a positive integer, got {rank}")
    if budget is not None and budget <= 0:
        problems.append(f"budget must be a positive integer, got {budget}")
    if rank is not None and budget is not None:
        problems.append(f"rank {rank} and budget {budget:,} both given: a budget solves the rank; give one")
    if rank is not None and spec.rank is not None and rank != spec.rank:
        problems.append(f"the placement says rank {spec.rank} and the command line or study says rank {rank}; "
                        "give the rank in one place")
    if budget is not None and spec.rank is not None:
        problems.append(f"the placement says rank {spec.rank} but a budget ({budget:,}) solves the rank; "
                        "remove one")
    if rank is not None and spec.budget is not None:
        problems.append(f"the placement has its own budget ({spec.budget:,}) and the command line or study gives "
                        f"rank {rank}; remove one")
    if budget is not None and spec.budget is not None and budget != spec.budget:
        problems.append(f"the placement has its own budget ({spec.budget:,}) and the command line or study gives "
                        f"budget {budget:,}; give the budget in one place")
    budget = budget if budget is not None else spec.budget
    rank = rank if rank is not None else spec.rank
    if arch.heuristic:
        warnings.append(f"unknown model family {arch.family!r}: roles assigned by a heuristic on module names")
    if arch.unassigned:
        names = [] if spec.target_modules is not None else [r for g in (spec.groups or [SiteGroup(
            roles=spec.roles or ["?"])]) for r in g.roles]
        hidden = _unassigned_for(names, arch)
        if spec.allow_unassigned and hidden:
            warnings.append(f"UNASSIGNED WEIGHTS NOT ADAPTED (--allow-unassigned): {len(hidden)} weight(s) in the "
                            f"blocks have no role, so {'+'.join(names)} does not cover them: "
                            + ", ".join(hidden[:6]) + (" …" if len(hidden) > 6 else ""))
        else:
            warnings.append(f"{len(arch.unassigned)} weight(s) in the blocks have no role: "
                            + ", ".join(arch.unassigned[:6]) + (" …" if len(arch.unassigned) > 6 else ""))

    if not arch.sites:
        raise PlacementError(f"no linear layer of the {arch.family!r} blocks could be given a role (unknown "
                             "architecture, and the name heuristic matched nothing)",
                             "open an issue with `print(model)`, or use target_modules with exact names")
    if spec.target_modules is not None:
        picked = [(site, None) for site in _suffix_match(spec, arch, problems, warnings)]
    else:
        picked = _select(spec, arch, problems, warnings)
    if not picked and not problems:
        problems.append("the placement selects no module")

    explicit = {site.path: _site_rank(site.role, group, spec, None) for site, group in picked}
    problems += _unused_rank_keys(spec, picked, arch, rank)
    if budget is not None:
        if any(r is not None for r in explicit.values()):
            problems.append("a budget solves one rank for every site; remove the per-role/per-group ranks")
        unit = sum(site.lora_params(1) for site, _ in picked)
        # DoRA trains a magnitude per output feature of each adapted linear, whatever the rank: paid first.
        fixed = sum(site.experts * site.out_features for site, _ in picked) if spec.variant == "dora" else 0
        solved = (budget - fixed) // unit if unit else 0
        if unit and solved < 1 and check_budget_fits:
            problems.append(f"budget {budget:,} is smaller than rank 1 allows for this placement "
                            f"({unit + fixed:,} trainable parameters"
                            + (f", {fixed:,} of them DoRA's magnitudes" if fixed else "") + ")")
        ranks = {site.path: max(solved, 1) for site, _ in picked}
        if fill == "exact" and solved >= 1:
            ranks = _exact_fill([site for site, _ in picked], ranks, budget - fixed)
    else:
        fallback = rank if rank is not None else DEFAULT_RANK
        ranks = {path: r if r is not None else fallback for path, r in explicit.items()}
    targets_parameters = [site.path for site, _ in picked if site.parameter]
    if spec.dropout and not targets_parameters:  # imports PEFT: only when a dropout is asked for
        renamed = peft_renamed_leaves(arch.family)
        targets_parameters = [t for site, _ in picked for t in site.module_targets if t.rpartition(".")[2] in renamed]
    if targets_parameters and spec.dropout:
        problems.append(f"dropout {spec.dropout}: PEFT cannot apply LoRA dropout to parameter targets "
                        f"({targets_parameters[0]}{' …' if len(targets_parameters) > 1 else ''}); use dropout 0")
    if spec.variant != "lora" and spec.variant != "rslora" and any(site.parameter for site, _ in picked):
        first = next(site.path for site, _ in picked if site.parameter)
        problems.append(f"variant {spec.variant}: PEFT supports only lora and rslora on parameter targets (fused "
                        f"experts, router weights: {first}); adapt linears only, or use variant lora")
    if problems:
        raise PlacementError("placement does not resolve:\n" + "\n".join(f"  - {p}" for p in problems),
                             "`loraplace plan MODEL --placement ...` shows the roles and layers of a model")

    if spec.variant == "eva":
        warnings.append(f"variant eva: these are the starting ranks; EVA moves rank between sites (up to "
                        f"{spec.eva_rho:g}× a site's rank, possibly to 0) from the training data, so the trial "
                        "records the sites, ranks and trainable count it ends with")
    oversized = [site.path for site, _ in picked if ranks[site.path] >= min(site.in_features, site.out_features)]
    if oversized:
        warnings.append(f"{len(oversized)} site(s) have rank ≥ min(d_in, d_out), e.g. {oversized[0]}: a rank that "
                        "high is a full-rank update with extra parameters (LoRA cannot use the excess)")
    modules = []
    for site, group in picked:
        r = ranks[site.path]
        alpha = group.alpha if group is not None and group.alpha is not None else spec.alpha
        modules.append(PlannedModule(site.path, site.layer, site.role, site.in_features, site.out_features, r,
                                     float(alpha if alpha is not None else spec.alpha_ratio * r), site.conv1d,
                                     experts=site.experts, parameter=site.parameter,
                                     expert_paths=site.expert_paths, magnitude=spec.variant == "dora"))
    order = {p: i for i, p in enumerate(arch.site_order)}
    modules.sort(key=lambda m: order.get(m.path, len(order)))
    return Plan(model=model, family=arch.family, num_layers=arch.num_layers,
                placement=requested.model_dump(exclude_none=True, exclude_defaults=True)
                | {"label": requested.describe()},
                modules=tuple(modules), total_params=arch.total_params, roles_present=tuple(arch.roles_present()),
                dropout=spec.dropout, budget=budget, warnings=tuple(warnings), heuristic=arch.heuristic,
                unassigned=tuple(arch.unassigned), active_params=arch.active_params, variant=spec.variant,
                eva_rho=spec.eva_rho)
