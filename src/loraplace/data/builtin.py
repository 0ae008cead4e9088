"""Builtin tasks: deterministic, seeded generators written by us, so the offline default has a real task.

``builtin:arithmetic`` yields multi-step arithmetic word problems in GSM8K format (``question``, ``answer`` with
worked steps and the final number after ``#### ``), so the answer is exactly checkable.
Parameters go after ``?``: ``builtin:arithmetic?n=2000&seed=0&steps=2-4``.
"""

from __future__ import annotations

import random
from urllib.parse import parse_qsl

from loraplace.errors import DataError

_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]


def _problem(rng: random.Random, min_steps: int, max_steps: int) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(5, 60)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        op = rng.choice(["buy", "give", "double", "split"] if value % 2 == 0 and value > 2 else ["buy", "give"])
        if op == "buy":
            n = rng.randint(2, 40)
            sentences.append(f"Then {name} gets {n} more.")
            steps.append(f"{value} + {n} = <<{value}+{n}={value + n}>>{value + n}")
            value += n
        elif op == "give" and value > 1:
            n = rng.randint(1, value - 1)
            sentences.append(f"Then {name} gives away {n}.")
            steps.append(f"{value} - {n} = <<{value}-{n}={value - n}>>{value - n}")
            value -= n
        elif op == "double":
            sentences.append(f"Then the number of {item} doubles.")
            steps.append(f"{value} * 2 = <<{value}*2={value * 2}>>{value * 2}")
            value *= 2
        else:
            sentences.append(f"Then {name} gives half of them to a friend.")
            steps.append(f"{value} / 2 = <<{value}/2={value // 2}>>{value // 2}")
            value //= 2
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(f"{s}." for s in steps) + f"\n#### {value}"
    return {"question": question, "answer": answer}


def arithmetic(n: int = 2000, seed: int = 0, steps: str = "2-4") -> list[dict[str, str]]:
    lo, _, hi = str(steps).partition("-")
    min_steps, max_steps = int(lo), int(hi or lo)
    rng = random.Random(f"loraplace-arithmetic-{seed}")
    return [_problem(rng, min_steps, max_steps) for _ in range(n)]


BUILTIN_TASKS = {"arithmetic": arithmetic}


def load_builtin(ref: str) -> tuple[list[dict], str]:
    """Records of ``builtin:NAME?k=v&...`` and a canonical fingerprint of the request."""
    name, _, query = ref.removeprefix("builtin:").partition("?")
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown builtin task {name!r}", f"builtin tasks: {', '.join(BUILTIN_TASKS)}")
    params = dict(parse_qsl(query))
    try:
        kwargs = {k: (int(v) if k in ("n", "seed") else v) for k, v in params.items()}
        records = BUILTIN_TASKS[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"bad parameters for builtin:{name}: {exc}", "e.g. builtin:arithmetic?n=2000&seed=0") from None
    return records, f"builtin:{name}?" + "&".join(f"{k}={v}" for k, v in sorted(params.items()))
