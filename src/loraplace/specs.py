"""Shared spec machinery: strict pydantic base, YAML loading with positions, one error for all problems."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, ValidationError, model_serializer

from loraplace.errors import ConfigError


class StrictModel(BaseModel):
    """Unknown keys are errors (a misspelt key must never be silently ignored); records are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields added after studies were first stored. A trial's id hashes its spec's dump, so such a field is left
    # out of dumps while it holds its default: every existing study keeps its trial ids (and resumes), and a spec
    # that sets the field gets new ones.
    added_fields: ClassVar[frozenset[str]] = frozenset()

    def id_neutral(self) -> set[str]:
        """Fields left out of this object's dump: by default the added fields that hold their default."""
        return {name for name in self.added_fields if getattr(self, name) == type(self).model_fields[name].default}

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if isinstance(data, dict):
            for name in self.id_neutral() & data.keys():
                del data[name]
        return data


def bare_on_off(value: Any, on: str, off: str = "off") -> Any:
    """A setting's word for a bare YAML ``on``/``off`` (YAML 1.1 reads them as true/false); other values pass."""
    return (on if value else off) if isinstance(value, bool) else value


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names at the location of an unknown key (walks nested models and lists of models)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            continue  # a dict key (e.g. a placement's name): the value type is the model we are already on
        current = _model_in(field.annotation)
    return list(getattr(current, "model_fields", {}) or [])


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def key_path(loc: tuple) -> str:
    """("axes", "lr", 0) → "axes.lr[0]": the path a user finds in their YAML."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_UNION_TAGS = ("int", "str", "float", "bool", "none")
_UNION_TAG_PREFIXES = ("literal[", "function-", "list[", "dict[", "constrained-", "tuple[", "lax-or-strict[")


# Tags of tagged unions whose member is chosen by the value's shape (see ``by_shape``): one member is tried, so its
# errors are the problem, at their own keys; the tag itself is dropped from the path.
SHAPE_TAGS = ("one-list", "per-name")


def by_shape(value: Any) -> str:
    """The member of a ``list | dict`` field a value means: a mapping is per name, anything else one list."""
    return "per-name" if isinstance(value, dict) else "one-list"


def _union_tag(part: Any) -> bool:
    """A location part pydantic adds for one member of a union (``int``, ``literal['auto','off']``), not a key."""
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith(_UNION_TAG_PREFIXES))


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """A value that fits no member of a union is one problem at its key, not one per member with internal names:
    ``execution.fuse: Input should be a valid integer, or Input should be 'auto' or 'off' (got 'many')``."""
    out: list[dict] = []
    merged: dict[tuple, dict] = {}
    for err in errors:
        loc = tuple(part for part in err["loc"] if part not in SHAPE_TAGS)
        err = err | {"loc": loc}
        cut = next((i for i, part in enumerate(loc) if _union_tag(part)), None)
        if cut is None:
            out.append(err)
            continue
        key = loc[:cut]
        msg = err["msg"].removeprefix("Value error, ")
        if key in merged:
            if msg not in merged[key]["msg"]:
                merged[key]["msg"] += f", or {msg[0].lower()}{msg[1:]}"
            continue
        merged[key] = {"loc": key, "msg": msg, "type": "union", "input": err.get("input")}
        out.append(merged[key])
    return out


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem: dotted key path, what is wrong, and a "did you mean" for misspelt keys."""
    problems = []
    for err in _merge_union_errors(exc.errors()):
        loc = tuple(err["loc"])
        path = key_path(((prefix,) if prefix else ()) + loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
            problems.append(f"{path}: unknown key{hint}")
        else:
            msg = err["msg"]
            if err["type"] not in ("missing", "value_error") and "input" in err:
                msg += f" (got {err['input']!r})"
            problems.append(f"{path}: {msg.removeprefix('Value error, ')}")
    return problems


def validate(model: type[BaseModel], data: Any, context: str, prefix: str = ""):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, prefix), context) from None


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error reports file:line:col."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head == b"SQLite format 3\x00":  # a study store given where its spec belongs (it said "not UTF-8 text")
            raise ConfigError([f"{path}: a study store (SQLite database), not a YAML spec"], "cannot read spec",
                              f"give the spec that wrote it (loraplace run SPEC.yaml --store {path}); "
                              f"loraplace status {path} shows what it holds")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"], "cannot read spec") from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a YAML file"], "cannot read spec") from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"], "cannot read spec") from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"], "cannot read spec") from None
    return parse_yaml(text, str(path))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a spec needs it: a key given twice in one mapping is an error (PyYAML
    keeps the last one silently — an arm named ``all`` would train what the second ``all`` says), and a key is read
    as the word it is (YAML 1.1 reads a bare ``on``/``off``/``yes``/``no`` as a boolean, even as a key)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then an explicit key: an override, as YAML means it
                if key_node.tag == "tag:yaml.org,2002:bool" and getattr(key_node, "style", None) is None:
                    key_node.tag = "tag:yaml.org,2002:str"
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float):
                    continue  # a complex key: not something a spec has
                if key in lines:
                    raise _DuplicateKey(str(key), key_node.start_mark.line + 1, lines[key])
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<inline>") -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError([f"{source}:{exc.line}: key {exc.key!r} is given twice (first at line {exc.first}); the "
                           "second would silently replace the first"], "cannot parse YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError([f"{where}: YAML syntax error: {detail}"], "cannot parse YAML") from None
