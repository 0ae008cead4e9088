"""Placement specs: *where* adapters go (roles × layers) and *how big* (rank, per-role ranks, or a budget).

The same schema is used inline on the command line, in a file, and under ``placements:`` in a study YAML::

    {roles: [attn, mlp.up], layers: "top:50%", rank: 16}
    {groups: [{roles: [attn], layers: "bottom:50%"}, {roles: [mlp], layers: "top:50%", rank: 8}]}
    {preset: seed-attn-suffix}
    {roles: [all], budget: 2_000_000}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from loraplace.errors import ConfigError
from loraplace.placement.selectors import LayerSelector
from loraplace.records import ProbeMeasure
from loraplace.specs import StrictModel, load_yaml, parse_yaml, validate

DEFAULT_RANK = 16  # a site's rank when neither the placement, the command line nor a study gives one
# How a budget is filled: "exact" gives rank r+1 to an evenly spread subset of the sites (every arm lands within
# about 1 % of the budget); "uniform" keeps one rank r everywhere (up to ~8 % below the budget).
Fill = Literal["exact", "uniform"]
DEFAULT_FILL: Fill = "exact"
# LoRA variants, each compiled to PEFT's own option and run through PEFT's code: rslora (scaling α/√r), dora
# (weight-decomposed: a trainable magnitude per output), pissa (A, B from the top singular vectors of W; W keeps
# the residual), eva (A from an SVD of the layer inputs on the training data; ranks redistributed across sites).
Variant = Literal["lora", "rslora", "dora", "pissa", "eva"]


def _split_roles(value: Any) -> Any:
    if isinstance(value, str):
        return [r.strip() for r in value.replace("+", ",").split(",") if r.strip()]
    return value


class SiteGroup(StrictModel):
    """Some roles on some layers, optionally with their own rank/alpha."""

    roles: list[str] = Field(min_length=1, description="roles or role groups (attn.q, mlp, …) of this group")
    layers: LayerSelector = Field(default="all", description="all, a range '0-11', a list [0, 2], top-half, "
                                  "bottom-half, or every-2")
    rank: int | None = Field(default=None, gt=0, description="this group's rank (default: the placement's)")
    alpha: float | None = Field(default=None, gt=0, description="this group's lora_alpha (default: ratio × rank)")

    _split = field_validator("roles", mode="before", json_schema_input_type=list[str] | str | None)(_split_roles)


AutoMethod = Literal["probe", "random", "nfn", "gradient", "warmup"]
# What `auto` does when it names no method: nfn, which tied the best preset on GSM8K where probe lost to it, and
# costs one forward pass (docs/probe.md, "Which method should auto use by default?"). It was probe until
# 2026-12-04; stored specs name their method, so no stored study changes meaning.
DEFAULT_AUTO_METHOD: AutoMethod = "nfn"
# Methods that adapt the k best-ranked units and fill the budget over them.
TOP_METHODS = ("nfn", "gradient", "warmup")
DEFAULT_TOP = 3  # PLoP adapts the three lowest-NFN module types
# method warmup: rank-r adapters on every linear, trained this many steps at this LR before the sites are scored.
# 10 steps of 40 is the fast phase's first quarter on GSM8K (docs/validation.md); 1e-3 sits inside every preset's
# stable range there (the selected LRs ran 1e-3 to 1e-2), so no site diverges and none stays at its init.
DEFAULT_WARMUP_STEPS = 10
DEFAULT_WARMUP_LR = 1e-3


def measure_of(method: AutoMethod) -> ProbeMeasure:
    """The probe an auto method reads: ``probe`` and ``gradient`` share the gradient probe (``random`` reads none
    and is priced like ``probe``)."""
    return method if method in ("nfn", "warmup") else "gradient"


class AutoPlacement(StrictModel):
    """Budget-aware automatic placement from site scores (see ``loraplace.probe``).

    ``probe`` (gradient energy per trainable parameter) and ``random`` (its control) allocate rank greedily over
    units until the budget is spent. ``nfn`` (PLoP's normalized feature norm, forward only: the *lowest* units),
    ``gradient`` (‖G_r‖_F itself, not divided by a unit's size: the *highest*) and ``warmup`` (adapters on every
    linear trained ``warmup_steps`` steps, then each site's relative update ‖ΔW·x‖ / ‖W·x‖: the *highest*) adapt
    the ``top`` best-ranked units and spend the budget over them at one rank (the study's ``fill``), by role
    unless ``granularity`` says otherwise. Without ``method``: ``DEFAULT_AUTO_METHOD``."""

    budget: int | None = Field(default=None, gt=0, description="trainable params (default: the study's/CLI budget)")
    method: AutoMethod = Field(
        default=DEFAULT_AUTO_METHOD, description=f"default {DEFAULT_AUTO_METHOD}. nfn: PLoP's normalized feature "
        "norm, the lowest `top` units; probe: gradient energy per parameter, greedy; random: seeded random sites (a "
        "control); gradient: ‖G_r‖_F, the highest `top` units; warmup: the relative update ‖ΔW·x‖/‖W·x‖ after a "
        "short all-linear warm-up, the highest `top` units")
    granularity: Literal["site", "role", "layer"] = Field(
        default="site", description="what is scored and chosen: a (layer, role) site, a role over all layers, or a "
        "layer (default: role for nfn, gradient and warmup; site for probe and random)")
    batches: int = Field(default=8, gt=0, description="batches of the training data the probe reads")
    batch: int = Field(default=8, gt=0, description="examples per probe batch")
    rank: int = Field(default=8, gt=0, description="rank at which sites are scored and priced")
    top: int | None = Field(default=None, gt=0, description=f"nfn, gradient, warmup: how many units are adapted "
                            f"(default {DEFAULT_TOP})")
    warmup_steps: int | None = Field(default=None, gt=0, description="warmup: optimizer steps of the all-linear "
                                     f"warm-up (default {DEFAULT_WARMUP_STEPS})")
    warmup_lr: float | None = Field(default=None, gt=0, description="warmup: the warm-up's constant learning rate "
                                    f"(default {DEFAULT_WARMUP_LR:g})")

    added_fields = frozenset({"top", "warmup_steps", "warmup_lr"})

    @property
    def measure(self) -> ProbeMeasure:
        """The probe a method reads (``ProbeScores.measure``)."""
        return measure_of(self.method)

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """nfn, gradient and warmup choose roles, three of them, unless told otherwise (PLoP's defaults)."""
        method = data.get("method", DEFAULT_AUTO_METHOD) if isinstance(data, dict) else None
        if method in TOP_METHODS:
            data = {"granularity": "role", "top": DEFAULT_TOP} | data
        if method == "warmup":
            data = {"warmup_steps": DEFAULT_WARMUP_STEPS, "warmup_lr": DEFAULT_WARMUP_LR} | data
        return data

    @field_validator("top")
    @classmethod
    def _top_for_top_methods(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("method") not in TOP_METHODS:
            raise ValueError(f"top applies to method {', '.join(TOP_METHODS)} (method "
                             f"{info.data.get('method')!r} allocates greedily over the budget)")
        return value

    @field_validator("warmup_steps", "warmup_lr")
    @classmethod
    def _for_warmup(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("method") != "warmup":
            raise ValueError(f"{info.field_name} applies to method warmup (method {info.data.get('method')!r} trains "
                             "nothing before it scores)")
        return value


_KINDS = ("preset", "roles", "groups", "target_modules", "auto")  # "auto" last: its validator checks the others


class PlacementSpec(StrictModel):
    preset: str | None = Field(default=None, description="a named placement: all, attn, mlp, mlp.up, q+v, "
                               "top-half, … (loraplace plan --help lists them)")
    roles: list[str] | None = Field(default=None, description="roles to adapt, e.g. [attn.q, attn.v] or 'mlp'")
    layers: LayerSelector = Field(default="all", description="with roles: all, a range '0-11', a list [0, 2], "
                                  "top-half, bottom-half, or every-2")
    groups: list[SiteGroup] | None = Field(default=None, description="several role × layer groups, each with "
                                           "its own rank/alpha")
    target_modules: list[str] | None = Field(
        default=None, description="raw PEFT-style names, suffix-matched exactly as PEFT does (flagged)")
    auto: AutoPlacement | None = Field(default=None, validate_default=True, description="let an importance "
                                       "probe choose the sites (method nfn by default)")
    rank: int | None = Field(default=None, gt=0, description="LoRA rank of every site (default 16; a study's "
                             "ranks/budget override it)")
    ranks: dict[str, int] | None = Field(default=None, description="per-role (or role group) ranks")
    alpha: float | None = Field(default=None, gt=0, description="lora_alpha for every site (default: ratio × rank)")
    alpha_ratio: float = Field(default=2.0, gt=0, description="lora_alpha = ratio × rank where alpha is not given")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout on each adapter's input")
    budget: int | None = Field(default=None, gt=0, description="trainable-parameter budget; the rank is solved")
    allow_unassigned: bool = Field(
        default=False, description="let a group (all, mlp, attn, moe) resolve although weights in the blocks have "
        "no role; they are not adapted, and the plan, the store and the report say so")
    variant: Variant = Field(default="lora", description="lora | rslora | dora | pissa | eva (PEFT's own code)")
    eva_rho: float = Field(default=2.0, ge=1.0, description="eva: a site's rank may grow to rho × r (1: no "
                           "redistribution)")

    added_fields = frozenset({"allow_unassigned", "variant", "eva_rho"})
    _split = field_validator("roles", mode="before", json_schema_input_type=list[str] | str | None)(_split_roles)

    @property
    def sets_own_size(self) -> bool:
        """It says its own rank(s) or budget: a study that gives no size takes the placement's own."""
        return (self.rank is not None or bool(self.ranks) or self.budget is not None
                or any(g.rank is not None for g in self.groups or ()))

    # Field validators (not one model validator), so these problems are reported together with type errors.
    @field_validator("layers")
    @classmethod
    def _layers_need_roles(cls, value, info: ValidationInfo):
        if value != "all" and "roles" in info.data and info.data["roles"] is None:
            raise ValueError("layers applies to roles; inside groups, give layers per group")
        return value

    @field_validator("auto")
    @classmethod
    def _one_kind(cls, value, info: ValidationInfo):
        kinds = [k for k in _KINDS[:-1] if info.data.get(k) is not None] + (["auto"] if value is not None else [])
        failed = [k for k in _KINDS[:-1] if k not in info.data]  # invalid: reported on its own
        if len(kinds) > 1 or (not kinds and not failed):
            raise ValueError(f"give exactly one of {', '.join(_KINDS)}"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        return value

    @field_validator("budget")
    @classmethod
    def _rank_or_budget(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("rank") is not None:
            raise ValueError("rank and budget are exclusive: a budget solves the rank")
        return value

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, value):
        if value is not None and any(r <= 0 for r in value.values()):
            raise ValueError("ranks must be positive")
        return value

    def describe(self) -> str:
        """A short human label (used in tables when the placement has no name)."""
        if self.preset:
            return self.preset
        if self.roles:
            label = "+".join(self.roles)
            return label if self.layers == "all" else f"{label}@{self.layers}"
        if self.groups:
            return " | ".join(f"{'+'.join(g.roles)}@{g.layers}" for g in self.groups)
        if self.target_modules:
            return "modules:" + ",".join(self.target_modules)
        if self.auto:
            return f"auto@{self.auto.budget}"
        return "?"


def parse_placement(value: str | dict | PlacementSpec, context: str = "invalid placement") -> PlacementSpec:
    """A placement from a spec object, a dict, a YAML/JSON string, a file path, a preset name or a role list."""
    from loraplace.placement.presets import PRESETS

    if isinstance(value, PlacementSpec):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigError(["empty placement"], context)
        path = Path(text)
        if not text.startswith(("{", "[")) and text not in PRESETS and path.is_dir():
            raise ConfigError([f"{text} is a directory, not a placement file"], context,
                              "give a YAML or JSON placement file, a preset (all, attn, mlp, …), roles or {…}")
        if (not text.startswith(("{", "[")) and text not in PRESETS and path.is_file()
                and path.suffix not in (".yaml", ".yml", ".json")):  # not "unknown role 'notes.txt'"
            raise ConfigError([f"{text} is a file, but a placement file is .yaml, .yml or .json"], context,
                              "give a YAML or JSON placement file, a preset (all, attn, mlp, …), roles or {…}")
        if not text.startswith(("{", "[")) and (path.suffix in (".yaml", ".yml", ".json") or "/" in text):
            if not path.is_file():  # it names a file: say the file is missing, not that it is an unknown role
                raise ConfigError([f"{text}: no such placement file"], context)
            data = load_yaml(path)
            value = data.get("placement", data) if isinstance(data, dict) else data
        elif text.startswith("{"):
            value = parse_yaml(text, "--placement")
        elif text in PRESETS:
            value = {"preset": text}
        else:
            value = {"roles": text}
    if not isinstance(value, dict):
        raise ConfigError([f"a placement is a mapping, got {type(value).__name__}"], context)
    return validate(PlacementSpec, value, context)
