import json
import math

import pytest
import torch
from peft import PeftModel

from loraplace.data import DataSpec, load_splits
from loraplace.evaluate import eval_loss
from loraplace.models import load_model, load_tokenizer
from loraplace.placement import parse_placement
from loraplace.records import TrialOutcome
from loraplace.train import TrainSpec
from loraplace.trial import TrialSpec, run_trial

pytestmark = pytest.mark.usefixtures("isolated_cache")


MOE_CASES = [("mixtral", "all"), ("qwen2_moe", "all"), ("qwen3_moe", {"roles": ["all", "moe.router"]}),
             ("olmoe", "mlp"), ("gpt_oss", "all"), ("deepseek_v3", "all")]


VARIANT_CASES = [("llama", {"roles": ["all"], "variant": v}) for v in ("rslora", "dora", "pissa", "eva")] + [
    ("gpt2", {"roles": ["attn"], "variant": "dora"})]


@pytest.mark.parametrize(("family", "placement"),
                         [("llama", {"roles": ["attn"], "layers": "1", "ranks": {"attn.o": 2}}), ("gpt2", "all+head")]
                         + MOE_CASES + VARIANT_CASES)
def test_adapter_round_trips_through_vanilla_peft(tmp_path, family, placement):
    """Train 10 steps (the loss falls), save in PEFT format, load with plain PEFT: the same eval loss. For the MoE
    families the experts are adapted through PEFT's target_parameters (one rank-r pair per expert)."""
    data = DataSpec(train="builtin:arithmetic?n=60", eval_count=12, max_len=160)
    spec = TrialSpec(model=f"tiny:{family}", data=data, placement=parse_placement(placement), rank=4,
                     train=TrainSpec(steps=10, batch=4, lr=5e-3, precision="fp32"))
    outcome = run_trial(spec, out_dir=tmp_path / "trial")
    assert outcome.status == "done", outcome.failure
    first, last = outcome.curve[0].loss, outcome.curve[-1].loss
    assert last < first - 0.02, (first, last)
    if (family, placement) in MOE_CASES:
        assert {s.role for s in outcome.sites.sites} & {"moe.experts.gate_up", "moe.experts.down"}
    adapter = tmp_path / "trial" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert outcome.adapter.path == str(adapter)
    assert outcome.adapter.bytes == sum(f.stat().st_size for f in adapter.iterdir())
    written = TrialOutcome.model_validate(json.loads((tmp_path / "trial" / "metrics.json").read_text()))
    assert written == outcome  # metrics.json is the outcome record itself

    # Plain PEFT, no loraplace model code: base model + PeftModel.from_pretrained.
    base = load_model(f"tiny:{family}")
    peft_model = PeftModel.from_pretrained(base, adapter)
    splits = load_splits(data, load_tokenizer(f"tiny:{family}"))
    loss, _ = eval_loss(peft_model, splits.eval, device=torch.device("cpu"), dtype=torch.float32, pad_id=0)
    assert loss == pytest.approx(outcome.metrics.eval_loss, abs=1e-5)
    trainable_saved = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    variant = placement.get("variant") if isinstance(placement, dict) else None
    if variant == "pissa":  # saved converted to a plain LoRA of rank 2r on the original base weights
        assert trainable_saved == 2 * outcome.trainable_params
    else:
        assert trainable_saved == outcome.trainable_params
    # And the HF forward of the loaded adapter (labels → HF's own shifted loss) agrees with our logits-at-labels
    # path on the same example.
    ex = torch.as_tensor(splits.eval.ids[0], dtype=torch.long)[None]
    labels = ex.clone()
    labels[0, : int(splits.eval.prompt_lens[0])] = -100
    with torch.no_grad():
        hf_loss = peft_model(input_ids=ex, labels=labels).loss.item()
    ours, _ = eval_loss(peft_model, splits.eval.subset([0]), device=torch.device("cpu"), dtype=torch.float32,
                        pad_id=0)
    assert hf_loss == pytest.approx(ours, rel=1e-5)


def test_trial_records_metrics(tmp_path):
    spec = TrialSpec(model="tiny:gpt2", data=DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160),
                     placement=parse_placement("attn"), rank=4, train=TrainSpec(steps=4, batch=4, precision="fp32"))
    outcome = run_trial(spec)
    m = outcome.metrics
    assert outcome.status == "done" and outcome.failure is None
    assert m.eval_loss > 0 and m.perplexity == pytest.approx(math.exp(m.eval_loss))
    assert m.train_s > 0 and m.peak_mem_mb > 0 and m.accuracy is None  # no generation asked for
    assert m.tokens_per_s == pytest.approx(outcome.train_tokens / m.train_s)
    # tiny gpt2: 2 layers × (c_attn 64→192 + c_proj 64→64) at r=4
    assert outcome.trainable_params == 2 * 4 * ((64 + 192) + (64 + 64))
    assert outcome.sites.num_layers == 2 and {(s.layer, s.role, s.rank) for s in outcome.sites.sites} == {
        (layer, role, 4) for layer in (0, 1) for role in ("attn.qkv", "attn.o")}
    assert [p.step for p in outcome.curve] == [1, 2, 3, 4]
    assert outcome.steps == 4 and outcome.curve[-1].tokens == outcome.train_tokens > 0
    assert outcome.eval_tokens > 0 and outcome.label_tokens > 0
    assert outcome.environment.device == "cpu" and outcome.environment.dtype == "float32"
    assert outcome.adapter is None  # no out_dir


def test_generation_accuracy_runs():
    spec = TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic?n=40", eval_count=4, max_len=200),
                     placement=parse_placement("attn"), rank=4, train=TrainSpec(steps=2, batch=4, precision="fp32"),
                     eval={"generate": 3, "max_new_tokens": 8})
    outcome = run_trial(spec)
    detail = outcome.accuracy_detail
    assert detail.n == 3 and detail.correct == round(detail.accuracy * 3)
    assert outcome.metrics.accuracy == detail.accuracy
    assert len(detail.samples) == 3 and all(s.expected is not None for s in detail.samples)


def test_every_failure_is_one_typed_outcome():
    data = DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160)
    # a placement this architecture cannot resolve: kind "invalid" (a user error), never an exception
    bad = run_trial(TrialSpec(model="tiny:gpt2", data=data, placement=parse_placement("attn.q"), rank=4,
                              train=TrainSpec(steps=2, batch=4, precision="fp32")))
    assert bad.status == "failed" and bad.failure.kind == "invalid" and bad.failure.user_error
    assert "attn.qkv" in bad.failure.message and bad.metrics is None
    # non-finite loss: kind "non_finite" with its step, and the size of the trial is still known
    nan = run_trial(TrialSpec(model="tiny:llama", data=data, placement=parse_placement("attn"), rank=2,
                              train=TrainSpec(steps=4, batch=4, precision="fp32")),
                    fault=lambda step, loss: loss * float("nan") if step == 2 else loss)
    assert (nan.status, nan.failure.kind, nan.failure.step) == ("failed", "non_finite", 2)
    assert nan.trainable_params > 0 and not nan.failure.user_error
    # max_len past GPT-2's learned positions: a user error naming the limit (it was "IndexError: index out of range
    # in self" from the position embedding, once an example that long came along)
    long = run_trial(TrialSpec(model="tiny:gpt2", data=data.model_copy(update={"max_len": 600}),
                               placement=parse_placement("attn"), rank=2, train=TrainSpec(steps=1, batch=4,
                                                                                            precision="fp32")))
    assert long.status == "failed" and long.failure.user_error, long.failure
    assert "max_len 600 is above the 512 positions of tiny:gpt2" in long.failure.message


def test_variants_leave_the_shared_base_model_untouched_and_eva_reports_its_ranks():
    """PiSSA rewrites the adapted base weights to their residual; the session restores them, so the next trial
    of a study trains on the real base model. EVA's redistributed ranks are what the outcome records."""
    from loraplace.trial import Session

    session = Session("tiny:llama", precision="fp32")
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    data = DataSpec(train="builtin:arithmetic?n=60", eval_count=8, max_len=160)
    for variant in ("pissa", "eva", "dora"):
        spec = TrialSpec(model="tiny:llama", data=data, rank=4,
                         placement=parse_placement({"roles": ["all"], "variant": variant}),
                         train=TrainSpec(steps=3, batch=4, lr=5e-3, precision="fp32"))
        outcome = run_trial(spec, session=session)
        assert outcome.status == "done", outcome.failure
        after = session.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), variant
        if variant == "eva":
            assert any(w.startswith("eva redistributed ranks") for w in outcome.warnings)
            assert outcome.trainable_params == sum(
                (s.rank * (64 + (128 if s.role in ("mlp.gate", "mlp.up", "mlp.down") else 64 if s.role in (
                    "attn.q", "attn.o") else 32))) for s in outcome.sites.sites)
