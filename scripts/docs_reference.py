"""The reference pages, generated at build time (mkdocs-gen-files) from the code itself, so they cannot drift:
reference/cli.md from the Typer app, reference/study-yaml.md from the study spec's pydantic models (through the
same JSON Schema `loraplace schema` prints). A command option or a spec field without a description fails the
build."""

from __future__ import annotations

import json
from typing import Any

import mkdocs_gen_files


def _cli_page() -> str:
    import typer

    import loraplace.cli.main  # noqa: F401 - registers every command on the app
    from loraplace.cli.common import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="loraplace")
    lines = ["# Command line", "", "Generated from the command-line app (`loraplace --help`, `loraplace COMMAND "
             "--help` print the same). Exit codes: 0 done; 1 failed trials or an internal error; 2 a usage or "
             "input error (one message naming the file, key or option); 75 time ran out with work left "
             "(`run --timeout`); 130 / 143 interrupted / terminated.", ""]
    undocumented = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = command.context_class(command, info_name=name, parent=ctx)
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        usage = " ".join(["[OPTIONS]"] + [p.name.upper() + ("..." if p.nargs == -1 else "") for p in arguments])
        lines += [f"## `loraplace {name}`", "", (command.help or "").strip(), "", "```", f"loraplace {name} {usage}",
                  "```", "", "| argument / option | default | what it does |", "|:---|:---|:---|"]
        for param in command.params:
            if param.name == "help":
                continue
            if not getattr(param, "help", None):
                undocumented.append(f"{name} {param.name}")
            if param.param_type_name == "argument":
                what = f"`{param.name.upper()}`" + ("" if param.required else " (optional)")
            else:
                what = ", ".join(f"`{opt}`" for opt in param.opts + param.secondary_opts)
                kind = "" if param.is_flag else f" {param.metavar or param.display_type(sub)}"
                what += kind.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            default = "" if param.default in (None, False, ()) or param.required else f"`{param.default}`"
            lines.append(f"| {what} | {default.replace('|', chr(92) + '|')} | {_cell(param.help or '')} |")
        lines.append("")
    if undocumented:
        raise SystemExit(f"command-line parameters without help: {', '.join(undocumented)}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, brackets escaped (``hf:NAME[:CONFIG]`` is no
    link or cross-reference)."""
    return " ".join(text.split()).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def _type(prop: dict[str, Any]) -> str:
    """A JSON Schema property's type as a reader would write it."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop:
        return " or ".join(t for t in (_type(p) for p in prop["anyOf"]) if t != "null") + (
            " or null" if any(p.get("type") == "null" for p in prop["anyOf"]) else "")
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"mapping of name → {_type(prop['additionalProperties'])}"
    bounds = [f"{sign} {prop[key]}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                        ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in prop]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _yaml_page() -> str:
    from loraplace.study.spec import SCHEMA_FILE, study_json_schema

    schema = study_json_schema()
    models = {"StudySpec": schema, **schema["$defs"]}
    order, queue = [], ["StudySpec"]
    while queue:  # breadth-first from the top level, so a section comes after the first key that uses it
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        refs = []
        for prop in models[name].get("properties", {}).values():
            text = json.dumps(prop)
            refs += [part.split('"')[0] for part in text.split('"$ref": "#/$defs/')[1:]]
        queue += [r for r in refs if r not in order]
    lines = ["# Study YAML", "", f"Generated from the pydantic models that validate a spec (the same as "
             f"`loraplace schema` and `{SCHEMA_FILE}`). Start a spec with "
             "`# yaml-language-server: $schema=PATH/TO/study.schema.json` and an editor with the YAML language "
             "server completes and checks these keys as you type. Every problem in a spec is reported at once, "
             "before anything runs.", ""]
    undocumented = []
    for name in order:
        model = models[name]
        title = "The study (top level)" if name == "StudySpec" else name
        lines += [f"## {name}" if name != "StudySpec" else f"## {title}", ""]
        if model.get("description") and name != "StudySpec":
            lines += [_cell(model["description"]), ""]
        required = set(model.get("required", []))
        lines += ["| key | type | default | description |", "|:---|:---|:---|:---|"]
        for key, prop in model.get("properties", {}).items():
            if "description" not in prop:
                undocumented.append(f"{name}.{key}")
            if key in required:
                default = "required"
            elif "$ref" in json.dumps(prop) and isinstance(prop.get("default"), dict | type(None)) and \
                    "anyOf" not in prop:  # a section: its keys have their own defaults, below
                default = "its defaults"
            else:
                default = f"`{json.dumps(prop.get('default'))}`"
            description = _cell(prop.get("description", ""))
            lines.append(f"| `{key}` | {_type(prop)} | {default} | {description} |")
        lines.append("")
    if undocumented:
        raise SystemExit(f"study-spec fields without a description: {', '.join(undocumented)}")
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/cli.md", "w") as page:
    page.write(_cli_page())
with mkdocs_gen_files.open("reference/study-yaml.md", "w") as page:
    page.write(_yaml_page())
