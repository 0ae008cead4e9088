"""The per-trial stepper: a trial stopped after k steps, its state saved and continued in a fresh process, trains
exactly what it trains uninterrupted — alone (PEFT's model) and as a member of a fused group."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loraplace.data import DataSpec
from loraplace.errors import TrialFailed
from loraplace.fused import FusedMember, train_fused
from loraplace.placement import parse_placement
from loraplace.stepper import Continuation, TrainerState, TrialStepper, lr_lambda, sync
from loraplace.train_config import TrainSpec
from loraplace.trial import EvalSpec, Session, TrialSpec, run_trial

pytestmark = pytest.mark.usefixtures("isolated_cache")

STEPS, STOP = 6, 2
DATA = DataSpec(train="builtin:arithmetic?n=120", test_count=12, validation_count=8, max_len=160)
# Two members with their own placements, seeds, LRs, micro-batches and eval intervals; one keeps LoRA dropout off
# the fused path's list (dropout is not fusable), so the alone trial draws from the RNG the state carries.
ALONE = TrialSpec(model="tiny:llama", data=DATA, placement=parse_placement({"roles": ["all"], "dropout": 0.1}),
                  rank=4, train=TrainSpec(steps=STEPS, batch=4, micro_batch=2, lr=3e-3, seed=0, precision="fp32",
                                          schedule="cosine", warmup=2),
                  eval=EvalSpec(every=2))
MEMBERS = [("all-s0", {"roles": ["all"]}, 4, {"seed": 0, "lr": 3e-3}, 2),
           ("attn-s1", {"roles": ["attn"], "variant": "dora"}, 2, {"seed": 1, "lr": 1e-3, "micro_batch": 2}, 3)]

# Runs in a fresh interpreter: phase "continue" continues the states saved by phase "stop" (trained to STOP) to STEPS.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_stepper import run_phase
    print("RESULT " + json.dumps(run_phase(Path(sys.argv[1]), sys.argv[2])))
""")


def _members(session, root, stop_after):
    return [FusedMember(key, session.plan(parse_placement(p), rank=r),
                        TrainSpec(steps=STEPS, batch=4, precision="fp32", schedule="linear", **train),
                        eval_every=every, eval_batch=16,
                        continuation=None if root is None else Continuation(root / key, stop_after))
            for key, p, r, train, every in MEMBERS]


def run_phase(root, phase: str | None) -> dict:
    """Train the alone trial and the fused group: uninterrupted (``root`` None), to STOP (phase "stop") or on from
    the saved states (phase "continue"). → curves and eval losses, JSON-ready."""
    session = Session("tiny:llama", precision="fp32")
    stop = STOP if phase == "stop" else None
    alone = run_trial(ALONE, session=session, out_dir=None if root is None else root / "alone-out",
                      continuation=None if root is None else Continuation(root / "alone", stop))
    splits = session.data(DATA)
    fused = train_fused(session, splits.train, _members(session, root, stop), pad_id=session.pad_id,
                        evals={"test": splits.eval, "validation": splits.validation})
    return {"alone": {"status": alone.status, "curve": [p.model_dump() for p in alone.curve],
                      "evals": [e.model_dump() for e in alone.evals], "eval_loss": alone.metrics.eval_loss,
                      "val_loss": alone.metrics.val_loss, "steps": alone.steps},
            "fused": {key: {"curve": [p.model_dump() for p in r.outcome.curve],
                            "evals": [e.model_dump() for e in r.outcome.evals], "eval_loss": r.eval_losses["test"][0],
                            "val_loss": r.eval_losses["validation"][0], "steps": r.outcome.steps}
                      for key, r in fused.items()}}


def _fresh_process(root, phase):
    from helpers import ROOT

    script = root / "phase.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    done = subprocess.run([sys.executable, str(script), str(root), phase], capture_output=True, text=True,
                          env=os.environ | {"PYTHONHASHSEED": "0"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _same(got: dict, want: dict, what: str) -> None:
    assert [(p["step"], p["tokens"], p["lr"]) for p in got["curve"]] == \
        [(p["step"], p["tokens"], p["lr"]) for p in want["curve"]], what
    assert [e["step"] for e in got["evals"]] == [e["step"] for e in want["evals"]], what
    values = [(a["loss"], b["loss"]) for a, b in zip(got["curve"], want["curve"], strict=True)]
    values += [(a["eval_loss"], b["eval_loss"]) for a, b in zip(got["evals"], want["evals"], strict=True)]
    values += [(got["eval_loss"], want["eval_loss"]), (got["val_loss"], want["val_loss"])]
    worst = max(abs(a - b) / abs(b) for a, b in values)
    assert worst <= 1e-6, (what, worst)


@pytest.mark.slow
def test_a_trial_stopped_and_continued_in_a_new_process_trains_what_it_trains_uninterrupted(tmp_path):
    """Nothing of the stopping process reaches the continuing one but the saved states: it is a fresh Python."""
    uninterrupted = run_phase(None, None)
    stopped = run_phase(tmp_path, "stop")  # here; the continuation below runs in a fresh interpreter
    assert stopped["alone"]["steps"] == STOP and all(f["steps"] == STOP for f in stopped["fused"].values())
    assert (tmp_path / "alone" / TrainerState.FILE).is_file()
    continued = _fresh_process(tmp_path, "continue")
    assert continued["alone"]["steps"] == STEPS
    _same(continued["alone"], uninterrupted["alone"], "alone")
    for key in uninterrupted["fused"]:
        _same(continued["fused"][key], uninterrupted["fused"][key], key)
    # The stopped run's own curve is the uninterrupted one's first STOP steps (the schedule spans all STEPS).
    assert [p["lr"] for p in stopped["alone"]["curve"]] == [p["lr"] for p in uninterrupted["alone"]["curve"][:STOP]]


def test_a_saved_state_is_continued_only_by_its_own_trial(tmp_path):
    """A state on other tensors, under another training spec, or past the run's stop is refused by name."""
    spec = TrainSpec(steps=4, batch=2, precision="fp32")
    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))]
    stepper = TrialStepper(params, ["a:lora_A", "a:lora_B"], spec, 10, torch.device("cpu"))
    for _ in range(3):
        (params[0].sum() * params[1].sum() + params[0].square().sum()).backward()
        lr = stepper.optimizer_step()
        stepper.record(torch.tensor(1.0), 5, 3, lr, 0.1)
    assert sync({"t": stepper}) == {}
    stepper.state().save(tmp_path / TrainerState.FILE)
    state = TrainerState.load(tmp_path / TrainerState.FILE)
    assert state.progress.steps == 3 and [p.step for p in state.progress.curve] == [1, 2, 3]

    def fresh(names=("a:lora_A", "a:lora_B"), train=spec, stop_after=None):
        ps = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))]
        return TrialStepper(ps, list(names), train, 10, torch.device("cpu"), stop_after=stop_after), ps

    resumed, ps = fresh()
    resumed.restore(state)
    assert resumed.step == 3 and torch.equal(ps[0], params[0]) and resumed.sched.last_epoch == 3
    for names, train, stop, why in [(("b:lora_A", "b:lora_B"), spec, None, "other adapter tensors"),
                                    (("a:lora_A", "a:lora_B"), spec.model_copy(update={"lr": 1.0}), None,
                                     "another training spec"),
                                    (("a:lora_A", "a:lora_B"), spec, 2, "past this run's stop")]:
        other, _ = fresh(names, train, stop)
        with pytest.raises(TrialFailed, match=why):
            other.restore(state)


def test_a_non_finite_loss_fails_its_stepper_at_its_own_step_and_no_other():
    spec = TrainSpec(steps=5, batch=2, precision="fp32", sync_every=3)
    steppers = {key: TrialStepper([torch.nn.Parameter(torch.ones(2))], ["w"], spec, 10, torch.device("cpu"))
                for key in ("ok", "bad")}
    for step in range(1, 4):
        for key, st in steppers.items():
            st.params[0].grad = torch.ones(2)
            lr = st.optimizer_step()
            loss = float("nan") if (key, step) == ("bad", 2) else 1.0 / step
            st.record(torch.tensor(loss), 4, 2, lr, 0.0)
        assert steppers["ok"].sync_due() == (step == 3)
    failures = sync(steppers)
    assert list(failures) == ["bad"] and failures["bad"].step == 2
    assert "precision: try fp32" in failures["bad"].hint  # one hint, whichever engine
    assert [p.step for p in steppers["bad"].outcome.curve] == [1]
    assert [p.step for p in steppers["ok"].outcome.curve] == [1, 2, 3]


def test_schedules():
    lin = lr_lambda("linear", 2, 10)
    assert [round(lin(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(7) == 1.0


def test_an_eva_trial_continued_from_its_state_skips_the_svd_and_trains_the_same(tmp_path):
    """EVA's ranks are saved beside the state when it is first initialised; a continued run injects them and loads
    the state over the adapters without running EVA's SVD passes again (they would be overwritten) — alone and in
    a fused group — and ends where the uninterrupted trial ends."""
    from loraplace.records import BuiltRanks

    spec = ALONE.model_copy(update={"placement": parse_placement({"roles": ["all"], "variant": "eva"}),
                                    "eval": EvalSpec()})
    session = Session("tiny:llama", precision="fp32")
    straight = run_trial(spec, session=session)
    assert straight.status == "done", straight.failure
    assert any(w.startswith("eva redistributed") for w in straight.warnings)

    stopped = run_trial(spec, session=session, continuation=Continuation(tmp_path / "alone", STOP))
    assert stopped.steps == STOP and (tmp_path / "alone" / BuiltRanks.FILE).is_file()
    before = session.init_forward_examples
    continued = run_trial(spec, session=session, continuation=Continuation(tmp_path / "alone"))
    assert session.init_forward_examples == before  # no SVD pass: the saved ranks, the state over them
    assert continued.steps == STEPS and continued.trainable_params == straight.trainable_params
    assert continued.sites == straight.sites
    assert continued.metrics.eval_loss == pytest.approx(straight.metrics.eval_loss, rel=1e-6)

    # Without the saved ranks (a state saved before they were kept) the SVD runs again: still correct, dearer.
    (tmp_path / "alone" / BuiltRanks.FILE).unlink()
    run_trial(spec, session=session, continuation=Continuation(tmp_path / "alone"))
    assert session.init_forward_examples > before

    splits = session.data(DATA)
    member = FusedMember("eva", session.plan(spec.placement, rank=spec.rank), spec.train,
                         continuation=Continuation(tmp_path / "fused", STOP))
    train_fused(session, splits.train, [member], pad_id=session.pad_id)
    before = session.init_forward_examples
    done = train_fused(session, splits.train, [dataclasses.replace(member, continuation=Continuation(
        tmp_path / "fused"))], pad_id=session.pad_id)["eva"]
    assert session.init_forward_examples == before and done.outcome.steps == STEPS
    assert done.plan.trainable_params == straight.trainable_params
