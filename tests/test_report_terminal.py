"""Terminal rendering: what a user reads after plan, train, run and status."""

import io

import pytest
from rich.console import Console

from loraplace.formatting import human_bytes, human_count
from loraplace.placement import plan_for_model
from loraplace.records import (
    Environment,
    Failure,
    GroupKey,
    Metrics,
    Size,
    StudyInfo,
    Timings,
    TrialLabels,
    TrialOutcome,
)
from loraplace.report_terminal import print_plan, print_status, print_trial
from loraplace.store import StudyRecord, TrialRecord


def render(fn, *args, width=200) -> str:
    buffer = io.StringIO()
    fn(*args, Console(file=buffer, width=width, color_system=None))
    return buffer.getvalue()


def test_formatting():
    assert [human_bytes(n) for n in (512, 1536, 3 * 2**30, 5 * 2**40)] == ["512 B", "1.5 KiB", "3.0 GiB", "5.0 TiB"]
    assert [human_count(n) for n in (999, 1500, 2_500_000, 7e9)] == ["999", "1.5k", "2.5M", "7B"]


def test_plan_shows_every_module_and_the_exact_count():
    plan = plan_for_model("tiny:llama", {"roles": ["attn.q", "mlp.down"], "layers": "1"}, rank=4)
    text = render(print_plan, plan)
    assert "model.layers.1.self_attn.q_proj" in text and "model.layers.1.mlp.down_proj" in text
    assert "model.layers.0." not in text
    assert f"trainable params: {plan.trainable_params:,}" in text


def test_trial_done_and_failed():
    done = TrialOutcome(status="done", metrics=Metrics(eval_loss=1.23456, perplexity=3.4366, tokens_per_s=1234.0,
                                                       train_s=2.5, peak_mem_mb=512.0),
                        trainable_params=2048, total_params=100_000, steps=3, train_tokens=999,
                        timings=Timings(load_s=1.0, tokenize_s=0.5, eval_s=0.25),
                        environment=Environment(device="cpu", dtype="float32"), warnings=("train: 2 truncated",))
    text = render(print_trial, done)
    for needle in ("1.2346", "3.437", "2,048 (2.048%)", "3 / 999", "1,234", "1.0 / 0.5 / 2.5 / 0.2 s", "512 MiB",
                   "cpu / float32", "not saved", "warning: train: 2 truncated"):
        assert needle in text, needle
    failed = TrialOutcome.failed(Failure(kind="non_finite", message="non-finite loss at step 3", step=3,
                                         hint="lower the learning rate"))
    assert render(print_trial, failed).splitlines() == ["trial failed non-finite loss at step 3",
                                                        "  hint: lower the learning rate"]


@pytest.mark.parametrize("width", [100, 200])
def test_status_shows_the_whole_failure_reason(width):
    reason = "ValueError: " + "a long reason that a user needs in full " * 4 + "END"
    info = StudyInfo(name="s", model="m", placements=("all",), baseline="all", baseline_given=True)
    key = GroupKey(placement="all", size=Size(kind="rank", value=4), axes=(("lr", 0.001),))
    trial = TrialRecord("abcdef0123456789", 1, 0, TrialLabels(group=key, seed=1), {}, "failed", 1, 0, reason, None,
                        None, None, None, None, None,
                        TrialOutcome.failed(Failure(kind="error", message=reason)))
    text = render(print_status, StudyRecord(1, "s", {}, info, 0.0), [trial], {"failed": 1}, width=width)
    assert "abcdef01" in text and "r=4 lr=0.001" in text and "failed" in text
    assert "".join(text.split()).count("failedabcdef01allr=4lr=0.001seed1:" + "".join(reason.split())) == 1
