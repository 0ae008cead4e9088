"""Fused trials: several LoRA trials trained in one pass over one frozen base model (issue "Fused studies").

Each adapted site of the base model is wrapped once by a :class:`FusedLoRA` that holds the adapters of every
trial of the group adapting it. A step's batch holds each trial's own rows, contiguous per trial (its own data
order: seeds differ); the frozen base runs once over all rows, then each trial's ``scale · B(A(x_rows))`` is
added to its rows only, and rows of trials that do not adapt a site pass through unchanged. Shapes: the batch is
[R, W] — each trial's packed rows (``data.batching.make_batch``) padded to the widest trial's width W and stacked,
so attention (block-diagonal within a row) never mixes trials. The plain LoRA trials' terms at a site are batched
matmuls — each trial one batch entry of its own rows — so the step's kernel count does not grow with K (what a
launch-bound GPU step needs) and no sum ever mixes two trials' numbers. (On a CPU a loop over trials was
measured no slower — benchmarks/RESULTS.md — and fusion is off on a CPU by default; the one path CUDA needs is
kept, so the suite tests what a GPU runs.)

Per trial, everything else is its own: its loss (token-weighted mean over its labels; the step's objective is the
sum, so each trial's gradients are exactly its own — its adapters are disjoint parameters and no op mixes rows),
and its :class:`~loraplace.stepper.TrialStepper` — the one a trial alone has: AdamW state, LR schedule, gradient
clipping by its own norm, data order, step count (a trial that has finished leaves the group), a non-finite loss
(that trial fails at its step and leaves; the others go on), and a saved state to continue from or stop at.

Initial weights come from PEFT itself: each trial's adapters are injected with ``Session.adapter`` (its seed, its
plan) and copied out (``peft_io.read_sites``), so a fused trial starts exactly where the same trial alone starts.
Each member's result is a ``peft_io.TrainedAdapters``: the caller (``trial.run_trial(trained_in_group=…)``)
injects the plan PEFT built again and loads the trained weights (:func:`load_weights`) to save through the usual
path (and to evaluate what the fused eval did not cover: accuracy by generation) — the saved PEFT adapter is the
standalone one.

Scope now: LoRA, rsLoRA, DoRA and EVA (PEFT's init per trial, as alone) on ``nn.Linear`` / GPT-2 ``Conv1D`` sites
and on parameter sites (PEFT ``target_parameters``: fused expert stacks, router weights) of families whose
packing is verified. A mixture-of-experts block routes tokens across rows, so it is the one place the rows do not
share a pass: a :class:`FusedBlock` runs it once per trial's rows with that trial's adapters (its expert stacks as
W + ΔW in PEFT's layout; linears inside it, e.g. shared experts, see only that trial's rows). Each trial cuts its
steps into micro-batches, packs or pads its rows and evaluates every ``eval.every`` steps as it does alone: forward
j of a step stacks every trial's j-th micro-batch, and a periodic eval is one fused pass for the trials due.
Activation checkpointing is on for the whole group when a member asks for it (or ``auto`` finds the group's
forward too big). Not covered: compile (the row routing is Python), dropout (LoRA's or the base model's: a fused
trial would draw other masks than alone) and per-expert linear modules (``expert_paths``).
Anything else is refused up front (:func:`fusion_problems`): the study runner runs such a trial alone, says why in
its warnings, and fuses the rest of its group. After training, the surviving trials' validation and test losses are
computed fused as well (each eval batch repeated once per trial); generation-based accuracy runs per trial.
"""

from loraplace.fused.layers import FusedBlock, FusedLoRA
from loraplace.fused.loop import initial_weights, train_fused
from loraplace.fused.policy import (
    BNB_LAYERS,
    CUDA_FUSE_VERIFIED,
    FUSABLE_VARIANTS,
    FUSE_AUTO_MAX,
    FUSE_AUTO_MEMORY_SHARE,
    FusedMember,
    auto_group_size,
    base_dropout,
    check_fusable,
    fusion_problems,
)
from loraplace.peft_io import load_weights

__all__ = ["BNB_LAYERS", "CUDA_FUSE_VERIFIED", "FUSABLE_VARIANTS", "FUSE_AUTO_MAX", "FUSE_AUTO_MEMORY_SHARE",
           "FusedBlock", "FusedLoRA", "FusedMember", "auto_group_size", "base_dropout", "check_fusable",
           "fusion_problems", "initial_weights", "load_weights", "train_fused"]
