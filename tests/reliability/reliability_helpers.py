"""Helpers for the reliability suite: tiny studies run as a user runs them, in subprocesses we can kill."""

import os
import subprocess
import sys
import time
from pathlib import Path

from loraplace.store import Store

STUDY = """\
name: NAME
model: tiny:llama
data: {train: "builtin:arithmetic?n=80", eval_count: 8, max_len: 160}
train: {steps: STEPS, batch: 4, lr: 1.0e-3, precision: fp32}
placements:
  all: {preset: all}
  attn: {preset: attn}
  mlp: {preset: mlp}
ranks: [2]
seeds: SEEDS
baseline: all
"""


def write_study(path: Path, name: str = "rel", steps: int = 4, seeds: int = 2) -> Path:
    path.write_text(STUDY.replace("NAME", name).replace("STEPS", str(steps))
                    .replace("SEEDS", str(list(range(seeds)))))
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, LORAPLACE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", COLUMNS="200")


def start_run(spec: Path, db: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", "loraplace", "run", str(spec), "--store", str(db), "-q"],
                            env=env, **popen)


def cli(*args, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplace", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def attempts(db: Path) -> int:
    """Total claims so far (0 when the store or study does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with Store(db, readonly=True) as store:
            return sum(t.attempts for t in store.trials(store.study().id))
    except Exception:  # noqa: BLE001 - the study row may not be there yet
        return 0


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def cli_in_process(*args, capsys) -> subprocess.CompletedProcess:
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
