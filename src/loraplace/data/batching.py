"""Micro-batches for causal-LM training: padded or packed rows, plus the flat indices of labelled positions.

Shapes: ``input_ids``/``position_ids`` are [R, T] (R rows of T tokens). ``target_index`` [N] holds flat indices
into the R*T hidden states that *predict* a label, ``targets`` [N] the label ids. The LM head then runs on N
rows only (prompt and pad positions never reach it — on SmolLM2 the head is ~21% of the FLOPs).

* ``pad``: one example per row, right-padded. Causal attention means a real token never sees a pad to its right,
  so no attention mask is needed and SDPA keeps its fast causal path.
* ``pack``: examples are first-fit-decreasing packed into rows as long as the longest example; position ids
  restart at 0 for each example, and transformers turns restarting position ids (with no attention mask) into a
  block-diagonal causal mask, so no token attends across examples (tested against unbatched losses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loraplace.data import TokenizedSet
from loraplace.models import causal_lm

# Families whose attention turns restarting position ids into a block-diagonal mask, verified by
# tests/data/test_batching.py against unbatched losses. OPT is not among them (it derives its own positions), and
# unknown families are padded, never packed, until verified.
PACKING_VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2",
                              "gpt_neox", "gemma3_text", "olmo2", "granite", "cohere", "smollm3", "mixtral",
                              "qwen2_moe", "qwen3_moe", "olmoe"})  # gpt_oss, deepseek_v3: the pack test fails; padded


def batching_mode(model, packing: bool) -> str:
    return "pack" if packing and getattr(causal_lm(model).config, "model_type", None) in PACKING_VERIFIED else "pad"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T] int64
    position_ids: torch.Tensor | None  # [R, T] int64 (pack) or None (pad)
    target_index: torch.Tensor  # [N] int64, flat index into R*T
    targets: torch.Tensor  # [N] int64
    real_tokens: int  # non-pad input tokens
    label_tokens: int  # N

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(self.input_ids.to(device, non_blocking=nb),
                     None if self.position_ids is None else self.position_ids.to(device, non_blocking=nb),
                     self.target_index.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     self.real_tokens, self.label_tokens)


def _rows(lengths: list[int], mode: str) -> list[list[int]]:
    if mode == "pad":
        return [[i] for i in range(len(lengths))]
    capacity = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # first-fit decreasing
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def make_batch(data: TokenizedSet, index: list[int] | np.ndarray, mode: str, pad_id: int,
               pad_to_multiple: int = 8) -> Batch:
    ids = [data.ids[i] for i in index]
    plens = [int(data.prompt_lens[i]) for i in index]
    lengths = [len(x) for x in ids]
    rows = _rows(lengths, mode)
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple  # fewer distinct shapes (kernels, torch.compile)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    target_index: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = lengths[i]
            input_ids[r, col:col + n] = ids[i]
            position_ids[r, col:col + n] = np.arange(n)
            first = max(plens[i], 1)  # token t is predicted by the hidden state at t-1
            t = np.arange(first, n)
            target_index.append(r * width + col + t - 1)
            targets.append(ids[i][first:].astype(np.int64))
            col += n
        # Tail padding gets its own restarting positions: a separate "sequence" nobody attends to or learns from.
        position_ids[r, col:] = np.arange(width - col)
    tidx = torch.from_numpy(np.concatenate(target_index))
    tgt = torch.from_numpy(np.concatenate(targets))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(position_ids) if mode == "pack" else None, tidx, tgt,
                 real_tokens=sum(lengths), label_tokens=int(tgt.numel()))
