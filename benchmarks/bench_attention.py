"""The attention path inside a training step against the same calls alone (issue 30's unexplained ~2.5× gap).

Runs a few training steps of the real model (r=16 all-linear, packed batches, as a trial trains), records every
``scaled_dot_product_attention`` call the model makes — its tensors' shapes, strides, dtypes, mask and flags — and
times each call's forward and backward inside the step. Then it replays the same calls alone, on tensors with the
same shapes and strides (copies of the recorded ones), and times them the same way. It also replays them *per
document* — one causal SDPA call per packed document, key/value heads not repeated (``enable_gqa``), instead of one
call per batch with a dense block-diagonal mask — the candidate lever for the attention path. The last line is
machine-readable: ``in_model_fwd_ms=… alone_fwd_ms=… in_model_bwd_ms=… alone_bwd_ms=… per_doc_fwd_ms=…
per_doc_bwd_ms=… cpu=…`` (per call, medians).

    python benchmarks/bench_attention.py                       # builtin:smollm2-135m, precision auto
    python benchmarks/bench_attention.py --precision fp32 --steps 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Call:
    """One recorded SDPA call: copies of its inputs (same strides) and its flags; times in seconds."""

    args: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None
    kwargs: dict
    fwd_s: float
    bwd_s: float | None = None
    documents: list[list[int]] | None = None  # each row's document lengths, read off the mask before timing


def describe(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    return f"{tuple(t.shape)} stride={t.stride()} {str(t.dtype).removeprefix('torch.')} grad={t.requires_grad}"


def copy_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same shape *and* strides (``clone`` would keep them too, but say it)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


class _Stamp(torch.autograd.Function):
    """Identity whose backward writes the time it runs into ``stamps[call_index]``. On the attention output it runs
    just before that call's SDPA backward; on the query, just after it (the next node autograd reaches)."""

    @staticmethod
    def forward(ctx, x, stamps, call_index):
        ctx.stamps, ctx.call_index = stamps, call_index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stamps[ctx.call_index] = time.perf_counter()
        return grad, None, None


_BWD_START: dict[int, float] = {}
_BWD_END: dict[int, float] = {}


def dense_call(sdpa, q, k, v, call: Call, n_rep: int) -> torch.Tensor:
    """The call as the model made it: [R, H, T, D] with repeated key/value heads and a [R, 1, T, T] mask."""
    return sdpa(q, k, v, attn_mask=call.mask, **call.kwargs)


def documents(mask: torch.Tensor) -> list[list[int]]:
    """Each row's document lengths, read off a block-diagonal causal mask [R, 1, T, T]: a position starts a new
    document where it may not attend to the position before it."""
    rows = []
    for m in mask[:, 0]:
        starts = [0] + [i for i in range(1, m.shape[0]) if not bool(m[i, i - 1])]
        rows.append([b - a for a, b in zip(starts, starts[1:] + [m.shape[0]], strict=True)])
    return rows


def per_document_call(sdpa, q, k, v, call: Call, n_rep: int) -> torch.Tensor:
    """The same attention, one causal call per document on the key/value heads as projected ([R, H/n_rep, T, D]:
    every n_rep-th head of the repeated ones). Split/unbind rather than slicing: their backward is one cat, where
    each slice's backward would write a zero-filled full-size gradient."""
    assert call.documents is not None, "per-document replay needs the packed mask"
    kw = {key: val for key, val in call.kwargs.items() if key != "is_causal"}
    k, v = k[:, ::n_rep], v[:, ::n_rep]
    rows = []
    for lengths, qr, kr, vr in zip(call.documents, q.unbind(0), k.unbind(0), v.unbind(0), strict=True):
        parts = [sdpa(a[None], b[None], c[None], is_causal=True, enable_gqa=n_rep > 1, **kw)
                 for a, b, c in zip(qr.split(lengths, 1), kr.split(lengths, 1), vr.split(lengths, 1), strict=True)]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench_train import add_trial_args, build_data, cpu_kind

    add_trial_args(parser, steps=3, train_examples=64, eval_examples=8)
    parser.add_argument("--replays", type=int, default=3, help="times each recorded call is replayed alone")
    args = parser.parse_args()

    from loraplace.data import DataSpec
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec, train
    from loraplace.trial import Session

    train_path, eval_path = build_data(args)
    session = Session(args.model, precision=args.precision)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, cpu={cpu_kind()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {session.dtype}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    splits = session.data(DataSpec(train=train_path, eval=eval_path, max_len=args.max_len))
    plan = session.plan(parse_placement("all"), rank=16)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[Call] = []
    recording = {"on": False}

    def timed_sdpa(q, k, v, attn_mask=None, **kwargs):
        if not recording["on"] or not torch.is_grad_enabled():
            return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        i = len(calls)
        q = _Stamp.apply(q, _BWD_END, i)
        t0 = time.perf_counter()
        out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        fwd = time.perf_counter() - t0
        calls.append(Call((copy_strided(q), copy_strided(k), copy_strided(v)),
                          None if attn_mask is None else attn_mask.clone(), dict(kwargs), fwd))
        return _Stamp.apply(out, _BWD_START, i)

    base = dict(batch=args.batch, lr=2e-4, seed=0, precision=args.precision, checkpointing="off")
    torch.nn.functional.scaled_dot_product_attention = timed_sdpa
    try:
        with session.adapter(plan, 0) as model:
            train(model, splits.train, TrainSpec(**(base | {"steps": 1})), device=session.device,
                  dtype=session.dtype, pad_id=session.pad_id)  # warm-up: heap, kernels
            recording["on"] = True
            t0 = time.perf_counter()
            out = train(model, splits.train, TrainSpec(**(base | {"steps": args.steps})), device=session.device,
                        dtype=session.dtype, pad_id=session.pad_id)
            step_s = (time.perf_counter() - t0) / args.steps
            recording["on"] = False
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    for i, c in enumerate(calls):
        if i in _BWD_START and i in _BWD_END:
            c.bwd_s = _BWD_END[i] - _BWD_START[i]
        c.documents = None if c.mask is None else documents(c.mask)
    first = calls[0]
    print(f"\n{len(calls)} SDPA calls in {args.steps} steps ({step_s:.2f} s a step, {out.tokens_per_s:.0f} tok/s); "
          "the first one's arguments:")
    for name, t in zip("qkv", first.args, strict=True):
        print(f"  {name}: {describe(t)}")
    print(f"  attn_mask: {describe(first.mask)}  kwargs: {first.kwargs}")

    # Alone: the same calls in the same order, each `--replays` times; autocast as the trial had it. Dense (as
    # recorded) and per document alternate, so drift in the machine's speed hits both alike.
    config = session.model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    times: dict[str, tuple[list[float], list[float]]] = {"alone": ([], []), "per_doc": ([], [])}
    autocast = torch.autocast("cpu", dtype=session.dtype, enabled=session.dtype != torch.float32)
    for _ in range(args.replays):
        for c in calls:
            for how, fn in (("alone", dense_call), ("per_doc", per_document_call)):
                q, k, v = (copy_strided(t) for t in c.args)
                with autocast:
                    t0 = time.perf_counter()
                    o = fn(sdpa, q, k, v, c, n_rep)
                    times[how][0].append(time.perf_counter() - t0)
                g = torch.randn_like(o)
                t0 = time.perf_counter()
                o.backward(g)
                times[how][1].append(time.perf_counter() - t0)
    q, k, v = (copy_strided(t) for t in first.args)
    with torch.no_grad(), autocast:
        diff = (dense_call(sdpa, q, k, v, first, n_rep) - per_document_call(sdpa, q, k, v, first, n_rep)).abs().max()
    alone_fwd, alone_bwd = times["alone"]
    doc_fwd, doc_bwd = (statistics.median(x) * 1e3 for x in times["per_doc"])
    fwd_in = statistics.median(c.fwd_s for c in calls) * 1e3
    bwd_in = statistics.median(c.bwd_s for c in calls if c.bwd_s is not None) * 1e3
    fwd_alone, bwd_alone = statistics.median(alone_fwd) * 1e3, statistics.median(alone_bwd) * 1e3
    attn_share = sum(c.fwd_s + (c.bwd_s or 0.0) for c in calls) / (step_s * args.steps)
    print("\nper call (median)     in the step    alone    ratio")
    print(f"  forward            {fwd_in:8.2f} ms {fwd_alone:8.2f} ms  {fwd_in / fwd_alone:5.2f}×")
    print(f"  backward           {bwd_in:8.2f} ms {bwd_alone:8.2f} ms  {bwd_in / bwd_alone:5.2f}×")
    print(f"  SDPA share of the step (in-model times): {100 * attn_share:.1f} %")
    print(f"per document, alone (max |diff| to dense {diff:.1e}): forward {doc_fwd:.2f} ms "
          f"({fwd_alone / doc_fwd:.2f}× dense), backward {doc_bwd:.2f} ms ({bwd_alone / doc_bwd:.2f}× dense)")
    print(f"in_model_fwd_ms={fwd_in:.2f} alone_fwd_ms={fwd_alone:.2f} in_model_bwd_ms={bwd_in:.2f} "
          f"alone_bwd_ms={bwd_alone:.2f} per_doc_fwd_ms={doc_fwd:.2f} per_doc_bwd_ms={doc_bwd:.2f} "
          f"sdpa_share={attn_share:.3f} cpu={cpu_kind()}")


if __name__ == "__main__":
    main()
