"""Named placements. The ``seed-*`` presets reproduce the GPT-2 medium seed study's three runs exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    spec: dict[str, Any]
    description: str


PRESETS: dict[str, Preset] = {
    "all": Preset({"roles": ["all"]}, "every attention and MLP projection, every layer (not the head)"),
    "attn": Preset({"roles": ["attn"]}, "every attention projection (q, k, v or fused qkv, o)"),
    "mlp": Preset({"roles": ["mlp"]}, "every MLP projection (gate, up, down or fused gate_up)"),
    "mlp.up": Preset({"roles": ["mlp.up"]}, "the MLP up projection only (the seed study's 'FF-only', GPT-2 c_fc)"),
    "attn.q+attn.v": Preset({"roles": ["attn.q", "attn.v"]}, "query and value only (the original LoRA paper)"),
    "top-half": Preset({"roles": ["all"], "layers": "top:50%"}, "all projections on the half nearest the head"),
    "bottom-half": Preset({"roles": ["all"], "layers": "bottom:50%"}, "all projections on the half nearest the input"),
    "all+head": Preset({"roles": ["all", "head"]}, "every projection plus the LM head"),
    "seed-all": Preset({"roles": ["attn.qkv", "attn.o", "mlp.up", "mlp.down"]},
                       "the seed study's all-linear run (GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj)"),
    "seed-attn-suffix": Preset(
        {"target_modules": ["c_attn", "c_proj"]},
        "the seed study's 'attention-only' list, kept to explain its bug: PEFT suffix matching of 'c_proj' "
        "also adapts the MLP's mlp.c_proj"),
}
