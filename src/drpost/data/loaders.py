"""Reading general / target data into ``Record``s, and records into token rows.

Sources (``load_records(source, ...)``):
- a local ``.jsonl`` / ``.ndjson`` file (one JSON object per line; blank lines skipped),
- a local ``.json`` file holding a list of objects (a ``.json`` file that starts with ``{`` is read as JSON lines),
- a local ``.parquet`` file (via pyarrow),
- otherwise a Hugging Face ``datasets`` name (``datasets.load_dataset(name, config, split=split)``).

Every problem is a ``DataError`` naming the file and the 1-based line (``file.jsonl:7: ...``) or record number, and
which set (general / target) it belongs to when the set is empty.

``to_rows(records, tokenizer, fmt, max_seq_length)`` turns records into rows for ``drpost.data.collate``:
- prompt_completion / messages / text -> ``{"input_ids", "labels"}`` (loss on the completion / final assistant
  turn / whole text, plus EOS); a row left with no loss tokens after truncation is a DataError naming file:line,
  or, with ``overlong="skip"`` / ``"truncate_prompt"``, dropped / kept with its prompt cut from the left;
- preference -> ``{"chosen": row, "rejected": row}`` (batch with ``collate.collate_preference``);
- prompt_answer -> ``{"prompt_ids", "prompt", "answer"}`` for generation; a prompt longer than max_seq_length keeps
  its last tokens (the end holds the question and the generation prompt).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from drpost.data import chat
from drpost.data.collate import IGNORE, tokenize_prompt_completion
from drpost.data.formats import FORMATS, DataError, Record, detect_format, make_record

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FILE_SUFFIXES = JSONL_SUFFIXES + (".json", ".parquet")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_jsonl(data: bytes, source: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSON-lines bytes. Lines are split on ``\\n`` only."""
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}:{i}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{i}: malformed JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # e.g. integers over the digit limit, absurd nesting
            raise DataError(f"{source}:{i}: unreadable JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}:{i}: expected one JSON object per line, got {_kind(obj)}")
        out.append((i, obj))
    return out


def parse_json_list(data: bytes, source: str) -> list[tuple[int, dict]]:
    """(line number, object) for every element of a JSON list of objects."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}:{line}: not valid UTF-8") from None
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)
    line = 1

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, p)
        last = p
        return line

    last = 0
    pos = skip_ws(pos)
    if pos >= n:
        return []
    if text[pos] != "[":
        raise DataError(f"{source}:{line_at(pos)}: expected a JSON list of records (starting with '[')")
    pos = skip_ws(pos + 1)
    out: list[tuple[int, dict]] = []
    if pos < n and text[pos] == "]":
        pos = skip_ws(pos + 1)
    else:
        while True:
            at = line_at(pos)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{source}:{at}: unreadable JSON: {e}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{source}:{at}: record {len(out) + 1} must be a JSON object, got {_kind(obj)}")
            out.append((at, obj))
            pos = skip_ws(pos)
            if pos < n and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos = skip_ws(pos + 1)
                break
            raise DataError(f"{source}:{line_at(min(pos, n))}: malformed JSON: expected ',' or ']' after a record")
    if pos < n:
        raise DataError(f"{source}:{line_at(pos)}: malformed JSON: extra data after the list")
    return out


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or drpost[trl])") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {e}") from None


def read_hub(name: str, split: str, config_name: str | None) -> list[dict]:
    """Rows of a Hugging Face dataset (downloads unless cached; needs the ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file and loading hub datasets needs the 'datasets' package "
                        f"(pip install 'drpost[trl]')") from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad split: all reported the same way
        raise DataError(f"could not load dataset {name!r} (config {config_name!r}, split {split!r}): {e}") from e
    return [dict(row) for row in ds]


def read_raw(source: str, split: str = "train", config_name: str | None = None
             ) -> tuple[str, list[tuple[int | None, dict]]]:
    """(source label, [(line or None, raw object)]) from a local file or a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give a .jsonl, .json or .parquet file")
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return source, parse_jsonl(path.read_bytes(), source)
        if suffix == ".json":
            data = path.read_bytes()
            if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):  # JSON lines saved as .json
                return source, parse_jsonl(data, source)
            return source, parse_json_list(data, source)
        if suffix == ".parquet":
            return source, [(None, row) for row in read_parquet(path)]
        raise DataError(f"{source}: unsupported file type {suffix or '(none)'}; expected .jsonl, .json or .parquet")
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found")
    return f"{source}[{split}]", [(None, row) for row in read_hub(source, split, config_name)]


def load_records(source: str, fmt: str = "auto", *, role: str = "general", split: str = "train",
                 config_name: str | None = None, limit: int | None = None) -> list[Record]:
    """Validated records of one data source. ``fmt="auto"`` detects the format from the first record's keys.

    ``role`` (general / target / eval) only words the error for an empty set.
    """
    label, raw = read_raw(source, split, config_name)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        if role == "target":
            raise DataError(f"the target set is empty: {label} has no records")
        raise DataError(f"{label}: empty file: the {role} data has no records")
    if fmt == "auto":
        first_line, first = raw[0]
        fmt = detect_format(first.keys()) if isinstance(first, dict) else None
        if fmt is None:
            where = f"{label}:{first_line}" if first_line is not None else f"{label} record 1"
            keys = ", ".join(sorted(map(str, first.keys()))) or "(none)"
            expected = "; ".join(f"{f}: {'+'.join(k)}" for f, k in FORMATS.items())
            raise DataError(f"{where}: cannot detect the data format from the keys {keys}; expected one of "
                            f"{expected} (or set data.format)")
    elif fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    return [make_record(obj, fmt, label, index=i, line=line) for i, (line, obj) in enumerate(raw, start=1)]


# ----------------------------------------------------------------------------------------------------------------
# Records -> rows.

def _sft_texts(record: Record, tokenizer) -> tuple[str, str, bool]:
    f = record.fields
    if record.fmt == "text":
        return "", f["text"], True
    if record.fmt == "messages":
        return chat.messages_to_prompt_completion(tokenizer, f["messages"])
    if isinstance(f["prompt"], list):  # conversational prompt_completion
        return chat.split_conversation(tokenizer, f["prompt"], f["completion"])
    return f["prompt"], f["completion"], True


OVERLONG = ("error", "skip", "truncate_prompt")


class _Overlong(Exception):
    """Internal: a row has no loss tokens left within max_seq_length (handled per ``overlong``)."""


def _truncate_prompt(row: dict, max_seq_length: int, keep_first: int) -> dict:
    """Drop prompt tokens after the first ``keep_first`` (BOS) until the row fits, then cut the row's end."""
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    excess = len(ids) - max_seq_length
    drop = min(max(0, excess), max(0, n_prompt - keep_first))
    ids = ids[:keep_first] + ids[keep_first + drop:]
    labels = labels[:keep_first] + labels[keep_first + drop:]
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length]}


def _checked_row(tokenizer, prompt: str, completion: str, add_eos: bool, max_seq_length: int | None,
                 record: Record, what: str = "completion", overlong: str = "error") -> dict:
    if overlong == "truncate_prompt" and max_seq_length is not None:
        full = tokenize_prompt_completion(tokenizer, prompt, completion, add_eos=add_eos)
        keep_first = 1 if chat.adds_bos(tokenizer) else 0
        row = _truncate_prompt(full, max_seq_length, keep_first) if len(full["input_ids"]) > max_seq_length \
            else full
    else:
        row = tokenize_prompt_completion(tokenizer, prompt, completion, max_length=max_seq_length, add_eos=add_eos)
    if not any(label != IGNORE for label in row["labels"]):
        if overlong == "skip":
            raise _Overlong(record.where)
        n_prompt = len(tokenize_prompt_completion(tokenizer, prompt, "", add_eos=False)["input_ids"])
        limit = f" after truncation to max_seq_length={max_seq_length} (the prompt is {n_prompt} tokens)" \
            if max_seq_length is not None else ""
        raise DataError(f"{record.where}: no {what} tokens left to train on{limit}; raise data.max_seq_length, "
                        f"shorten the prompt, or skip / left-truncate such records (overlong='skip' or "
                        f"'truncate_prompt')")
    return row


def to_rows(records: list[Record], tokenizer, fmt: str | None = None, max_seq_length: int | None = None,
            overlong: str = "error", skipped: list[str] | None = None) -> list[dict]:
    """Token rows for ``records`` (see the module docstring for the row shape of each format).

    ``fmt`` None or "auto" takes each record's own format; otherwise every record must have that format.
    ``overlong``: what to do with a record whose prompt leaves no completion token within ``max_seq_length``:
    ``error`` (a DataError naming file:line), ``skip`` (drop it; its ``file:line`` is appended to ``skipped``
    when a list is given, and the count is logged) or ``truncate_prompt`` (drop prompt tokens from the left,
    after BOS, until the row fits; the completion is cut at its end only if it alone is too long).
    """
    if overlong not in OVERLONG:
        raise DataError(f"unknown overlong policy {overlong!r}; expected one of {', '.join(OVERLONG)}")
    rows = []
    dropped: list[str] = []
    for record in records:
        if fmt not in (None, "auto") and record.fmt != fmt:
            raise DataError(f"{record.where}: record has format {record.fmt}, expected {fmt}")
        try:
            row = _record_row(record, tokenizer, max_seq_length, overlong)
        except _Overlong:
            dropped.append(record.where)
            continue
        rows.append(row)
    if dropped:
        log.warning("skipped %d record(s) with no completion token within max_seq_length=%s (first: %s)",
                    len(dropped), max_seq_length, dropped[0])
        if skipped is not None:
            skipped.extend(dropped)
    return rows


def _record_row(record: Record, tokenizer, max_seq_length: int | None, overlong: str) -> dict:
    """The row (or pair of rows) of one record; raises _Overlong when ``overlong="skip"`` drops it."""
    if record.fmt in ("prompt_completion", "messages", "text"):
        return _checked_row(tokenizer, *_sft_texts(record, tokenizer), max_seq_length, record, overlong=overlong)
    if record.fmt == "preference":
        f = record.fields
        pair = {}
        for side in ("chosen", "rejected"):
            if isinstance(f["prompt"], list):
                prompt, completion, add_eos = chat.split_conversation(tokenizer, f["prompt"], f[side])
            else:
                prompt, completion, add_eos = f["prompt"], f[side], True
            pair[side] = _checked_row(tokenizer, prompt, completion, add_eos, max_seq_length, record, side,
                                      overlong=overlong)
        return pair
    if record.fmt == "prompt_answer":
        prompt = record.fields["prompt"]
        text = chat.render_prompt(tokenizer, prompt) if isinstance(prompt, list) else prompt
        ids = tokenize_prompt_completion(tokenizer, text, "", add_eos=False)["input_ids"]
        if not ids:
            raise DataError(f"{record.where}: the prompt encodes to no tokens")
        if max_seq_length is not None:
            ids = ids[-max_seq_length:]
        return {"prompt_ids": ids, "prompt": text, "answer": record.fields["answer"]}
    raise DataError(f"{record.where}: unknown format {record.fmt!r}")


def load_rows(source: str, tokenizer, fmt: str = "auto", max_seq_length: int | None = None, *,
              role: str = "general", split: str = "train", config_name: str | None = None,
              limit: int | None = None, overlong: str = "error") -> list[dict]:
    """``load_records`` then ``to_rows``: one call from a file (or hub name) to token rows."""
    records = load_records(source, fmt, role=role, split=split, config_name=config_name, limit=limit)
    return to_rows(records, tokenizer, None, max_seq_length, overlong=overlong)
