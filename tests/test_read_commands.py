"""Commands that only read a store load neither torch nor transformers (a table should not wait seconds for a
deep-learning stack), nor does a `run` refused for its store, and the pure-Python Kendall tau they use instead of
scipy's agrees with it."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from helpers import ROOT, tiny_study_yaml

READ_COMMANDS = [
    ["status", "{grid}"],
    ["status", "{search}"],
    ["recommend", "{grid}"],
    ["recommend", "{search}", "--json"],
    ["export", "{grid}", "--format", "csv", "--out", "{tmp}/trials.csv"],
    ["report", "{search}", "--out", "{tmp}/report", "--format", "md,csv", "--quiet"],
    ["compare", "{grid}", "{search}", "--out", "{tmp}/compare", "--format", "md,csv", "--quiet"],
    # not a read, but refused before any work: a store it could not write is said in a second, not after ~5 s of
    # imports (the spec file stands where the store's folder should be); exit 2
    ["run", "{tmp}/grid.yaml", "--store", "{tmp}/grid.yaml/new.db", "-q"],
]

# Runs every command with the CLI's own entry point in one fresh interpreter, and reports after each which of the
# heavy packages it had imported.
PROBE = """
import json, sys
from loraplace.cli import main
out = []
for args in json.loads(sys.argv[1]):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out.append({"args": args, "code": code, "loaded": [m for m in ("torch", "transformers", "peft", "scipy")
                                                         if m in sys.modules]})
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from loraplace.study import load_study, run_study

    root = tmp_path_factory.mktemp("read")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        grid = tiny_study_yaml("grid", steps=2, seeds=[0, 1])
        (root / "grid.yaml").write_text(grid)
        run_study(load_study(root / "grid.yaml"), root / "grid.db")
        search = tiny_study_yaml("srch", steps=4, seeds=[0, 1], baseline=None, n=80,
                                 extra="tune: {lr: [1.0e-4, 1.0e-2]}\nsearch: {eta: 2}\n")
        (root / "search.yaml").write_text(search.replace("eval_count: 8,", "eval_count: 8, validation_count: 8,"))
        run_study(load_study(root / "search.yaml"), root / "search.db")
    finally:
        mp.undo()
    return root


def test_read_commands_load_neither_torch_nor_transformers(stores):
    commands = [[part.format(grid=stores / "grid.db", search=stores / "search.db", tmp=stores) for part in command]
                for command in READ_COMMANDS]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.rsplit("PROBE", 1)[1])
    for result in results:
        assert result["code"] == (2 if result["args"][0] == "run" else 0), (result, done.stderr[-2000:])
        assert "torch" not in result["loaded"] and "transformers" not in result["loaded"], result
    # a status table needs no statistics either (scipy: seconds to import); the analyses that compute
    # intervals load it when they do
    assert "scipy" not in results[0]["loaded"] and "scipy" not in results[1]["loaded"]


def test_kendall_tau_is_scipy_s_tau_b():
    from scipy.stats import kendalltau

    from loraplace.analysis.search import kendall_tau

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 12)
        a = [rng.choice([1.0, 2.0, 3.0, 4.5]) for _ in range(n)]
        b = [rng.choice([1.0, 2.0, 3.0]) for _ in range(n)]
        expected = kendalltau(a, b).statistic
        got = kendall_tau(a, b)
        assert (got is None and expected != expected) or got == pytest.approx(expected, abs=1e-12), (a, b)
    assert kendall_tau([1.0], [2.0]) is None
