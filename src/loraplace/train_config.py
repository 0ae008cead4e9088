"""How a trial trains: :class:`TrainSpec`, the one home of every training default. No torch here, so the command
line and study loading can read these defaults without importing the training loop."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from loraplace.specs import StrictModel, bare_on_off

DEFAULT_STEPS = 20  # when neither steps nor epochs is given (the CLI and study YAML share this default)
# train.loss_chunk: auto on a CPU. 1.17× the tokens/s of the whole-logits loss on the builtin model (bf16,
# AVX512-BF16, batch 8 × 256) and 433 MiB less live memory (benchmarks/RESULTS.md, 2026-11-24). On CUDA the
# chunks' recomputed head is not measured yet, so auto keeps the whole loss there.
CPU_LOSS_CHUNK = 256
# Steps between host syncs on CUDA/MPS (TrainSpec.sync_every: None); a CPU syncs every step.
ACCELERATOR_SYNC_EVERY = 10


class TrainSpec(StrictModel):
    """How one trial trains. Every default here is *the* default: the CLI and the study YAML both use this spec."""

    steps: int | None = Field(default=None, gt=0, description=f"optimizer steps (default {DEFAULT_STEPS} when "
                                                               "epochs is not given)")
    epochs: float | None = Field(default=None, gt=0, description="passes over the training split instead of steps")
    batch: int = Field(default=8, gt=0, description="examples per optimizer step")
    micro_batch: int | None = Field(default=None, gt=0, description="examples per forward (default: batch)")
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate (AdamW)")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="learning-rate decay after the warm-up (to 0 at the last step; constant: none)")
    warmup: int = Field(default=0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's decoupled weight decay on the adapters")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the global gradient norm (None: off)")
    seed: int = Field(default=0, ge=0, description="adapter init and data order (NumPy's seeding takes no "
                      "negative seed)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    packing: bool = Field(default=True, description="pack examples into rows (block-diagonal attention)")
    compile: bool = Field(default=False, description="torch.compile the decoder (its first step compiles)")
    static_shapes: bool | None = Field(
        default=None, description="every forward one fixed [rows, width] block: each step packed first-fit into "
        "rows as wide as the run's longest example, as many rows as its fullest micro-batch needs, so "
        "torch.compile compiles once (None: on when compile is)")
    sync_every: int | None = Field(default=None, gt=0, description="steps between host syncs (losses read back); "
                                   "default 1 on a CPU, 10 on CUDA/MPS")
    base_dropout: Literal["keep", "off"] = Field(
        default="keep", description="the base model's own dropout while training (e.g. GPT-2 checkpoints' 0.1; LoRA's "
        "is the placement's dropout): keep it, or turn it off — needed to fuse such trials (execution.fuse)")
    checkpointing: Literal["off", "on", "auto"] = Field(
        default="auto", description="activation checkpointing per decoder layer; auto: on when the estimated "
        "activations of a micro-batch exceed 80 % of the memory the device has free (loraplace.memory)")

    loss_chunk: int | Literal["auto"] = Field(
        default="auto", description="LM head + loss over at most this many label positions at a time, each chunk "
        "recomputed in backward: the fp32 [labels, vocab] logits are never held whole. 0: all at once. auto: "
        f"{CPU_LOSS_CHUNK} on a CPU (measured faster there as well as leaner), all at once elsewhere")

    quantize: Literal["none", "nf4", "fp4", "int8"] = Field(
        default="none", description="load the frozen base quantized by bitsandbytes (QLoRA: nf4); the adapters "
        "train in fp32 on top, through PEFT's bitsandbytes LoRA layers. 4-bit compute dtype: the trial's precision")
    bnb_4bit_use_double_quant: bool = Field(
        default=True, description="nf4/fp4: quantize the quantization constants too (QLoRA's double quantization)")

    @property
    def base(self) -> tuple[str, bool]:
        """How the frozen base is loaded: (quantize, double quantization) — what a ``Session`` holds."""
        return self.quantize, self.bnb_4bit_use_double_quant

    added_fields = frozenset({"checkpointing", "loss_chunk", "static_shapes", "base_dropout", "quantize",
                              "bnb_4bit_use_double_quant"})

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any) -> Any:
        # Resolved here, so the stored spec (and the trial id) names the number of steps that actually ran.
        if isinstance(data, dict) and data.get("steps") is None and data.get("epochs") is None:
            return {**data, "steps": DEFAULT_STEPS}
        return data

    # Field validators (not one model validator): these are reported together with type errors of other fields.
    @field_validator("epochs")
    @classmethod
    def _steps_or_epochs(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("steps") is not None:
            raise ValueError("give steps or epochs, not both")
        return value

    @field_validator("warmup")
    @classmethod
    def _warmup_within_the_run(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if value and steps is not None and value >= steps:
            raise ValueError(f"warmup {value} is not below steps {steps}: the learning rate would never leave its "
                             "warm-up ramp (a few percent of the steps is usual)")
        return value

    @field_validator("micro_batch")
    @classmethod
    def _divides_batch(cls, value: int | None, info: ValidationInfo) -> int | None:
        batch = info.data.get("batch")
        if value is not None and batch is not None and batch % value:
            raise ValueError(f"batch {batch} is not a multiple of micro_batch {value}")
        return value

    @field_validator("checkpointing", "base_dropout", mode="before",  # YAML's bare on/off read as booleans
                     json_schema_input_type=str | bool)
    @classmethod
    def _yaml_on_off(cls, value: Any, info: ValidationInfo) -> Any:
        return bare_on_off(value, on="on" if info.field_name == "checkpointing" else "keep")

    @field_validator("loss_chunk", mode="before", json_schema_input_type=int | Literal["auto"] | None)
    @classmethod
    def _none_is_whole(cls, value: Any) -> Any:
        return 0 if value is None else value  # the setting's earlier spelling of "all at once"

    @field_validator("loss_chunk")
    @classmethod
    def _not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("loss_chunk is a number of label positions (0: all at once) or auto")
        return value

    def resolved_loss_chunk(self, device_type: str) -> int | None:
        """Label positions per chunk on this device type (cpu, cuda, mps); None: the whole loss at once."""
        if self.loss_chunk == "auto":
            return CPU_LOSS_CHUNK if device_type == "cpu" else None
        return self.loss_chunk or None

    def resolved_sync_every(self, device_type: str) -> int:
        """Steps between host syncs (losses read back, non-finite check) on this device type: the setting, else
        every step on a CPU (a sync costs nothing there) and every ACCELERATOR_SYNC_EVERY on a GPU (each one
        stalls the launch queue)."""
        if self.sync_every is not None:
            return self.sync_every
        return 1 if device_type == "cpu" else ACCELERATOR_SYNC_EVERY

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * math.ceil(n_examples / self.batch)))
