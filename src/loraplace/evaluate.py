"""Evaluation: token-weighted eval loss, perplexity = exp(that same number), and task accuracy by generation."""

from __future__ import annotations

import math
import time

import torch

from loraplace.data import TokenizedSet
from loraplace.data.batching import batching_mode, eval_batches
from loraplace.data.formats import final_answer
from loraplace.models import causal_lm, pad_token_id
from loraplace.records import AccuracyDetail, GenerationSample
from loraplace.train import autocast, loss_sum


def perplexity(eval_loss: float) -> float:
    """Always exp of the token-weighted mean loss (never a mean of per-batch perplexities)."""
    return math.exp(eval_loss) if eval_loss < 700 else float("inf")


@torch.no_grad()
def eval_loss(model, data: TokenizedSet, *, device: torch.device, dtype: torch.dtype, pad_id: int,
              batch: int = 16, packing: bool = True) -> tuple[float, int]:
    """(Σ token losses / Σ label tokens over the whole eval set, label token count)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for b in eval_batches(data, batch, batching_mode(model, packing), pad_id):
        b = b.to(device)
        with autocast(device, dtype):
            total += loss_sum(model, b).double()
        count += b.label_tokens
    if was_training:
        model.train()
    return float(total.item()) / count, count


@torch.no_grad()
def task_accuracy(model, tokenizer, data: TokenizedSet, n: int, *, device: torch.device, dtype: torch.dtype,
                  max_new_tokens: int = 256, batch: int = 8) -> AccuracyDetail:
    """Greedy generation on the first ``n`` eval prompts; exact match of the final number (GSM8K-style)."""
    t0 = time.perf_counter()
    n = min(n, len(data))
    hf = causal_lm(model)
    pad = pad_token_id(tokenizer)
    correct, scored, samples = 0, 0, []
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        prompts = [data.ids[i][: int(data.prompt_lens[i])] for i in idx]
        width = max(len(p) for p in prompts)
        # Left padding so every prompt ends where generation starts.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        with autocast(device, dtype):
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            want = final_answer(data.answers[i])
            got = final_answer(text)
            if want is not None:
                scored += 1
                correct += int(got == want)
            if len(samples) < 5:
                samples.append(GenerationSample(prompt=data.prompts[i][-200:], generated=text[:300], expected=want,
                                                extracted=got))
    return AccuracyDetail(accuracy=correct / scored if scored else None, n=scored, correct=correct,
                          generate_s=time.perf_counter() - t0, samples=tuple(samples))
