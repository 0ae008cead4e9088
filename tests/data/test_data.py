import csv
import json

import numpy as np
import pytest

from loraplace.data import DataSpec, load_splits, load_tokenized, tokenize_records
from loraplace.data.builtin import arithmetic
from loraplace.data.formats import detect_format, final_answer
from loraplace.errors import ConfigError, DataError
from loraplace.models import load_tokenizer
from loraplace.specs import validate


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:llama")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))


def test_arithmetic_is_deterministic_and_checkable():
    a, b = arithmetic(n=50, seed=3), arithmetic(n=50, seed=3)
    assert a == b and a != arithmetic(n=50, seed=4)
    for rec in a:
        # Re-evaluate the worked steps: the final answer is exactly what the steps compute.
        steps = [line for line in rec["answer"].splitlines() if "=" in line]
        value = None
        for line in steps:
            expr = line.split("<<")[1].split("=")[0]
            value = eval(expr.replace("/", "//"))  # noqa: S307 - our own generated arithmetic
        assert final_answer(rec["answer"]) == str(value)


@pytest.mark.parametrize(
    ("record", "fmt"),
    [({"instruction": "a", "input": "", "output": "b"}, "alpaca"), ({"question": "q", "answer": "a"}, "gsm8k"),
     ({"messages": []}, "messages"), ({"prompt": "p", "completion": "c"}, "prompt_completion"),
     ({"text": "t"}, "text")],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_unknown_columns():
    with pytest.raises(DataError, match="cannot detect the data format"):
        detect_format({"foo": 1})


def test_masking_labels_only_response(tok):
    data = tokenize_records([{"question": "What is 2+2?", "answer": "4\n#### 4"}], tok, "auto", None, 256, False)
    prompt_ids = tok("Question: What is 2+2?\nAnswer: ")["input_ids"]
    assert int(data.prompt_lens[0]) == len(prompt_ids)
    assert list(data.ids[0][: len(prompt_ids)]) == prompt_ids
    assert data.ids[0][-1] == tok.eos_token_id  # EOS appended to the response
    full = tokenize_records([{"question": "What is 2+2?", "answer": "4"}], tok, "auto", None, 256, True)
    assert int(full.prompt_lens[0]) == 0


def test_chat_messages_use_template(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tokenize_records([rec], tok, "auto", None, 256, False)
    response = tok.decode(data.ids[0][int(data.prompt_lens[0]):])
    assert response == "hello<|im_end|>\n"


def test_guards_count_and_drop(tok):
    records = [{"prompt": "x" * 10, "completion": "ok"}, {"prompt": "y", "completion": "   "},
               {"prompt": "z" * 100, "completion": "never seen"}, {"prompt": "w", "completion": "a" * 100}]
    data = tokenize_records(records, tok, "auto", None, 50, False)
    assert data.stats["empty"] == 1
    assert data.stats["response_truncated_away"] == 1
    assert data.stats["truncated"] == 2
    assert data.stats["kept"] == 2
    assert all(len(x) <= 50 for x in data.ids)
    assert all(len(x) > p for x, p in zip(data.ids, data.prompt_lens, strict=True))


def test_all_examples_too_long_is_an_error(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p" * 300, "completion": "c"}) for _ in range(5)))
    with pytest.raises(DataError, match="empty after the guards"):
        load_splits(DataSpec(train=str(path), eval_count=1, max_len=64), tok)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_sources(tmp_path, tok, suffix):
    records = [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(20)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["question", "answer"])
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    splits = load_splits(DataSpec(train=str(path), eval_fraction=0.25, max_len=64), tok)
    assert len(splits.train) == 15 and len(splits.eval) == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"", "holds no records"), (b"\xff\xfe\x00bad", "not UTF-8"),
     (b'{"a": 1}\n{oops', "invalid JSON"), (b'{"foo": "bar"}\n', "cannot detect the data format")],
)
def test_bad_files(tmp_path, tok, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_splits(DataSpec(train=str(path), eval_count=1), tok)


def test_every_record_is_read_as_its_author_wrote_it(tmp_path):
    """A CSV field quoted over several lines keeps its line breaks (the file was split into lines before, so GSM8K's
    "2 + 2 = 4\n#### 4" became "2 + 2 = 4#### 4"), and a pretty-printed JSON document under a .jsonl name is read
    as the JSON it is (it said "invalid JSON" at line 1)."""
    from loraplace.data.sources import read_records

    records = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
               {"question": 'A "quoted", comma', "answer": "line one\r\nline two\n#### 2"}]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["question", "answer"])
        writer.writeheader()
        writer.writerows(records)
    assert read_records(str(tmp_path / "d.csv"))[0] == records
    (tmp_path / "pretty.jsonl").write_text(json.dumps(records, indent=2))
    assert read_records(str(tmp_path / "pretty.jsonl"))[0] == records
    (tmp_path / "one.jsonl").write_text(json.dumps(records[0], indent=2))
    assert read_records(str(tmp_path / "one.jsonl"))[0] == records[:1]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n[1, 2]\n', "bad.jsonl: record 2 is a JSON array, not an object"),
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n"text"\n', "record 2 is a JSON string, not an object"),
    ("bad.json", '"just text"', "bad.json: record 1 is a JSON string, not an object"),
    ("bad.json", '{"data": 3}', "bad.json: expected a list of objects (records), got a JSON number"),
    ("bad.csv", 'question,answer\n"a,#### 1\n', "bad.csv:2: invalid CSV (unexpected end of data)"),
])
def test_a_malformed_record_is_named(tmp_path, name, content, message):
    """Not "expected a list of objects" for the whole file, nor a CSV row swallowed by an unclosed quote (it read
    as one long field, and the error blamed the format's guards): the record or line at fault."""
    from loraplace.data.sources import read_records

    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        read_records(str(tmp_path / name))
    assert message in str(info.value)


def test_wrong_declared_format(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(DataError, match="missing"):
        load_splits(DataSpec(train=str(path), eval_count=1, format="alpaca"), tok)


def test_offline_hf_dataset_fails_clearly(tok):
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        load_splits(DataSpec(train="hf:loraplace-test/nothing", eval_count=1), tok)


def test_tokenisation_cache_hit(tok, tmp_path):
    spec = DataSpec(train="builtin:arithmetic?n=40", eval_count=4, max_len=128)
    first, hit1 = load_tokenized(spec.train, tok, spec)
    second, hit2 = load_tokenized(spec.train, tok, spec)
    assert (hit1, hit2) == (False, True)
    assert all(np.array_equal(a, b) for a, b in zip(first.ids, second.ids, strict=True))
    assert np.array_equal(first.prompt_lens, second.prompt_lens)
    other, hit3 = load_tokenized(spec.train, tok, spec.model_copy(update={"max_len": 64}))
    assert hit3 is False  # max_len is part of the key


def test_split_is_seeded_and_disjoint(tok):
    spec = DataSpec(train="builtin:arithmetic?n=60", eval_fraction=0.2, max_len=256)
    a, b = load_splits(spec, tok), load_splits(spec, tok)
    assert [x.tolist() for x in a.eval.ids] == [x.tolist() for x in b.eval.ids]
    train_q = set(a.train.prompts)
    assert not train_q & set(a.eval.prompts) and len(a.eval) == 12


def test_three_way_split_is_disjoint_and_keeps_the_test_split(tok):
    """Carving test first, then validation: adding a validation split never changes the test examples (a study
    stored with eval_count alone reports on the same test split)."""
    old = load_splits(DataSpec(train="builtin:arithmetic?n=80", eval_count=12, max_len=256), tok)
    new = load_splits(DataSpec(train="builtin:arithmetic?n=80", test_count=12, validation_count=10, max_len=256), tok)
    assert old.validation is None
    assert new.eval.prompts == old.eval.prompts  # the same test split
    assert len(new.validation) == 10 and len(new.train) == len(old.train) - 10
    test, val, train = set(new.eval.prompts), set(new.validation.prompts), set(new.train.prompts)
    assert not test & val and not test & train and not val & train
    fraction = load_splits(DataSpec(train="builtin:arithmetic?n=80", test_fraction=0.1, validation_fraction=0.25,
                                    max_len=256), tok)
    assert (len(fraction.eval), len(fraction.validation)) == (8, 20)


def test_split_files_and_conflicts(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]
    for name, part in (("train", rows[:20]), ("val", rows[20:25]), ("test", rows[25:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    splits = load_splits(DataSpec(train=str(tmp_path / "train.jsonl"), validation=str(tmp_path / "val.jsonl"),
                                  test=str(tmp_path / "test.jsonl"), max_len=64), tok)
    assert (len(splits.train), len(splits.validation), len(splits.eval)) == (20, 5, 5)
    with pytest.raises(ConfigError, match="give one of test, test_fraction, test_count"):
        validate(DataSpec, {"train": "x", "eval_count": 3, "test_count": 4}, "bad")
    with pytest.raises(ConfigError, match="give one of validation, validation_fraction, validation_count"):
        validate(DataSpec, {"train": "x", "validation": "v.jsonl", "validation_count": 4}, "bad")
    leaky = DataSpec(train=str(tmp_path / "train.jsonl"), validation=str(tmp_path / "train.jsonl"), test_count=2,
                     max_len=64)
    assert any("20 of 20 validation example(s) are also training examples" in w
               for w in load_splits(leaky, tok).warnings)
