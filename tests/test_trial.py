import json

import pytest
import torch
from peft import PeftModel

from loraplace.data import DataSpec, load_splits
from loraplace.evaluate import eval_loss
from loraplace.models import load_model, load_tokenizer
from loraplace.placement import parse_placement
from loraplace.train import TrainSpec
from loraplace.trial import TrialSpec, run_trial


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(("family", "placement"),
                         [("llama", {"roles": ["attn"], "layers": "1", "ranks": {"attn.o": 2}}), ("gpt2", "all+head")])
def test_adapter_round_trips_through_vanilla_peft(tmp_path, family, placement):
    data = DataSpec(train="builtin:arithmetic?n=60", eval_count=12, max_len=160)
    spec = TrialSpec(model=f"tiny:{family}", data=data, placement=parse_placement(placement), rank=4,
                     train=TrainSpec(steps=8, batch=4, lr=5e-3, precision="fp32"))
    result = run_trial(spec, out_dir=tmp_path / "trial")
    assert result.status == "done"
    adapter = tmp_path / "trial" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert result.adapter_bytes == sum(f.stat().st_size for f in adapter.iterdir())
    metrics = json.loads((tmp_path / "trial" / "metrics.json").read_text())
    assert metrics["eval_loss"] == result.eval_loss

    # Plain PEFT, no loraplace model code: base model + PeftModel.from_pretrained.
    base = load_model(f"tiny:{family}")
    peft_model = PeftModel.from_pretrained(base, adapter)
    splits = load_splits(data, load_tokenizer(f"tiny:{family}"))
    loss, _ = eval_loss(peft_model, splits.eval, device=torch.device("cpu"), dtype=torch.float32, pad_id=0)
    assert loss == pytest.approx(result.eval_loss, abs=1e-5)
    trainable_saved = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable_saved == result.trainable_params
    # And the HF forward of the loaded adapter agrees with our logits-at-labels path.
    ex = torch.as_tensor(splits.eval.ids[0], dtype=torch.long)[None]
    labels = ex.clone()
    labels[0, : int(splits.eval.prompt_lens[0])] = -100
    with torch.no_grad():
        hf_loss = peft_model(input_ids=ex, labels=labels).loss.item()
    assert torch.isfinite(torch.tensor(hf_loss))


def test_trial_records_metrics(tmp_path):
    spec = TrialSpec(model="tiny:gpt2", data=DataSpec(train="builtin:arithmetic?n=40", eval_count=8, max_len=160),
                     placement=parse_placement("attn"), rank=4,
                     train=TrainSpec(steps=4, batch=4, precision="fp32"))
    r = run_trial(spec)
    s = r.summary()
    for key in ("eval_loss", "perplexity", "trainable_params", "train_tokens", "tokens_per_s", "train_s",
                "peak_mem_mb", "load_s", "tokenize_s", "eval_s", "device", "versions"):
        assert key in s
    assert r.train_tokens > 0 and r.tokens_per_s > 0 and r.peak_mem_mb > 0
    assert r.trainable_params == r.plan["trainable_params"]
    assert len(r.curve) == 4 and r.curve[-1]["tokens"] == r.train_tokens


def test_generation_accuracy_runs():
    spec = TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic?n=40", eval_count=4, max_len=200),
                     placement=parse_placement("attn"), rank=4, train=TrainSpec(steps=2, batch=4, precision="fp32"),
                     eval={"generate": 3, "max_new_tokens": 8})
    r = run_trial(spec)
    assert r.accuracy_detail["n"] == 3 and 0.0 <= r.accuracy <= 1.0
