"""Verifiers of user RLVR data (``grpo.verifier``): does a decoded completion give the record's ``answer``?

- ``exact``: the completion's first non-empty line, stripped, equals the answer, stripped;
- ``numeric``: the completion's final answer as a number equals the answer as a number (relative tolerance
  1e-6). The final answer is the text after the last ``####`` (GSM8K style) or inside the last ``\\boxed{...}`` when
  there is one, else the whole completion; in it the *last* number counts (``1,234`` = 1234, ``-3.5``, ``.5``,
  ``3/4``);
- ``contains``: the answer, stripped, occurs in the completion.

The ``world`` verifier (each world task family's own check) lives with the world, in ``drpost.world.tasks.verify``.

    from drpost.data.verifiers import answer_matches
    answer_matches("numeric", "so the total is 1,234.0 apples", "1234")   # True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from drpost.data.formats import DataError

VERIFIERS: tuple[str, ...] = ("exact", "numeric", "contains")

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")


def _final_segment(text: str) -> str:
    if "####" in text:
        return text.rsplit("####", 1)[1]
    i = text.rfind("\\boxed{")
    if i >= 0:
        j = text.find("}", i)
        return text[i + len("\\boxed{"): j if j >= 0 else len(text)]
    return text


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators, decimals, a fraction a/b), or None."""
    found = None
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if not any(c.isdigit() for c in s):
            continue
        found = s
    if found is None:
        return None
    s = found.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            d = float(den)
            return float(num) / d if d != 0 else None
        return float(s)
    except ValueError:
        return None


def answer_matches(kind: str, completion: str, answer: str) -> bool:
    """Whether ``completion`` gives ``answer`` under the verifier ``kind`` (one of ``VERIFIERS``)."""
    if kind == "exact":
        first = next((line.strip() for line in completion.splitlines() if line.strip()), "")
        return first == str(answer).strip()
    if kind == "numeric":
        want = parse_number(str(answer))
        got = parse_number(_final_segment(completion))
        if want is None:
            raise ValueError(f"numeric verifier: the answer {answer!r} is not a number")
        return got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if kind == "contains":
        return str(answer).strip() in completion
    raise ValueError(f"unknown verifier {kind!r}; expected one of {', '.join(VERIFIERS)} (or 'world' for world "
                     f"records, checked by drpost.world.tasks.verify)")


def make_verifier(kind: str) -> Callable[[str, dict], float]:
    """``fn(completion_text, record) -> reward`` (1.0 when the record's ``answer`` is matched, else 0.0)."""
    if kind not in VERIFIERS:
        answer_matches(kind, "", "")  # raises the error naming the choices

    def fn(completion: str, record: dict) -> float:
        return float(answer_matches(kind, completion, record["answer"]))

    return fn


def check_numeric_answers(records: list[dict], source: str = "data") -> None:
    """Raise DataError naming the first record whose ``answer`` is not a number (for ``grpo.verifier=numeric``)."""
    for i, r in enumerate(records, start=1):
        if parse_number(str(r.get("answer", ""))) is None:
            raise DataError(f"{source} record {i}: grpo.verifier=numeric needs a numeric 'answer', got "
                             f"{r.get('answer')!r}")
