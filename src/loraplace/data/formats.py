"""Record formats → (prompt, response) text pairs. Loss goes on the response (and EOS) only by default."""

from __future__ import annotations

import re

from loraplace.errors import DataError

FORMATS = ("alpaca", "gsm8k", "messages", "prompt_completion", "text")

# Default templates: {field} placeholders filled from the record.
DEFAULT_TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n", "{output}"),
    "gsm8k": ("Question: {question}\nAnswer: ", "{answer}"),
    "prompt_completion": ("{prompt}", "{completion}"),
    "text": ("", "{text}"),
}
_REQUIRED = {"alpaca": ("instruction", "output"), "gsm8k": ("question", "answer"), "messages": ("messages",),
             "prompt_completion": ("prompt", "completion"), "text": ("text",)}


def detect_format(record: dict) -> str:
    keys = set(record)
    for fmt in ("messages", "alpaca", "gsm8k", "prompt_completion", "text"):
        if set(_REQUIRED[fmt]) <= keys:
            return fmt
    raise DataError(f"cannot detect the data format from columns {sorted(keys)}",
                    "expected one of: messages | instruction+output (alpaca) | question+answer (gsm8k) | "
                    "prompt+completion | text; or declare format: and map columns")


def check_columns(records: list[dict], fmt: str, source: str = "") -> None:
    """Every record has the format's columns; the first that does not is named (1-based), with how many more."""
    bad = [i for i, r in enumerate(records) if any(k not in r for k in _REQUIRED[fmt])]
    if bad:
        record = records[bad[0]]
        missing = [k for k in _REQUIRED[fmt] if k not in record]
        where = f"{source}: " if source else ""
        more = f" ({len(bad) - 1} more record(s) like it)" if len(bad) > 1 else ""
        raise DataError(f"{where}record {bad[0] + 1} of {len(records)}: format {fmt!r} needs columns "
                        f"{list(_REQUIRED[fmt])}; missing {missing} (found {sorted(record)}){more}",
                        "declare the right format, or fix or rename the columns")


def render(record: dict, fmt: str, template: tuple[str, str] | None, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) text of one record."""
    if fmt == "messages":
        return _render_chat(record["messages"], tokenizer)
    prompt_t, response_t = template or DEFAULT_TEMPLATES[fmt]
    fields = {k: ("" if v is None else str(v)) for k, v in record.items()}
    if fmt == "alpaca":
        fields["input_block"] = f"### Input:\n{fields['input']}\n\n" if fields.get("input") else ""
    try:
        return prompt_t.format(**fields), response_t.format(**fields)
    except KeyError as exc:
        raise DataError(f"template placeholder {exc} is not a column (columns: {sorted(record)})") from None


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, str]:
    """Train on the last assistant turn: prompt = everything before it with the generation prompt."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("a chat example must end with an assistant message")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("chat 'messages' data needs a tokenizer with a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the conversation inconsistently; cannot mask the prompt")
    response = full[len(prompt):]
    # The template already closes the turn (e.g. <|im_end|>); EOS is not appended a second time.
    return prompt, response


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """GSM8K-style final answer: the number after '####', else the last number in the text; commas dropped."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.search(text)
    else:
        matches = _NUMBER.findall(text)
        found = matches[-1] if matches else None
        return _normalise(found) if found else None
    return _normalise(found.group(0)) if found else None


def _normalise(number: str) -> str:
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number
