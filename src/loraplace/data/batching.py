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

from collections.abc import Iterator
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


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of ``lengths`` packed first-fit decreasing into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def _rows(lengths: list[int], mode: str, capacity: int | None = None) -> list[list[int]]:
    if mode == "pad":
        return [[i] for i in range(len(lengths))]
    return _first_fit(lengths, capacity or max(lengths))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _assemble(data: TokenizedSet, index: list[int] | np.ndarray, rows: list[list[int]], mode: str, pad_id: int,
              shape: tuple[int, int]) -> Batch:
    """One [R, T] batch: ``rows[r]`` lists the positions in ``index`` of the examples laid side by side in row r;
    rows past ``len(rows)`` and columns past each row's examples are padding."""
    n_rows, width = shape
    input_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    position_ids = np.zeros((n_rows, width), dtype=np.int64)
    target_index: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    real = 0
    for r in range(n_rows):
        col = 0
        for k in rows[r] if r < len(rows) else ():
            i = index[k]
            n = len(data.ids[i])
            input_ids[r, col:col + n] = data.ids[i]
            position_ids[r, col:col + n] = np.arange(n)
            first = max(int(data.prompt_lens[i]), 1)  # token t is predicted by the hidden state at t-1
            t = np.arange(first, n)
            target_index.append(r * width + col + t - 1)
            targets.append(data.ids[i][first:].astype(np.int64))
            col += n
            real += n
        # Tail padding (and a whole empty row) gets its own restarting positions: a separate "sequence" nobody
        # attends to or learns from.
        position_ids[r, col:] = np.arange(width - col)
    tidx = torch.from_numpy(np.concatenate(target_index)) if target_index else torch.zeros(0, dtype=torch.int64)
    tgt = torch.from_numpy(np.concatenate(targets)) if targets else torch.zeros(0, dtype=torch.int64)
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(position_ids) if mode == "pack" else None, tidx, tgt,
                 real_tokens=real, label_tokens=int(tgt.numel()))


def make_batch(data: TokenizedSet, index: list[int] | np.ndarray, mode: str, pad_id: int,
               pad_to_multiple: int = 8) -> Batch:
    """The examples ``index`` as one batch: rows as wide as the longest example (pack: as its longest packed row)."""
    lengths = [len(data.ids[i]) for i in index]
    rows = _rows(lengths, mode)
    width = max(sum(lengths[k] for k in row) for row in rows)
    # Widths in multiples of 8: fewer distinct shapes (kernels, torch.compile).
    return _assemble(data, index, rows, mode, pad_id, (len(rows), _round_up(width, pad_to_multiple)))


# --------------------------------------------------------------------------------------------- static shapes
# torch.compile specialises on shapes; batches whose [R, T] changes every step recompile or run a generic kernel.
# With static shapes every forward of a run is one [R, T] block: T is the longest example of the run (rounded up
# to 8), R the most rows any of its micro-batches needs. A step's examples are packed first-fit decreasing into
# rows of T tokens, and the rows are dealt round-robin to the step's ``blocks`` micro-batches (so they carry similar
# token counts); unused rows are padding. The loss is still normalised by the step's label count, so the gradient
# is the one of the same examples batched any other way.


def eval_batches(data: TokenizedSet, batch: int, mode: str, pad_id: int) -> Iterator[Batch]:
    """An eval split's batches, the same every time: examples sorted by length (stable, so little padding), ``batch``
    at a time, packed or padded by ``mode``. Both eval paths read these: a trial's own (``evaluate.eval_loss``) and
    a fused group's (each batch repeated once per trial)."""
    order = np.argsort([len(x) for x in data.ids], kind="stable")
    for i in range(0, len(order), batch):
        yield make_batch(data, order[i:i + batch], mode, pad_id)


def _step_groups(data: TokenizedSet, index: list[int] | np.ndarray, mode: str, width: int,
                 blocks: int) -> list[list[list[int]]]:
    lengths = [len(data.ids[i]) for i in index]
    if mode == "pad":  # one example per row: contiguous chunks, like micro-batches of examples
        per = -(-len(lengths) // blocks)
        return [[[k] for k in range(b, min(b + per, len(lengths)))] for b in range(0, len(lengths), per)]
    rows = _first_fit(lengths, width)
    return [group for group in (rows[b::blocks] for b in range(blocks)) if group]


def static_shape(data: TokenizedSet, order: list[np.ndarray], mode: str, blocks: int,
                 pad_to_multiple: int = 8) -> tuple[int, int]:
    """(R, T) that holds every micro-batch of the run whose step indices are ``order``."""
    width = _round_up(max(len(data.ids[i]) for idx in order for i in idx), pad_to_multiple)
    rows = max(len(group) for idx in order for group in _step_groups(data, idx, mode, width, blocks))
    return rows, width


def static_batches(data: TokenizedSet, index: list[int] | np.ndarray, mode: str, pad_id: int,
                   shape: tuple[int, int], blocks: int) -> list[Batch]:
    """One step's examples as at most ``blocks`` batches, each exactly ``shape``."""
    groups = _step_groups(data, index, mode, shape[1], blocks)
    if max(len(g) for g in groups) > shape[0]:
        raise ValueError(f"a micro-batch needs {max(len(g) for g in groups)} rows; the static shape has {shape[0]}")
    return [_assemble(data, index, group, mode, pad_id, shape) for group in groups]
