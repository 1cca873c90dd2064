"""User data of the preference and RL commands: preference pairs (``drpost dpo``) and prompts (``drpost rlhf``,
``drpost rlvr``), read from the same sources as SFT data and checked the same way.

Sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a Hugging Face ``datasets`` name (``read_raw`` in
``drpost.data.loaders``); every problem is a ``DataError`` naming ``file:line`` (or ``name[split] record N``).

- ``load_preference_pairs(source, tokenizer)``: TRL's preference format, standard
  (``{"prompt": str, "chosen": str, "rejected": str}``) or conversational (``prompt`` / ``chosen`` / ``rejected``
  lists of messages; the chat template renders the prompt with its generation prompt, and each response is the
  rendered conversation minus the rendered prompt). Returns ``{"prompt", "chosen", "rejected", **other keys}`` with
  strings, the shape ``drpost.trainers.dpo`` trains on; ``encode_preference`` tokenizes one pair with
  ``dpo.max_prompt_length``.
- ``load_prompts(source, tokenizer, require_answer=...)``: one prompt per record, from ``{"prompt": str | messages}``
  (optionally with ``answer``, a string or number), ``{"messages": [...]}`` (the prompt is every turn before the final
  assistant turn, or the whole conversation when it does not end with one), or ``{"prompt", "completion"}`` (the
  completion is dropped). Returns ``{"prompt": str, "answer"?: str, **other keys}``; ``require_answer=True`` (RLVR,
  graded by ``drpost.data.verifiers``) makes a missing ``answer`` an error naming the record.

Other keys of a record (e.g. a world task's ``family``) are kept, so the world's own records load unchanged.
"""

from __future__ import annotations

from typing import Any

from drpost.data import chat
from drpost.data.collate import tokenize_prompt_completion
from drpost.data.formats import DataError, make_record, validate_messages
from drpost.data.loaders import read_raw


def _raw(source: str, role: str, split: str, config_name: str | None, limit: int | None
         ) -> tuple[str, list[tuple[int | None, dict]]]:
    label, raw = read_raw(source, split, config_name)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"{label}: empty: the {role} data has no records")
    return label, raw


def _where(label: str, line: int | None, index: int) -> str:
    return f"{label}:{line}" if line is not None else f"{label} record {index}"


def _response_text(tokenizer, prompt_messages: list[dict], response_messages: list[dict]) -> str:
    """The rendered response, without a trailing EOS text (the trainer appends the EOS token itself)."""
    _, text, add_eos = chat.split_conversation(tokenizer, prompt_messages, response_messages)
    eos = getattr(tokenizer, "eos_token", None)
    if not add_eos and eos:
        stripped = text.rstrip()
        text = stripped[: len(stripped) - len(eos)] if stripped.endswith(eos) else text
    return text


def load_preference_pairs(source: str, tokenizer=None, *, role: str = "general", split: str = "train",
                          config_name: str | None = None, limit: int | None = None) -> list[dict]:
    """Preference pairs of ``source`` as strings ``{"prompt", "chosen", "rejected", **other keys}`` (see above).

    ``tokenizer`` renders conversational pairs with its chat template (the fallback template when it has none, or
    when ``tokenizer`` is None).
    """
    label, raw = _raw(source, role, split, config_name, limit)
    out = []
    for i, (line, obj) in enumerate(raw, start=1):
        rec = make_record(obj, "preference", label, index=i, line=line)
        f = rec.fields
        if isinstance(f["prompt"], list):
            try:
                pair = {"prompt": chat.render_prompt(tokenizer, f["prompt"]),
                        "chosen": _response_text(tokenizer, f["prompt"], f["chosen"]),
                        "rejected": _response_text(tokenizer, f["prompt"], f["rejected"])}
            except DataError as e:
                raise DataError(f"{rec.where}: {e}") from None
        else:
            pair = {"prompt": f["prompt"], "chosen": f["chosen"], "rejected": f["rejected"]}
        out.append({**rec.meta, **pair})
    return out


def _prompt_of(obj: dict, where: str) -> Any:
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, list):
            return validate_messages(p, "prompt", where)
        if not isinstance(p, str):
            raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got "
                            f"{type(p).__name__}")
        if not p.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return p
    if "messages" in obj:
        msgs = validate_messages(obj["messages"], "messages", where)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{where}: 'messages' holds only an assistant turn; there is no prompt to roll out")
        return msgs
    keys = ", ".join(sorted(map(str, obj))) or "(none)"
    raise DataError(f"{where}: a prompt record needs 'prompt' (a string or a list of messages) or 'messages'; "
                    f"got the keys {keys}")


def load_prompts(source: str, tokenizer=None, *, require_answer: bool = False, role: str = "general",
                 split: str = "train", config_name: str | None = None, limit: int | None = None) -> list[dict]:
    """Prompts of ``source`` as ``{"prompt": str, "answer"?: str, **other keys}`` (see the module docstring).

    Chat-format prompts are rendered with ``tokenizer``'s chat template plus its generation prompt.
    """
    label, raw = _raw(source, role, split, config_name, limit)
    out = []
    for i, (line, obj) in enumerate(raw, start=1):
        where = _where(label, line, i)
        prompt = _prompt_of(obj, where)
        if isinstance(prompt, list):
            try:
                prompt = chat.render_prompt(tokenizer, prompt)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        rec = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "completion", "answer")}
        rec["prompt"] = prompt
        if "answer" in obj:
            answer = obj["answer"]
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
            rec["answer"] = str(answer)
        elif require_answer:
            raise DataError(f"{where}: missing field 'answer' (verifiable-reward prompts need the answer the "
                            f"verifier checks: {{\"prompt\": ..., \"answer\": ...}})")
        out.append(rec)
    return out


def encode_preference(tokenizer, pair: dict, max_length: int | None = None,
                      max_prompt_length: int | None = None) -> tuple[dict, dict]:
    """(chosen row, rejected row), completion-only, as ``drpost.data.collate.collate_preference`` batches them.

    ``max_prompt_length`` keeps the prompt's last tokens (the end of a prompt holds the question and the generation
    prompt) before the response is appended; ``max_length`` then truncates the whole row. A row left with no
    response token is a DataError.
    """
    rows = []
    for side in ("chosen", "rejected"):
        row = tokenize_prompt_completion(tokenizer, pair["prompt"], pair[side], add_eos=True)
        if max_prompt_length is not None:
            n_prompt = sum(1 for lab in row["labels"] if lab == -100)
            cut = max(0, n_prompt - max_prompt_length)
            row = {"input_ids": row["input_ids"][cut:], "labels": row["labels"][cut:]}
        if max_length is not None:
            row = {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}
        if all(lab == -100 for lab in row["labels"]):
            raise DataError(f"a preference pair has no '{side}' tokens left after truncation to max_length="
                            f"{max_length}; raise data.max_seq_length or set dpo.max_prompt_length")
        rows.append(row)
    return rows[0], rows[1]
