"""Activation memory of one training step, estimated from a model's config (no torch, no weights).

What it estimates: the peak of the bytes held by live tensors during one forward + backward of a micro-batch,
above the weights — what a device's allocator must hold at once (CUDA's ``max_memory_allocated``; on a CPU, the
torch memory profiler's live bytes). Checked against that measurement on the builtin model by
``benchmarks/bench_memory.py`` (within 25 %; see benchmarks/RESULTS.md).

Per token and decoder layer, what backward needs kept, for a pre-norm block with gated MLP (llama-like; other
blocks are close): the block input and the post-attention residual (2H), both norm outputs (2H) and their fp32
upcasts (2H in fp32), q, k, v and their rotated copies (2·(q + 2·kv) where q = heads·head_dim, kv =
kv_heads·head_dim, less the unrotated v), the attention output (q), and the MLP's gate, up, activation and product
(4I; for MoE, I is what one token passes through: experts per token × expert width, plus shared experts). SDPA's
flash (CPU) and memory-efficient (CUDA) kernels take the packed rows' block-diagonal mask and keep no T×T matrix.

The head: logits exist only at labelled positions. At its backward the fp32 logits, the saved fp32 log-softmax and
the fp32 logits gradient are alive together (12 bytes per label × vocab entry; with ``loss_chunk`` for one chunk
only). Without checkpointing that lands on top of every layer's activations. With checkpointing per decoder layer
only each layer's input (H per token and layer) is kept, and backward holds either the head's logits (first) or
one rebuilt layer (then), whichever is larger.

What it does not model: the host allocator. On a CPU, glibc keeps freed heap pages, so a process's resident
memory (RSS) peaks well above the live bytes: on the builtin model, batch 8 × 256, 1.7–1.9× without
checkpointing and 1.0–1.2 GiB above the live bytes with it (benchmarks/RESULTS.md, 2026-11-24; a 1 MiB
``MALLOC_MMAP_THRESHOLD_`` takes it to within 1.7× of live even with checkpointing, at ~1.9× the step time, so it is
not set). ``train.checkpointing: auto`` allows ``CPU_RESIDENT_FACTOR`` × the estimate on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LOGIT_BYTES = 4 + 4 + 4  # per label × vocab entry at the head's backward: fp32 logits, log-softmax, gradient
# Resident memory of a CPU training process over its live tensor bytes without checkpointing (glibc's retained
# heap): 3,882 MiB RSS vs 2,299 MiB live on the builtin model (1.69×; 1.87× with loss_chunk 256), 2026-11-24.
CPU_RESIDENT_FACTOR = 2.0


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer_token_bytes: int  # everything a layer keeps, per token
    layers: int
    tokens: int
    label_tokens: int  # labels whose logits exist at once (one chunk's with loss_chunk)
    vocab: int

    @property
    def logits_bytes(self) -> int:
        return LOGIT_BYTES * self.label_tokens * self.vocab

    @property
    def per_layer_bytes(self) -> int:
        return self.per_layer_token_bytes * self.tokens

    @property
    def full_bytes(self) -> int:
        """Without checkpointing: every layer's activations for every token, plus the head's logits."""
        return self.per_layer_bytes * self.layers + self.logits_bytes

    def checkpointed_bytes(self, hidden_bytes_per_token: int) -> int:
        """With per-layer checkpointing: each layer's input, plus the head's logits or one rebuilt layer."""
        return hidden_bytes_per_token * self.layers * self.tokens + max(self.per_layer_bytes, self.logits_bytes)


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
                         loss_chunk: int | None = None) -> ActivationEstimate:
    """Activations of one forward/backward over ``tokens`` positions (``label_tokens`` of them labelled);
    ``loss_chunk``: the head's logits exist for at most that many labels at a time (``train.loss_chunk``)."""
    if loss_chunk:
        label_tokens = min(label_tokens, loss_chunk)
    shape = BlockShape.of(config)
    return ActivationEstimate(shape.per_layer_token_bytes(dtype_bytes), shape.layers, tokens, label_tokens,
                              shape.vocab)


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


QUANT_BLOCK = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level absmax bytes


def quantized_linear_bytes(in_features: int, out_features: int, quantize: str, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one linear's weight quantized ``quantize`` (its bias is not counted): nf4/fp4 —
    two weights a byte, an absmax per 64 (fp32; or uint8 plus a second-level fp32 absmax per 256 blocks, a 256-entry
    fp32 code and an fp32 offset with double quantization) and the 16-entry fp32 code; int8 (LLM.int8) — a byte a
    weight and an fp32 scale per output row."""
    n = in_features * out_features
    if quantize == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / QUANT_BLOCK)
    constants = (blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4) if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants + 4 * 16


def base_weight_bytes(arch, dtype_bytes: int, quantize: str = "none", double_quant: bool = True) -> int:
    """The frozen base's weights in memory: every parameter in the compute dtype, except — quantized — the blocks'
    linear weights (every expert's, when experts are separate linears), which bitsandbytes holds as
    :func:`quantized_linear_bytes`. Embeddings, norms, biases, the head and fused expert tensors stay in the
    compute dtype, as bitsandbytes leaves them."""
    total = arch.total_params * dtype_bytes
    if quantize == "none":
        return total
    for site in arch.sites.values():
        if site.parameter or site.layer is None:  # fused tensors and the head are not quantized
            continue
        n = site.experts * site.in_features * site.out_features
        total += site.experts * quantized_linear_bytes(site.in_features, site.out_features, quantize,
                                                       double_quant) - n * dtype_bytes
    return total


def training_memory(config: Any, batch: int, max_len: int, dtype_bytes: int, base_bytes: int,
                    trainable_params: int) -> TrainingMemory:
    """``base_bytes``: the frozen base's weights (:func:`base_weight_bytes`)."""
    tokens = batch * max_len
    est = estimate_activations(config, tokens, tokens, dtype_bytes)
    fixed = base_bytes + 16 * trainable_params  # fp32 weights + gradient + two AdamW moments
    return TrainingMemory(batch, max_len, est.full_bytes, est.checkpointed_bytes(hidden_bytes_per_token(
        config, dtype_bytes)), fixed)
