import math

import pytest
import torch

from loraplace.data import DataSpec
from loraplace.errors import TrialFailed
from loraplace.placement import parse_placement
from loraplace.stepper import batch_order
from loraplace.train import TrainSpec, train
from loraplace.trial import Session, TrialSpec, run_trial

pytestmark = pytest.mark.usefixtures("isolated_cache")


def spec(**train_kw):
    kw = dict(steps=25, batch=8, lr=3e-3, precision="fp32", seed=0) | train_kw
    return TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic?n=120", eval_count=16, max_len=160),
                     placement=parse_placement("all"), rank=8, train=TrainSpec(**kw))


def test_loss_decreases_on_learnable_task():
    result = run_trial(spec(steps=40))
    assert result.status == "done"
    first = sum(p.loss for p in result.curve[:5]) / 5
    last = sum(p.loss for p in result.curve[-5:]) / 5
    assert last < first - 0.3
    assert result.metrics.perplexity == pytest.approx(math.exp(result.metrics.eval_loss))


def test_same_seed_same_losses_fp32():
    a, b = run_trial(spec()), run_trial(spec())
    assert [p.loss for p in a.curve] == pytest.approx([p.loss for p in b.curve], abs=1e-6)
    assert a.metrics.eval_loss == pytest.approx(b.metrics.eval_loss, abs=1e-6)
    c = run_trial(spec(seed=1))
    assert c.metrics.eval_loss != pytest.approx(a.metrics.eval_loss, abs=1e-6)


def test_gradient_accumulation_matches_full_batch():
    full = run_trial(spec(steps=6))
    accum = run_trial(spec(steps=6, micro_batch=2))
    assert [p.loss for p in accum.curve] == pytest.approx([p.loss for p in full.curve], abs=1e-5)


def test_packing_matches_padding_in_training():
    packed = run_trial(spec(steps=6, packing=True))
    padded = run_trial(spec(steps=6, packing=False))
    assert [p.loss for p in packed.curve] == pytest.approx([p.loss for p in padded.curve], abs=1e-4)
    assert packed.train_tokens == padded.train_tokens


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_trial(bad):
    seen = []

    def fault(step, loss):
        seen.append(step)
        return loss * bad if step == 4 else loss

    result = run_trial(spec(steps=20, sync_every=1), fault=fault)
    assert result.status == "failed" and result.failure.kind == "non_finite" and result.failure.step == 4
    assert "non-finite" in result.failure.message and "step 4" in result.failure.message
    assert result.failure.hint and "learning rate" in result.failure.hint
    assert max(seen) == 4  # stopped at that very step (host sync every step)
    assert result.metrics is None


def test_deferred_sync_still_reports_the_exact_step():
    def fault(step, loss):
        return loss * float("nan") if step == 7 else loss

    result = run_trial(spec(steps=20, sync_every=5), fault=fault)
    assert result.status == "failed" and result.failure.step == 7 and "step 7" in result.failure.message


def test_exception_inside_training_fails_the_trial():
    def fault(step, loss):
        raise RuntimeError("simulated out of memory")

    result = run_trial(spec(), fault=fault)
    assert result.status == "failed" and result.failure.kind == "error"
    assert result.failure.message == "RuntimeError: simulated out of memory"


def test_session_reuse_equals_fresh_session():
    session = Session("tiny:llama", precision="fp32")
    run_trial(spec(steps=5).model_copy(update={"placement": parse_placement("mlp")}), session=session)
    reused = run_trial(spec(steps=5), session=session)
    fresh = run_trial(spec(steps=5))
    assert reused.metrics.eval_loss == pytest.approx(fresh.metrics.eval_loss, abs=1e-6)
    assert not any("lora" in n for n, _ in session.model.named_parameters())


def test_one_default_for_the_length_of_training():
    from loraplace.train_config import DEFAULT_STEPS

    assert TrainSpec().steps == DEFAULT_STEPS and TrainSpec(epochs=2).steps is None
    assert TrainSpec(steps=3).steps == 3
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainSpec(steps=3, epochs=1)


def test_batch_order_covers_each_epoch():
    order = batch_order(20, 8, 5, seed=0)
    first_epoch = [int(i) for b in order for i in b][:20]
    assert sorted(first_epoch) == list(range(20))
    assert all(len(b) == 8 for b in order)
    assert [b.tolist() for b in order] == [b.tolist() for b in batch_order(20, 8, 5, seed=0)]


def test_no_trainable_parameters_is_an_error():
    session = Session("tiny:llama", precision="fp32")
    with pytest.raises(TrialFailed, match="no trainable"):
        train(session.model, None, TrainSpec(steps=1), device=torch.device("cpu"), dtype=torch.float32, pad_id=0)


def test_activation_checkpointing_keeps_the_loss_and_saves_less():
    """checkpointing: on trains to the same losses as off, while the forward keeps a fraction of the tensors for
    backward (counted with saved-tensor hooks); auto stays off when the activations fit."""
    session = Session("tiny:llama", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160))
    plan = session.plan({"roles": ["all"]}, rank=4)
    losses, saved = {}, {}
    for setting in ("off", "on", "auto"):
        kept = []

        def pack(t, kept=kept):
            kept.append(t.numel() * t.element_size())
            return t

        with session.adapter(plan, 0) as model, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = train(model, splits.train, TrainSpec(steps=3, batch=4, precision="fp32", checkpointing=setting),
                        device=torch.device("cpu"), dtype=torch.float32, pad_id=session.pad_id)
        losses[setting], saved[setting] = [p.loss for p in out.curve], sum(kept)
        assert not out.notes  # auto: a tiny batch fits, so no note and no checkpointing
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-6) and losses["auto"] == losses["off"]
    assert saved["on"] < 0.6 * saved["off"] and saved["auto"] > 0.9 * saved["off"]


def test_plan_states_training_memory_and_whether_it_fits(cli):
    small = cli("plan", "tiny:llama", "--batch", "8", "--max-len", "128", "--device-memory", "64GiB", "--json")
    assert small.returncode == 0, small.stderr
    import json

    memory = json.loads(small.stdout)["training_memory"]
    assert memory["checkpointed_activations_bytes"] < memory["activations_bytes"]
    assert memory["verdict"] == "fits"
    tight = cli("plan", "tiny:llama", "--batch", "64", "--max-len", "512", "--device-memory", "250MiB")
    assert "fits only with activation checkpointing" in " ".join(tight.stdout.split())


def test_chunked_loss_equals_the_whole_loss_and_its_gradients():
    """loss_chunk: the same loss and the same adapter gradients, with the logits built a chunk at a time."""
    from loraplace.data.batching import batching_mode, make_batch
    from loraplace.train import loss_sum

    session = Session("tiny:llama", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160))
    plan = session.plan({"roles": ["all"]}, rank=4)
    with session.adapter(plan, 0) as model:
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)  # B ≠ 0, so every adapter has a gradient
        batch = make_batch(splits.train, list(range(8)), batching_mode(model, True), session.pad_id)
        results = []
        for chunk in (None, 7):
            model.zero_grad(set_to_none=True)
            loss = loss_sum(model, batch, chunk=chunk)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((loss.item(), grads))
    assert batch.label_tokens > 7  # really several chunks
    (whole, g_whole), (chunked, g_chunked) = results
    assert chunked == pytest.approx(whole, rel=1e-6)
    worst = max(float(((a - b).abs() / (a.abs().max() + 1e-12)).max()) for a, b in zip(g_whole, g_chunked, strict=True))
    assert worst < 1e-5, worst  # relative to each gradient's scale: only summation order differs


def test_static_shapes_train_like_dynamic_batches():
    """Static [R, T] blocks (two per step here) give the same losses as micro-batches packed as they come."""
    static = run_trial(spec(steps=5, static_shapes=True, micro_batch=4))
    dynamic = run_trial(spec(steps=5, static_shapes=False, micro_batch=4))
    assert [p.loss for p in static.curve] == pytest.approx([p.loss for p in dynamic.curve], abs=1e-5)
    assert static.metrics.eval_loss == pytest.approx(dynamic.metrics.eval_loss, abs=1e-5)
    assert static.train_tokens == dynamic.train_tokens


def test_compiled_training_gives_the_eager_losses():
    """torch.compile of the decoder (static shapes: one compilation) changes the numbers only by rounding."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = run_trial(spec(steps=4, static_shapes=True))
    compiled = run_trial(spec(steps=4, compile=True))
    assert [p.loss for p in compiled.curve] == pytest.approx([p.loss for p in eager.curve], rel=1e-4)
    assert compiled.metrics.eval_loss == pytest.approx(eager.metrics.eval_loss, rel=1e-4)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bf16_training_without_peft_input_casts_gives_the_same_losses(monkeypatch, variant):
    """Under bf16 autocast train() turns PEFT's cast of each adapter input to fp32 off (autocast casts it straight
    back): the losses must be those of PEFT's default path."""
    import contextlib

    import peft.helpers  # loraplace.train imports it when a trial trains: patched where it is looked up

    def bf16(**kw):
        base = spec(steps=4, precision="bf16", **kw)
        return base.model_copy(update={"placement": parse_placement({"roles": ["all"], "variant": variant})})

    fast = run_trial(bf16())
    monkeypatch.setattr(peft.helpers, "disable_input_dtype_casting",
                        lambda model, active=True: contextlib.nullcontext())
    default = run_trial(bf16())
    assert fast.status == default.status == "done"
    assert [p.loss for p in fast.curve] == pytest.approx([p.loss for p in default.curve], rel=1e-3)
    assert fast.metrics.eval_loss == pytest.approx(default.metrics.eval_loss, rel=1e-3)


def test_base_dropout_off_turns_every_base_dropout_off_and_puts_it_back():
    """train.base_dropout: off — GPT-2's dropout modules (0.1) and a llama's attention_dropout rate are 0 inside
    (the training-mode forward is then the eval-mode one), and every rate is back afterwards; LoRA's own dropout
    is the placement's and stays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplace.models import load_model
    from loraplace.train import base_dropout_off, base_dropout_sites

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, attention_dropout=0.25))
    for lm in (load_model("tiny:gpt2"), llama):
        before = [(name, attr, getattr(module, attr)) for name, module, attr in base_dropout_sites(lm)]
        assert before  # there is dropout to turn off
        ids = torch.randint(0, 64, (2, 12))
        lm.eval()
        expected = lm(ids).logits
        lm.train()
        with base_dropout_off(lm):
            assert base_dropout_sites(lm) == []
            torch.testing.assert_close(lm(ids).logits, expected)
        assert [(name, attr, getattr(module, attr)) for name, module, attr in base_dropout_sites(lm)] == before
        assert not torch.allclose(lm(ids).logits, expected)  # dropping out again
    session = Session("tiny:gpt2", precision="fp32")
    with session.adapter(session.plan(parse_placement({"roles": ["attn"], "dropout": 0.1}), rank=2), 0) as model:
        lora = [m for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)]
        with base_dropout_off(model):
            assert lora and all(m.p == 0.1 for m in lora)


@pytest.mark.parametrize(("text", "expected"), [("checkpointing: off", ("off", "keep")),
                                                ("checkpointing: on", ("on", "keep")),
                                                ("base_dropout: off", ("auto", "off"))])
def test_bare_yaml_on_off_reads_as_the_setting(text, expected):
    """YAML 1.1 reads `off` as False: `train: {checkpointing: off}` in a study file must mean "off"."""
    from loraplace.specs import parse_yaml

    spec = TrainSpec.model_validate(parse_yaml(text))
    assert (spec.checkpointing, spec.base_dropout) == expected


def test_compile_keeps_compiling_past_dynamos_recompile_limit(monkeypatch):
    """Dynamo traces at most ``recompile_limit`` (8) graphs per code object and then runs it eagerly, silently:
    a study's ninth distinct rank would have trained uncompiled. Each new graph must really be traced; a repeat of
    the previous trial's graph (another LR or seed of a placement) reuses it without tracing. Dynamo's eager
    backend and a limit of 1 keep this fast: the limit is dynamo's, whatever compiles the graphs."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    session = Session("tiny:llama", precision="fp32")
    splits = session.data(DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160))

    def traced(rank: int) -> int:
        before = counters["frames"]["ok"]
        with session.adapter(session.plan(parse_placement("all"), rank=rank), 0) as model:
            train(model, splits.train, TrainSpec(steps=1, batch=4, lr=1e-3, precision="fp32", compile=True),
                  device=session.device, dtype=session.dtype, pad_id=session.pad_id)
        return counters["frames"]["ok"] - before

    with torch._dynamo.config.patch(recompile_limit=1):
        assert [traced(rank) > 0 for rank in (1, 2, 3)] == [True] * 3
        assert traced(3) == 0  # the same graph as the trial before: reused
        assert traced(3) == 0
    torch._dynamo.reset()
