"""The activation estimate (loraplace.memory) against the live tensor bytes torch's memory profiler measures."""

import pytest
import torch

from loraplace.memory import estimate_activations, hidden_bytes_per_token, training_memory

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
                           "max_position_embeddings": 512} | kw))


def test_checkpointing_and_loss_chunks_shrink_the_estimate():
    config = _config()
    whole = estimate_activations(config, 4096, 2048, 2)
    chunked = estimate_activations(config, 4096, 2048, 2, loss_chunk=256)
    assert chunked.logits_bytes == whole.logits_bytes * 256 // 2048
    assert chunked.per_layer_bytes == whole.per_layer_bytes
    hidden = hidden_bytes_per_token(config, 2)
    assert whole.checkpointed_bytes(hidden) < whole.full_bytes
    # With checkpointing, backward holds the head's logits or one rebuilt layer, not both.
    assert whole.checkpointed_bytes(hidden) == hidden * 4 * 4096 + max(whole.per_layer_bytes, whole.logits_bytes)
    memory = training_memory(config, 8, 512, 2, 2 * 10_000_000, 100_000)
    assert memory.verdict(10**12) == "fits" and "does not fit" in memory.verdict(10**6)


def _live_peak(model, batch, chunk):
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from loraplace.train import loss_sum

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        (loss_sum(model, batch, None, chunk) / batch.label_tokens).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(x) for x in sizes]
    model.zero_grad(set_to_none=True)
    return max(totals) - totals[0]


@pytest.fixture(scope="module")
def profiled_model(tmp_path_factory):
    """fp32, a llama large enough that activations dominate the profiler's bookkeeping (saved, loaded as a session
    and planned once for the module): (session, its training split, an all-linear r=8 plan)."""
    from transformers import LlamaForCausalLM

    from loraplace.data import DataSpec
    from loraplace.models import load_tokenizer
    from loraplace.trial import Session

    root = tmp_path_factory.mktemp("profiled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
        torch.manual_seed(0)
        config = _config(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(root / "model")
        load_tokenizer("tiny:llama").save_pretrained(root / "model")
        session = Session(str(root / "model"), precision="fp32")
        splits = session.data(DataSpec(train="builtin:arithmetic?n=200", eval_count=8, max_len=160))
    return session, splits.train, session.plan({"roles": ["all"]}, rank=8)


@pytest.mark.parametrize(("checkpointing", "chunk"), [(False, None), (True, None), (False, 64), (True, 64)])
def test_estimate_is_within_25_percent_of_the_live_peak(profiled_model, checkpointing, chunk):
    from loraplace.data.batching import make_batch
    from loraplace.models import causal_lm
    from loraplace.train import set_activation_checkpointing

    session, train, plan = profiled_model
    with session.adapter(plan, 0) as model:
        batch = make_batch(train, list(range(32)), "pack", session.pad_id)
        lm = causal_lm(model)
        set_activation_checkpointing(lm, checkpointing)
        model.train()
        live = _live_peak(model, batch, chunk)
        set_activation_checkpointing(lm, False)
    est = estimate_activations(session.model.config, batch.input_ids.numel(), batch.label_tokens, 4, chunk)
    estimated = est.checkpointed_bytes(hidden_bytes_per_token(session.model.config, 4)) if checkpointing \
        else est.full_bytes
    assert 0.75 < estimated / live < 1.25, (estimated, live)


def test_quantized_weights_cost_the_qlora_papers_bits_per_parameter():
    """The published figure (QLoRA, Dettmers et al. 2023, §3 "Double Quantization"): 4-bit blocks of 64 with an fp32
    absmax cost 4 + 32/64 = 4.5 bits a weight; double quantization stores the absmax in 8 bits with an fp32 constant
    per 256 of them, 4 + 8/64 + 32/(64·256) ≈ 4.127 bits. A Llama-3-8B MLP projection (4,096 × 14,336) planned both
    ways."""
    from loraplace.memory import quantized_linear_bytes

    n = 4096 * 14336
    assert 8 * quantized_linear_bytes(4096, 14336, "nf4", double_quant=True) / n == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert 8 * quantized_linear_bytes(4096, 14336, "nf4", double_quant=False) / n == pytest.approx(4.5, abs=1e-3)
