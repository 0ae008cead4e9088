"""Helpers for the reliability suite: tiny studies run as a user runs them, in subprocesses we can kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import tiny_study_yaml
from loraplace.store import Store

# Every child started here; the suite's conftest kills those still alive after each test, pass or fail.
CHILDREN: list[subprocess.Popen] = []

PLACEMENTS = {"all": "{preset: all}", "attn": "{preset: attn}", "mlp": "{preset: mlp}"}


def write_study(path: Path, name: str = "rel", steps: int = 4, seeds: int = 2, extra: str = "") -> Path:
    path.write_text(tiny_study_yaml(name, placements=PLACEMENTS, steps=steps, seeds=list(range(seeds)), n=80,
                                    extra=extra))
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, LORAPLACE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", COLUMNS="200")


def _default_sigint() -> None:
    # A suite started in the background by a non-interactive shell (`make test &`) runs with SIGINT ignored, and
    # children inherit that: Python then installs no KeyboardInterrupt handler and Ctrl-C tests could not work.
    # The child gets SIGINT's default back, as it has when a user runs the command in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(spec: Path, db: Path, env: dict[str, str], server=None, **popen) -> subprocess.Popen:
    """``loraplace run SPEC --store DB -q`` as a child process; ``server``: forked by a ``forkserver.ForkServer``
    (imports paid once; output discarded) instead of a fresh interpreter."""
    if server is not None:  # output is kept only when asked for (stdout/stderr=PIPE), in files next to the store
        capture = db.parent / "output" if popen.get("stderr") == subprocess.PIPE else None
        if capture is not None:
            capture.mkdir(exist_ok=True)
        forked = server.run(["run", spec, "--store", db, "-q"], env, capture=capture)
        CHILDREN.append(forked)
        return forked
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", "loraplace", "run", str(spec), "--store", str(db), "-q"],
                            env=env, preexec_fn=_default_sigint, **popen)
    CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    while CHILDREN:
        proc = CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def cli(*args, env: dict[str, str], timeout: float = 300, server=None, capture: Path | None = None
        ) -> subprocess.CompletedProcess:
    """``loraplace ARGS`` run to its end: a fresh interpreter, or forked by ``server`` (its output written to
    ``capture``, a folder)."""
    if server is not None:
        forked = server.run(list(args), env, capture=capture)
        stdout, stderr = forked.communicate(timeout)
        return subprocess.CompletedProcess(forked.args, forked.returncode, stdout, stderr)
    return subprocess.run([sys.executable, "-m", "loraplace", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def attempts(db: Path) -> int:
    """Total claims so far (0 when the store or study does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with Store.open_readonly(db) as store:
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


def measured_step_s(tmp_path: Path, steps: int = 4) -> float:
    """Seconds per optimizer step of the suite's tiny study on this machine, right now (model load, tokenising and
    the final eval included, so a busy machine gets a proportionally longer deadline)."""
    from loraplace.study import expand_grid, load_study
    from loraplace.trial import run_trial

    trial = expand_grid(load_study(write_study(tmp_path / "calibrate.yaml", steps=steps, seeds=1)))[0]
    t0 = time.perf_counter()
    run_trial(trial.spec)
    return (time.perf_counter() - t0) / steps


__all__ = ["CHILDREN", "attempts", "cli", "cli_env", "kill_children", "measured_step_s", "start_run", "wait_for",
           "write_study"]
