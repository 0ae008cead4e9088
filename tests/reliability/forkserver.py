"""A fork server for the kill tests: ``loraplace run`` processes started without paying the imports each time.

Every ``python -m loraplace run`` spends ~6–9 s on this 2-core machine importing torch, transformers and peft before
it touches the store; the kill-stress test starts ~40 of them. This server imports them once, then forks a child per
run: a real process with its own pid, running ``loraplace.cli.main`` from its first line, that the test SIGKILLs
like any other. What a kill can interrupt — claims, training, the store's transactions, adapter writes — is all
after the fork, so the test exercises the same code; only the interpreter start-up is shared. The server runs no
torch op before forking (a thread pool started before fork() would not survive it in the child).

Protocol (one JSON object per line on stdin, one reply per line on stdout):
``{"op": "run", "argv": [...], "env": {...}, "cwd": "..."}`` → ``{"pid": N}``;
``{"op": "poll" | "wait", "pid": N}`` → ``{"returncode": int | null}`` (Popen's convention: −signal if killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _child(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """In the forked child: a fresh ``loraplace`` command line, then ``_exit`` with its status."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a user's terminal gives it (see reliability_helpers)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = ["loraplace", *argv]
        from loraplace.cli import main

        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - an internal error: exit 1, as the command does
        code = 1
    finally:
        os._exit(code)


def _status(pid: int, block: bool) -> int | None:
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    if done == 0:
        return None
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    # The imports a `loraplace run` pays before its first claim; nothing is computed.
    import loraplace.cli  # noqa: F401
    import loraplace.fused  # noqa: F401
    import loraplace.runner  # noqa: F401
    import loraplace.study  # noqa: F401
    import loraplace.trial  # noqa: F401

    finished: dict[int, int] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["argv"], request["env"], request["cwd"])
            reply = {"pid": pid}
        else:
            pid = request["pid"]
            if pid not in finished:
                code = _status(pid, block=request["op"] == "wait")
                if code is not None:
                    finished[pid] = code
            reply = {"returncode": finished.get(pid)}
        print(json.dumps(reply), flush=True)


class ForkServer:
    """The test side: starts the server (in ``env``) and hands out :class:`ForkedRun` processes."""

    def __init__(self, env: dict[str, str]):
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        assert self._request(None) == {"ready": True}

    def _request(self, request: dict | None) -> dict:
        if request is not None:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self._proc.poll()})")
        return json.loads(line)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> ForkedRun:
        reply = self._request({"op": "run", "argv": [str(a) for a in argv], "env": env, "cwd": str(cwd or Path.cwd())})
        return ForkedRun(self, reply["pid"], argv)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class ForkedRun:
    """A forked ``loraplace`` process, with the part of Popen's interface the kill tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]):
        self._server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server._request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:  # polled, so the server is never blocked by one child
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    serve()
