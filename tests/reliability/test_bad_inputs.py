"""7. Bad YAML; 8. bad placements; 9. bad data; 10. store versioning — as a user meets them on the command line:
exit code 2, one clear message (cause + what to do), no traceback, nothing written."""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from helpers import FIXTURES, tiny_study_yaml

GOOD = tiny_study_yaml("bad", placements={"all": "{preset: all}"}, steps=2, seeds=[0], baseline=None)


def run_spec(cli, tmp_path, text: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return cli("run", spec, "--store", tmp_path / "s.db", "-q")


def one_clear_error(done) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "error:" in done.stderr
    return done.stderr


@pytest.mark.parametrize(("text", "expected"), [
    # 7. YAML syntax error → file:line:col
    (GOOD.replace("ranks: [2]", "ranks: [2"), ["spec.yaml:8:6: YAML syntax error"]),
    # 7. misspelled keys → key path + suggestion, top level and nested
    (GOOD.replace("ranks:", "rank:"), ["rank", "did you mean 'ranks'"]),
    (GOOD.replace("steps: 2", "stpes: 2"), ["train.stpes", "did you mean 'steps'"]),
    # 7. wrong types → every problem at once
    (GOOD.replace("steps: 2", "steps: two").replace("ranks: [2]", "ranks: [-1]").replace("max_len: 160",
                                                                                         "max_len: long"),
     ["3 problems", "train.steps", "ranks", "data.max_len"]),
])
def test_bad_yaml(cli, tmp_path, text, expected):
    err = one_clear_error(run_spec(cli, tmp_path, text))
    for needle in expected:
        assert needle in err
    assert not (tmp_path / "s.db").exists()  # nothing written


@pytest.mark.parametrize(("placement", "model", "expected"), [
    ("{roles: [attn.qq]}", "tiny:llama", "attn.qq"),                         # unknown role
    ("{roles: [attn.qkv]}", "tiny:llama", "attn.qkv"),                       # role absent in this architecture
    ("{roles: [all], layers: '40-45'}", "tiny:llama", "layer"),              # empty layer selection
    ("{roles: [attn.q]}", "tiny:gpt2", "attn.qkv"),                          # fused qkv: names the right role
])
def test_bad_placement_in_a_study_fails_before_anything_loads(cli, tmp_path, placement, model, expected):
    text = GOOD.replace("model: tiny:llama", f"model: {model}").replace("{preset: all}", placement)
    err = one_clear_error(run_spec(cli, tmp_path, text))
    assert expected in err
    assert not (tmp_path / "s.db").exists()  # refused before the store, the model or the data


@pytest.mark.parametrize(("placement", "expected"), [
    ("{roles: [attn.qq]}", "attn.qq"), ("{roles: [mlp.gate]}", "mlp.gate"), ("{roles: [all], layers: '0-3,9'}",
                                                                              "layer"),
])
def test_bad_placement_in_plan(cli, tmp_path, placement, expected):
    model = "tiny:gpt2" if "gate" in placement else "tiny:llama"
    err = one_clear_error(cli("plan", model, "--placement", placement))
    assert expected in err


def _write(path: Path, content: bytes | None) -> Path:
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(("content", "expected"), [
    (None, "not found"),                                                 # missing file
    (b'{"foo": "bar"}\n', "cannot detect the data format"),              # wrong columns
    (b"", "holds no records"),                                           # empty file
    (b"\xff\xfe\x00\x81bad\n", "not UTF-8"),                             # not UTF-8
])
def test_bad_data_is_refused_before_the_store_is_written(cli, tmp_path, content, expected):
    data = _write(tmp_path / "d.jsonl", content)
    text = GOOD.replace('"builtin:arithmetic?n=60"', f'"{data}"').replace("eval_count: 8", "eval_count: 2")
    err = one_clear_error(run_spec(cli, tmp_path, text))
    assert expected in err
    assert not (tmp_path / "s.db").exists()  # no store that would later look finished


def test_data_whose_every_response_is_truncated_away_is_refused_before_the_store(cli, tmp_path):
    # Readable and well-formed; tokenising (done up front, before the store exists) finds nothing left to train on.
    # It once wrote the store and failed every trial one by one, after which the corrected spec was an "edit".
    data = _write(tmp_path / "d.jsonl", (b'{"question": "' + b"word " * 400 + b'", "answer": "#### 4"}\n') * 20)
    text = GOOD.replace('"builtin:arithmetic?n=60"', f'"{data}"').replace("eval_count: 8", "eval_count: 2")
    done = run_spec(cli, tmp_path, text)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the training set is empty after the guards" in done.stderr and "too long" in done.stderr
    assert not (tmp_path / "s.db").exists()


def test_fully_truncated_responses_are_counted_not_trained_on(cli, tmp_path):
    # Prompts of ~150 tokens with max_len 160: the answer is cut off for the long ones. Those are dropped and
    # counted in a warning; never trained on with zero label tokens (a loss of 0.0).
    long_q = "word " * 40
    rows = [f'{{"question": "{long_q if i % 2 else "short"} {i}", "answer": "because #### {i}"}}' for i in range(40)]
    data = _write(tmp_path / "d.jsonl", "\n".join(rows).encode())
    text = GOOD.replace('"builtin:arithmetic?n=60"', f'"{data}"').replace("max_len: 160", "max_len: 48")
    done = run_spec(cli, tmp_path, text)
    assert done.returncode == 0, done.stderr
    exported = cli("export", tmp_path / "s.db", "--format", "json")
    (row,) = json.loads(exported.stdout)
    assert row["status"] == "done" and row["label_tokens"] > 0 and row["eval_loss"] > 0
    report = cli("report", tmp_path / "s.db", "--format", "md")
    assert "dropped" in (tmp_path / "s_report" / "results.md").read_text(), report.stderr


def test_old_store_migrates_and_newer_store_is_refused(cli, tmp_path):
    old = tmp_path / "v1.db"
    shutil.copy(FIXTURES / "store_v1.db", old)
    before = old.read_bytes()
    done = cli("status", old)  # read through the migration, in memory
    assert done.returncode == 0, done.stderr
    assert "old-study" in done.stdout and old.read_bytes() == before
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 1
    with sqlite3.connect(old) as db:
        db.execute("UPDATE schema_version SET version = 99")
    err = one_clear_error(cli("status", old))
    assert "newer loraplace" in err and "v99" in err and "upgrade" in err
