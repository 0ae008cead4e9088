"""Evaluation: the eval loss is the token-weighted mean over every label token, perplexity is exp of it, and
generation-based accuracy is an exact match on the final number."""

import math

import numpy as np
import pytest
import torch

from loraplace.data import DataSpec, load_splits
from loraplace.evaluate import eval_loss, perplexity, task_accuracy
from loraplace.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        splits = load_splits(DataSpec(train="builtin:arithmetic?n=40", eval_count=10, max_len=160),
                             load_tokenizer("tiny:llama"))
    finally:
        mp.undo()
    return load_model("tiny:llama"), splits.eval


def test_eval_loss_is_token_weighted_not_a_mean_of_batches(model_and_data):
    model, data = model_and_data
    cpu = torch.device("cpu")
    whole, count = eval_loss(model, data, device=cpu, dtype=torch.float32, pad_id=0, batch=3)
    per_example = [eval_loss(model, data.subset([i]), device=cpu, dtype=torch.float32, pad_id=0)
                   for i in range(len(data))]
    weights = np.array([n for _, n in per_example])
    assert count == weights.sum() == data.label_tokens
    assert whole == pytest.approx(float(np.dot([loss for loss, _ in per_example], weights) / weights.sum()), rel=1e-6)
    unweighted = float(np.mean([loss for loss, _ in per_example]))
    assert abs(whole - unweighted) > 1e-4  # the two differ here, so the test tells them apart
    for batch in (1, 16):  # batching and packing never change the number
        assert eval_loss(model, data, device=cpu, dtype=torch.float32, pad_id=0, batch=batch)[0] == pytest.approx(
            whole, rel=1e-5)


def test_perplexity_is_exp_of_the_loss():
    assert perplexity(1.5) == math.exp(1.5) and perplexity(800.0) == math.inf


def test_task_accuracy_counts_exact_final_numbers(model_and_data, monkeypatch):
    model, data = model_and_data
    tokenizer = load_tokenizer("tiny:llama")
    answers = ["#### 7", "#### 8", "#### 9"]
    monkeypatch.setattr(data, "answers", answers + data.answers[3:])
    replies = iter(["so it is 7", "the answer is #### 5", "9"])
    monkeypatch.setattr(tokenizer, "decode", lambda *_args, **_kw: next(replies))
    detail = task_accuracy(model, tokenizer, data, 3, device=torch.device("cpu"), dtype=torch.float32,
                           max_new_tokens=2)
    assert (detail.n, detail.correct, detail.accuracy) == (3, 2, pytest.approx(2 / 3))
    assert [s.extracted for s in detail.samples] == ["7", "5", "9"]
