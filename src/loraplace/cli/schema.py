"""``loraplace schema``: the study YAML's JSON Schema, for editors and validators."""

from __future__ import annotations

import json
import sys

import typer

from loraplace.cli.common import _Command, app


@app.command(cls=_Command)
def schema(output: str | None = typer.Option(None, "--out", "-o", help="file (default: stdout)")) -> None:
    """Print the study YAML's JSON Schema (from the same models that validate a spec). Point an editor at it with
    `# yaml-language-server: $schema=PATH` as a spec's first line; the repository commits it as
    docs/study.schema.json."""
    from loraplace.study.spec import study_json_schema

    text = json.dumps(study_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    from loraplace.atomic import write_text_atomic

    write_text_atomic(output, text)
