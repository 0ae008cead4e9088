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


def _timed(tid: str, placement: str, seed: int, status: str, lr: float = 0.001, started: float | None = None,
           finished: float | None = None) -> TrialRecord:
    key = GroupKey(placement=placement, size=Size(kind="rank", value=4), axes=(("lr", lr),))
    return TrialRecord(tid, 1, 0, TrialLabels(group=key, seed=seed), {}, status, 1, 0, None, None, None, None, None,
                       started, finished, None)


def test_status_says_how_long_a_running_trial_has_run_and_the_time_left():
    """The median done trial's wall time × what is left (a running trial: less what it has run), at the trials
    running at once now; a tuned grid's other seeds counted from its spec before they are in the store."""
    from loraplace.study.time_left import time_left, trials_to_add

    info = StudyInfo(name="s", model="m", placements=("a", "b"), baseline="a", baseline_given=True,
                     tune_lrs=(1e-3, 1e-2), tune_seeds=(0,))
    trials = [_timed("d1", "a", 0, "done", 1e-3, 0.0, 600.0), _timed("d2", "a", 0, "done", 1e-2, 1000.0, 1900.0),
              _timed("d3", "b", 0, "done", 1e-3, 2000.0, 2700.0),  # median 700 s
              _timed("r1", "b", 0, "running", 1e-2, started=3000.0), _timed("f1", "b", 0, "failed", 3e-2)]
    to_add = trials_to_add(info, [0, 1, 2], trials)
    assert to_add == 2 * 2  # cells a and b, seeds 1 and 2
    estimate = time_left(trials, now=3200.0, to_add=to_add)
    assert estimate is not None and (estimate.trial_s, estimate.done, estimate.left) == (700.0, 3, 1)
    assert estimate.seconds == 500.0 + 4 * 700.0  # the running trial's 500 s left; the failed one is not rerun
    assert trials_to_add(info, [0, 1, 2], [*trials, _timed("s1", "a", 1, "pending", 1e-2)]) == 3
    assert trials_to_add(info.model_copy(update={"search": True}), [0, 1, 2], trials) == 0
    assert trials_to_add(info.model_copy(update={"tune_lrs": ()}), [0, 1, 2], trials) == 0
    # two running at once: the work is shared
    two = time_left([*trials, _timed("r2", "a", 1, "running", 1e-2, started=3100.0)], now=3200.0)
    assert two is not None and two.seconds == (500.0 + 600.0) / 2
    assert time_left(trials[3:], now=3200.0) is None  # nothing done to time
    assert time_left(trials[:3], now=3200.0) is None  # nothing left
    text = render(lambda *a: print_status(*a, now=3200.0, estimate=estimate), StudyRecord(1, "s", {}, info, 0.0),
                  trials, {"done": 3, "running": 1, "failed": 1})
    assert "running 3m20s" in text
    assert ("time left: ≈ 55m00s at one trial at a time (1 trial left, and the other seeds' 4 trials once the "
            "selection pass ends; a trial takes 11m40s of wall time, the median of 3 done)") in " ".join(text.split())
