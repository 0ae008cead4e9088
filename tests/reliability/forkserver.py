"""A fork server for the kill tests: ``loraplace run`` processes started without paying the imports each time.

Every ``python -m loraplace run`` spends ~6–9 s on this 2-core machine importing torch, transformers and peft before
it touches the store; the kill-stress test starts ~40 of them. This server imports them once, then forks a child per
run: a real process with its own pid, running ``loraplace.cli.main`` from its first line, that the test SIGKILLs
like any other. What a kill can interrupt — claims, training, the store's transactions, adapter writes — is all
after the fork, so the test exercises the same code; only the interpreter start-up is shared. The server runs no
torch op before forking (a thread pool started before fork() would not survive it in the child).

Protocol (one JSON object per line on stdin, one reply per line on stdout):
``{"op": "run", "argv": [...], "env": {...}, "cwd": "...", "stdout": path | null, "stderr": path | null}`` →
``{"pid": N}`` (output goes to those files, else to /dev/null);
``{"op": "poll", "pid": N}`` → ``{"returncode": int | null}`` (null while it runs; Popen's convention: −signal
if killed). The client waits by polling, so one child never blocks the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str | None, stderr: str | None) -> None:
    """In the forked child: a fresh ``loraplace`` command line, then ``_exit`` with its status."""
    code = 1
    try:
        # The signal dispositions a fresh interpreter starts with (the server's may differ): Ctrl-C raises
        # KeyboardInterrupt, SIGTERM kills — until the command installs its own handlers.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else devnull, fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = ["loraplace", *argv]
        from loraplace.cli import main

        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - escaped the command's own handling: exit 1, with the traceback for the test
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):  # what the command printed reaches its files before _exit
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _status(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # a hung server tells where: kill -USR1 PID
    # The imports a `loraplace run` pays before its first claim; nothing is computed.
    import peft.helpers  # noqa: F401 - imported by a trial when it trains (loraplace.train), not by the modules

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
                _child(request["argv"], request["env"], request["cwd"], request.get("stdout"),
                       request.get("stderr"))
            reply = {"pid": pid}
        else:
            pid = request["pid"]
            if pid not in finished:
                code = _status(pid)
                if code is not None:
                    finished[pid] = code
            reply = {"returncode": finished.get(pid)}
        print(json.dumps(reply), flush=True)


class ForkServer:
    """The test side: starts the server (in ``env``) and hands out :class:`ForkedRun` processes."""

    def __init__(self, env: dict[str, str]):
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        self._runs = 0
        self._lock = threading.Lock()
        assert self._request(None) == {"ready": True}

    def _request(self, request: dict | None) -> dict:
        with self._lock:  # one request and its reply at a time, whichever thread asks (a test may poll from two)
            if request is not None:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self._proc.poll()})")
        return json.loads(line)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path | None = None, capture: Path | None = None
            ) -> ForkedRun:
        """Fork ``loraplace ARGV``; ``capture``: a folder to write its stdout and stderr into (read back by
        :meth:`ForkedRun.communicate`), else they are discarded."""
        self._runs += 1
        out = (capture / f"run{self._runs}.out", capture / f"run{self._runs}.err") if capture else (None, None)
        reply = self._request({"op": "run", "argv": [str(a) for a in argv], "env": env, "cwd": str(cwd or Path.cwd()),
                               "stdout": out[0] and str(out[0]), "stderr": out[1] and str(out[1])})
        return ForkedRun(self, reply["pid"], argv, out)

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

    def __init__(self, server: ForkServer, pid: int, args: list[str], output: tuple[Path | None, Path | None]):
        self._server, self.pid, self.args, self._output = server, pid, args, output
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

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Wait for the end; (stdout, stderr) as text when captured."""
        self.wait(timeout)
        return tuple(path.read_text() if path is not None else None for path in self._output)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    serve()
