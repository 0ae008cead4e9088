"""4. Atomic artifacts: a full disk (ENOSPC) while saving leaves the previous good file, no partial file, no temp."""

import errno
import json
import os

import pytest
from reliability_helpers import write_study

from loraplace import atomic
from loraplace import trial as trial_module
from loraplace.atomic import write_json_atomic
from loraplace.store import Store
from loraplace.study import load_study, run_study
from loraplace.trial import Session, save_adapter_atomic


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_json_keeps_the_previous_file_when_the_disk_fills(tmp_path, monkeypatch):
    out = tmp_path / "out"  # a folder of its own (tmp_path also holds the test's cache)
    out.mkdir()
    path = out / "metrics.json"
    write_json_atomic(path, {"eval_loss": 1.0})
    good = path.read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", enospc)  # the data was written, the flush fails
    with pytest.raises(OSError) as info:
        write_json_atomic(path, {"eval_loss": 2.0, "big": "x" * 100_000})
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and json.loads(good) == {"eval_loss": 1.0}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # the temp file is gone


def test_adapter_keeps_the_previous_version_when_the_disk_fills(tmp_path):
    session = Session("tiny:llama", precision="fp32")
    plan = session.plan({"roles": ["attn"]}, rank=2)
    out = tmp_path / "out"  # a folder of its own (tmp_path also holds the test's cache)
    out.mkdir()
    target = out / "adapter"
    with session.adapter(plan, seed=0) as model:
        save_adapter_atomic(model, target, None)
        good = {p.name: p.read_bytes() for p in target.iterdir()}

        def partial_then_full(directory, **_kwargs):  # half a weights file lands, then the disk is full
            (directory / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
            enospc()

        model.save_pretrained = partial_then_full
        with pytest.raises(OSError, match="No space left"):
            save_adapter_atomic(model, target, None)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]


def test_a_full_disk_fails_one_trial_and_the_study_goes_on(tmp_path, monkeypatch):
    spec = load_study(write_study(tmp_path / "s.yaml", steps=2, seeds=1))
    real_save, calls = trial_module.save_adapter_atomic, []

    def flaky_save(model, target, base, pissa_init=None):
        calls.append(target)
        if len(calls) != 2:
            return real_save(model, target, base, pissa_init)

        def partial_then_full(directory, **_kwargs):
            (directory / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
            enospc()

        model.save_pretrained = partial_then_full  # this trial's PeftModel only (adapters are per trial)
        try:
            return real_save(model, target, base, pissa_init)
        finally:
            del model.save_pretrained

    monkeypatch.setattr(trial_module, "save_adapter_atomic", flaky_save)
    summary = run_study(spec, tmp_path / "s.db")
    assert (summary.done, summary.failed) == (2, 1)
    with Store(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    failed = [t for t in trials if t.status == "failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0].error
    assert failed[0].metrics is None and failed[0].outcome.adapter is None  # nothing half-recorded
    assert not calls[1].exists()  # no adapter directory for the failed trial
    assert not [p.name for p in calls[1].parent.iterdir() if p.name.startswith(".")]  # temp dir removed
    for t in trials:
        if t.status == "done":
            assert os.path.isdir(t.outcome.adapter.path)
