"""What every command shares: the Typer app and its help classes, the consoles, exit codes, and the small
option parsers (key=value, --at, --quantize, --fill, a placement given inline)."""

from __future__ import annotations

import sys
import typing
from typing import Any

import typer
from rich.console import Console

from loraplace.errors import ConfigError
from loraplace.placement.spec import (
    DEFAULT_FILL,
    Fill,
)
from loraplace.train_config import TrainSpec

FLAG = ""  # a flag takes no value: --help shows no "<bool>" type for it


class _HelpIsAFlag:
    """Typer builds each command's --help option itself: shown like our flags, with no "<bool>" type."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG
        return option


class _HelpGroup(_HelpIsAFlag, typer.core.TyperGroup):
    pass


class _Command(_HelpIsAFlag, typer.core.TyperCommand):
    pass


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_HelpGroup,
                  help="Selective LoRA placement studies: where should the adapters go, and at what rank?")


# Piped output (make, CI logs) gets a readable width instead of rich's 80-column fallback.
out = Console() if sys.stdout.isatty() else Console(width=140)


err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)


DEFAULT_PROBE_DATA = "builtin:arithmetic?n=256"  # offline default data for the importance probe


EXIT_WORK_LEFT = 75  # run --timeout stopped with trials left (EX_TEMPFAIL: "try again later")


STATE = {"debug": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal lands so a run stops like on Ctrl-C (trial marked interrupted)."""


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", metavar=FLAG, help="Show tracebacks on errors.")) -> None:
    STATE["debug"] = debug


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


FILL_HELP = (f"with --budget: exact (rank r+1 on an evenly spread subset of the sites, within ~1 % of the budget) "
             f"or uniform (one rank); default {DEFAULT_FILL}")


ALLOW_UNASSIGNED_HELP = ("let all/mlp/attn/moe resolve although some weights in the blocks have no role (they "
                         "are not adapted; the plan, the store and the report warn)")


AT_HELP = ("recommend at these values of the study's swept axes only, e.g. quantize=nf4 (the best placement on the "
           "4-bit base); default: compared across them")


def at_values(text: str | None) -> dict[str, str]:
    """``--at quantize=nf4[,axis=value]`` → {axis: value} (values as text: the group keys are matched to them)."""
    pairs = [item.split("=", 1) for item in (text or "").split(",") if item.strip()]
    bad = [f"--at: {'='.join(p)!r} is not axis=value" for p in pairs if len(p) != 2 or not p[0].strip()]
    if bad:
        raise ConfigError(bad, "invalid --at")
    return {k.strip(): v.strip() for k, v in pairs}


def default_of(model, name: str) -> str:
    """A spec field's default, for --help (the spec is the one home of every default)."""
    return f"default {model.model_fields[name].get_default(call_default_factory=True)}"


def quantize_option(value: str) -> str:
    choices = typing.get_args(TrainSpec.model_fields["quantize"].annotation)  # the spec's own literal
    if value not in choices:
        raise ConfigError([f"--quantize {value!r}: one of {', '.join(choices)}"], "invalid --quantize")
    return value


def fill_option(value: str):
    choices = typing.get_args(Fill)  # the spec's own literal: one list of fill modes
    if value not in choices:
        raise ConfigError([f"--fill {value!r}: one of {', '.join(choices)}"], "invalid --fill")
    return value


def placement_dict(text: str) -> dict:
    from loraplace.placement import parse_placement

    return parse_placement(text).model_dump(exclude_none=True, exclude_defaults=True)
