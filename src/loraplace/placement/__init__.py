"""Placement language: roles × layer selectors × rank, resolved per architecture to exact module paths."""

from __future__ import annotations

from typing import Any

from loraplace.placement.plan import Plan, PlannedModule, rebuilt_plan, resolve_placement, resulting_plan
from loraplace.placement.presets import PRESETS
from loraplace.placement.roles import ROLE_GROUPS, ROLES, AdaptableModule, ArchitectureMap, map_architecture
from loraplace.placement.selectors import select_layers
from loraplace.placement.spec import DEFAULT_FILL, Fill, PlacementSpec, SiteGroup, parse_placement

__all__ = [
    "PRESETS", "ROLES", "ROLE_GROUPS", "AdaptableModule", "ArchitectureMap", "Plan", "PlacementSpec", "PlannedModule",
    "SiteGroup", "map_architecture", "parse_placement", "plan_for_model", "rebuilt_plan", "resolve_placement",
    "resulting_plan", "select_layers",
    "meta_architecture", "model_config_of",
]


def model_config_of(model_ref: str, model_config: dict[str, Any] | None = None, model_type: str | None = None):
    """The config of ``model_ref`` with overrides, or a default config of ``model_type`` (no hub needed)."""
    from loraplace import models

    if model_type is not None:
        return models.config_from_model_type(model_type, model_config)
    return models.load_config(model_ref, model_config)


def meta_architecture(model_ref: str, model_config: dict[str, Any] | None = None,
                      model_type: str | None = None, config=None) -> ArchitectureMap:
    """The architecture map of a model built on the meta device from its config: no weights, no memory.
    ``config``: one already loaded (then ``model_config``/``model_type`` are not read)."""
    from loraplace import models

    config = config if config is not None else model_config_of(model_ref, model_config, model_type)
    return map_architecture(models.meta_model(config), config)


def plan_for_model(model_ref: str, placement: Any, *, rank: int | None = None, budget: int | None = None,
                   model_config: dict[str, Any] | None = None, model_type: str | None = None,
                   fill: Fill = DEFAULT_FILL, config=None) -> Plan:
    """Dry-run plan: resolve ``placement`` on the meta-device model of ``model_ref`` (or of ``config``)."""
    arch = meta_architecture(model_ref, model_config, model_type, config)
    return resolve_placement(arch, placement, model=model_ref, rank=rank, budget=budget, fill=fill)
