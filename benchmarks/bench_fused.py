"""Fused vs one-at-a-time training of K trials on a randomly initialised SmolLM2-shaped model (no download, no
tokenizer): the measurement the "Fused studies" issue asks for on a GPU (6 trials, batch 8; goal ≥ 4×).

    python benchmarks/bench_fused.py                      # SmolLM2-135M shape, 6 trials, batch 8, 20 steps
    python benchmarks/bench_fused.py --shape tiny --steps 3   # a smoke run on a CPU

Both modes train the same trials (mixed placements, two ranks, two LRs, seeds 0–5) on the same synthetic data
(random token ids, response = the last two thirds) in this process: one at a time (PEFT-injected, our training
loop) and fused (``loraplace.fused.train_fused``, one pass per step). Training only, no eval. On CUDA, peak
memory is ``max_memory_allocated`` per mode; on a CPU it is not measured here (see ``bench_study.py --fuse``).
Last line: ``fused_speedup=… seq_s=… fused_s=… tokens_per_s_seq=… tokens_per_s_fused=… peak_mem_seq_mb=…
peak_mem_fused_mb=… max_loss_rel_diff=… device=… trials=… batch=…``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SHAPES = {  # SmolLM2-135M's config (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                    tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True),
}
# (placement, rank, lr): mixed sites and sizes, as a placement study's trials are
TRIALS = [({"roles": ["all"]}, 16, 1e-3), ({"roles": ["attn"]}, 16, 3e-3), ({"roles": ["mlp"]}, 8, 1e-3),
          ({"roles": ["all"], "layers": "top:50%"}, 8, 3e-3), ({"roles": ["attn.q", "attn.v"]}, 16, 1e-3),
          ({"roles": ["mlp.up"]}, 16, 3e-3)]


def synthetic_data(n: int, max_len: int, vocab: int, seed: int = 0):
    from loraplace.data import TokenizedSet

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_len // 2, max_len + 1, size=n)
    ids = [rng.integers(3, vocab, size=int(n_tok)).astype(np.int32) for n_tok in lengths]
    return TokenizedSet(ids, np.asarray([len(x) // 3 for x in ids]), [""] * n, [""] * n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--checkpointing", choices=["off", "on", "auto"], default="off",
                        help="train.checkpointing of every trial (default off: the speed of the two ways of running "
                             "them; auto turns it on for a fused group whose activations the estimate finds too big, "
                             "e.g. 6 SmolLM2 trials on a 24 GiB CPU machine)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraplace.fused import FusedMember, train_fused
    from loraplace.models import tiny_tokenizer
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec, train
    from loraplace.trial import Session

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape])
    session = Session.from_model(AutoModelForCausalLM.from_config(config), tiny_tokenizer(),
                                 name=f"random:{args.shape}", device=args.device, precision=args.precision)
    device = session.device
    data = synthetic_data(args.batch * args.steps, args.max_len, config.vocab_size)
    members = []
    for i in range(args.trials):
        placement, rank, lr = TRIALS[i % len(TRIALS)]
        spec = TrainSpec(steps=args.steps, batch=args.batch, lr=lr, seed=i, precision=args.precision,
                         checkpointing=args.checkpointing)
        members.append(FusedMember(f"t{i}", session.plan(parse_placement(placement), rank=rank), spec))
    print(f"device={device} dtype={session.dtype} shape={args.shape} trials={args.trials} batch={args.batch} "
          f"max_len={args.max_len} steps={args.steps}", flush=True)

    warm = members[0]  # kernels, allocator and autotuning warmed once, outside both timings
    with session.adapter(warm.plan, warm.train.seed) as model:
        train(model, data, warm.train.model_copy(update={"steps": 2}), device=device, dtype=session.dtype,
              pad_id=session.pad_id)
    train_fused(session, data, [FusedMember(m.key, m.plan, m.train.model_copy(update={"steps": 2}))
                                for m in members], pad_id=session.pad_id)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    alone, tokens = {}, 0
    for m in members:
        with session.adapter(m.plan, m.train.seed) as model:
            out = train(model, data, m.train, device=device, dtype=session.dtype, pad_id=session.pad_id)
        alone[m.key] = [p.loss for p in out.curve]
        tokens += out.real_tokens
    sync(device)
    seq_s, seq_peak = time.perf_counter() - t0, peak_mb(device)
    print(f"one at a time: {seq_s:.1f} s, {tokens / seq_s:,.0f} tok/s", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    fused = train_fused(session, data, members, pad_id=session.pad_id)
    sync(device)
    fused_s, fused_peak = time.perf_counter() - t0, peak_mb(device)
    fused_tokens = sum(r.outcome.real_tokens for r in fused.values())
    notes = sorted({note for r in fused.values() for note in r.outcome.notes})
    print(f"fused: {fused_s:.1f} s, {fused_tokens / fused_s:,.0f} tok/s{''.join('; ' + n for n in notes)}",
          flush=True)

    diff = max(abs(a.loss - b) / abs(b) for m in members
               for a, b in zip(fused[m.key].outcome.curve, alone[m.key], strict=True))
    print(f"fused_speedup={seq_s / fused_s:.2f} seq_s={seq_s:.1f} fused_s={fused_s:.1f} "
          f"tokens_per_s_seq={tokens / seq_s:.0f} tokens_per_s_fused={fused_tokens / fused_s:.0f} "
          f"peak_mem_seq_mb={seq_peak if seq_peak is None else round(seq_peak)} "
          f"peak_mem_fused_mb={fused_peak if fused_peak is None else round(fused_peak)} "
          f"max_loss_rel_diff={diff:.2e} device={device.type} trials={args.trials} batch={args.batch} "
          f"checkpointing={args.checkpointing}")


if __name__ == "__main__":
    main()
