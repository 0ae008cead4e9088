import pytest
import torch

from loraplace.data import tokenize_records
from loraplace.data.batching import PACKING_VERIFIED, batching_mode, make_batch
from loraplace.models import TINY_FAMILIES, load_model, load_tokenizer
from loraplace.train import loss_sum


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer("tiny:llama")
    # Very different lengths, so packing really puts several examples in one row.
    records = [{"prompt": "p" * (3 + 17 * i % 90), "completion": "c" * (2 + 31 * i % 70)} for i in range(12)]
    return tokenize_records(records, tok, "auto", None, 256, False)


def test_packing_packs(data):
    packed = make_batch(data, list(range(len(data))), "pack", 0)
    padded = make_batch(data, list(range(len(data))), "pad", 0)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert packed.input_ids.numel() < padded.input_ids.numel()
    assert packed.label_tokens == padded.label_tokens == data.label_tokens - 0
    # every target index points at the position just before the labelled token
    flat = packed.input_ids.reshape(-1)
    assert torch.equal(flat[packed.target_index + 1], packed.targets)


@torch.no_grad()
def _reference(model, data):
    total, count = 0.0, 0
    for ids, plen in zip(data.ids, data.prompt_lens, strict=True):
        x = torch.as_tensor(ids, dtype=torch.long)[None]
        labels = x.clone()
        labels[0, : max(int(plen), 1)] = -100
        n = int((labels[0, 1:] != -100).sum())
        total += model(input_ids=x, labels=labels).loss.item() * n
        count += n
    return total / count


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@torch.no_grad()
def test_pad_and_pack_equal_unbatched_hf_loss(family, data):
    model = load_model(f"tiny:{family}")
    ref = _reference(model, data)  # HF's own forward + loss, one example at a time
    assert batching_mode(model, packing=True) == ("pack" if family in PACKING_VERIFIED else "pad")
    modes = ("pad", "pack") if family in PACKING_VERIFIED else ("pad",)
    for mode in modes:
        b = make_batch(data, list(range(len(data))), mode, 0)
        ours = loss_sum(model, b).item() / b.label_tokens
        assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5), mode


@torch.no_grad()
def test_opt_packing_would_leak_which_is_why_it_pads(data):
    """Guards the PACKING_VERIFIED list: if OPT ever packs correctly, this fails and OPT can join the list."""
    model = load_model("tiny:opt")
    b = make_batch(data, list(range(len(data))), "pack", 0)
    assert loss_sum(model, b).item() / b.label_tokens != pytest.approx(_reference(model, data), rel=1e-5)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_static_batches_have_one_shape_and_hold_every_label(data, mode):
    from loraplace.data.batching import static_batches, static_shape

    steps = [list(range(0, 6)), list(range(6, 12)), [0, 11, 5, 7, 2, 9]]
    shape = static_shape(data, steps, mode, blocks=2)
    assert shape[1] % 8 == 0 and shape[1] >= max(len(x) for x in data.ids)
    for index in steps:
        dynamic = make_batch(data, index, mode, 0)
        blocks = static_batches(data, index, mode, 0, shape, blocks=2)
        assert 1 <= len(blocks) <= 2 and all(tuple(b.input_ids.shape) == shape for b in blocks)
        assert sum(b.real_tokens for b in blocks) == dynamic.real_tokens
        assert sorted(torch.cat([b.targets for b in blocks]).tolist()) == sorted(dynamic.targets.tolist())
        for b in blocks:  # each target index still points just before its labelled token
            assert torch.equal(b.input_ids.reshape(-1)[b.target_index + 1], b.targets)


@torch.no_grad()
def test_static_blocks_give_the_unbatched_loss(data):
    """Empty padding rows and fixed widths change nothing: the summed loss over a step's blocks is HF's own."""
    from loraplace.data.batching import static_batches, static_shape

    model = load_model("tiny:llama")
    index = list(range(len(data)))
    shape = static_shape(data, [index], "pack", blocks=3)
    blocks = static_batches(data, index, "pack", 0, shape, blocks=3)
    assert len(blocks) == 3
    total = sum(loss_sum(model, b).item() for b in blocks) / sum(b.label_tokens for b in blocks)
    assert total == pytest.approx(_reference(model, data), rel=1e-5)
