"""Activation memory of one training step, estimated from a model's config (no torch, no weights).

What backward needs kept, per token and decoder layer, for a pre-norm block with gated MLP (llama-like; other
blocks are close): the block input and the post-attention residual (2H), both norm outputs (2H) and their fp32
upcasts (2H in fp32), q, k, v and their rotated copies (2·(q + 2·kv) where q = heads·head_dim, kv =
kv_heads·head_dim, less the unrotated v), the attention output (q), and the MLP's gate, up, activation and product
(4I; for MoE, I is what one token passes through: experts per token × expert width, plus shared experts). SDPA's
flash path keeps no T×T matrix, but packed rows carry a block-diagonal mask, which sends SDPA on the CPU down its
math path: then the masked scores and their softmax, [rows, heads, T, T] each, are kept too (counted always, so on
CUDA, whose memory-efficient kernel takes a mask without the matrix, the estimate is an upper bound). On top: the
logits at the labelled positions [labels, vocab] at the head's backward: the saved fp32 log-softmax, its fp32
gradient, the fp32 logits gradient and its compute-dtype copy.

With activation checkpointing per decoder layer, only each layer's input (H per token and layer) is kept, and one
layer's activations are rebuilt at a time in backward.

The estimate is checked against the measured peak on the builtin model in ``benchmarks/bench_memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOGIT_BYTES = 4 + 4 + 4 + 2  # per label × vocab entry at the head's backward (see above; the last in bf16)
ATTENTION_MATRIX_COPIES = 2  # masked scores and softmax output, kept on SDPA's math path (packed rows)


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer_token_bytes: int  # everything a layer keeps, per token
    layers: int
    tokens: int
    label_tokens: int
    vocab: int
    attention_matrix_bytes: int = 0  # per layer: [rows, heads, T, T] kept on SDPA's math path (packed rows)

    @property
    def logits_bytes(self) -> int:
        return LOGIT_BYTES * self.label_tokens * self.vocab

    @property
    def per_layer_bytes(self) -> int:
        return self.per_layer_token_bytes * self.tokens + self.attention_matrix_bytes

    @property
    def full_bytes(self) -> int:
        """Without checkpointing: every layer's activations for every token, plus the logits."""
        return self.per_layer_bytes * self.layers + self.logits_bytes

    def checkpointed_bytes(self, hidden_bytes_per_token: int) -> int:
        """With per-layer checkpointing: each layer's input, one layer rebuilt at a time, plus the logits."""
        return hidden_bytes_per_token * self.layers * self.tokens + self.per_layer_bytes + self.logits_bytes


def _get(config: Any, *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    q_width: int  # heads × head_dim
    kv_width: int  # kv heads × head_dim
    mlp_width: int  # what one token's MLP computes (MoE: experts per token × expert width + shared experts)
    layers: int
    vocab: int
    heads: int = 1

    @classmethod
    def of(cls, config: Any) -> BlockShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = _get(text, "hidden_size", "n_embd", "d_model")
        heads = _get(text, "num_attention_heads", "n_head")
        head_dim = _get(text, "head_dim", default=hidden // heads)
        kv_heads = _get(text, "num_key_value_heads", default=heads)
        dense = _get(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
        expert = _get(text, "moe_intermediate_size")
        per_token = _get(text, "num_experts_per_tok")
        if expert is not None and per_token is not None:
            shared = _get(text, "shared_expert_intermediate_size", default=0) or expert * _get(
                text, "n_shared_experts", default=0)
            mlp = per_token * expert + shared
        elif per_token is not None:  # mixtral/olmoe/gpt-oss: intermediate_size is one expert's width
            mlp = per_token * dense
        else:
            mlp = dense
        return cls(hidden, heads * head_dim, kv_heads * head_dim, mlp, _get(text, "num_hidden_layers", "n_layer"),
                   _get(text, "vocab_size"), heads)

    def per_layer_token_bytes(self, dtype_bytes: int) -> int:
        elements = 4 * self.hidden + 2 * self.q_width + 3 * self.kv_width + self.q_width + 4 * self.mlp_width
        return elements * dtype_bytes + 2 * self.hidden * 4  # + the norms' fp32 upcasts


def estimate_activations(config: Any, tokens: int, label_tokens: int, dtype_bytes: int,
                         packed_rows: tuple[int, int] | None = None,
                         loss_chunk: int | None = None) -> ActivationEstimate:
    """Activations of one forward/backward over ``tokens`` positions (``label_tokens`` of them labelled);
    ``packed_rows`` = (rows, width) of a packed micro-batch (its attention takes SDPA's math path); ``loss_chunk``:
    the head's logits exist for at most that many labels at a time (``train.loss_chunk``)."""
    if loss_chunk:
        label_tokens = min(label_tokens, loss_chunk)
    shape = BlockShape.of(config)
    matrix = 0
    if packed_rows is not None:
        rows, width = packed_rows
        matrix = ATTENTION_MATRIX_COPIES * rows * shape.heads * width * width * dtype_bytes
    return ActivationEstimate(shape.per_layer_token_bytes(dtype_bytes), shape.layers, tokens, label_tokens,
                              shape.vocab, matrix)


def hidden_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    return BlockShape.of(config).hidden * dtype_bytes


@dataclass(frozen=True)
class TrainingMemory:
    """What ``loraplace plan`` states for a batch × max_len: the bound every position labelled, one packed row per
    example of max_len (the most a micro-batch can hold)."""

    batch: int
    max_len: int
    activations_bytes: int
    checkpointed_bytes: int
    fixed_bytes: int  # base weights (compute dtype) + adapters, their gradients and AdamW moments

    def verdict(self, device_bytes: int) -> str:
        if self.fixed_bytes + self.activations_bytes <= device_bytes:
            return "fits"
        if self.fixed_bytes + self.checkpointed_bytes <= device_bytes:
            return "fits only with activation checkpointing (train.checkpointing: auto turns it on)"
        return "does not fit, even with activation checkpointing: lower batch (micro_batch) or max_len"


def training_memory(config: Any, batch: int, max_len: int, dtype_bytes: int, base_params: int,
                    trainable_params: int) -> TrainingMemory:
    tokens = batch * max_len
    est = estimate_activations(config, tokens, tokens, dtype_bytes, packed_rows=(batch, max_len))
    fixed = base_params * dtype_bytes + 16 * trainable_params  # fp32 weights + gradient + two AdamW moments
    return TrainingMemory(batch, max_len, est.full_bytes, est.checkpointed_bytes(hidden_bytes_per_token(
        config, dtype_bytes)), fixed)
