"""Build the replay grids' two extra tasks as prompt/completion JSONL: NL→bash and data-to-text.

    python scripts/prepare_tasks.py                    # download the pinned files from GitHub
    python scripts/prepare_tasks.py --from-dir NAME=DIR  # or read them from local checkouts

Writes ``data/tasks/<task>/{train,validation,test}.jsonl`` (committed; `docs/replay.md` gives their sha256).

- **nl2bash** (TellinaTool/nl2bash, ``data/bash/all.nl`` + ``all.cm``, 12,607 pairs, MIT): one English request →
  one bash command. Examples are grouped by their command, so a command never sits in two splits.
- **e2e** (tuetschek/e2e-dataset, ``devset.csv``, 4,672 references of 547 meaning representations, CC BY-SA 4.0):
  a restaurant meaning representation → a description. One MR has several references: examples are grouped by MR,
  so an MR never sits in two splits (the issue's "split by meaning representation").

Split rule, the same for both: groups in a seeded shuffle (``--seed``, default 0); the first ``TEST_GROUPS`` groups
give the test split and the next ``VALIDATION_GROUPS`` the validation split, one example each (the group's first,
in file order: held-out examples are independent); every example of the other groups is a training example.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import urllib.request
from pathlib import Path

TEST_GROUPS = 200
VALIDATION_GROUPS = 100

SOURCES = {
    "nl2bash": ("TellinaTool/nl2bash", "466c5fe873ab08c7cc0112ea1521cc6ad9c20992",
                ("data/bash/all.nl", "data/bash/all.cm", "data/bash/LICENSE")),
    "e2e": ("tuetschek/e2e-dataset", "ab0d967dd5729ce455ef14ba9ffafc456a335264", ("devset.csv", "README.md")),
}
LICENCES = {"nl2bash": "MIT (data/bash/LICENSE of TellinaTool/nl2bash, copied as LICENSE)",
            "e2e": "CC BY-SA 4.0 (Novikova, Dušek and Rieser, 2017; tuetschek/e2e-dataset)"}
PROMPTS = {"nl2bash": "Write a bash command for this task.\nTask: {source}\nCommand: ",
           "e2e": "Describe the restaurant in one or two sentences.\nFacts: {source}\nDescription: "}


def read_source(task: str, local: Path | None) -> dict[str, str]:
    repo, commit, files = SOURCES[task]
    out = {}
    for name in files:
        if local is not None:
            out[name] = (local / name).read_text(encoding="utf-8")
        else:
            url = f"https://raw.githubusercontent.com/{repo}/{commit}/{name}"
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a pinned https URL
                out[name] = response.read().decode("utf-8")
    return out


def pairs(task: str, files: dict[str, str]) -> list[tuple[str, str]]:
    """(group key, source text, target text) in file order; the key is what must not cross splits."""
    if task == "nl2bash":
        nl = files["data/bash/all.nl"].splitlines()
        cm = files["data/bash/all.cm"].splitlines()
        if len(nl) != len(cm):
            raise SystemExit(f"nl2bash: {len(nl)} requests but {len(cm)} commands")
        return [(c.strip(), n.strip(), c.strip()) for n, c in zip(nl, cm, strict=True) if n.strip() and c.strip()]
    rows = list(csv.DictReader(io.StringIO(files["devset.csv"])))
    return [(r["mr"].strip(), r["mr"].strip(), r["ref"].strip()) for r in rows if r["mr"].strip() and r["ref"].strip()]


def split(examples: list[tuple[str, str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, source, target in examples:
        groups.setdefault(key, []).append((source, target))
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    test = keys[:TEST_GROUPS]
    validation = keys[TEST_GROUPS:TEST_GROUPS + VALIDATION_GROUPS]
    held_out = set(test) | set(validation)
    return {"test": [groups[k][0] for k in test], "validation": [groups[k][0] for k in validation],
            "train": [ex for k in groups if k not in held_out for ex in groups[k]]}


def write(task: str, splits: dict[str, list[tuple[str, str]]], out: Path, files: dict[str, str]) -> None:
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        text = "".join(json.dumps({"prompt": PROMPTS[task].format(source=s), "completion": t},
                                  ensure_ascii=False) + "\n" for s, t in rows)
        path = folder / f"{name}.jsonl"
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(rows)} examples, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    repo, commit, _ = SOURCES[task]
    if "data/bash/LICENSE" in files:
        (folder / "LICENSE").write_text(files["data/bash/LICENSE"], encoding="utf-8")
    (folder / "SOURCE.md").write_text(
        f"From https://github.com/{repo} at commit {commit}, built by scripts/prepare_tasks.py "
        f"(groups: {TEST_GROUPS} test, {VALIDATION_GROUPS} validation, one example each; the rest train).\n"
        f"Licence: {LICENCES[task]}.\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-dir", action="append", default=[], metavar="TASK=DIR",
                        help="read TASK's files from a local checkout of its repository")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tasks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    local = dict(item.split("=", 1) for item in args.from_dir)
    for task in SOURCES:
        files = read_source(task, Path(local[task]) if task in local else None)
        write(task, split(pairs(task, files), args.seed), args.out, files)


if __name__ == "__main__":
    main()
