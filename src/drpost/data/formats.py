"""Record formats of general / target data (TRL's dataset formats), their detection and validation.

Formats (the fields a record must have; other keys are kept in ``Record.meta``):

| format              | fields                                   | used by              |
|---------------------|------------------------------------------|----------------------|
| `prompt_completion` | `prompt`, `completion`                   | SFT (loss on completion) |
| `messages`          | `messages`: [{role, content}, ...]       | SFT (loss on the final assistant turn) |
| `text`              | `text`                                   | SFT (loss on every token) |
| `preference`        | `prompt`, `chosen`, `rejected`           | DPO |
| `prompt_answer`     | `prompt`, `answer` (string or number)    | RLVR (verifier compares with `answer`) |

``prompt`` / ``completion`` / ``chosen`` / ``rejected`` may each be a string (standard form) or a list of messages
(TRL's conversational form, rendered with the chat template, see ``drpost.data.chat``); within one record they must
all be of the same form. Roles: system, user, assistant, tool; ``content`` is a string.

``detect_format`` picks the format from a record's keys (first match, in this order): prompt+chosen+rejected ->
preference, messages -> messages, prompt+completion -> prompt_completion, prompt+answer -> prompt_answer,
text -> text. Every problem is a ``DataError`` that names where the record came from (``file:line``).
Reading files is ``drpost.data.loaders``; records become token rows in ``loaders.to_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad input data: unreadable file, malformed record, missing or wrong-typed field, empty set."""


FORMATS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_answer": ("prompt", "answer"),
}

# Detection order matters: preference records also have a prompt, so they are matched first.
DETECTION_ORDER: tuple[str, ...] = ("preference", "messages", "prompt_completion", "prompt_answer", "text")

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One validated example and where it came from."""

    fields: dict[str, Any]  # the format's fields, validated (strings or lists of {role, content})
    fmt: str  # a key of FORMATS
    source: str  # file path, or "name[split]" for a hub dataset
    index: int  # 1-based position of the record in its source
    line: int | None = None  # 1-based line in a JSON / JSONL file (None for Parquet and hub datasets)
    meta: dict[str, Any] = field(default_factory=dict)  # the record's other keys (e.g. a task family)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source} record {self.index}"


def detect_format(keys) -> str | None:
    """The format whose fields are all among ``keys`` (first in DETECTION_ORDER), or None."""
    keys = set(keys)
    for fmt in DETECTION_ORDER:
        if set(FORMATS[fmt]) <= keys:
            return fmt
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def validate_messages(value: Any, key: str, where: str, *, last_role: str | None = None) -> list[dict]:
    """Check a list of {role, content} messages; returns clean copies ({role, content} only)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}' must be a list of messages, got {_kind(value)}")
    if not value:
        raise DataError(f"{where}: field '{key}' is an empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{j}] must be an object with 'role' and 'content', got {_kind(m)}")
        for k in ("role", "content"):
            if k not in m:
                raise DataError(f"{where}: {key}[{j}] is missing field '{k}'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{j}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{j}].content must be a string, got {_kind(m['content'])}")
        out.append({"role": m["role"], "content": m["content"]})
    if last_role is not None and out[-1]["role"] != last_role:
        raise DataError(f"{where}: the last message of '{key}' must have role '{last_role}' (the completion), "
                        f"got '{out[-1]['role']}'")
    return out


def validate_record(obj: Any, fmt: str, where: str) -> dict[str, Any]:
    """Check one raw record against ``fmt``; returns its validated fields. Raises DataError naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object (a record), got {_kind(obj)}")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for k in FORMATS[fmt]:
        if k not in obj:
            raise DataError(f"{where}: missing field '{k}' (format {fmt} needs {', '.join(FORMATS[fmt])})")
    if fmt == "text":
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {_kind(obj['text'])}")
        return {"text": obj["text"]}
    if fmt == "messages":
        return {"messages": validate_messages(obj["messages"], "messages", where, last_role="assistant")}
    if fmt == "prompt_answer":
        prompt = _text_or_messages(obj["prompt"], "prompt", where, conversational=None)
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field 'answer' must be a string or a number, got {_kind(answer)}")
        if isinstance(prompt, str) and not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return {"prompt": prompt, "answer": str(answer)}
    # prompt_completion / preference: all fields in the same (standard or conversational) form
    conversational = isinstance(obj["prompt"], list)
    out = {"prompt": _text_or_messages(obj["prompt"], "prompt", where, conversational=conversational)}
    for k in FORMATS[fmt][1:]:
        out[k] = _text_or_messages(obj[k], k, where, conversational=conversational, last_role="assistant")
    return out


def _text_or_messages(value: Any, key: str, where: str, *, conversational: bool | None,
                      last_role: str | None = None) -> Any:
    if conversational is None:
        conversational = isinstance(value, list)
    if conversational:
        if isinstance(value, str):
            raise DataError(f"{where}: field '{key}' is a string but 'prompt' is a list of messages; use one form "
                            f"for all fields of a record")
        return validate_messages(value, key, where, last_role=last_role)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {_kind(value)}")
    return value


def make_record(obj: Any, fmt: str, source: str, index: int, line: int | None = None) -> Record:
    """Validate a raw record and wrap it with its provenance."""
    where = f"{source}:{line}" if line is not None else f"{source} record {index}"
    fields = validate_record(obj, fmt, where)
    meta = {k: v for k, v in obj.items() if k not in FORMATS[fmt]}
    return Record(fields=fields, fmt=fmt, source=source, index=index, line=line, meta=meta)
