"""Speed, memory and correctness of loraplace's trial engine against Hugging Face Trainer + PEFT, side by side.

Same model, same examples in the same order, same steps/batch/lr/schedule/rank/placement/masking:

  (a) HF Trainer + PEFT, defaults (fp32 on CPU)     (b) the same with bf16=True     (c) loraplace's engine

Every run is a fresh process (a CPU allocator keeps freed pages, so a second engine in one process would inherit the
first one's memory); runs alternate (a b c, c b a, …) and medians are reported. Peak memory is the process's peak
resident set (CPU) or the peak allocated CUDA memory. The last line is machine-readable:

``ratio_vs_hf_fp32=… ratio_vs_hf_bf16=…|n/a(no-native-bf16) mfu=… eval_loss_rel_diff=… peak_mem_ratio_vs_hf=…
cpu=avx2|avx512_bf16|amx|cuda``

``eval_loss_rel_diff`` compares (c) with the HF run of the same precision (b when (c) runs bf16, else a);
``peak_mem_ratio_vs_hf`` is (c)'s peak over that same HF run's. tokens/s counts every step, torch.compile's
warm-up included; the steady-state rate (without the first step) is printed beside it.

    python benchmarks/bench_train.py                       # defaults of the benchmark issue
    python benchmarks/bench_train.py --steps 20 --reps 1 --skip-bf16
    python benchmarks/bench_train.py --compile --loss-chunk 1024   # (c) with more levers on
    python benchmarks/bench_train.py --random-init DIR     # a config+tokenizer dir, random weights (GPU machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """Achieved FLOP/s of a large square matmul (the roofline we compare against), measured now."""
    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    reps = 50 if device.type == "cuda" else 4
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_step(plan, n_layers: int, d_model: int, real_tokens: int, label_tokens: int, seq_sq: float,
                   head_params: int, block_linear_params: int) -> float:
    """Useful FLOPs of a frozen-base LoRA training run over ``real_tokens`` tokens.

    Frozen base matmuls: forward 2·P + input-gradient backward 2·P = 4·P per token (no weight gradients).
    LM head: 4·P_head per *labelled* token (unlabelled positions need no logits). Adapters: 6 per param per token.
    Attention scores and mixing: 4·T·d per token per layer forward (QK^T and AV), ×3 with backward.
    """
    base = 4 * block_linear_params * real_tokens + 4 * head_params * label_tokens
    adapters = 6 * plan.trainable_params * real_tokens
    attention = 3 * 4 * d_model * n_layers * seq_sq  # seq_sq = Σ over examples of T²/2 (causal context sum)
    return base + adapters + attention


def add_trial_args(parser, *, steps: int, train_examples: int, eval_examples: int, precision: bool = True) -> None:
    """The options of a benchmark that trains the builtin model on :func:`build_data`'s data: model, data, steps,
    batch, max_len and (unless the bench fixes it) precision."""
    parser.add_argument("--model", default="builtin:smollm2-135m")
    add_data_args(parser, train_examples=train_examples, eval_examples=eval_examples)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    if precision:
        parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])


def add_data_args(parser, *, train_examples: int, eval_examples: int) -> None:
    """The options :func:`build_data` reads, for every benchmark that builds its data with it."""
    parser.add_argument("--data", default="auto", help="auto: ../shared GSM8K if present, else builtin:arithmetic; "
                        "or a GSM8K-format .jsonl path, or 'builtin'")
    parser.add_argument("--train-examples", type=int, default=train_examples)
    parser.add_argument("--eval-examples", type=int, default=eval_examples)


def build_data(args) -> tuple[str, str]:
    workdir = Path(tempfile.mkdtemp(prefix="loraplace-bench-"))
    source = SHARED_GSM8K if args.data == "auto" else Path(args.data)
    if args.data != "builtin" and source.is_file():
        lines = source.read_text().splitlines()
        if len(lines) < args.train_examples + args.eval_examples:
            raise SystemExit(f"{source} has {len(lines)} lines; need {args.train_examples + args.eval_examples}")
        (workdir / "train.jsonl").write_text("\n".join(lines[: args.train_examples]) + "\n")
        (workdir / "eval.jsonl").write_text("\n".join(lines[-args.eval_examples:]) + "\n")
        return str(workdir / "train.jsonl"), str(workdir / "eval.jsonl")
    from loraplace.data.builtin import arithmetic

    recs = arithmetic(n=args.train_examples + args.eval_examples, seed=0)
    (workdir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs[: args.train_examples]) + "\n")
    (workdir / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in recs[args.train_examples:]) + "\n")
    return str(workdir / "train.jsonl"), str(workdir / "eval.jsonl")


def run_hf(model_path: str, session, plan, splits, order, args, bf16: bool) -> dict:
    """HF Trainer + PEFT on exactly our examples, in our order (sequential sampler), our masking."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loraplace.evaluate import eval_loss

    rows = [splits.train.hf_row(int(i)) for step_idx in order for i in step_idx]
    real_tokens = sum(len(r["input_ids"]) for r in rows)

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, plan.to_lora_config())
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-bench-"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, args.steps // 5), report_to=[], save_strategy="no", seed=args.seed,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), dataloader_drop_last=False, remove_unused_columns=False,
        disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(session.tokenizer, padding=True, label_pad_token_id=-100)
    trainer = SequentialTrainer(model=peft_model, args=targs, train_dataset=rows, data_collator=collator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    device = next(peft_model.parameters()).device
    loss, _ = eval_loss(peft_model, splits.eval, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                        pad_id=session.pad_id, packing=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_peak_mb()
    del trainer, peft_model, model
    return {"tokens_per_s": real_tokens / train_s, "train_s": train_s, "eval_loss": loss, "peak_mem_mb": peak,
            "real_tokens": real_tokens}


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM back to the current RSS
    except OSError:
        pass


def cpu_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return "unknown"
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "avx2"


def trial_spec(args, model_ref: str):
    from loraplace.data import DataSpec
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec
    from loraplace.trial import TrialSpec

    data = DataSpec(train=args.train_file, eval=args.eval_file, max_len=args.max_len)
    train = TrainSpec(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, compile=args.compile,
                      loss_chunk=args.loss_chunk, checkpointing=args.checkpointing, static_shapes=args.static)
    return TrialSpec(model=model_ref, data=data, placement=parse_placement(args.placement), rank=args.rank,
                     train=train)


def run_one(args) -> dict:
    """One engine in this (fresh) process: the child side of main()."""
    from loraplace.models import checkpoint_path
    from loraplace.stepper import batch_order
    from loraplace.trial import Session, run_trial

    spec = trial_spec(args, args.model)
    session = Session(args.model)
    if args.only == "loraplace":
        r = run_trial(spec, session=session)
        assert r.metrics is not None, r.failure
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_peak_mb()
        return {"tokens_per_s": r.metrics.tokens_per_s, "train_s": r.metrics.train_s,
                "first_step_s": r.timings.first_step_s, "eval_loss": r.metrics.eval_loss, "peak_mem_mb": peak,
                "real_tokens": r.train_tokens, "label_tokens": r.label_tokens, "dtype": str(session.dtype)}
    plan = session.plan(spec.placement, rank=args.rank)
    splits = session.data(spec.data)
    order = batch_order(len(splits.train), args.batch, args.steps, args.seed)
    model_path = checkpoint_path(args.model)
    import gc

    del session.model, session.arch  # HF loads its own fp32 copy; ours would only inflate its peak
    gc.collect()
    _reset_rss_peak()
    return run_hf(model_path, session, plan, splits, order, args, bf16=args.only == "hf_bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--random-init", default=None, help="dir with config.json + tokenizer: random weights")
    add_data_args(ap, train_examples=240, eval_examples=100)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--placement", default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of (a b c)")
    ap.add_argument("--skip-bf16", action="store_true", help="skip (b); automatic on CPUs without native bf16")
    ap.add_argument("--skip-hf", action="store_true", help="(c) only (no ratios): a quick lever check")
    # (c)'s levers; the defaults are TrainSpec's.
    ap.add_argument("--compile", action="store_true", help="(c) with torch.compile (static shapes follow)")
    ap.add_argument("--static", action=argparse.BooleanOptionalAction, default=None, help="(c) static shapes")
    ap.add_argument("--loss-chunk", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="(c) train.loss_chunk (0: the whole loss at once)")
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"], help="(c) train.checkpointing")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--only", choices=["hf_fp32", "hf_bf16", "loraplace"], help=argparse.SUPPRESS)
    ap.add_argument("--train-file", help=argparse.SUPPRESS)
    ap.add_argument("--eval-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args)))
        return

    from loraplace.stepper import batch_order
    from loraplace.train import cpu_has_bf16
    from loraplace.trial import Session

    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        target = Path(tempfile.mkdtemp(prefix="loraplace-randinit-"))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_init)).save_pretrained(target)
        AutoTokenizer.from_pretrained(args.random_init).save_pretrained(target)
        args.model = str(target)
    args.train_file, args.eval_file = build_data(args)
    spec = trial_spec(args, args.model)
    t0 = time.perf_counter()
    session = Session(args.model)
    load_s = time.perf_counter() - t0
    plan = session.plan(spec.placement, rank=args.rank)
    splits = session.data(spec.data)
    order = batch_order(len(splits.train), args.batch, args.steps, args.seed)
    device, dtype = session.device, session.dtype
    native_bf16 = device.type == "cuda" or cpu_has_bf16()
    skip_bf16 = args.skip_bf16 or not native_bf16 or args.skip_hf
    kind = cpu_kind()
    print(f"device={device} dtype={dtype} native_bf16={native_bf16} torch={torch.__version__} "
          f"cores={os.cpu_count()} cpu={kind} ({platform.processor() or platform.machine()}) load_s={load_s:.2f} "
          f"levers: compile={args.compile} static={args.static} loss_chunk={args.loss_chunk} "
          f"checkpointing={args.checkpointing}", flush=True)

    child_args = [a for a in sys.argv[1:]]
    child_args = [*child_args, "--model", args.model, "--train-file", args.train_file, "--eval-file", args.eval_file]
    engines = ["loraplace"] if args.skip_hf else ["hf_fp32", "hf_bf16", "loraplace"]
    runs: dict[str, list[dict]] = {"hf_fp32": [], "hf_bf16": [], "loraplace": []}
    for rep in range(args.reps):
        for name in engines if rep % 2 == 0 else engines[::-1]:
            if name == "hf_bf16" and skip_bf16:
                continue
            proc = subprocess.run([sys.executable, __file__, *child_args, "--only", name], capture_output=True,
                                  text=True, cwd=Path(__file__).parent)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(res)
            extra = f" first_step_s={res['first_step_s']:.1f}" if "first_step_s" in res else ""
            print(f"rep {rep} {name:10s} tok/s={res['tokens_per_s']:8.1f} train_s={res['train_s']:7.2f} "
                  f"eval_loss={res['eval_loss']:.4f} peak_mem_mb={res['peak_mem_mb']:.0f}{extra}", flush=True)

    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in runs[name]]
        return statistics.median(vals) if vals else None

    # MFU of (c): useful FLOPs per second over the matmul peak of its own dtype, measured now.
    cfg = session.model.config
    head = session.model.get_output_embeddings().weight.numel()
    block_linear = sum(s.in_features * s.out_features for s in session.arch.sites.values())
    lp = runs["loraplace"][0]
    seq_sq = sum(len(splits.train.ids[int(i)]) ** 2 / 2 for b in order for i in b)
    flops = flops_per_step(plan, session.arch.num_layers, cfg.hidden_size, lp["real_tokens"], lp["label_tokens"],
                           seq_sq, head, block_linear)
    peak = matmul_peak(dtype, device)
    mfu = flops / med("loraplace", "train_s") / peak
    steady_s = med("loraplace", "train_s") - med("loraplace", "first_step_s")
    steady_tps = lp["real_tokens"] * (args.steps - 1) / args.steps / steady_s if args.steps > 1 else None
    a, b, c = med("hf_fp32", "tokens_per_s"), med("hf_bf16", "tokens_per_s"), med("loraplace", "tokens_per_s")
    same = "hf_bf16" if dtype == torch.bfloat16 and b else "hf_fp32"
    summary = {
        "device": str(device), "dtype": str(dtype), "cpu": kind, "steps": args.steps, "batch": args.batch,
        "rank": args.rank, "placement": args.placement, "train_examples": len(splits.train),
        "levers": {"compile": args.compile, "static": args.static, "loss_chunk": args.loss_chunk,
                   "checkpointing": args.checkpointing},
        "tokens_per_s": {"hf_fp32": a, "hf_bf16": b, "loraplace": c, "loraplace_steady": steady_tps},
        "eval_loss": {k: med(k, "eval_loss") for k in runs},
        "peak_mem_mb": {k: med(k, "peak_mem_mb") for k in runs},
        "matmul_peak_tflops": peak / 1e12, "useful_tflop_per_run": flops / 1e12, "mfu": mfu, "runs": runs,
        "bf16_skipped": skip_bf16, "data": args.train_file, "first_step_s": med("loraplace", "first_step_s"),
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    print(f"(c) steady state (without the first step, {summary['first_step_s']:.1f} s): "
          f"{steady_tps or 0:.1f} tok/s; bf16/fp32 matmul peak measured now: {peak / 1e12:.3f} TFLOP/s")
    if args.skip_hf:
        print(f"tokens_per_s={c:.1f} mfu={mfu:.3f} eval_loss={med('loraplace', 'eval_loss'):.4f} "
              f"peak_mem_mb={med('loraplace', 'peak_mem_mb'):.0f} cpu={kind}")
        return
    rel = abs(med("loraplace", "eval_loss") - med(same, "eval_loss")) / med(same, "eval_loss")
    mem = med("loraplace", "peak_mem_mb") / med(same, "peak_mem_mb")
    ratio_b = f"{c / b:.2f}" if b else "n/a(no-native-bf16)"
    print(f"ratio_vs_hf_fp32={c / a:.2f} ratio_vs_hf_bf16={ratio_b} mfu={mfu:.3f} eval_loss_rel_diff={rel:.4f} "
          f"peak_mem_ratio_vs_hf={mem:.2f} cpu={kind}")


if __name__ == "__main__":
    main()
