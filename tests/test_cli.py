"""End-to-end: the installed command, in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

GPT2_MEDIUM_CFG = "model_type=gpt2,n_layer=24,n_embd=1024,n_head=16,vocab_size=50257"


def run_cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "loraplace", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("all", 6_291_456), ("attn", 2_359_296), ("mlp.up", 1_966_080), ("seed-attn-suffix", 4_325_376)],
)
def test_plan_json_gpt2_medium(placement, expected):
    proc = run_cli("plan", "gpt2-medium", "--model-config", GPT2_MEDIUM_CFG, "--placement", placement, "--rank",
                   "16", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["trainable_params"] == expected
    assert data["total_params"] == 354_823_168
    for key in ("model", "placement", "trainable_percent", "modules", "rank_by_module"):
        assert key in data
    assert len(data["modules"]) == len(data["rank_by_module"])
    if placement == "seed-attn-suffix":
        assert any("mlp.c_proj" in w for w in data["warnings"])


def test_plan_table_output():
    proc = run_cli("plan", "tiny:llama", "--placement", "{roles: [attn], layers: bottom:50%}", "--rank", "4")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj" in proc.stdout
    assert "model.layers.1.self_attn.q_proj" not in proc.stdout
    assert "trainable params" in proc.stdout


def test_plan_from_placement_file(tmp_path):
    spec = tmp_path / "placement.yaml"
    spec.write_text("placement:\n  roles: [mlp]\n  layers: top:1\n  rank: 2\n")
    proc = run_cli("plan", "tiny:gpt2", "--placement", str(spec), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modules"] == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--placement", "attn.q", "--rank", "16"], "use 'attn.qkv'"),
        (["--placement", "{roles: [attn], layers: '30-31'}"], "does not exist"),
        (["--placement", "all", "--rank", "0"], "rank must be a positive"),
        (["--placement", "all", "--budget", "100"], "smaller than rank 1 allows"),
        (["--placement", "{roles: [attn], layerz: all}"], "did you mean 'layers'"),
    ],
)
def test_plan_errors_exit_nonzero_without_traceback(args, message):
    proc = run_cli("plan", "gpt2-medium", "--model-config", GPT2_MEDIUM_CFG, *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_architecture_without_fallback(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "no-such-arch"}))
    proc = run_cli("plan", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no-such-arch" in proc.stderr


def test_debug_shows_traceback():
    proc = run_cli("--debug", "plan", "tiny:gpt2", "--placement", "attn.q")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_train_json_end_to_end(tmp_path):
    proc = run_cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=60", "--placement", "attn",
                   "--rank", "4", "--steps", "3", "--batch", "4", "--max-len", "160", "--precision", "fp32",
                   "--out", str(tmp_path / "t"), "--json", env_extra={"LORAPLACE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("eval_loss", "perplexity", "trainable_params", "train_tokens", "tokens_per_s", "train_s",
                "peak_mem_mb", "adapter_dir"):
        assert key in data, key
    assert data["status"] == "done" and data["steps"] == 3
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_train_bad_data_is_one_clear_error(tmp_path):
    proc = run_cli("train", "--model", "tiny:llama", "--data", str(tmp_path / "missing.jsonl"), "--steps", "1")
    assert proc.returncode == 2 and "data file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_run_then_report_end_to_end(tmp_path):
    """The user's path: run a study, then `loraplace report`; run ends with the comparison table."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: e2e\nmodel: tiny:llama\ndata: {train: 'builtin:arithmetic?n=60', eval_count: 8, "
                    "max_len: 160}\ntrain: {steps: 2, batch: 4, precision: fp32}\nplacements: {all: {preset: all}, "
                    "attn: {preset: attn}}\nranks: [2]\nseeds: [0, 1]\nbaseline: all\n")
    env = {"LORAPLACE_CACHE": str(tmp_path / "cache")}
    ran = run_cli("run", str(spec), "--store", str(tmp_path / "s.db"), "--quiet", env_extra=env)
    assert ran.returncode == 0, ran.stderr
    assert "Placements compared" in ran.stdout and "not budget-matched" in ran.stdout
    rep = run_cli("report", str(tmp_path / "s.db"), "--format", "html,md", env_extra=env)
    assert rep.returncode == 0, rep.stderr
    html = tmp_path / "s_report" / "report.html"
    assert rep.stdout.strip().splitlines()[-1] == f"report: {html}"
    assert html.is_file() and (tmp_path / "s_report" / "results.md").is_file()
    assert not (tmp_path / "s_report" / "results.tex").exists()
    bad = run_cli("report", str(tmp_path / "s.db"), "--format", "docx")
    assert bad.returncode == 2 and "unknown report format" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("report", str(tmp_path / "nope.db"))
    assert missing.returncode == 2 and "no store" in missing.stderr
