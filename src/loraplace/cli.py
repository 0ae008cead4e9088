"""The ``loraplace`` command line: thin recipes over the library (parse → run → print).

Every user-facing failure is a :class:`~loraplace.errors.LoraplaceError`, printed as one cause + hint with exit
code 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import click
import typer
from rich.console import Console

from loraplace.errors import ConfigError, LoraplaceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Selective LoRA placement studies: where should the adapters go, and at what rank?")
out = Console()
err = Console(stderr=True)
_STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _STATE["debug"] = debug


def parse_kv(text: str | None) -> dict[str, Any]:
    """``k=v,k2=v2`` → dict, values parsed as YAML scalars (ints, floats, bools, null)."""
    import yaml

    if not text:
        return {}
    result: dict[str, Any] = {}
    problems = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            problems.append(f"{item!r} is not key=value")
            continue
        key, value = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(value.strip())
    if problems:
        raise ConfigError(problems, "invalid --model-config")
    return result


@app.command()
def plan(
    model: str = typer.Argument(..., help="hub id, checkpoint dir, config.json, builtin:smollm2-135m or tiny:FAMILY"),
    placement: str = typer.Option("all", "--placement", "-p",
                                  help="preset name, role list (attn,mlp.up), inline YAML/JSON or a YAML file"),
    rank: int | None = typer.Option(None, "--rank", "-r", help="LoRA rank for every site (default 16)"),
    budget: int | None = typer.Option(None, "--budget", help="trainable-parameter budget: solve the rank"),
    model_config: str | None = typer.Option(
        None, "--model-config", help="config overrides k=v,...; with model_type=NAME no hub is needed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Dry-run: show every module a placement adapts and the exact trainable-parameter count. Loads no weights."""
    from loraplace.placement import parse_placement, plan_for_model
    from loraplace.report_terminal import print_plan

    overrides = parse_kv(model_config)
    model_type = overrides.pop("model_type", None)
    spec = parse_placement(placement)
    if rank is None and budget is None and spec.rank is None and spec.budget is None and not spec.ranks \
            and not (spec.groups and all(g.rank for g in spec.groups)):
        rank = 16
    result = plan_for_model(model, spec, rank=rank, budget=budget, model_config=overrides or None,
                            model_type=model_type)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_plan(result, out)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="loraplace")
    except LoraplaceError as exc:
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, traceback on --debug
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n  hint: run with --debug for the "
                  "traceback and report it", highlight=False)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
