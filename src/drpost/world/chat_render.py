"""The world on a real tokenizer: tasks as chat turns, answer extraction for chat models, zero-shot accuracy.

Owns how a world example (``drpost.world.tasks``) becomes a conversation for an instruction-tuned model, how that
model's reply is scored, and the base model's zero-shot table (per family x phrasing).

Phrasings (``PHRASINGS``) of the user turn; the assistant turn is always the example's ``completion``:

- ``natural``: a plain-English question written for the family (``NATURAL``), followed by ``ANSWER_HINT``
  ("Reply with only the answer."): the phrasing an instruction-tuned model is most likely to get right.
- ``natural_bare``: the same question without the hint (the model has to guess the terse answer format).
- ``qa`` / ``inst`` / ``arrow`` / ``bracket``: the world's own formats (``tasks.TEMPLATES``) with their
  instruction phrase sets, inside the user turn, without the trailing answer cue (the chat template supplies the
  assistant header). ``qa``/``inst`` use phrase set "a", ``arrow``/``bracket`` phrase set "b".

Rendering goes through the tokenizer's chat template (``drpost.data.chat``): the loss covers the assistant turn only
(``chat_prompt_completion``), which is what ``drpost sft`` does with ``{"messages": ...}`` records (``to_chat``).

Answer extraction (``extract_answer``), decided for chat models and kept strict on purpose:
1. the reply's first non-empty line, stripped (as the world's verifiers already do);
2. one pair of wrapping quotes, backticks or ``**`` around the whole line is removed (``"olleh"`` -> ``olleh``);
3. one trailing period is removed (``42.`` -> ``42``).
Then the family's own normalizer and exact match against the true answer. Nothing is searched for inside a
sentence: ``17 + 25 = 42`` or ``The answer is 42.`` score 0 for the answer ``42``; answering with only the answer is
part of the task (a skill post-training can teach, and one the base model partly lacks).

Measure: ``zero_shot_table(model, tokenizer, ...)`` -> per-cell accuracy dict; ``scripts/zero_shot_real.py`` runs
it on ``smollm2-135m-instruct`` and writes ``results/real/zero_shot/``.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from drpost.data import chat
from drpost.world.tasks import (
    FAMILIES,
    FAMILY_NAMES,
    FORMATS,
    TEMPLATES,
    Difficulty,
    first_line,
    make_example,
)

ANSWER_HINT = "Reply with only the answer."


def _q(s: str) -> str:
    return f'"{s}"'


def _count(text: str) -> str:
    s, c = text.split("; ")
    return f"How many times does the letter {_q(c)} occur in {_q(s)}?"


def _compare(text: str) -> str:
    a, b = text.split(" ? ")
    return f"Which sign fits between {a} and {b}: <, > or =?"


# family -> natural question built from the example's input text (the generators' input formats, tasks.gen_*)
NATURAL = {
    "add": lambda x: f"What is {x}?",
    "sub": lambda x: f"What is {x}?",
    "mul": lambda x: f"What is {x}?",
    "compare": _compare,
    "reverse": lambda x: f"Write the letters of {_q(x)} in reverse order.",
    "upper": lambda x: f"Write {_q(x)} in uppercase letters.",
    "sort_letters": lambda x: f"Sort the letters of {_q(x)} in alphabetical order.",
    "count_char": _count,
    "first_char": lambda x: f"What is the first letter of {_q(x)}?",
    "last_char": lambda x: f"What is the last letter of {_q(x)}?",
    "dedupe": lambda x: f"Remove the repeated letters from {_q(x)}, keeping the first occurrence of each letter.",
    "sort_nums": lambda x: f"Sort these numbers in increasing order, separated by spaces: {x}",
    "max_list": lambda x: f"What is the largest of these numbers: {x}?",
    "sum_list": lambda x: f"What is the sum of these numbers: {x}?",
    "kv_json": lambda x: f"Write these key=value pairs as a compact JSON object: {x}",
    "date": lambda x: f"Rewrite the date {x} in DD/MM/YYYY form.",
}
assert set(NATURAL) == set(FAMILY_NAMES)

# the world's formats inside a chat turn: the template without its answer cue (the chat template has its own)
CHAT_TEMPLATES = {
    "qa": "Q: {instruction}: {input}",
    "inst": "# {instruction}\n{input}",
    "arrow": "{instruction}\n{input}",
    "bracket": "[{instruction}] {input}",
}
PHRASINGS: tuple[str, ...] = ("natural", "natural_bare", *FORMATS)


def split_prompt(example: dict) -> tuple[str, str]:
    """(instruction, input text) of a world example, recovered exactly from its rendered prompt."""
    fmt, fam = example["format"], FAMILIES[example["family"]]
    template = TEMPLATES[FORMATS[fmt][0]]
    head, tail = template.split("{input}")
    prompt = example["prompt"]
    for instruction in fam.phrases[FORMATS[fmt][1]]:
        pre = head.format(instruction=instruction)
        if prompt.startswith(pre) and prompt.endswith(tail) and len(prompt) >= len(pre) + len(tail):
            return instruction, prompt[len(pre):len(prompt) - len(tail)]
    raise ValueError(f"prompt {prompt!r} is not a {fmt!r} prompt of family {example['family']!r}")


def user_message(example: dict, phrasing: str | None = None) -> str:
    """The user turn of ``example`` in ``phrasing`` (None: ``example['phrasing']``, else the example's own format).

    A world-format phrasing other than the example's own format takes its instruction from that format's phrase
    set (the same paraphrase index, so the choice stays deterministic).
    """
    phrasing = phrasing or example.get("phrasing") or example["format"]
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r} (known: {', '.join(PHRASINGS)})")
    instruction, text = split_prompt(example)
    if phrasing == "natural":
        return f"{NATURAL[example['family']](text)} {ANSWER_HINT}"
    if phrasing == "natural_bare":
        return NATURAL[example["family"]](text)
    if FORMATS[phrasing][1] != FORMATS[example["format"]][1]:
        fam = FAMILIES[example["family"]]
        own = fam.phrases[FORMATS[example["format"]][1]]
        instruction = fam.phrases[FORMATS[phrasing][1]][own.index(instruction) % len(fam.phrases[FORMATS[phrasing][1]])]
    return CHAT_TEMPLATES[phrasing].format(instruction=instruction, input=text)


def to_chat(example: dict, phrasing: str | None = None, system: str | None = None) -> dict:
    """``{"messages": [(system,) user, assistant], **metadata, "phrasing"}``: a record ``drpost sft`` trains on
    (loss on the assistant turn through the tokenizer's chat template). ``system`` None: no system turn (the
    template may add its default one); a string (even empty): that system turn."""
    phrasing = phrasing or example.get("phrasing") or example["format"]
    meta = {k: v for k, v in example.items() if k not in ("prompt", "completion", "messages")}
    head = [] if system is None else [{"role": "system", "content": system}]
    return {"messages": head + [{"role": "user", "content": user_message(example, phrasing)},
                                {"role": "assistant", "content": example["completion"]}], **meta, "phrasing": phrasing}


def chat_prompt(tokenizer, example: dict, phrasing: str | None = None, system: str | None = None) -> str:
    """Generation prompt text: the (system and) user turn through the chat template plus the assistant header."""
    return chat.render_prompt(tokenizer, to_chat(example, phrasing, system)["messages"][:-1])


def chat_prompt_completion(tokenizer, example: dict, phrasing: str | None = None,
                           system: str | None = None) -> tuple[str, str, bool]:
    """(prompt text, completion text, add_eos) with the loss on the assistant turn (``chat.split_conversation``)."""
    msgs = to_chat(example, phrasing, system)["messages"]
    return chat.split_conversation(tokenizer, msgs[:-1], msgs[-1:])


_WRAPS = (('"', '"'), ("'", "'"), ("`", "`"), ("**", "**"))


def extract_answer(text: str) -> str:
    """The answer in a chat reply: first non-empty line, one wrapping quote pair removed, one final period removed.

    Deliberately no search inside sentences (see the module docstring).
    """
    line = first_line(text)
    for a, b in _WRAPS:
        if len(line) > len(a) + len(b) and line.startswith(a) and line.endswith(b):
            line = line[len(a):-len(b)].strip()
            break
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1].rstrip()
    return line


def verify_chat(family: str, reply: str, answer: str) -> bool:
    """Exact match of the extracted answer under the family's normalizer."""
    return FAMILIES[family].verify(extract_answer(reply), answer)


def answer_in_line(reply: str, answer: str) -> bool:
    """Diagnostic only, never a verifier: the true answer occurs in the reply's first line as a whole token
    (not inside a longer word or number). Separates "knows the skill, wrong answer format" from "wrong answer"."""
    line = first_line(reply)
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(answer) + r"(?![A-Za-z0-9])", line) is not None


def make_eval_set(n: int, families: Sequence[str] = FAMILY_NAMES, phrasings: Sequence[str] = PHRASINGS,
                  difficulty: Difficulty | None = None, seed: int = 0) -> list[dict]:
    """``n`` clean examples per (family, phrasing); each carries ``phrasing``. Deterministic in ``seed``."""
    difficulty = difficulty or Difficulty()
    out = []
    for fam in families:
        for ph in phrasings:
            rng = random.Random(f"{seed}:{fam}:{ph}")
            fmt = ph if ph in FORMATS else "qa"
            out += [{**make_example(rng, fam, fmt, difficulty), "phrasing": ph} for _ in range(n)]
    return out


@torch.no_grad()
def generate_replies(model, tokenizer, examples: list[dict], batch_size: int = 64, max_new_tokens: int = 24,
                     bf16: bool = False, progress: bool = False, system: str | None = None) -> list[str]:
    """Greedy replies (left-padded batches, stops at EOS), decoded without special tokens; ``system`` as in
    ``to_chat``."""
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    chat.ensure_pad_token(tokenizer)
    replies: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            texts = [chat_prompt(tokenizer, e, system=system) for e in examples[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=chat.adds_bos(tokenizer))
            enc = {k: v.to(dev) for k, v in enc.items()}  # input_ids, attention_mask: [B, T]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # [B, T + new]
            new = out[:, enc["input_ids"].shape[1]:]  # [B, new]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
            if progress:
                print(f"  generated {len(replies)}/{len(examples)} replies, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        tokenizer.padding_side = side
    return replies


def zero_shot_table(model, tokenizer, n: int = 48, families: Sequence[str] = FAMILY_NAMES,
                    phrasings: Sequence[str] = PHRASINGS, seed: int = 0, batch_size: int = 64,
                    max_new_tokens: int = 24, bf16: bool = False, samples_per_cell: int = 2,
                    progress: bool = False) -> dict:
    """Greedy zero-shot accuracy of a chat model on the world, per family x phrasing (``n`` prompts per cell).

    Returns ``{"cells": {family: {phrasing: acc}}, "by_family", "by_phrasing", "overall", "samples", ...}`` with
    ``samples_per_cell`` example replies per cell (raw reply, extracted answer, true answer) for reading.
    """
    model.eval()
    examples = make_eval_set(n, families, phrasings, seed=seed)
    t0 = time.perf_counter()
    replies = generate_replies(model, tokenizer, examples, batch_size, max_new_tokens, bf16, progress)
    seconds = time.perf_counter() - t0
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    loose: dict[tuple[str, str], list[bool]] = defaultdict(list)
    samples: dict[str, dict[str, list]] = defaultdict(dict)
    for e, r in zip(examples, replies):
        ok = verify_chat(e["family"], r, e["answer"])
        hits[e["family"], e["phrasing"]].append(ok)
        loose[e["family"], e["phrasing"]].append(answer_in_line(r, e["answer"]))
        cell = samples[e["family"]].setdefault(e["phrasing"], [])
        if len(cell) < samples_per_cell:
            cell.append({"user": user_message(e), "reply": r, "extracted": extract_answer(r),
                         "answer": e["answer"], "correct": ok})

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    cells = {f: {p: mean(hits[f, p]) for p in phrasings} for f in families}
    return {
        "n_per_cell": n, "seed": seed, "max_new_tokens": max_new_tokens, "bf16_autocast": bf16,
        "families": list(families), "phrasings": list(phrasings), "cells": cells,
        "by_family": {f: mean([x for p in phrasings for x in hits[f, p]]) for f in families},
        "by_phrasing": {p: mean([x for f in families for x in hits[f, p]]) for p in phrasings},
        "overall": mean([x for v in hits.values() for x in v]), "n_prompts": len(examples),
        "answer_in_line": {f: {p: mean(loose[f, p]) for p in phrasings} for f in families},
        "generate_seconds": round(seconds, 1), "samples": samples,
    }


def markdown_table(result: dict, key: str = "cells") -> str:
    """A family x phrasing table (markdown): ``key`` = "cells" (accuracy, with the by-phrasing row and by-family
    column) or "answer_in_line" (the diagnostic)."""
    ph, table = result["phrasings"], result[key]
    total = key == "cells"
    lines = ["| family | " + " | ".join(ph) + (" | all |" if total else " |"),
             "|---|" + "---|" * (len(ph) + int(total))]
    for f in result["families"]:
        row = " | ".join(f"{table[f][p]:.2f}" for p in ph)
        lines.append(f"| {f} | {row} |" + (f" {result['by_family'][f]:.2f} |" if total else ""))
    if total:
        lines.append("| **all** | " + " | ".join(f"**{result['by_phrasing'][p]:.2f}**" for p in ph)
                     + f" | **{result['overall']:.2f}** |")
    return "\n".join(lines)


__all__ = ["ANSWER_HINT", "CHAT_TEMPLATES", "NATURAL", "PHRASINGS", "answer_in_line", "chat_prompt", "chat_prompt_completion",
           "extract_answer", "generate_replies", "make_eval_set", "markdown_table", "split_prompt", "to_chat",
           "user_message", "verify_chat", "zero_shot_table"]
