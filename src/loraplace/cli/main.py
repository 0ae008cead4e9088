"""The entry point: runs the app, and turns every failure into one line and an exit code (2: the user's
mistake, with its hint; 1: an internal error; 130 / 143: interrupted / terminated)."""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import click
import typer
from rich.markup import escape

try:  # typer ≥ 0.20 raises its own vendored copy of click's exceptions
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click = click.exceptions

# the commands register themselves on the app when their modules are imported
import loraplace.cli.plan  # noqa: E402, F401, I001 - in this order: the order of --help
import loraplace.cli.train  # noqa: E402, F401, I001
import loraplace.cli.run  # noqa: E402, F401, I001
import loraplace.cli.results  # noqa: E402, F401, I001
import loraplace.cli.schema  # noqa: E402, F401, I001
from loraplace.cli.common import STATE, Terminated, app, err
from loraplace.errors import LoraplaceError
from loraplace.paths import os_error_text

_USAGE_ERRORS = tuple({click.ClickException, _typer_click.ClickException})


_EXITS = tuple({click.exceptions.Exit, typer.Exit})


_ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def main(argv: list[str] | None = None) -> None:
    import warnings

    # Library deprecation chatter is not the user's business on the command line (pytest still shows it).
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="loraplace")
    except LoraplaceError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except PermissionError as exc:  # a folder or file the user may not write (or read): name it
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(str(exc.filename or exc))}: permission denied\n  hint: this command "
                  "needs access to that path; run it where you may write, or point its --out/--store elsewhere",
                  highlight=False)
        sys.exit(2)
    except OSError as exc:  # the file system refused a named path: say which and why (the OS's words), exit 2
        if exc.filename is None:
            _internal(exc)
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(os_error_text(exc))}\n  hint: check that path (a file where a "
                  "folder should be, a full disk, a file system that refuses writes) or point the command "
                  "elsewhere", highlight=False)
        sys.exit(2)
    except _USAGE_ERRORS as exc:  # a mistyped command, option or value: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except Terminated:
        err.print("[red]terminated[/]")
        sys.exit(143)
    except (*_ABORTS, KeyboardInterrupt):
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, traceback on --debug
        _internal(exc)
    sys.exit(rv if isinstance(rv, int) else 0)


def _internal(exc: BaseException) -> NoReturn:
    """An error loraplace did not foresee: one line and exit 1; the traceback with --debug."""
    if STATE["debug"]:
        traceback.print_exc()
    hint = ("the traceback is above: please report it" if STATE["debug"] else
            "run with --debug for the traceback and report it")
    err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n  hint: {hint}",
              highlight=False)
    sys.exit(1)
