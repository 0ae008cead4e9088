"""5. SIGINT; 6. non-finite loss inside a study; 11. an exception (out of memory) inside a trial."""

import signal
import subprocess

import pytest
from reliability_helpers import attempts, cli_env, measured_step_s, start_run, wait_for, write_study

from loraplace import runner as runner_module
from loraplace.store import Store
from loraplace.study import load_study, run_study

STARTUP_S = 60.0  # interpreter, imports and model load of a `loraplace run` child, before any step


def statuses(db):
    with Store.open_readonly(db) as store:
        return {t.id: (t.status, t.outcome) for t in store.trials(store.study().id)}


@pytest.mark.slow
def test_sigint_interrupts_the_current_trial_and_a_rerun_completes(tmp_path, fork_server):
    """The run is a `loraplace run` process forked from the fork server (its Ctrl-C handling is the command's own,
    installed after the fork, as in a fresh interpreter)."""
    steps = 40
    # The first trial must finish before the signal: its deadline scales with this machine's speed right now.
    deadline = STARTUP_S + 10 * steps * measured_step_s(tmp_path)
    spec = write_study(tmp_path / "s.yaml", steps=steps, seeds=2)
    db = tmp_path / "s.db"
    env = cli_env(tmp_path)
    proc = start_run(spec, db, env, server=fork_server, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # at least one trial finished, the second one is running
    assert wait_for(lambda: attempts(db) >= 2, timeout=deadline), f"no second trial within {deadline:.0f} s"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr
    before = statuses(db)
    values = [status for status, _ in before.values()]
    assert values.count("interrupted") == 1 and "running" not in values
    finished = {tid: result for tid, (status, result) in before.items() if status == "done"}
    assert finished  # the trial that finished before Ctrl-C is kept…
    # The rerun resumes in this process (the interrupt above is the part that needs a real one).
    rerun = run_study(load_study(spec), db)
    assert (rerun.done, rerun.failed) == (len(before) - len(finished), 0)
    after = statuses(db)
    assert all(status == "done" for status, _ in after.values())
    assert all(after[tid][1] == result for tid, result in finished.items())  # …unchanged by the rerun


def _inject(monkeypatch, faults: dict[tuple[str, int], object]):
    """Wrap the runner's run_trial so that the (placement, seed) trials in ``faults`` get that training fault."""
    real = runner_module.run_trial

    def run_trial(spec, **kwargs):
        return real(spec, fault=faults.get((spec.placement.preset, spec.train.seed)), **kwargs)

    monkeypatch.setattr(runner_module, "run_trial", run_trial)


def test_non_finite_loss_fails_that_trial_with_its_step_and_the_study_continues(tmp_path, monkeypatch):
    spec = load_study(write_study(tmp_path / "s.yaml", steps=6, seeds=1))
    _inject(monkeypatch, {("attn", 0): lambda step, loss: loss * float("nan") if step == 3 else loss})
    summary = run_study(spec, tmp_path / "s.db")
    assert (summary.done, summary.failed) == (2, 1)
    with Store(tmp_path / "s.db") as store:
        failed = [t for t in store.trials(store.study().id) if t.status == "failed"]
    assert len(failed) == 1 and failed[0].failed_step == 3 == failed[0].outcome.failure.step
    assert "non-finite" in failed[0].error and "step 3" in failed[0].error
    assert failed[0].metrics is None  # no eval loss of 0.0 or NaN recorded as a result


def test_an_exception_inside_a_trial_fails_it_and_others_go_on(tmp_path, monkeypatch):
    def out_of_memory(step, loss):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    spec = load_study(write_study(tmp_path / "s.yaml", steps=3, seeds=1))
    _inject(monkeypatch, {("mlp", 0): out_of_memory})
    summary = run_study(spec, tmp_path / "s.db")
    assert (summary.done, summary.failed) == (2, 1)
    with Store(tmp_path / "s.db") as store:
        by_status = {t.status: t for t in store.trials(store.study().id)}
    assert "RuntimeError: CUDA out of memory" in by_status["failed"].error
