"""Fused trials: K trials in one pass over one base model give each trial what it gets alone (fp32)."""

import dataclasses

import pytest
import torch

from loraplace.data import DataSpec
from loraplace.errors import TrialFailed
from loraplace.evaluate import eval_loss
from loraplace.fused import FusedMember, load_weights, train_fused
from loraplace.placement import parse_placement
from loraplace.train import TrainSpec, train
from loraplace.trial import Session

pytestmark = pytest.mark.usefixtures("isolated_cache")

# ≥ 4 trials mixing placements (all / attn / mlp / a layer subset), two ranks, two seeds, two LRs, two lengths.
GROUP = [("all-r4-s0", {"roles": ["all"]}, 4, 0, 3e-3, 6), ("attn-r2-s1", {"roles": ["attn"]}, 2, 1, 1e-3, 6),
         ("mlp-r4-s1", {"roles": ["mlp"]}, 4, 1, 3e-3, 4), ("top-r2-s0", {"roles": ["all"], "layers": "top:1"}, 2, 0,
                                                            1e-3, 6)]


EVAL_BATCH = 16  # eval_loss's own default: the fused eval then sees exactly its batches


@pytest.fixture(scope="module")
def setup():
    session = Session("tiny:llama", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=200", eval_count=16, max_len=160))
    members = [FusedMember(key, session.plan(parse_placement(p), rank=r),
                           TrainSpec(steps=steps, batch=4, lr=lr, seed=seed, precision="fp32", schedule="linear"),
                           eval_batch=EVAL_BATCH)
               for key, p, r, seed, lr, steps in GROUP]
    return session, splits, members


def _alone(session, splits, member):
    with session.adapter(member.plan, member.train.seed, init_data=splits.train) as model:  # (EVA reads it)
        out = train(model, splits.train, member.train, device=session.device, dtype=session.dtype,
                    pad_id=session.pad_id)
        loss, tokens = eval_loss(model, splits.eval, device=session.device, dtype=session.dtype,
                                 pad_id=session.pad_id, batch=EVAL_BATCH)
    return [p.loss for p in out.curve], loss, tokens


def _fused_eval(session, splits, member, result):
    with session.adapter(member.plan, member.train.seed, init_data=splits.train) as model:
        load_weights(model, result.weights)
        loss, _ = eval_loss(model, splits.eval, device=session.device, dtype=session.dtype, pad_id=session.pad_id,
                            batch=EVAL_BATCH)
    return loss


def test_each_fused_trial_matches_the_trial_alone(setup, tmp_path):
    session, splits, members = setup
    results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    worst = 0.0
    for m in members:
        curve, loss, tokens = _alone(session, splits, m)
        fused = results[m.key]
        assert fused.failure is None and fused.outcome.steps == m.train.steps
        got = [p.loss for p in fused.outcome.curve]
        assert len(got) == len(curve)
        worst = max(worst, *(abs(a - b) / abs(b) for a, b in zip(got, curve, strict=True)))
        reloaded = _fused_eval(session, splits, m, fused)  # the trained adapters put back into PEFT
        fused_eval, fused_tokens = fused.eval_losses["test"]  # the fused eval pass
        assert fused_tokens == tokens
        worst = max(worst, abs(reloaded - loss) / loss, abs(fused_eval - loss) / loss)
    print(f"max relative difference, fused vs alone (curves, eval losses): {worst:.2e}")
    assert worst <= 1e-4, worst
    # The session's base model is back as it was: no fused layer left behind.
    assert not any(type(mod).__name__ == "FusedLoRA" for mod in session.model.modules())


# Trials that train differently alone: micro-batches (two sizes), padded rows (packing off), static shapes,
# activation checkpointing, and periodic evals at two intervals.
MIXED = [("micro2-evals2", {"roles": ["all"]}, {"micro_batch": 2}, 2),
         ("padded-evals3", {"roles": ["attn"]}, {"packing": False}, 3),
         ("micro1-ckpt", {"roles": ["mlp"]}, {"micro_batch": 1, "checkpointing": "on"}, None),
         ("static", {"roles": ["all"], "layers": "top:1"}, {"static_shapes": True, "micro_batch": 2}, 2)]


def test_micro_batches_padding_checkpointing_and_periodic_evals_fuse_as_alone(setup):
    session, splits, _ = setup
    members = [FusedMember(key, session.plan(parse_placement(p), rank=2),
                           TrainSpec(steps=6, batch=4, lr=3e-3, seed=i, precision="fp32", **train),
                           eval_every=every, eval_batch=EVAL_BATCH)
               for i, (key, p, train, every) in enumerate(MIXED)]
    calls = []  # one per call of the first layer's attention with grad on: a training forward, or its recompute
    layer = session.model.model.layers[0].self_attn
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
    try:
        results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    finally:
        hook.remove()
    # 6 steps × 4 forwards (the most micro-batches a member cuts a step into: micro1), each recomputed once in
    # backward by activation checkpointing.
    assert len(calls) == 6 * 4 * 2
    assert not session.model.is_activation_checkpointing  # the shared base model is back as it was
    worst = 0.0
    for m in members:
        with session.adapter(m.plan, m.train.seed) as model:
            alone = train(model, splits.train, m.train, device=session.device, dtype=session.dtype,
                          pad_id=session.pad_id, eval_every=m.eval_every,
                          eval_fn=lambda model=model, m=m: eval_loss(
                              model, splits.eval, device=session.device, dtype=session.dtype, pad_id=session.pad_id,
                              batch=EVAL_BATCH, packing=m.train.packing)[0])
            final, _ = eval_loss(model, splits.eval, device=session.device, dtype=session.dtype,
                                 pad_id=session.pad_id, batch=EVAL_BATCH, packing=m.train.packing)
        fused = results[m.key]
        assert fused.failure is None
        assert [(p.step, p.tokens) for p in fused.outcome.curve] == [(p.step, p.tokens) for p in alone.curve]
        assert [(e.step, e.split) for e in fused.outcome.evals] == [(e.step, e.split) for e in alone.evals]
        assert fused.outcome.static_shape == alone.static_shape
        pairs = [(a.loss, b.loss) for a, b in zip(fused.outcome.curve, alone.curve, strict=True)]
        pairs += [(a.eval_loss, b.eval_loss) for a, b in zip(fused.outcome.evals, alone.evals, strict=True)]
        pairs.append((fused.eval_losses["test"][0], final))
        worst = max(worst, *(abs(a - b) / abs(b) for a, b in pairs))
    print(f"max relative difference, fused vs alone (curves, periodic and final evals): {worst:.2e}")
    assert worst <= 1e-4, worst
    assert [len(results[m.key].outcome.evals) for m in members] == [2, 1, 0, 2]  # step 6 is the final eval
    # Checkpointing served the whole group; the members that did not ask for it are told why it was on.
    assert any("checkpointing on" in n for n in results["static"].outcome.notes)
    assert not results["micro1-ckpt"].outcome.notes


def test_a_fused_adapter_loads_in_vanilla_peft(setup, tmp_path):
    from peft import PeftModel

    from loraplace.models import load_model

    session, splits, members = setup
    member = members[1]
    result = train_fused(session, splits.train, [member], pad_id=session.pad_id)[member.key]
    with session.adapter(member.plan, member.train.seed) as model:
        load_weights(model, result.weights)
        model.save_pretrained(tmp_path / "adapter")
        ours, _ = eval_loss(model, splits.eval, device=session.device, dtype=session.dtype, pad_id=session.pad_id)
    vanilla = PeftModel.from_pretrained(load_model("tiny:llama"), str(tmp_path / "adapter"))
    theirs, _ = eval_loss(vanilla, splits.eval, device=session.device, dtype=torch.float32, pad_id=session.pad_id)
    assert theirs == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("sync_every", [None, 4])  # every step (the CPU default); every 4th (as on CUDA: 10)
def test_a_nan_fails_one_trial_and_leaves_the_others_alone(setup, sync_every):
    """With deferred syncs the NaN is read back a step later: the victim has taken a step with NaN in its own
    adapters meanwhile, and still fails at step 3 with steps 1–2 recorded; nobody else notices."""
    session, splits, members = setup
    members = [dataclasses.replace(m, train=m.train.model_copy(update={"sync_every": sync_every}))
               for m in members]
    victim = members[1].key

    def fault(key, step, loss):
        return loss * float("nan") if key == victim and step == 3 else loss

    with_nan = train_fused(session, splits.train, members, pad_id=session.pad_id, fault=fault)
    without = train_fused(session, splits.train, [m for m in members if m.key != victim], pad_id=session.pad_id)
    failed = with_nan[victim]
    assert failed.failure is not None and failed.failure.step == 3 and failed.outcome.steps == 2
    for key, clean in without.items():
        got = [p.loss for p in with_nan[key].outcome.curve]
        assert got == pytest.approx([p.loss for p in clean.outcome.curve], rel=1e-5), key
        for path, (a, b) in clean.weights.items():
            torch.testing.assert_close(with_nan[key].weights[path][0], a, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(with_nan[key].weights[path][1], b, rtol=1e-5, atol=1e-7)


def test_a_fused_study_stores_what_the_sequential_study_stores(tmp_path):
    """execution: {fuse: 4} — the four trials are claimed, trained together, and recorded one by one, with the
    results the one-at-a-time study records."""
    from helpers import tiny_study_yaml
    from loraplace.analysis import analyze_store
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    results = {}
    for mode in ("off", "4", "auto"):
        root = tmp_path / mode
        root.mkdir()
        (root / "s.yaml").write_text(tiny_study_yaml("fz", steps=4, extra=f"execution: {{fuse: {mode}}}\n"
                                                                          "eval: {every: 2, at_steps: [1, 3], "
                                                                          "watch_examples: 3}\n"))
        summary = run_study(load_study(root / "s.yaml"), root / "s.db")
        assert summary.done == 4 and summary.failed == 0
        with Store.open_readonly(root / "s.db") as store:
            trials = store.trials(store.study().id)
        assert all(t.attempts == 1 and t.status == "done" for t in trials)
        assert all((root / "s_artifacts" / t.id / "adapter" / "adapter_config.json").is_file() for t in trials)
        assert all(t.outcome.fused_with == (3 if mode == "4" else 0) for t in trials)  # really fused (or not)
        assert summary.execution == {"off": None, "4": "trials fused in groups of up to 4 (execution.fuse)",
                                     "auto": "trials run one at a time (execution.fuse: auto — fusion is measured "
                                             "not to pay on a CPU; fuse: K forces it)"}[mode]
        results[mode] = {t.id: t.outcome for t in trials}
        speed = [w for w in analyze_store(root / "s.db").warnings if "speed and memory comparisons" in w]
        assert speed == ([] if mode != "4" else [  # a fused trial's timings are its group's: the report says so
            "4 of 4 finished trial(s) trained fused with up to 3 other(s) (execution.fuse): their train time, "
            "tokens/s and peak memory are their group's, so speed and memory comparisons between placements do not "
            "hold; run with execution.fuse: off to compare them"])
    assert results["off"].keys() == results["4"].keys() == results["auto"].keys()  # fusion changes no trial id
    assert {t: o.metrics.eval_loss for t, o in results["auto"].items()} == {
        t: o.metrics.eval_loss for t, o in results["off"].items()}  # auto on a CPU: exactly the plain path
    for tid, alone in results["off"].items():
        fused = results["4"][tid]
        assert fused.metrics.eval_loss == pytest.approx(alone.metrics.eval_loss, rel=1e-4)
        assert [p.loss for p in fused.curve] == pytest.approx([p.loss for p in alone.curve], rel=1e-4)
        # eval.every and eval.at_steps on the first eval.watch_examples: fused too
        assert [e.step for e in fused.evals] == [e.step for e in alone.evals] == [1, 2, 3]
        assert [e.examples for e in fused.evals] == [e.examples for e in alone.evals] == [3, 3, 3]
        assert [e.eval_loss for e in fused.evals] == pytest.approx([e.eval_loss for e in alone.evals], rel=1e-4)


def test_groups_fusion_does_not_cover_are_refused_with_every_reason(setup):
    from loraplace.errors import ConfigError
    from loraplace.fused import check_fusable

    session, splits, members = setup
    pissa = FusedMember("pissa", session.plan(parse_placement({"roles": ["attn"], "variant": "pissa"}), rank=2),
                        members[0].train)
    compiled = FusedMember("compiled", members[2].plan, members[2].train.model_copy(update={"compile": True}))
    dropout = FusedMember("dropout", session.plan(parse_placement({"roles": ["attn"], "dropout": 0.1}), rank=2),
                          members[0].train)
    with pytest.raises(ConfigError) as info:
        check_fusable(session.model, [pissa, compiled, dropout, members[1]])
    text = str(info.value)
    assert "variant pissa" in text and "compiled: train.compile" in text and "dropout 0.1" in text
    assert members[1].key not in text  # a plain member is not among the reasons


def test_a_trial_that_cannot_be_fused_runs_alone_and_the_rest_of_its_group_still_fuses(tmp_path):
    from helpers import tiny_study_yaml
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    spec = tiny_study_yaml("nf", steps=2, seeds=[0], placements={"all": "{preset: all}", "attn": "{preset: attn}",
                                                                  "pissa": "{roles: [attn], variant: pissa}"},
                           extra="execution: {fuse: 3}\n")
    (tmp_path / "s.yaml").write_text(spec)
    assert run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db").done == 3
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = {t.labels.group.placement: t.outcome for t in store.trials(store.study().id)}
    assert (trials["all"].fused_with, trials["attn"].fused_with, trials["pissa"].fused_with) == (1, 1, 0)
    assert [w for w in trials["pissa"].warnings if "not fused" in w] == [
        "not fused: variant pissa cannot share a base model (fusable: lora, rslora, dora, eva)"]
    assert not any("not fused" in w for w in trials["all"].warnings + trials["attn"].warnings)


def test_a_fused_group_out_of_memory_runs_its_trials_one_at_a_time(tmp_path, monkeypatch):
    """K trials' activations may not fit where one trial's do: the group's trials then run alone (and say so)
    and later groups are halved; any other error in the fused pass fails the group's trials, and the study goes
    on."""
    import loraplace.fused
    from helpers import tiny_study_yaml
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    real_train_fused = loraplace.fused.train_fused
    groups = []

    def out_of_memory_above_two(session, data, members, **kwargs):  # as if three trials' activations did not fit
        groups.append(len(members))
        if len(members) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train_fused(session, data, members, **kwargs)

    monkeypatch.setattr(loraplace.fused, "train_fused", out_of_memory_above_two)
    (tmp_path / "s.yaml").write_text(tiny_study_yaml("oom", steps=2, seeds=[0, 1, 2, 3],
                                                     extra="execution: {fuse: 4}\n"))
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
    assert (summary.done, summary.failed) == (8, 0)
    # The first group of 4 ran out of memory and its trials ran alone; later groups were halved, and fused.
    assert groups == [4, 2, 2]
    assert summary.execution == ("trials fused in groups of up to 4 (execution.fuse); then groups of up to 2, "
                                 "after a group of 4 ran out of memory")
    with Store.open_readonly(tmp_path / "s.db") as store:
        outcomes = [t.outcome for t in store.trials(store.study().id)]
    alone = [o for o in outcomes if o.fused_with == 0]
    assert len(alone) == 4 and all(any("ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in w
                                       for w in o.warnings) for o in alone)
    assert sorted(o.fused_with for o in outcomes) == [0, 0, 0, 0, 1, 1, 1, 1]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the fused pass")

    monkeypatch.setattr(loraplace.fused, "train_fused", broken)
    (tmp_path / "s.yaml").write_text(tiny_study_yaml("oom", steps=2, extra="execution: {fuse: 4}\n"))
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s2.db")
    assert (summary.done, summary.failed) == (0, 4)
    with Store.open_readonly(tmp_path / "s2.db") as store:
        assert all("a bug in the fused pass" in t.outcome.failure.message for t in store.trials(store.study().id))


def test_trials_of_a_group_that_read_different_data_are_fused_per_data(tmp_path):
    """A group mixing two max_len values runs as two fused pairs (Ray groups are formed before anyone looks)."""
    from loraplace.runner import fused_outcomes
    from loraplace.trial import TrialSpec

    session = Session("tiny:llama", precision="fp32")
    specs = [TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic?n=60", eval_count=8,
                                                         max_len=max_len),
                       placement=parse_placement({"preset": "all"}), rank=2,
                       train=TrainSpec(steps=2, batch=2, seed=seed, precision="fp32"))
             for max_len in (160, 192) for seed in (0, 1)]
    members = [(f"t{i}", spec, tmp_path / f"t{i}") for i, spec in enumerate(specs)]
    outcomes = dict(fused_outcomes(session, members))
    assert [outcomes[f"t{i}"].status for i in range(4)] == ["done"] * 4
    assert [outcomes[f"t{i}"].fused_with for i in range(4)] == [1, 1, 1, 1]  # two pairs, not one group of four
    assert not any("not fused" in w for o in outcomes.values() for w in o.warnings)


@pytest.mark.parametrize(("device", "trials_free", "expected"), [
    ("cpu", 100, 1), ("mps", 100, 1), ("cuda", None, 1), ("cuda", 1.5, 1), ("cuda", 3.5, 3), ("cuda", 100, 8)])
def test_fuse_auto_sizes_groups_from_the_device_and_memory(device, trials_free, expected):
    """``trials_free``: the device's free memory in units of one trial's estimated activations (80 % usable)."""
    from loraplace.fused import FUSE_AUTO_MAX, FUSE_AUTO_MEMORY_SHARE, auto_group_size
    from loraplace.memory import estimate_activations
    from loraplace.models import load_config

    config = load_config("tiny:llama")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 30, 576, 1536  # SmolLM2-135M-shaped
    per_trial = estimate_activations(config, 8 * 512, 8 * 512, 2).full_bytes
    free = None if trials_free is None else int(trials_free * per_trial / FUSE_AUTO_MEMORY_SHARE)
    size, why = auto_group_size(config, device, free, 2, 8 * 512, None, cuda_verified=True)
    assert size == expected and FUSE_AUTO_MAX == 8
    assert ("one at a time" in why) == (size == 1) and ("fusion is measured not to pay" in why) == (device == "cpu")
    # Until gpu_check.py has run on a GPU, auto on CUDA is off (the default the module ships with).
    from loraplace.fused import CUDA_FUSE_VERIFIED

    size, why = auto_group_size(config, device, free, 2, 8 * 512, None)
    if device == "cuda" and not CUDA_FUSE_VERIFIED:
        assert size == 1 and "has not yet run on a GPU" in why


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear without bias; Conv1D (weight [in, out]) with bias
def test_dora_trials_fuse_and_match_the_trial_alone(family, tmp_path):
    """DoRA's magnitude and its detached ‖W + s·BA‖ are per trial: a fused group of DoRA and plain LoRA trials gives
    each its standalone curve and eval loss, and the DoRA adapter loads in vanilla PEFT with that eval loss."""
    from peft import PeftModel

    from loraplace.errors import ConfigError
    from loraplace.fused import check_fusable
    from loraplace.models import load_model

    session = Session(f"tiny:{family}", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=120", eval_count=12, max_len=160))
    train_spec = TrainSpec(steps=4, batch=4, lr=1e-2, precision="fp32", schedule="linear")
    members = [FusedMember(key, session.plan(parse_placement(p), rank=r), train_spec.model_copy(update={"seed": seed}),
                           eval_batch=EVAL_BATCH)
               for key, p, r, seed in [("dora-all", {"roles": ["all"], "variant": "dora"}, 4, 0),
                                       ("dora-attn", {"roles": ["attn"], "variant": "dora"}, 2, 1),
                                       ("lora-mlp", {"roles": ["mlp"]}, 4, 1)]]
    if family == "gpt2":  # GPT-2 drops out while training (0.1): refused, since masks would differ …
        with pytest.raises(ConfigError, match="drops out while training.*train.base_dropout: off"):
            check_fusable(session.model, members)
        # … unless the trials turn it off (alone too: _alone trains with the same spec)
        members = [dataclasses.replace(m, train=m.train.model_copy(update={"base_dropout": "off"}))
                   for m in members]
    rates = [m.p for m in session.model.modules() if isinstance(m, torch.nn.Dropout)]
    results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    worst = 0.0
    for m in members:
        curve, loss, _ = _alone(session, splits, m)
        got = results[m.key]
        assert got.failure is None and (len(got.weights[m.plan.modules[0].path]) == 3) == m.key.startswith("dora")
        worst = max(worst, *(abs(a.loss - b) / abs(b) for a, b in zip(got.outcome.curve, curve, strict=True)),
                    abs(got.eval_losses["test"][0] - loss) / loss)
    assert worst <= 1e-4, worst
    # the shared base model's own dropout is back after the fused group and the trials alone
    assert [m.p for m in session.model.modules() if isinstance(m, torch.nn.Dropout)] == rates
    member = members[0]
    with session.adapter(member.plan, member.train.seed) as model:
        load_weights(model, results[member.key].weights)
        model.save_pretrained(tmp_path / "dora")
    vanilla = PeftModel.from_pretrained(load_model(f"tiny:{family}"), str(tmp_path / "dora"))
    theirs, _ = eval_loss(vanilla, splits.eval, device=session.device, dtype=torch.float32, pad_id=session.pad_id,
                          batch=EVAL_BATCH)
    assert theirs == pytest.approx(results[member.key].eval_losses["test"][0], rel=1e-4)


def test_an_eva_trial_fuses_with_its_own_data_driven_ranks(tmp_path):
    """EVA's init (PEFT's SVD of the layer inputs on the training split) runs per trial as alone, moving rank between
    sites; the fused trial then trains exactly what it trains alone, and run_trial's re-injection gets the same
    ranks back, so the saved adapter is the trained one."""
    from loraplace.trial import TrialSpec, run_trial

    session = Session("tiny:llama", precision="fp32")
    data = DataSpec(train="builtin:arithmetic?n=120", eval_count=12, max_len=160)
    splits = session.data(data)
    train_spec = TrainSpec(steps=3, batch=4, lr=1e-2, precision="fp32", schedule="linear")
    placements = [("eva-all", {"roles": ["all"], "variant": "eva", "eva_rho": 2.0}, 0), ("lora-attn", {"roles":
                                                                                                        ["attn"]}, 1)]
    members = [FusedMember(key, session.plan(parse_placement(p), rank=4), train_spec.model_copy(update={"seed": seed}),
                           eval_batch=EVAL_BATCH) for key, p, seed in placements]
    results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    eva = results["eva-all"]
    ranks = {path: w[0].shape[0] for path, w in eva.weights.items()}
    assert set(ranks.values()) != {4}  # EVA moved rank between sites
    for m in members:
        curve, loss, _ = _alone(session, splits, m)
        assert [p.loss for p in results[m.key].outcome.curve] == pytest.approx(curve, rel=1e-4)
        assert results[m.key].eval_losses["test"][0] == pytest.approx(loss, rel=1e-4)
    spec = TrialSpec(model="tiny:llama", data=data, placement=parse_placement(placements[0][1]), rank=4,
                     train=train_spec)
    outcome = run_trial(spec, session=session, out_dir=tmp_path / "eva", trained_in_group=eva)
    assert outcome.status == "done" and outcome.fused_with == 1
    assert outcome.metrics.eval_loss == eva.eval_losses["test"][0]
    assert outcome.trainable_params == sum(a.numel() + b.numel() for a, b in eva.weights.values())


@pytest.mark.parametrize(("family", "moe_placement"), [
    ("qwen3_moe", {"roles": ["all", "moe.router"]}),  # expert stacks and the router weight: parameter sites
    ("qwen2_moe", "mlp")])  # expert stacks + shared-expert linears, which see gathered tokens inside the block
def test_moe_trials_fuse_block_by_block_and_match_the_trial_alone(family, moe_placement, tmp_path):
    """A MoE block routes tokens across rows, so it runs once per trial's rows with that trial's expert adapters
    (PEFT's own ΔW layout); everything else stays fused. Each trial's curve and eval loss equal the trial alone,
    and its adapter loads back into PEFT with the fused eval loss."""
    session = Session(f"tiny:{family}", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=120", eval_count=12, max_len=160))
    train_spec = TrainSpec(steps=3, batch=4, lr=1e-2, precision="fp32", schedule="linear")
    # The MoE trial also cuts its steps in two and checkpoints (the whole group then recomputes in backward,
    # FusedBlock's per-trial expert stacks included).
    members = [FusedMember(key, session.plan(parse_placement(p), rank=2),
                           train_spec.model_copy(update={"seed": seed, **extra}), eval_batch=EVAL_BATCH)
               for key, p, seed, extra in [("moe", moe_placement, 0, {"micro_batch": 2, "checkpointing": "on"}),
                                           ("all", "all", 1, {}), ("attn", "attn", 0, {})]]
    assert any(pm.parameter for pm in members[0].plan.modules)
    results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    worst = 0.0
    for m in members:
        curve, loss, _ = _alone(session, splits, m)
        got = results[m.key]
        assert got.failure is None
        worst = max(worst, *(abs(a.loss - b) / abs(b) for a, b in zip(got.outcome.curve, curve, strict=True)),
                    abs(got.eval_losses["test"][0] - loss) / loss)
        assert _fused_eval(session, splits, m, got) == pytest.approx(got.eval_losses["test"][0], rel=1e-4)
    assert worst <= 1e-4, worst
    assert not any(type(mod).__name__ in ("FusedLoRA", "FusedBlock") for mod in session.model.modules())


def test_an_adapted_lm_head_fuses_with_a_chunked_loss():
    """The head sees one trial's label positions at a time (its own adapter bound to the call, so a chunked loss's
    recompute during backward gets the same trial)."""
    session = Session("tiny:llama", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=120", eval_count=12, max_len=160))
    train_spec = TrainSpec(steps=3, batch=4, lr=1e-2, precision="fp32", schedule="linear", loss_chunk=16)
    members = [FusedMember(key, session.plan(parse_placement(p), rank=2), train_spec.model_copy(update={"seed": seed}),
                           eval_batch=EVAL_BATCH)
               for key, p, seed in [("head", "all+head", 0), ("attn", "attn", 1), ("head-1", "all+head", 1)]]
    results = train_fused(session, splits.train, members, pad_id=session.pad_id, evals={"test": splits.eval})
    for m in members:
        curve, loss, _ = _alone(session, splits, m)
        assert [p.loss for p in results[m.key].outcome.curve] == pytest.approx(curve, rel=1e-4), m.key
        assert results[m.key].eval_losses["test"][0] == pytest.approx(loss, rel=1e-4), m.key


def test_the_fused_benchmark_runs_and_its_modes_agree(monkeypatch, capsys):
    """benchmarks/bench_fused.py (the GPU measurement the issue asks for) on the tiny shape in fp32: six mixed trials,
    fused and one at a time, with the same losses."""
    import runpy

    from helpers import ROOT

    monkeypatch.setattr("sys.argv", ["bench_fused.py", "--shape", "tiny", "--steps", "3", "--precision", "fp32",
                                     "--max-len", "64"])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_fused.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert fields["trials"] == "6" and float(fields["fused_speedup"]) > 0
    assert float(fields["max_loss_rel_diff"]) <= 1e-4


def test_the_run_command_shows_a_fused_group_as_one_bar(tmp_path, cli, monkeypatch):
    """`loraplace run` with fuse: 2 — one progress bar per group (its steps, mean loss, tokens), each trial's
    result line, and the execution decision."""
    from helpers import tiny_study_yaml
    from loraplace.cli import TrainProgress
    from loraplace.store import Store

    bars, calls = [], []  # (rich draws no bar on a non-terminal console: what it is given is recorded instead)
    monkeypatch.setattr(TrainProgress, "new_trial", lambda self, description: bars.append(description))
    monkeypatch.setattr(TrainProgress, "__call__", lambda self, *args: calls.append((bars[-1], *args)))
    (tmp_path / "s.yaml").write_text(tiny_study_yaml("bar", steps=2, extra="execution: {fuse: 2}\n"
                                                                         "eval: {every: 1}\n"))
    done = cli("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db")
    assert done.returncode == 0, done.stderr
    assert bars == ["1/4 all r=2 seed=0", "1–2/4 fused ×2", "3/4 attn r=2 seed=0", "3–4/4 fused ×2"]
    assert [(bar, step, total) for bar, step, total, _, _ in calls] == [
        ("1–2/4 fused ×2", 1, 2), ("1–2/4 fused ×2", 2, 2), ("3–4/4 fused ×2", 1, 2), ("3–4/4 fused ×2", 2, 2)]
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    for i, placement in enumerate(("all", "attn")):  # the bar's loss: the group's mean training loss of the step
        curves = [t.outcome.curve for t in trials if t.labels.group.placement == placement]
        for step in (1, 2):
            mean = sum(curve[step - 1].loss for curve in curves) / len(curves)
            assert calls[2 * i + step - 1][3] == pytest.approx(mean, rel=1e-6)
    assert [tokens for *_, tokens in calls][1] > [tokens for *_, tokens in calls][0] > 0
    assert done.stderr.count("→ done eval_loss=") == 4
    assert "trials fused in groups of up to 2 (execution.fuse)" in done.stdout + done.stderr


def test_checkpointing_auto_looks_at_the_whole_group(setup, monkeypatch):
    """train.checkpointing: auto — the group's forward holds every member's rows, so the estimate is the group's,
    and every member's notes say why checkpointing was on."""
    import loraplace.train

    session, splits, members = setup
    members = [dataclasses.replace(m, train=m.train.model_copy(update={"steps": 1})) for m in members]
    results = train_fused(session, splits.train, members, pad_id=session.pad_id)
    assert not any(r.outcome.notes for r in results.values())  # plenty of memory here
    monkeypatch.setattr(loraplace.train, "free_memory_bytes", lambda device: 2**20)  # 1 MiB free
    results = train_fused(session, splits.train, members, pad_id=session.pad_id)
    for r in results.values():
        assert len(r.outcome.notes) == 1 and r.outcome.notes[0].startswith(
            "activation checkpointing on: the fused group's activations (≈ "), r.outcome.notes


def test_a_fused_trials_peak_memory_is_its_groups_training_peak(tmp_path, monkeypatch):
    """The peak a fused trial records is the one its group reached while training, not the (smaller) peak of its own
    evaluation afterwards. A fake meter stands in for the device's: a training forward (grad on) reaches 1000 MiB,
    an eval forward 10 MiB."""
    import loraplace.fused.loop
    import loraplace.trial
    from loraplace.runner import fused_outcomes
    from loraplace.trial import TrialSpec

    meter = {"peak": 0.0}
    monkeypatch.setattr(loraplace.fused.loop, "reset_peak_memory", lambda device: meter.update(peak=0.0))
    monkeypatch.setattr(loraplace.trial, "reset_peak_memory", lambda device: meter.update(peak=0.0))
    monkeypatch.setattr(loraplace.fused.loop, "peak_memory_mb", lambda device: meter["peak"])
    monkeypatch.setattr(loraplace.trial, "peak_memory_mb", lambda device: meter["peak"])
    session = Session("tiny:llama", precision="fp32")
    layer = session.model.model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda *_: meter.update(peak=max(meter["peak"], 1000.0 if torch.is_grad_enabled() else 10.0)))
    specs = [TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic?n=60", eval_count=8, max_len=160),
                       placement=parse_placement({"preset": p}), rank=2,
                       train=TrainSpec(steps=2, batch=2, seed=0, precision="fp32")) for p in ("all", "attn")]
    try:
        outcomes = dict(fused_outcomes(session, [(f"t{i}", spec, tmp_path / f"t{i}") for i, spec in enumerate(specs)]))
    finally:
        hook.remove()
    assert [o.fused_with for o in outcomes.values()] == [1, 1]
    assert [o.metrics.peak_mem_mb for o in outcomes.values()] == [1000.0, 1000.0]


def test_a_fused_member_is_saved_without_redoing_its_init_and_a_failed_one_is_never_injected(tmp_path, monkeypatch):
    """run_trial(trained_in_group=…) injects the plan PEFT built in the group (EVA's ranks) without EVA's SVD — the
    trained weights replace the init anyway — and a member that failed in its group fails before any injection."""
    from loraplace.trial import TrialSpec, run_trial

    session = Session("tiny:llama", precision="fp32")
    data = DataSpec(train="builtin:arithmetic?n=120", eval_count=12, max_len=160)
    splits = session.data(data)
    spec = TrialSpec(model="tiny:llama", data=data, placement=parse_placement({"roles": ["all"], "variant": "eva"}),
                     rank=4, train=TrainSpec(steps=2, batch=4, lr=1e-2, precision="fp32"))
    member = FusedMember("eva", session.plan(spec.placement, rank=4), spec.train, eval_batch=EVAL_BATCH)
    trained = train_fused(session, splits.train, [member], pad_id=session.pad_id, evals={"test": splits.eval})["eva"]
    svds = []
    monkeypatch.setattr(Session, "_eva_init", lambda self, model, data: svds.append(1))
    outcome = run_trial(spec, session=session, out_dir=tmp_path / "eva", trained_in_group=trained)
    assert outcome.status == "done" and svds == []
    assert outcome.trainable_params == trained.plan.trainable_params
    from peft import PeftModel

    from loraplace.models import load_model

    vanilla = PeftModel.from_pretrained(load_model("tiny:llama"), outcome.adapter.path)  # EVA's ranks, trained
    theirs, _ = eval_loss(vanilla, splits.eval, device=session.device, dtype=torch.float32, pad_id=session.pad_id)
    assert theirs == pytest.approx(outcome.metrics.eval_loss, rel=1e-5)
    injected = []
    monkeypatch.setattr(Session, "adapter", lambda *args, **kwargs: injected.append(1))
    failed = dataclasses.replace(trained, failure=TrialFailed("non-finite training loss (nan) at step 2", step=2))
    outcome = run_trial(spec, session=session, out_dir=tmp_path / "failed", trained_in_group=failed)
    assert outcome.status == "failed" and outcome.failure.step == 2 and injected == []


def test_the_gpu_check_runs_dry_on_a_cpu():
    """benchmarks/gpu_check.py in CI: without CUDA (or with --dry-run) every CUDA part is skipped, saying why, the
    scripts it would run parse their options, and the summary line says cuda=none."""
    import subprocess
    import sys

    from helpers import ROOT

    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum("skipped (--dry-run)" in line for line in lines) == 3
    assert lines[-1].startswith("gpu_check cuda=none equality=skipped")
