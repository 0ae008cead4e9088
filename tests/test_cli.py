"""The command line: every command in process (the ``cli`` fixture), and one true end-to-end subprocess run."""

import json
import os
import subprocess
import sys

import pytest

from helpers import run_cli_in_process, tiny_study_yaml
from loraplace.records import TrialOutcome

GPT2_MEDIUM_CFG = "model_type=gpt2,n_layer=24,n_embd=1024,n_head=16,vocab_size=50257"

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("all", 6_291_456), ("attn", 2_359_296), ("mlp.up", 1_966_080), ("seed-attn-suffix", 4_325_376)],
)
def test_plan_json_gpt2_medium(cli, placement, expected):
    proc = cli("plan", "gpt2-medium", "--model-config", GPT2_MEDIUM_CFG, "--placement", placement, "--rank",
                   "16", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["trainable_params"] == expected
    assert data["total_params"] == 354_823_168
    assert data["model"] == "gpt2-medium" and data["family"] == "gpt2" and data["num_layers"] == 24
    assert data["trainable_percent"] == pytest.approx(100 * expected / 354_823_168, abs=1e-6)
    assert set(data["rank_by_module"].values()) == {16}
    assert data["modules"] == list(data["rank_by_module"]) and len(data["modules"]) == len(data["sites"])
    if placement == "seed-attn-suffix":
        assert any("mlp.c_proj" in w for w in data["warnings"])


def test_plan_table_output(cli):
    proc = cli("plan", "tiny:llama", "--placement", "{roles: [attn], layers: bottom:50%}", "--rank", "4")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj" in proc.stdout
    assert "model.layers.1.self_attn.q_proj" not in proc.stdout
    assert "trainable params" in proc.stdout


def test_plan_from_placement_file(cli, tmp_path):
    spec = tmp_path / "placement.yaml"
    spec.write_text("placement:\n  roles: [mlp]\n  layers: top:1\n  rank: 2\n")
    proc = cli("plan", "tiny:gpt2", "--placement", str(spec), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modules"] == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--placement", "attn.q", "--rank", "16"], "use 'attn.qkv'"),
        (["--placement", "{roles: [attn], layers: '30-31'}"], "does not exist"),
        (["--placement", "all", "--rank", "0"], "Invalid value for '--rank'"),
        (["--placement", "all", "--budget", "100"], "smaller than rank 1 allows"),
        (["--placement", "{roles: [attn], layerz: all}"], "did you mean 'layers'"),
    ],
)
def test_plan_errors_exit_nonzero_without_traceback(cli, args, message):
    proc = cli("plan", "gpt2-medium", "--model-config", GPT2_MEDIUM_CFG, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_documented_per_role_ranks_take_the_default_rank_elsewhere(cli):
    proc = cli("plan", "tiny:llama", "--placement", "{roles: [all], ranks: {attn: 8, mlp.down: 32}}", "--json")
    assert proc.returncode == 0, proc.stderr
    ranks = {s["role"]: s["rank"] for s in json.loads(proc.stdout)["sites"]}
    assert ranks == {"attn.q": 8, "attn.k": 8, "attn.v": 8, "attn.o": 8, "mlp.gate": 16, "mlp.up": 16,
                     "mlp.down": 32}


def test_unknown_architecture_without_fallback(cli, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "no-such-arch"}))
    proc = cli("plan", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no-such-arch" in proc.stderr


def test_debug_shows_traceback(cli):
    proc = cli("--debug", "plan", "tiny:gpt2", "--placement", "attn.q")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_train_json(cli, tmp_path):
    proc = cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=60", "--placement", "attn",
               "--rank", "4", "--steps", "3", "--batch", "4", "--max-len", "160", "--precision", "fp32",
               "--out", tmp_path / "t", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    outcome = TrialOutcome.model_validate_json((tmp_path / "t" / "metrics.json").read_text())
    assert data["status"] == "done" and data["steps"] == 3 == outcome.steps
    assert data["eval_loss"] == outcome.metrics.eval_loss and data["trainable_params"] == outcome.trainable_params
    assert data["adapter_dir"] == str(tmp_path / "t" / "adapter") and data["tokens_per_s"] > 0
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_train_uses_the_spec_defaults(cli, monkeypatch):
    from loraplace import trial as trial_module
    from loraplace.train_config import DEFAULT_STEPS, TrainSpec

    seen = []
    monkeypatch.setattr(trial_module, "run_trial", lambda spec, **_: seen.append(spec) or TrialOutcome.failed(
        trial_module.Failure(kind="error", message="stop here")))
    proc = cli("train", "--model", "tiny:llama")
    assert proc.returncode == 1 and "stop here" in proc.stdout
    assert seen[0].train == TrainSpec() and seen[0].train.steps == DEFAULT_STEPS and seen[0].rank is None


def test_train_bad_data_is_one_clear_error(cli, tmp_path):
    proc = cli("train", "--model", "tiny:llama", "--data", tmp_path / "missing.jsonl", "--steps", "1")
    assert proc.returncode == 2 and "data file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_run_then_report_end_to_end(tmp_path):
    """The one true end-to-end test: the installed command in a subprocess, as a user runs it — run a study,
    then `loraplace report`; run ends with the comparison table."""
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_study_yaml("e2e", steps=2))
    env = dict(os.environ, COLUMNS="200", LORAPLACE_CACHE=str(tmp_path / "cache"))

    def run_cli(*args):
        return subprocess.run([sys.executable, "-m", "loraplace", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)

    ran = run_cli("run", spec, "--store", tmp_path / "s.db")
    assert ran.returncode == 0, ran.stderr
    assert "Placements compared" in ran.stdout and "not budget-matched" in ran.stdout
    # Not a terminal (as under nohup): plain progress lines, one when each trial starts training, then its end.
    assert ran.stderr.count("training, 2 steps") == 4 and ran.stderr.count("→ done") == 4, ran.stderr
    assert "━" not in ran.stderr  # and no progress bar (rich would print the bars' last frame when they stop)
    rep = run_cli("report", tmp_path / "s.db", "--format", "html,md")
    assert rep.returncode == 0, rep.stderr
    html = tmp_path / "s_report" / "report.html"
    assert rep.stdout.strip().splitlines()[-1] == f"report: {html}"
    assert html.is_file() and (tmp_path / "s_report" / "results.md").is_file()
    assert not (tmp_path / "s_report" / "results.tex").exists()


def test_report_errors(cli, tmp_path):
    bad = cli("report", tmp_path / "s.db", "--format", "docx")
    assert bad.returncode == 2 and "unknown report format" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("report", tmp_path / "nope.db")
    assert missing.returncode == 2 and "no store" in missing.stderr


def test_probe_shows_each_measure(tmp_path, capsys, monkeypatch):
    """`loraplace probe` scores by nfn (the default), gradient or warmup: the table, probe.json and the heatmap;
    bad options are one clear error before the model loads."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    common = ["probe", "tiny:llama", "--data", "builtin:arithmetic?n=32", "--batches", "2", "--batch", "4"]
    done = run_cli_in_process(*common, "--measure", "nfn", "--out", tmp_path / "nfn", capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert "normalized feature norm" in done.stdout and "roles by mean NFN, lowest first" in done.stdout
    saved = json.loads((tmp_path / "nfn" / "probe.json").read_text())
    assert saved["measure"] == "nfn" and all(s["actual"] is not None for s in saved["sites"])
    assert (tmp_path / "nfn" / "probe.png").is_file()
    done = run_cli_in_process(*common, "--measure", "gradient", "--json", capsys=capsys)
    assert done.returncode == 0 and json.loads(done.stdout)["measure"] == "gradient"
    done = run_cli_in_process(*common, "--json", capsys=capsys)  # the default: what auto reads without a method
    assert done.returncode == 0 and json.loads(done.stdout)["measure"] == "nfn"
    done = run_cli_in_process(*common, "--measure", "warmup", "--warmup-steps", "2", "--warmup-lr", "0.01",
                              "--out", tmp_path / "warmup", capsys=capsys)
    assert done.returncode == 0, done.stderr
    shown = " ".join(done.stdout.split())  # the table's title wraps
    assert "after 2 warm-up steps at lr 0.01" in shown and "roles by mean relative update" in shown
    saved = json.loads((tmp_path / "warmup" / "probe.json").read_text())
    assert (saved["measure"], saved["warmup_steps"], saved["warmup_lr"]) == ("warmup", 2, 0.01)
    assert all(s["update_norm"] > 0 for s in saved["sites"]) and (tmp_path / "warmup" / "probe.png").is_file()
    bad = run_cli_in_process(*common, "--measure", "norm", "--warmup-lr", "0", capsys=capsys)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--measure" in bad.stderr and "--warmup-lr" in bad.stderr  # every problem, at once


def test_train_reproduces_a_study_arm(tmp_path, capsys, monkeypatch):
    """One trial with a carved validation split and a LoRA variant, as a study's arm has them."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    done = run_cli_in_process("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=48", "--steps", "2",
                              "--batch", "4", "--precision", "fp32", "--test-count", "8", "--validation-count", "8",
                              "--variant", "dora", "--placement", "attn", "--rank", "2", "--json", capsys=capsys)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["val_loss"] is not None and summary["trainable_params"] > 0
    from loraplace.placement import plan_for_model

    assert summary["trainable_params"] == plan_for_model("tiny:llama", {"roles": ["attn"], "variant": "dora"},
                                                         rank=2).trainable_params
    clash = run_cli_in_process("train", "--model", "tiny:llama", "--placement", "{roles: [attn], variant: eva}",
                               "--variant", "dora", capsys=capsys)
    assert clash.returncode == 2 and "give it in one place" in clash.stderr


def test_help_names_the_extras_and_shows_no_type_for_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    done = run_cli_in_process("train", "--help", capsys=capsys)
    assert "loraplace[mlflow]" in done.stdout and "loraplace[tensorboard]" in done.stdout
    assert "loraplace[wandb]" in done.stdout
    flags = [line for line in done.stdout.splitlines() if any(f in line for f in ("--force", "--json", "--help"))]
    assert len(flags) >= 3 and not any("<bool>" in line for line in flags)
    top = run_cli_in_process("--help", capsys=capsys)  # the group's own --help too
    assert "--help" in top.stdout and "<bool>" not in top.stdout
