"""Our training loop, in plain view.

Per optimizer step: ``batch`` examples, split into micro-batches of ``micro_batch``; the loss is the
token-weighted mean over *all* label tokens of the step (sum of per-token losses / label count, the count known
on the host before the forward), so gradient accumulation gives the same gradient as one big batch.
Frozen base weights are stored in the compute dtype (bf16 on CUDA / bf16-capable CPUs) and adapters in fp32
under autocast: no per-step weight casts. Losses stay on the device and are read back every ``sync_every`` steps;
the first non-finite step is still reported exactly.
"""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Callable, Collection

import numpy as np
import torch
import torch.nn.functional as F

from loraplace.data import TokenizedSet
from loraplace.data.batching import Batch, batching_mode, make_batch, static_batches, static_shape
from loraplace.errors import ConfigError, TrialFailed
from loraplace.models import causal_lm
from loraplace.stepper import Continuation, TrainClock, TrainOutcome, TrialStepper, sync
from loraplace.train_config import TrainSpec

# --------------------------------------------------------------------------------------------- device & precision


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA, else MPS, else CPU; an explicit device must exist here (one clear error if not)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError([f"device {device!r}: not a device name"], "invalid device",
                          "use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device {device!r}: this machine (or this torch build) has no CUDA"], "invalid device",
                          "use device auto or cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError([f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"],
                          "invalid device")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                       and torch.backends.mps.is_available()):
        raise ConfigError([f"device {device!r}: MPS is not available here"], "invalid device", "use auto or cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError([f"device {device!r}: loraplace trains on cpu, cuda or mps"], "invalid device")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or this process's peak resident set (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: "5" resets the peak RSS (VmHWM) of this process
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since :func:`reset_peak_memory`, MiB: CUDA's peak allocated, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- loss


def loss_sum(model, batch: Batch, decoder=None, chunk: int | None = None) -> torch.Tensor:
    """Σ token cross-entropy over the batch's label positions (fp32), computing logits only there.

    ``decoder`` replaces the transformer body (e.g. its ``torch.compile``d version). ``chunk``: see
    :func:`head_loss_sum`."""
    lm = causal_lm(model)
    decoder = decoder if decoder is not None else lm.base_model  # HF: the body without the LM head
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)  # [N, H]
    return head_loss_sum(lm, hidden, batch.targets, chunk)


def head_loss_sum(lm, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
                  head=None) -> torch.Tensor:
    """Σ cross-entropy of the LM head over ``hidden`` [N, H] against ``targets`` [N]. ``chunk``: the head and the
    loss run over at most ``chunk`` rows at a time, each chunk checkpointed, so the fp32 [N, vocab] logits and
    their gradient never exist at once (one chunk's do; backward recomputes a chunk's logits, one extra LM-head
    matmul). ``head``: what computes the logits (default: the model's output embeddings; a fused trial passes its
    own view of an adapted head)."""
    head = head if head is not None else lm.get_output_embeddings()

    def head_loss(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # [n, V]
        # The scalings HF's own heads apply after the LM head: cohere multiplies, granite divides, gemma soft-caps.
        scale = getattr(lm.config, "logit_scale", None)
        if scale:
            logits = logits * scale
        divisor = getattr(lm.config, "logits_scaling", None)
        if divisor:
            logits = logits / divisor
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="sum")

    if not chunk or hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return head_loss(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return sum(checkpoint(head_loss, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
               for i in range(0, hidden.shape[0], chunk))


# --------------------------------------------------------------------------------------------- loop


def step_batcher(data: TokenizedSet, spec: TrainSpec, order: list[np.ndarray], mode: str, pad_id: int
                 ) -> tuple[Callable[[np.ndarray], list[Batch]], tuple[int, int] | None]:
    """(one step's example indices → its micro-batches, the static [R, T] of every forward or None): ``batch``
    examples cut into ``batch / micro_batch`` forwards; with static shapes (``static_shapes``, or ``compile``)
    every forward is one [R, T] block (data.batching, "static shapes"). The fused trainer cuts each trial's
    steps with this too."""
    micro = spec.micro_batch or spec.batch
    blocks = spec.batch // micro  # forwards per step
    static = spec.static_shapes if spec.static_shapes is not None else spec.compile
    shape = static_shape(data, order, mode, blocks) if static and order else None

    def step_batches(example_index: np.ndarray) -> list[Batch]:
        if shape is not None:
            return static_batches(data, example_index, mode, pad_id, shape, blocks)
        return [make_batch(data, example_index[i:i + micro], mode, pad_id)
                for i in range(0, len(example_index), micro)]

    return step_batches, shape


# The graph the last compiled trial of this process traced (see _prepare_compile).
_last_compiled: tuple | None = None


def _prepare_compile(lm, shape: tuple[int, int] | None, dtype: torch.dtype) -> None:
    """Make this trial's ``torch.compile`` really compile, reusing the previous trial's graph when it is the same.

    Dynamo keeps the graphs it traced per code object — here the decoder's ``forward``, shared by every trial of a
    session — and after ``recompile_limit`` (8) of them it silently runs that code *eagerly* from then on: the
    ninth distinct placement or rank of a study would have trained uncompiled while its spec said compile. So
    when a trial's graph differs from the previous compiled trial's, the in-memory graphs are dropped
    (``torch._dynamo.reset``); inductor's on-disk caches (FX graph, AOTAutograd) still spare most of the
    recompilation. Trials with the same graph — every LR and seed of a placement, run one after another in a
    grid — reuse the traced graph and compile nothing (benchmarks/RESULTS.md).
    The graph's key: the adapters' names and shapes (placement, rank, variant), the static shape, the dtype.
    """
    global _last_compiled
    import torch._dynamo

    key = (id(lm), shape, dtype, tuple((n, tuple(p.shape)) for n, p in lm.named_parameters() if p.requires_grad))
    if _last_compiled is not None and key != _last_compiled:
        torch._dynamo.reset()
    _last_compiled = key


def train(model, data: TokenizedSet, spec: TrainSpec, *, device: torch.device, dtype: torch.dtype, pad_id: int,
          on_step: Callable[[int, int, float | None, float], None] | None = None,
          eval_fn: Callable[[], float] | None = None, eval_every: int | None = None, eval_at: Collection[int] = (),
          eval_split: str = "test", eval_examples: int | None = None,
          fault: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
          params: tuple[list[torch.nn.Parameter], list[str]] | None = None,
          continuation: Continuation | None = None) -> TrainOutcome:
    """Train the trainable parameters of ``model`` (the adapters) in place; one :class:`TrialStepper` does the
    per-trial bookkeeping.

    ``on_step(step, steps of this run, loss_or_None, tokens_so_far)`` drives progress bars; ``fault`` lets tests
    inject a non-finite loss. ``eval_fn`` is called every ``eval_every`` steps and at the steps ``eval_at``
    (recorded as ``eval_split``'s loss on ``eval_examples`` examples, None: all). ``params``: (the adapter
    tensors, their names) in the order a saved state keeps them (``peft_io.site_parameters``; default: the model's
    trainable parameters in module order). ``continuation``: continue its saved state if there is one, stop at its
    ``stop_after`` and save the state there. Raises :class:`TrialFailed` at the first non-finite loss, with its
    step.
    """
    if params is None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = ([p for _, p in named], [name for name, _ in named])
    if not params[0]:  # before the data is looked at
        raise TrialFailed("the model has no trainable parameters")
    stepper = TrialStepper.resuming(*params, spec, len(data), device, continuation=continuation,
                                    eval_every=eval_every if eval_fn is not None else None,
                                    eval_at=eval_at if eval_fn is not None else ())
    step_batches, shape = step_batcher(data, spec, stepper.order, batching_mode(model, spec.packing), pad_id)
    stepper.outcome.static_shape = shape

    lm = causal_lm(model)
    # One shape: compile once, specialised to it. Otherwise widths are multiples of 8 and shapes are dynamic.
    decoder = None
    if spec.compile:
        _prepare_compile(lm, shape, dtype)
        decoder = torch.compile(lm.base_model, dynamic=shape is None)
    first = step_batches(stepper.order[0])[0] if stepper.order else None
    loss_chunk = spec.resolved_loss_chunk(device.type)
    checkpointing, why = checkpointing_for(spec.checkpointing, lm.config,
                                           None if first is None else (first.input_ids.numel(), first.label_tokens),
                                           device, dtype, loss_chunk)
    stepper.note(why)

    def read_back() -> None:
        before = len(stepper.outcome.curve)
        failures = sync({"": stepper})
        if failures:
            raise failures[""]
        if on_step is not None and len(stepper.outcome.curve) > before:
            last = stepper.outcome.curve[-1]
            on_step(last.step, stepper.stop, last.loss, stepper.tokens_taken)

    with contextlib.ExitStack() as cleanup:  # undone in reverse order, failed or not
        cleanup.callback(model.eval)
        if checkpointing:  # the session's base model is shared by the next trial
            set_activation_checkpointing(lm, True)
            cleanup.callback(set_activation_checkpointing, lm, False)
        if spec.base_dropout == "off":
            cleanup.enter_context(base_dropout_off(lm))
        # PEFT casts each adapted layer's input to the adapter's dtype (fp32 here), and autocast casts it straight
        # back to bf16 for the matmul: two copies of a [tokens, d_in] activation per adapted layer, 11 % of a bf16
        # CPU step (benchmarks/RESULTS.md). Under autocast the cast is pointless — the values are the same.
        from peft.helpers import disable_input_dtype_casting  # peft: ~6 s to import; only a training run needs it

        cleanup.enter_context(disable_input_dtype_casting(model, active=dtype != torch.float32))
        model.train()
        clock = TrainClock(device)
        while not stepper.finished:
            batches = step_batches(stepper.examples())
            n_labels = sum(b.label_tokens for b in batches)  # known on the host: no sync needed to normalise
            step_loss = torch.zeros((), device=device)
            for b in batches:
                b = b.to(device)
                with autocast(device, dtype):
                    part = loss_sum(model, b, decoder, loss_chunk)
                if fault is not None:
                    part = fault(stepper.step + 1, part)
                (part / n_labels).backward()
                step_loss += part.detach() / n_labels
            lr = stepper.optimizer_step()
            sync_now = stepper.sync_due()
            # The first step includes torch.compile's warm-up when compile is on: timed after a sync too.
            stepper.record(step_loss, sum(b.real_tokens for b in batches), n_labels, lr,
                           clock.elapsed(synchronize=sync_now or stepper.step == 1))
            if sync_now:
                read_back()
                stepper.save_if_due(clock)  # a killed run continues from here (execution.save_state_every)
            elif on_step is not None:
                on_step(stepper.step, stepper.stop, None, stepper.tokens_taken)
            if stepper.eval_due():
                read_back()
                with clock.excluded():
                    stepper.add_eval(eval_fn(), eval_split, eval_examples)
                    model.train()
        read_back()
    if continuation is not None:
        stepper.state().save(continuation.file)
    return stepper.outcome


# Float rates HF attention modules keep and pass to their attention function while training (llama-style
# ``attention_dropout``; others name them so too); nn.Dropout modules hold theirs as ``p``.
_DROPOUT_RATE_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p")


def base_dropout_sites(lm) -> list[tuple[str, torch.nn.Module, str]]:
    """Every dropout the base model applies while training, as (module name, module, attribute): nn.Dropout
    modules with p > 0 and float rates > 0 of the attributes above. PEFT's LoRA dropout (``lora_dropout``) is the
    placement's, not the base model's: left out."""
    sites = []
    for name, module in lm.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            if module.p > 0:
                sites.append((name, module, "p"))
            continue
        sites += [(name, module, attr) for attr in _DROPOUT_RATE_ATTRIBUTES
                  if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0]
    return sites


@contextlib.contextmanager
def base_dropout_off(lm):
    """``train.base_dropout: off`` — every base-model dropout at 0 inside, each rate put back on exit (the session's
    model is shared by the next trial)."""
    saved = [(module, attr, getattr(module, attr)) for _, module, attr in base_dropout_sites(lm)]
    try:
        for module, attr, _ in saved:
            setattr(module, attr, 0.0)
        yield
    finally:
        for module, attr, rate in saved:
            setattr(module, attr, rate)


def set_activation_checkpointing(lm, enabled: bool) -> None:
    """Per-decoder-layer checkpointing on or off; non-reentrant, so the frozen embeddings need no requires_grad
    trick. Newer transformers renamed the methods (the old names warn)."""
    if enabled:
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        getattr(lm, "activation_checkpointing_disable", lm.gradient_checkpointing_disable)()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device has free now: CUDA's free bytes, or the host's MemAvailable (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checkpointing_for(setting: str, config, forward: tuple[int, int] | None, device: torch.device,
                      dtype: torch.dtype, loss_chunk: int | None, whose: str = "a micro-batch's"
                      ) -> tuple[bool, str | None]:
    """(use activation checkpointing, a note saying why auto turned it on). ``forward``: (positions, label
    positions) of the largest forward, ``whose`` it is in the note (a fused group's holds every trial's), or
    None."""
    if setting != "auto":
        return setting == "on", None
    free = free_memory_bytes(device)
    if forward is None or free is None:
        return False, None
    from loraplace.memory import CPU_RESIDENT_FACTOR, estimate_activations

    estimate = estimate_activations(config, forward[0], forward[1], torch.finfo(dtype).bits // 8, loss_chunk)
    # On a CPU the process's resident memory runs above its live tensors (glibc keeps freed heap pages).
    needed = estimate.full_bytes * (CPU_RESIDENT_FACTOR if device.type == "cpu" else 1.0)
    if needed <= 0.8 * free:
        return False, None
    return True, (f"activation checkpointing on: {whose} activations (≈ {needed / 2**30:.1f} GiB estimated"
                  f"{', resident' if device.type == 'cpu' else ''}) exceed 80 % of the {free / 2**30:.1f} GiB free "
                  f"on {device.type}")
