"""Every mistake a user makes gets one clear error and changes nothing.

Each case runs through the command line (in process) and checks: the documented exit code (2 for a user error),
a message naming the problem, no traceback, no "internal error", and every file in the test's directory — store,
spec, data — byte for byte as before (SHA-256 of each, before and after).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import cli_env, start_run

from helpers import FIXTURES, run_study_once, tiny_study_yaml

GOOD = tiny_study_yaml("mistakes", placements={"all": "{preset: all}", "attn": "{preset: attn}"}, steps=1,
                       seeds=[0])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` → its SHA-256; the tokenisation cache and SQLite's transient -wal/-shm sidecars of
    a reader aside (a read-only connection to a WAL store may create them; the store file itself never changes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.relative_to(root).parts
            and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A finished two-trial study, copied into each test that needs one."""
    return run_study_once(tmp_path_factory.mktemp("finished"), GOOD)


@pytest.fixture
def workdir(tmp_path, finished_store, monkeypatch):
    """A directory holding a spec, data files, a finished store and odd files; the test runs from inside it."""
    (tmp_path / "spec.yaml").write_text(GOOD)
    shutil.copy(finished_store, tmp_path / "s.db")
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-dir" / "keep").write_text("x")
    (tmp_path / "report-file").write_text("a file where a report directory would go\n")
    (tmp_path / "truncated.json").write_text('{"model_type": "llama", "num_hid')
    (tmp_path / "wrong-type.json").write_text('{"model_type": "llama", "num_hidden_layers": "x"}')
    (tmp_path / "columns.jsonl").write_text('{"foo": "bar"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    good_row = '{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n'
    (tmp_path / "broken.jsonl").write_text(good_row * 12 + '{"question": "no answer here"}\n' + good_row * 3)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    (tmp_path / "not.parquet").write_text("question,answer\nWhat is 2 + 2?,4\n")  # CSV under a .parquet name
    monkeypatch.chdir(tmp_path)
    return tmp_path


def spec_with(**replacements: str) -> str:
    text = GOOD
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


CASES = [
    # 2. usage mistakes: click's own message, exit 2
    ("rank not a number", ["plan", "tiny:llama", "--rank", "abc"], "Invalid value for '--rank'"),
    ("unknown option", ["plan", "tiny:llama", "--bogus"], "No such option: --bogus"),
    ("mistyped command", ["plna", "tiny:llama"], "No such command 'plna'"),
    ("missing argument", ["plan"], "Missing argument"),
    ("config value not a number", ["plan", "x", "--model-config", "model_type=llama,num_hidden_layers=abc"],
     "num_hidden_layers"),
    ("config value zero", ["plan", "x", "--model-config", "model_type=llama,num_hidden_layers=0"],
     "num_hidden_layers=0: must be positive"),
    ("config value negative", ["plan", "x", "--model-config", "model_type=llama,num_hidden_layers=-2"],
     "num_hidden_layers=-2: must be positive"),
    ("truncated config.json", ["plan", "truncated.json"], "truncated.json is not valid JSON"),
    ("wrong-typed config.json", ["plan", "wrong-type.json"], "num_hidden_layers"),
    ("text file as a store", ["status", "notes.txt"], "not a loraplace store"),
    ("0-byte file as a store", ["report", "empty.db"], "not a loraplace store"),
    ("text file as a store to run into", ["run", "spec.yaml", "--store", "notes.txt"], "not a loraplace store"),
    ("directory as a store", ["run", "spec.yaml", "--store", "a-dir"], "is a directory"),
    ("export into a missing directory", ["export", "s.db", "--out", "nowhere/trials.csv"], "does not exist"),
    ("export onto a directory", ["export", "s.db", "--out", "a-dir"], "is a directory"),
    ("report onto a file", ["report", "s.db", "--out", "report-file"], "is a file"),
    ("spec path is a directory", ["run", "a-dir"], "is a directory"),
    # a store where the spec belongs said "not UTF-8 text (invalid start byte …)"; a spec where a store belongs
    # said only "not an SQLite database"
    ("a store given as the spec", ["run", "s.db"], "s.db: a study store (SQLite database), not a YAML spec"),
    ("a spec given as the store", ["report", "spec.yaml"], "it looks like a study spec"),
    ("train on CUDA without CUDA", ["train", "--model", "tiny:llama", "--device", "cuda", "--steps", "1"],
     "has no CUDA"),
    # 5. bad data, model reference and device: refused before the store is written
    ("missing data file", ["run", "bad.yaml"], "data file not found", spec_with(
        **{'"builtin:arithmetic?n=60"': '"missing.jsonl"'})),
    ("empty data file", ["run", "bad.yaml"], "holds no records", spec_with(
        **{'"builtin:arithmetic?n=60"': '"empty.jsonl"'})),
    ("wrong columns", ["run", "bad.yaml"], "cannot detect the data format", spec_with(
        **{'"builtin:arithmetic?n=60"': '"columns.jsonl"'})),
    ("not UTF-8", ["run", "bad.yaml"], "not UTF-8", spec_with(**{'"builtin:arithmetic?n=60"': '"latin1.jsonl"'})),
    ("bad builtin parameter", ["run", "bad.yaml"], "bad parameters for builtin:arithmetic", spec_with(
        **{"n=60": "n=lots"})),
    ("unknown device", ["run", "bad.yaml"], "not a device name", spec_with(**{"precision: fp32": "precision: fp32, "
                                                                              "device: gpu0"})),
    ("unknown model", ["run", "bad.yaml"], "no-such-model",
     spec_with(**{"model: tiny:llama": "model: ./no-such-model"})),
    # 3. bad axis values: at load time, with their key path, alongside every other problem
    ("bad axis values", ["run", "bad.yaml"], "axes.lr[0]", spec_with(**{"seeds: [0]": "seeds: [0]\naxes: {lr: [-1], "
                                                                         "steps: [0], batch: [x], schedule: [exp]}"})),
    # 6. keys that would do nothing
    ("typo in a ranks key", ["plan", "tiny:llama", "--placement", "{roles: [attn], ranks: {atn: 8}}"],
     "did you mean 'attn'"),
    ("ranks for a role not placed", ["plan", "tiny:llama", "--placement", "{roles: [attn], ranks: {mlp.down: 8}}"],
     "adapts no 'mlp.down' site"),
    ("ranks next to groups that set every rank", ["plan", "tiny:llama", "--placement",
     '{groups: [{roles: [attn], layers: "bottom:50%", rank: 8}, {roles: [mlp], layers: "top:50%", rank: 4}], '
     "ranks: {mlp.down: 12}}"], "ranks.mlp.down"),
    ("rank and budget both", ["plan", "tiny:llama", "--rank", "4", "--budget", "5000"], "both given"),
    # 7. smaller ones
    ("placement file that does not exist", ["plan", "tiny:llama", "--placement", "mine.yaml"],
     "no such placement file"),
    ("unknown backend", ["run", "spec.yaml", "--store", "new.db", "--backend", "slurm"], "unknown backend"),
    ("rank far above the layer width", ["plan", "tiny:llama", "--rank", "100000"], "--force"),
    ("rank far above the layer width in a study", ["run", "bad.yaml"], "--force", spec_with(
        **{"ranks: [2]": "ranks: [100000]"})),
    ("placement name of 300 characters", ["run", "bad.yaml"], "at most 48 characters", spec_with(
        **{"attn: {preset: attn}": "a" * 300 + ": {preset: attn}"})),
    # 8. mixture of experts, splits, tuning, variants
    ("mlp.up on an MoE model", ["plan", "tiny:mixtral", "--placement", "mlp.up"], "use 'moe.experts.*' roles"),
    ("'all' where some weights have no role", ["plan", "x", "--model-config",
     "model_type=jamba,num_hidden_layers=2,attn_layer_offset=1,attn_layer_period=2", "--placement", "all"],
     "--allow-unassigned"),
    ("dropout on fused experts", ["plan", "tiny:qwen3_moe", "--placement", "{roles: [moe], dropout: 0.1}"],
     "cannot apply LoRA dropout to parameter targets"),
    ("dora on fused experts", ["plan", "tiny:qwen3_moe", "--placement", "{roles: [moe], variant: dora}"],
     "supports only lora and rslora on parameter targets"),
    ("unknown variant", ["plan", "tiny:llama", "--placement", "{roles: [all], variant: qlora}"],
     "'lora', 'rslora', 'dora', 'pissa' or 'eva'"),
    ("tune without a validation split", ["run", "bad.yaml"], "tune selects on the validation split", spec_with(
        **{"seeds: [0]": "seeds: [0]\ntune: {lr: [1.0e-3, 3.0e-3]}"})),
    ("tune next to an lr axis", ["run", "bad.yaml"], "tune.lr and axes.lr both sweep", spec_with(
        **{"seeds: [0]": "seeds: [0]\ntune: {lr: [1.0e-3, 3.0e-3]}\naxes: {lr: [1.0e-3]}",
           "eval_count: 8": "eval_count: 8, validation_count: 8"})),
    ("test split given twice", ["run", "bad.yaml"], "give one of test, test_fraction, test_count", spec_with(
        **{"eval_count: 8": "eval_count: 8, test_count: 8"})),
    ("held-out splits as large as the data", ["run", "bad.yaml"], "leave no training examples", spec_with(
        **{"eval_count: 8": "eval_count: 40, validation_count: 30"})),
    # round 2 (issue 28): a key given twice would silently keep the last one
    ("a placement name given twice", ["run", "bad.yaml"], "key 'all' is given twice (first at line 6)",
     spec_with(**{"  attn: {preset: attn}": "  all: {preset: attn}"})),
    ("a section given twice", ["run", "bad.yaml"], "key 'train' is given twice (first at line 4)",
     spec_with(**{"seeds: [0]": "seeds: [0]\ntrain: {steps: 5}"})),
    ("a key given twice in an inline placement", ["plan", "tiny:llama", "--placement",
     "{roles: [attn], roles: [mlp]}"], "key 'roles' is given twice"),
    # round 2: arms or grid values that would be the same trials (one would vanish from the comparison)
    ("two arms with one placement", ["run", "bad.yaml"], "placements all, control are the same placement",
     spec_with(**{"  attn: {preset: attn}": "  control: {preset: all}\n  attn: {preset: attn}"})),
    ("a rank twice", ["run", "bad.yaml"], "ranks has duplicates (2)", spec_with(**{"ranks: [2]": "ranks: [2, 4, 2]"})),
    ("a budget twice", ["run", "bad.yaml"], "budgets has duplicates (900)",
     spec_with(**{"ranks: [2]": "budgets: [900, 900]"})),
    ("an axis value twice", ["run", "bad.yaml"], "lr has duplicates (0.001)",
     spec_with(**{"seeds: [0]": "seeds: [0]\naxes: {lr: [1.0e-3, 1.0e-3]}"})),
    ("a test split given twice without a count", ["run", "bad.yaml"], "give one of test, test_fraction",
     spec_with(**{"eval_count: 8": "eval: columns.jsonl, test_fraction: 0.5"})),
    ("a validation split given twice without a count", ["run", "bad.yaml"], "give one of validation, "
     "validation_fraction", spec_with(**{"eval_count: 8": "eval_count: 8, validation: columns.jsonl, "
                                         "validation_fraction: 0.5"})),
    ("validation and test the same file", ["run", "bad.yaml"], "validation and test are the same source",
     spec_with(**{"eval_count: 8": "test: columns.jsonl, validation: columns.jsonl"})),
    # round 2: sizes that are not sizes, options that cannot take effect
    ("a negative batch", ["plan", "tiny:llama", "--batch", "-3", "--device-memory", "1MiB"],
     "Invalid value for '--batch'"),
    ("a zero max-len", ["plan", "tiny:llama", "--max-len", "0"], "Invalid value for '--max-len'"),
    ("a negative device memory", ["plan", "tiny:llama", "--device-memory", "-5GiB"],
     "--device-memory '-5GiB': a size must be positive"),
    ("a zero device memory", ["plan", "tiny:llama", "--device-memory", "0"], "a size must be positive"),
    ("a device memory that is not a size", ["plan", "tiny:llama", "--device-memory", "lots"], "is not a size"),
    ("a zero budget to recommend", ["recommend", "s.db", "--budget", "0"], "Invalid value for '--budget'"),
    ("export --from with placement options", ["export-placement", "--from", "s.db", "--to", "peft", "--rank", "64",
     "-p", "attn"], "--rank: --from exports the placement the study measured"),
    ("plan --data without an auto placement", ["plan", "tiny:llama", "--data", "columns.jsonl"],
     "only an auto placement's probe reads data"),
    ("plan --fill without a budget", ["plan", "tiny:llama", "--fill", "uniform"],
     "fill says how a budget is spent"),
    ("export --metric without --from", ["export-placement", "tiny:llama", "--to", "peft", "--metric", "accuracy"],
     "--metric: reads a study store"),
    # round 2: data that leaves nothing to train, known before the store exists
    ("every example too long for max_len", ["run", "bad.yaml"], "the training set is empty after the guards",
     spec_with(**{"max_len: 160": "max_len: 24"})),
    ("a builtin source of no examples", ["run", "bad.yaml"], "holds no records", spec_with(**{"n=60": "n=0"})),
    ("train on a builtin source of no examples", ["train", "--model", "tiny:llama", "--data",
     "builtin:arithmetic?n=0", "--steps", "1"], "builtin:arithmetic?n=0 holds no records"),
    ("a record after the first breaks the format", ["run", "bad.yaml"], "record 13 of 16: format 'gsm8k' needs "
     "columns", spec_with(**{'"builtin:arithmetic?n=60"': '"broken.jsonl"'})),
    ("fuse not a number, auto or off", ["run", "bad.yaml"], "or input should be 'auto' or 'off' (got 'many')",
     spec_with(**{"seeds: [0]": "seeds: [0]\nexecution: {fuse: many}"})),
    ("a tune seed twice", ["run", "bad.yaml"], "tune.seeds has duplicates", spec_with(
        **{"seeds: [0]": "seeds: [0]\ntune: {lr: [1.0e-3, 3.0e-3], seeds: [0, 0]}",
           "eval_count: 8": "eval_count: 8, validation_count: 8"})),
    # round 3: a section written empty is YAML null — `search:` alone ran the full tuned grid without a word
    ("an empty search section", ["run", "bad.yaml"], "search: is empty (nothing after the colon reads as null) — "
     "write search: {} for its defaults", spec_with(
         **{"seeds: [0]": "seeds: [0]\ntune: {lr: [1.0e-3, 3.0e-3]}\nsearch:",
            "eval_count: 8": "eval_count: 8, validation_count: 8"})),
    ("warm-up longer than training", ["train", "--model", "tiny:llama", "--steps", "4", "--warmup", "100"],
     "warmup 100 is not below steps 4: the learning rate would never leave its warm-up ramp"),
    ("a study's warm-up longer than its steps", ["run", "bad.yaml"], "warmup 30 is not below steps 12",
     spec_with(**{"train: {steps: 1,": "train: {steps: 12, warmup: 30,"})),
    ("save_state_every on", ["run", "bad.yaml"], "save_state_every takes seconds (600), a duration ('10m', '1h') "
     "or off; on/true is not an interval",
     spec_with(**{"seeds: [0]": "seeds: [0]\nexecution: {save_state_every: on}"})),
    ("save_state_every not a duration", ["run", "bad.yaml"], "save_state_every 'soon' is not a duration",
     spec_with(**{"seeds: [0]": "seeds: [0]\nexecution: {save_state_every: soon}"})),
    ("PiSSA on a quantized base", ["run", "bad.yaml"], "placements.all: variant pissa rewrites the base weights "
     "from their SVD: not on a base quantized nf4", spec_with(
         **{"  all: {preset: all}": "  all: {preset: all, variant: pissa}",
            "seeds: [0]": "seeds: [0]\naxes: {quantize: [none, nf4]}"})),
    ("eval points past the last step", ["run", "bad.yaml"], "eval.at_steps must stay below train.steps (1)",
     spec_with(**{"seeds: [0]": "seeds: [0]\neval: {at_steps: [2]}"})),
    ("a .parquet file that is not Parquet", ["run", "bad.yaml"], "not.parquet is not a readable Parquet file",
     spec_with(**{'"builtin:arithmetic?n=60"': '"not.parquet"'})),
    ("train on a .parquet file that is not Parquet", ["train", "--model", "tiny:llama", "--data", "not.parquet",
     "--steps", "1"], "not.parquet is not a readable Parquet file"),
    # round 3: messages that named the wrong cause
    ("a directory as the training data", ["run", "bad.yaml"], "is a directory, not a data file",
     spec_with(**{'"builtin:arithmetic?n=60"': '"a-dir"'})),
    ("a directory as a placement file", ["plan", "tiny:llama", "--placement", "a-dir"],
     "a-dir is a directory, not a placement file"),
    ("an empty spec file", ["run", "empty.jsonl"], "empty.jsonl: the file is empty (or only comments)"),
    # a file where a folder is expected said "permission denied", "does not exist" or an internal NotADirectoryError
    ("a store under a file", ["run", "spec.yaml", "--store", "notes.txt/x.db"],
     "notes.txt/x.db: notes.txt is a file, not a folder"),
    ("export under a file", ["export", "s.db", "--out", "notes.txt/trials.csv"],
     "--out notes.txt/trials.csv: notes.txt is a file, not a folder"),
    ("export-placement onto a directory", ["export-placement", "--from", "s.db", "--to", "axolotl", "--lossy",
     "--out", "a-dir"], "e.g. axolotl.yaml"),
    ("a report under a file", ["report", "s.db", "--out", "notes.txt/report", "-q"],
     "--out notes.txt/report: notes.txt is a file, not a folder"),
    ("train --out under a file", ["train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=24", "--steps",
     "1", "--out", "notes.txt/run1"], "--out notes.txt/run1: notes.txt is a file, not a folder"),
    ("a text file as the model", ["plan", "notes.txt", "-p", "attn"], "notes.txt is a file but not a config.json"),
    ("a directory to reuse from", ["run", "spec.yaml", "--store", "new.db", "--reuse-from", "a-dir"],
     "--reuse-from a-dir is a directory, not a store file"),
    ("a text file as a placement", ["plan", "tiny:llama", "--placement", "notes.txt"],
     "notes.txt is a file, but a placement file is .yaml, .yml or .json"),
    ("a Ray address without the Ray backend", ["run", "spec.yaml", "--store", "new.db", "--address", "10.0.0.1:6379"],
     "--address 10.0.0.1:6379 is a Ray cluster's address, but the backend is local"),
    # work done, then an error: every trial failed at run time, after the store was written
    ("a negative seed", ["run", "bad.yaml"], "seeds[0]: Input should be greater than or equal to 0",
     spec_with(**{"seeds: [0]": "seeds: [-1]"})),
    ("train with a negative seed", ["train", "--model", "tiny:llama", "--seed", "-1", "--steps", "1"],
     "train.seed: Input should be greater than or equal to 0"),
    ("a budget below rank 1 for every cell", ["run", "bad.yaml"], "no cell of the grid can run",
     spec_with(**{"ranks: [2]": "budget: 10"})),
    # an example longer than GPT-2's learned positions failed its trial with "IndexError: index out of range in self"
    ("max_len above a learned-position model's positions", ["train", "--model", "tiny:gpt2", "--max-len", "600",
     "--steps", "1"], "max_len 600 is above the 512 positions of tiny:gpt2"),
    ("a study's max_len above GPT-2's positions", ["run", "bad.yaml"], "set max_len to 512 or less",
     spec_with(**{"model: tiny:llama": "model: tiny:gpt2", "max_len: 160": "max_len: 600"})),
    ("an empty tune section", ["run", "bad.yaml"], "tune: is empty (nothing after the colon reads as null) — give "
     "its settings, or leave the key out", spec_with(**{"seeds: [0]": "seeds: [0]\ntune:"})),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_clear_error_and_changes_nothing(cli, workdir, case):
    _, args, expected, *spec = case
    if spec:
        (workdir / "bad.yaml").write_text(spec[0])
    before = snapshot(workdir)
    done = cli(*args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, (done.returncode, output)
    assert expected in output, output
    assert "Traceback" not in output and "internal error" not in output
    assert snapshot(workdir) == before  # not a byte changed, nothing created (no store for a refused run)


def test_a_store_folder_the_file_system_refuses_is_named_with_the_os_reason(cli, workdir, monkeypatch):
    """`--store /proc/x/y.db` (root may write /proc, yet no folder can be made there) ended in "internal error:
    FileNotFoundError". Any file system that refuses the folder — read-only, full — is named with the OS's words."""
    import errno
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name == "fresh":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    before = snapshot(workdir)
    done = cli("run", "spec.yaml", "--store", "fresh/x.db")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert "fresh/x.db: its folder cannot be created (fresh: Read-only file system)" in output, output
    assert "internal error" not in output and snapshot(workdir) == before


def test_an_os_error_on_a_named_path_is_a_clear_error_not_an_internal_one(cli, workdir, monkeypatch):
    """The last line of defence for the file system: an OSError that names a path (one no check foresaw) is exit 2
    with the path and the OS's reason; an error naming no path stays an internal error (exit 1)."""
    import errno

    def fails(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "s_report/figure.png")

    monkeypatch.setattr("loraplace.analysis.report.write_report", fails)  # report imports it at call time
    done = cli("report", "s.db", "-q")
    output = " ".join(done.stderr.split())
    assert done.returncode == 2 and "error: s_report/figure.png: Input/output error" in output, output
    assert "internal error" not in output
    monkeypatch.setattr("loraplace.analysis.report.write_report", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    done = cli("report", "s.db", "-q")
    assert done.returncode == 1 and "internal error: OSError" in done.stderr


def test_an_edited_spec_is_refused_with_its_differences(cli, workdir):
    edited = spec_with(**{"lr: 0.001": "lr: 0.002", "  attn: {preset: attn}\n": ""})
    (workdir / "spec.yaml").write_text(edited)
    before = snapshot(workdir)
    done = cli("run", "spec.yaml", "--store", "s.db")
    assert done.returncode == 2 and "was run with a different spec" in done.stderr
    assert "train.lr: 0.001 → 0.002" in done.stderr and "placements.attn: removed" in done.stderr
    assert "--extend" in done.stderr and "--store" in done.stderr
    assert snapshot(workdir) == before
    # --extend cannot help here: group "all r=2" would mix lr 0.001 and 0.002
    extended = cli("run", "spec.yaml", "--store", "s.db", "--extend")
    assert extended.returncode == 2 and "would mix configurations inside group(s) all r=2" in extended.stderr
    assert "In all r=2, stored → now:\n  train.lr: 0.001 → 0.002" in extended.stderr  # what differs, per trial
    assert snapshot(workdir) == before


def test_extend_never_drops_or_replaces_an_arm(cli, workdir):
    """`attn` replaced by `mlp` under --extend: refused, naming the stored group the spec drops; nothing written."""
    (workdir / "spec.yaml").write_text(spec_with(**{"  attn: {preset: attn}": "  mlp: {preset: mlp}"}))
    before = snapshot(workdir)
    done = cli("run", "spec.yaml", "--store", "s.db", "--extend")
    assert done.returncode == 2 and "--extend only adds cells" in done.stderr and "attn r=2" in done.stderr
    assert "placements.attn: removed" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(workdir) == before


def test_extend_adds_cells_and_keeps_every_group_homogeneous(cli, workdir):
    from loraplace.store import Store

    grown = spec_with(**{"seeds: [0]": "seeds: [0, 1]", "  attn: {preset: attn}\n":
                         "  attn: {preset: attn}\n  mlp: {preset: mlp}\n"})
    (workdir / "spec.yaml").write_text(grown)
    refused = cli("run", "spec.yaml", "--store", "s.db")
    assert refused.returncode == 2 and "seeds: [0] → [0, 1]" in refused.stderr
    done = cli("run", "spec.yaml", "--store", "s.db", "--extend", "-q")
    assert done.returncode == 0, done.stderr
    with Store.open_readonly(workdir / "s.db") as store:
        trials = store.trials(store.study().id)
    assert len(trials) == 6 and all(t.status == "done" for t in trials)
    groups: dict = {}
    for t in trials:
        train = {k: v for k, v in t.spec["train"].items() if k != "seed"}
        groups.setdefault(t.labels.group.label, set()).add(json.dumps(t.spec | {"train": train}, sort_keys=True))
    assert sorted(groups) == ["all r=2", "attn r=2", "mlp r=2"]
    assert all(len(configs) == 1 for configs in groups.values())  # homogeneous: only the seed differs
    assert cli("run", "spec.yaml", "--store", "s.db", "-q").returncode == 0  # now it is the study's spec


def test_a_rerun_with_failed_trials_says_retry_failed(cli, workdir, monkeypatch):
    from loraplace import runner
    from loraplace.records import Failure, TrialOutcome

    spec = workdir / "new.yaml"
    spec.write_text(GOOD)
    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_trial", lambda *_a, **_k: TrialOutcome.failed(Failure(kind="error",
                                                                                       message="boom")))
        first = cli("run", spec, "--store", "new.db", "-q")
    assert first.returncode == 1
    again = cli("run", spec, "--store", "new.db", "-q")
    assert again.returncode == 1 and "2 trial(s) failed in an earlier run" in again.stderr
    assert "--retry-failed" in again.stderr and "boom" in again.stdout  # the whole reason, in the status
    fixed = cli("run", spec, "--store", "new.db", "-q", "--retry-failed")
    assert fixed.returncode == 0, fixed.stderr


def test_a_bom_is_read_and_eval_overlap_is_warned(cli, workdir):
    rows = [json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) for i in range(24)]
    (workdir / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    (workdir / "eval.csv").write_bytes(b"\xef\xbb\xbfquestion,answer\n" + "\n".join(
        f"What is {i} + 1?,#### {i + 1}" for i in range(4)).encode())
    text = spec_with(**{'train: "builtin:arithmetic?n=60", eval_count: 8': 'train: train.jsonl, eval: eval.csv'})
    (workdir / "bom.yaml").write_text(text)
    done = cli("run", "bom.yaml", "--store", "bom.db", "-q")
    assert done.returncode == 0, done.stderr
    assert "4 of 4 test example(s) are also training examples" in done.stderr


def test_cjk_and_long_names_render_without_warnings(cli, workdir, recwarn):
    text = spec_with(**{"attn: {preset: attn}": "注意力: {preset: attn}"})
    (workdir / "cjk.yaml").write_text(text)
    done = cli("run", "cjk.yaml", "--store", "cjk.db", "-q")
    assert done.returncode == 0, done.stderr
    report = cli("report", "cjk.db")
    assert report.returncode == 0 and "注意力" in (workdir / "cjk_report" / "results.md").read_text()
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


def test_an_interrupt_before_any_trial_does_not_claim_one_was_interrupted(cli, workdir, monkeypatch):
    from loraplace.study import checks

    def interrupted(_study):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, "check_inputs", interrupted)
    (workdir / "new.yaml").write_text(GOOD)
    done = cli("run", "new.yaml", "--store", "new.db")
    assert done.returncode == 130 and "before any trial ran" in done.stderr and "marked" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                    (signal.SIGINT, 130, "interrupted")])
def test_sigterm_stops_a_run_like_sigint(tmp_path, sig, code, word, fork_server):
    """SIGTERM (a scheduler, `kill`) marks the trial in flight interrupted and exits 143 with a message. The run is
    forked from the fork server; its signal handling is installed by the command after the fork."""
    from reliability_helpers import attempts, wait_for

    from loraplace.store import Store

    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_study_yaml("sig", steps=400, seeds=[0]))
    db = tmp_path / "s.db"
    proc = start_run(spec, db, cli_env(tmp_path), server=fork_server, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    assert wait_for(lambda: attempts(db) >= 1, timeout=180)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    # SIGINT: exit status 130, or death by SIGINT (-2), which a shell reports as 130 too. The latter was seen in ~1 of
    # 10 runs on a loaded machine (2026-11-24) after the interrupt had been handled — message printed, trial marked
    # interrupted — so the process ends by a signal only after loraplace's handling; its cause was not found.
    accepted = (code, -signal.SIGINT) if sig == signal.SIGINT else (code,)
    assert proc.returncode in accepted and word in stderr and "marked interrupted" in stderr, stderr
    assert "Traceback" not in stderr
    with Store.open_readonly(db) as store:
        assert [t.status for t in store.trials(store.study().id)][0] == "interrupted"


def _unprivileged(probe_dir: Path) -> list[str] | None:
    """A command prefix under which file permissions apply, or None. Root ignores them (CAP_DAC_OVERRIDE), so as
    root the commands run under ``setpriv`` with that capability dropped from the bounding set."""
    prefix = [] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if prefix and shutil.which("setpriv") is None:
        return None
    attempt = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe_dir / 'x')!r}, 'w')"],
                             capture_output=True, text=True)
    return prefix if attempt.returncode != 0 and "PermissionError" in attempt.stderr else None


@pytest.mark.slow
def test_reads_work_on_a_read_only_store_and_change_nothing(finished_store, tmp_path):
    """status, export and report on a finished store in a read-only directory: they work, and its bytes stay."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(finished_store, ro / "s.db")
    shutil.copy(FIXTURES / "store_v1.db", ro / "v1.db")  # an old schema: read through the migration, in memory
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(ro)
    for path in (ro / "s.db", ro / "v1.db"):
        path.chmod(0o444)
    ro.chmod(0o555)
    try:
        prefix = _unprivileged(ro)
        if prefix is None:
            pytest.skip("permissions are not enforced for this user (root with CAP_DAC_OVERRIDE and no setpriv)")
        env = dict(os.environ, LORAPLACE_CACHE=str(out / "cache"), MPLCONFIGDIR=str(out / "mpl"))
        for args in (["status", ro / "s.db"], ["status", ro / "v1.db"], ["export", ro / "s.db", "--format", "json",
                     "--out", out / "trials.json"], ["report", ro / "s.db", "--out", out / "report", "-q"]):
            done = subprocess.run([*prefix, sys.executable, "-m", "loraplace", *map(str, args)], capture_output=True,
                                  text=True, env=env, timeout=300)
            assert done.returncode == 0, (args, done.stderr)
        assert len(json.loads((out / "trials.json").read_text())) == 2
        assert (out / "report" / "report.html").is_file()
    finally:
        ro.chmod(0o755)
    assert snapshot(ro) == before
    assert sorted(p.name for p in ro.iterdir()) == ["s.db", "v1.db"]  # not even a -wal or -shm sidecar


# Every command that writes an --out file, with the format it writes (export-placement: --from the store, or a model).
OUT_COMMANDS = [
    ("export csv", ["export", "s.db", "--format", "csv", "--out"]),
    ("export json", ["export", "s.db", "--format", "json", "--out"]),
    ("export parquet", ["export", "s.db", "--format", "parquet", "--out"]),
    *[(f"export-placement --from {fmt}", ["export-placement", "--from", "s.db", "--to", fmt, "--lossy", "--out"])
      for fmt in ("peft", "trl", "axolotl", "llamafactory")],
    ("export-placement --from torchtune", ["export-placement", "--from", "s.db", "--to", "torchtune", "--lossy",
                                           "--torchtune-component", "torchtune.models.llama3_2.lora_llama3_2_1b",
                                           "--out"]),
    ("export-placement MODEL peft", ["export-placement", "tiny:llama", "-p", "attn", "--to", "peft", "--out"]),
]


@pytest.mark.parametrize("victim", ["s.db", "spec.yaml", "notes.txt", "columns.jsonl"])
@pytest.mark.parametrize("command", OUT_COMMANDS, ids=[c[0] for c in OUT_COMMANDS])
def test_no_out_option_writes_over_a_store_a_spec_data_or_a_foreign_file(cli, workdir, command, victim):
    """`export s.db --format csv --out s.db` once turned the store into CSV text. Every --out refuses an existing
    file it did not write itself (the store, the spec, data, anything else) and changes nothing; its own earlier
    output of the same kind is replaced."""
    _, args = command
    before = snapshot(workdir)
    done = cli(*args, victim)
    output = " ".join((done.stdout + done.stderr).split())  # unwrapped
    assert done.returncode == 2, (done.returncode, output)
    assert "is not overwritten" in output or "this command's input" in output, output
    assert "Traceback" not in output and "internal error" not in output
    assert snapshot(workdir) == before
    first = cli(*args, "fresh.out")  # a new file: written
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli(*args, "fresh.out")  # its own earlier output: replaced
    assert again.returncode == 0, again.stdout + again.stderr


DIR_OUT_COMMANDS = [
    ("train", ["train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=24", "--steps", "1", "--out"]),
    ("probe", ["probe", "tiny:llama", "--data", "builtin:arithmetic?n=16", "--batches", "1", "--batch", "2",
               "--out"]),
    ("report", ["report", "s.db", "--out"]),
]


@pytest.mark.parametrize("victim", ["s.db", "spec.yaml", "notes.txt"])
@pytest.mark.parametrize("command", DIR_OUT_COMMANDS, ids=[c[0] for c in DIR_OUT_COMMANDS])
def test_a_directory_out_option_refuses_a_file_before_any_work(cli, workdir, command, victim):
    """`train --out f.txt` once trained first and then failed to save. A command that writes a directory refuses an
    existing file there before loading, tokenising or training anything."""
    _, args = command
    before = snapshot(workdir)
    done = cli(*args, victim)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "is a file" in output, output
    assert "Traceback" not in output and "step" not in output.lower()
    assert snapshot(workdir) == before


def test_train_out_never_replaces_a_file_it_did_not_write(cli, workdir):
    (workdir / "a-dir" / "metrics.json").write_text("my own notes\n")
    before = snapshot(workdir)
    done = cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=24", "--steps", "1", "--out", "a-dir")
    assert done.returncode == 2 and "is not overwritten" in " ".join(done.stderr.split())
    assert snapshot(workdir) == before
    (workdir / "a-dir" / "metrics.json").unlink()
    first = cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=24", "--steps", "1", "--out", "run1")
    assert first.returncode == 0, first.stderr
    again = cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=24", "--steps", "1", "--out", "run1")
    assert again.returncode == 0, again.stderr  # its own earlier output is replaced


@pytest.mark.slow
def test_writing_where_it_may_not_is_one_clear_error(finished_store, tmp_path):
    """A run into a read-only store, a run into a read-only folder, a report beside a store in a read-only folder:
    exit 2 and a message naming the path, never SQLite's or Python's own words."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD)
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(finished_store, ro / "s.db")
    ro_file = tmp_path / "ro-file.db"
    shutil.copy(finished_store, ro_file)
    ro_file.chmod(0o444)
    ro.chmod(0o555)
    try:
        prefix = _unprivileged(ro)
        if prefix is None:
            pytest.skip("permissions are not enforced for this user (root with CAP_DAC_OVERRIDE and no setpriv)")
        env = dict(os.environ, LORAPLACE_CACHE=str(tmp_path / "cache"), MPLCONFIGDIR=str(tmp_path / "mpl"))
        for args, path in ((["run", spec, "--store", ro_file, "-q"], ro_file),
                           (["run", spec, "--store", ro / "new.db", "-q"], ro / "new.db"),
                           (["run", spec, "--store", ro / "s.db", "-q"], ro / "s.db"),
                           (["report", ro / "s.db", "-q"], ro / "s_report")):
            done = subprocess.run([*prefix, sys.executable, "-m", "loraplace", *map(str, args)], capture_output=True,
                                  text=True, env=env, timeout=300)
            output = " ".join(done.stderr.split())
            assert done.returncode == 2, (args, done.stderr)
            assert str(path) in output and ("cannot be written" in output or "permission denied" in output), output
            assert "internal error" not in output and "Traceback" not in output and "readonly database" not in output
    finally:
        ro.chmod(0o755)
