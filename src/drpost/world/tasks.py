"""Procedural task families with verifiable answers: the benchmark world's raw material.

Owns: the task families (generator, instruction paraphrases, verifier), the prompt formats, label noise, and the
conversions to the other data formats (chat ``messages``, RL prompts with a verifier). Pure Python, deterministic by
seed (every function takes a seed or a ``random.Random``; no global random state).

An example is a dict ``{"prompt", "completion", "family", "answer", "noisy", "format"}``: ``completion`` is the label
trained on, ``answer`` is always the *true* answer (they differ exactly when ``noisy`` is True), ``format`` names the
prompt format (a template plus a paraphrase set, see ``FORMATS``).

Try it: ``python -m drpost.world.tasks`` prints one example per family and format.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Difficulty:
    """Difficulty knobs shared by all families; each family reads the ones it needs.

    min_len/max_len: string length, list length (kv pairs: half of it); max_num: operand range of add/sub/compare
    (mul: first factor up to min(max_num, 20), second 0..9); max_item: list item range.
    """

    min_len: int = 2
    max_len: int = 6
    max_num: int = 99
    max_item: int = 9


# ----------------------------------------------------------------------------------------------------------------
# generators: (rng, difficulty) -> (input text, true answer)

def _length(rng: random.Random, d: Difficulty) -> int:
    return rng.randint(d.min_len, max(d.min_len, d.max_len))


def _word(rng: random.Random, n: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _numbers(rng: random.Random, d: Difficulty) -> list[int]:
    return [rng.randint(0, d.max_item) for _ in range(_length(rng, d))]


def gen_add(rng, d):
    a, b = rng.randint(0, d.max_num), rng.randint(0, d.max_num)
    return f"{a} + {b}", str(a + b)


def gen_sub(rng, d):
    a, b = sorted((rng.randint(0, d.max_num), rng.randint(0, d.max_num)), reverse=True)
    return f"{a} - {b}", str(a - b)


def gen_mul(rng, d):
    a, b = rng.randint(0, min(d.max_num, 20)), rng.randint(0, 9)
    return f"{a} * {b}", str(a * b)


def gen_compare(rng, d):
    a = rng.randint(0, d.max_num)
    b = a if rng.random() < 0.2 else rng.randint(0, d.max_num)
    return f"{a} ? {b}", "<" if a < b else (">" if a > b else "=")


def gen_reverse(rng, d):
    s = _word(rng, _length(rng, d))
    return s, s[::-1]


def gen_upper(rng, d):
    s = _word(rng, _length(rng, d))
    return s, s.upper()


def gen_sort_letters(rng, d):
    s = _word(rng, _length(rng, d))
    return s, "".join(sorted(s))


def gen_count_char(rng, d):
    pool = _word(rng, 3)  # a small alphabet so counts above one are common
    s = _word(rng, _length(rng, d), pool)
    c = rng.choice(s) if rng.random() < 0.85 else rng.choice(LETTERS)
    return f"{s}; {c}", str(s.count(c))


def gen_first_char(rng, d):
    s = _word(rng, _length(rng, d))
    return s, s[0]


def gen_last_char(rng, d):
    s = _word(rng, _length(rng, d))
    return s, s[-1]


def gen_dedupe(rng, d):
    n = _length(rng, d)
    pool = _word(rng, rng.randint(2, max(2, n - 1)))  # fewer distinct letters than positions: duplicates
    s = _word(rng, n, pool)
    return s, "".join(dict.fromkeys(s))


def gen_sort_nums(rng, d):
    xs = _numbers(rng, d)
    return " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def gen_max_list(rng, d):
    xs = _numbers(rng, d)
    return " ".join(map(str, xs)), str(max(xs))


def gen_sum_list(rng, d):
    xs = _numbers(rng, d)
    return " ".join(map(str, xs)), str(sum(xs))


def gen_kv_json(rng, d):
    k = min(4, max(1, _length(rng, d) // 2))
    keys = rng.sample(LETTERS, k)
    vals = [rng.randint(0, 9) for _ in keys]
    text = ", ".join(f"{a}={v}" for a, v in zip(keys, vals))
    return text, "{" + ",".join(f'"{a}":{v}' for a, v in zip(keys, vals)) + "}"


def gen_date(rng, d):
    y, m, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y}-{m:02d}-{day:02d}", f"{day:02d}/{m:02d}/{y}"


# ----------------------------------------------------------------------------------------------------------------
# normalizers for the verifiers

def _strip(s: str) -> str:
    return s.strip()


def _int(s: str) -> str:
    s = s.strip()
    return str(int(s)) if re.fullmatch(r"-?\d+", s) else s


def _spaces(s: str) -> str:
    return " ".join(s.split())


def _nospace(s: str) -> str:
    return "".join(s.split())


@dataclass(frozen=True)
class Family:
    """One task family: generator, kind, instruction paraphrases per phrase set, answer normalizer."""

    name: str
    kind: str  # arithmetic | string | list | format
    generate: Callable[[random.Random, Difficulty], tuple[str, str]]
    phrases: Mapping[str, tuple[str, ...]]  # phrase set -> paraphrases
    normalize: Callable[[str], str] = _strip

    def verify(self, prediction: str, answer: str) -> bool:
        return self.normalize(first_line(prediction)) == self.normalize(answer)


def _fam(name, kind, gen, a, b, norm=_strip) -> Family:
    return Family(name, kind, gen, {"a": tuple(a), "b": tuple(b)}, norm)


# Phrase set "a" is what the pretraining formats use; set "b" belongs to the target formats. Both name the operation
# (a shared keyword where natural), so a model that reads set "a" has a chance on set "b".
FAMILIES: dict[str, Family] = {f.name: f for f in [
    _fam("add", "arithmetic", gen_add,
         ["Add", "Compute the sum", "What is the total"],
         ["add these", "sum of the two", "plus: give the result"], _int),
    _fam("sub", "arithmetic", gen_sub,
         ["Subtract", "Compute the difference", "What is the difference"],
         ["subtract these", "difference of the two", "minus: give the result"], _int),
    _fam("mul", "arithmetic", gen_mul,
         ["Multiply", "Compute the product", "What is the product"],
         ["multiply these", "product of the two", "times: give the result"], _int),
    _fam("compare", "arithmetic", gen_compare,
         ["Compare with <, > or =", "Which sign fits", "Compare the numbers"],
         ["compare these", "sign between the two", "compare: <, > or ="]),
    _fam("reverse", "string", gen_reverse,
         ["Reverse it", "Write it backwards", "Reverse the letters"],
         ["reverse this", "backwards please", "the letters reversed"]),
    _fam("upper", "string", gen_upper,
         ["Uppercase it", "Write in capitals", "Make it uppercase"],
         ["uppercase this", "in capitals please", "the letters in upper case"]),
    _fam("sort_letters", "string", gen_sort_letters,
         ["Sort the letters", "Alphabetize", "Letters in a-z order"],
         ["sort these letters", "alphabetical order please", "the letters sorted"]),
    _fam("count_char", "string", gen_count_char,
         ["Count the letter", "How often is the letter there", "Count the given letter"],
         ["count this letter", "letter count", "how many of the letter"], _int),
    _fam("first_char", "string", gen_first_char,
         ["First letter", "Give the first letter", "What is the first letter"],
         ["first letter please", "the first char", "start letter"]),
    _fam("last_char", "string", gen_last_char,
         ["Last letter", "Give the last letter", "What is the last letter"],
         ["last letter please", "the last char", "end letter"]),
    _fam("dedupe", "string", gen_dedupe,
         ["Remove repeats", "Drop duplicate letters", "Keep each letter once"],
         ["remove repeats", "duplicates removed please", "each letter once"]),
    _fam("sort_nums", "list", gen_sort_nums,
         ["Sort the numbers", "Numbers in increasing order", "Sort ascending"],
         ["sort these numbers", "increasing order please", "the numbers sorted"], _spaces),
    _fam("max_list", "list", gen_max_list,
         ["Maximum", "Give the largest number", "What is the max"],
         ["maximum of these", "largest please", "the biggest one"], _int),
    _fam("sum_list", "list", gen_sum_list,
         ["Sum the list", "Add up the list", "Total of the list"],
         ["sum these up", "total of the list", "add the list together"], _int),
    _fam("kv_json", "format", gen_kv_json,
         ["To JSON", "Write as JSON", "Pairs to JSON"],
         ["as json please", "json object of the pairs", "pairs to a json dict"], _nospace),
    _fam("date", "format", gen_date,
         ["Date as DD/MM/YYYY", "Rewrite the date", "Day/month/year form"],
         ["date as d/m/y", "reformat the date", "DD/MM/YYYY please"]),
]}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)

# ----------------------------------------------------------------------------------------------------------------
# formats: a template plus the phrase set it draws instructions from

TEMPLATES: dict[str, str] = {
    "qa": "Q: {instruction}: {input}\nA: ",
    "inst": "# {instruction}\n{input}\nOut: ",
    "arrow": "{instruction}\n{input}\n=> ",
    "bracket": "[{instruction}] {input} = ",
}
FORMATS: dict[str, tuple[str, str]] = {  # format -> (template, phrase set)
    "qa": ("qa", "a"),
    "inst": ("inst", "a"),
    "arrow": ("arrow", "b"),
    "bracket": ("bracket", "b"),
}
PRETRAIN_FORMATS: tuple[str, ...] = ("qa", "inst")  # what the base model is pretrained on
TARGET_FORMATS: tuple[str, ...] = ("arrow", "bracket")  # kept out of pretraining


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def verify(family: str, prediction: str, answer: str) -> bool:
    """Exact match after the family's normalization (first line of the prediction only)."""
    return FAMILIES[family].verify(prediction, answer)


def corrupt_answer(rng: random.Random, answer: str) -> str:
    """A wrong answer near the true one: a number shifted by 1..3, another comparison sign, one character replaced."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    if answer in ("<", ">", "="):
        return rng.choice([s for s in "<>=" if s != answer])
    spots = [i for i, ch in enumerate(answer) if ch.isalnum()]
    if not spots:
        return answer + "x"
    i = rng.choice(spots)
    ch = answer[i]
    alphabet = "0123456789" if ch.isdigit() else (LETTERS.upper() if ch.isupper() else LETTERS)
    new = rng.choice([c for c in alphabet if c != ch])
    return answer[:i] + new + answer[i + 1:]


def render(fmt: str, text: str, instruction: str) -> str:
    """The prompt of format ``fmt`` for an input text and an instruction."""
    template, _ = FORMATS[fmt]
    return TEMPLATES[template].format(instruction=instruction, input=text)


def make_example(rng: random.Random, family: str, fmt: str, difficulty: Difficulty = Difficulty(),
                 noise: float = 0.0) -> dict:
    """One example of ``family`` in format ``fmt``; with probability ``noise`` the completion is corrupted."""
    fam = FAMILIES[family]
    text, answer = fam.generate(rng, difficulty)
    instruction = rng.choice(fam.phrases[FORMATS[fmt][1]])
    noisy = noise > 0 and rng.random() < noise
    label = corrupt_answer(rng, answer) if noisy else answer
    return {"prompt": render(fmt, text, instruction), "completion": label, "family": family,
            "answer": answer, "noisy": noisy, "format": fmt}


def _weights(spec: Mapping[str, float] | Sequence[str] | Sequence[tuple[str, float]]) -> tuple[list, list]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = [(s, 1.0) if isinstance(s, str) else tuple(s) for s in spec]
    names = [k for k, w in items if w > 0]
    return names, [w for k, w in items if w > 0]


def generate_examples(n: int, families=FAMILY_NAMES, formats=PRETRAIN_FORMATS, difficulty: Difficulty = Difficulty(),
                      noise: float = 0.0, seed: int | str = 0) -> list[dict]:
    """``n`` examples; ``families`` / ``formats``: names (uniform) or name -> weight (mapping or pairs).

    Deterministic in ``seed`` (an int or a string, fed to ``random.Random``).
    """
    rng = random.Random(seed)
    fams, fw = _weights(families)
    fmts, mw = _weights(formats)
    return [make_example(rng, rng.choices(fams, fw)[0], rng.choices(fmts, mw)[0], difficulty, noise)
            for _ in range(n)]


def to_messages(example: dict) -> dict:
    """Chat form: ``{"messages": [user, assistant], ...metadata}`` (TRL's conversational format)."""
    meta = {k: v for k, v in example.items() if k not in ("prompt", "completion")}
    return {"messages": [{"role": "user", "content": example["prompt"]},
                         {"role": "assistant", "content": example["completion"]}], **meta}


def to_rl_prompt(example: dict) -> dict:
    """RL (RLVR) form: the prompt, the true answer and the family; score completions with ``verify``."""
    return {"prompt": example["prompt"], "answer": example["answer"], "family": example["family"]}


if __name__ == "__main__":
    rng = random.Random(0)
    for name in FAMILY_NAMES:
        for fmt in FORMATS:
            ex = make_example(rng, name, fmt)
            print(repr(ex["prompt"] + ex["completion"]))
