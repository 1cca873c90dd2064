"""Data formats, loaders and chat templates on local files only (tiny offline tokenizers, no downloads).

Covers: every TRL format from JSONL / JSON / Parquet; auto-detection; each malformed-input case with file:line in
the message; token rows (completion-only labels, truncation errors, pairs, RL prompts); chat-template round trips
with and without a template; pad-token handling; a hypothesis fuzz of the JSONL loader (only DataError escapes).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drpost.data import chat, loaders
from drpost.data.collate import IGNORE, collate_preference
from drpost.data.formats import DataError, detect_format
from drpost.data.loaders import load_records, parse_jsonl, to_rows

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat_template: str | None = None, bos: bool = True, eos: str | None = "</s>"):
    """A byte-level tokenizer with no merges (one token per byte) plus special tokens; built offline."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    kwargs = {"bos_token": "<s>"} if bos else {}
    if eos is not None:
        kwargs["eos_token"] = eos
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=specials[2:], **kwargs)
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    return byte_tokenizer(CHATML, bos=False, eos="<|im_end|>")


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


SAMPLES = {
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "text": {"text": "hello world"},
    "preference": {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    "prompt_answer": {"prompt": "3*3=", "answer": 9},
}


# ---------------------------------------------------------------------------------------------------------------
# Loading every format from every file type.

@pytest.mark.parametrize("fmt", list(SAMPLES))
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_every_format_from_every_file_type(tmp_path, fmt, kind):
    recs = [dict(SAMPLES[fmt], family="f1"), dict(SAMPLES[fmt], family="f2")]
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, recs)
    elif kind == "json":
        path.write_text(json.dumps(recs, indent=2))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    records = load_records(str(path))
    assert [r.fmt for r in records] == [fmt, fmt]
    assert records[1].meta == {"family": "f2"} and records[1].index == 2
    if fmt == "prompt_answer":
        assert records[0].fields["answer"] == "9"
    if kind == "jsonl":
        assert records[1].where == f"{path}:2"
    elif kind == "json":
        assert records[1].line is not None and records[1].line > records[0].line
    else:
        assert records[1].where == f"{path} record 2"


def test_detect_format_order():
    assert detect_format(["prompt", "chosen", "rejected", "completion"]) == "preference"
    assert detect_format(["messages", "text"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["prompt", "answer"]) == "prompt_answer"
    assert detect_format(["text"]) == "text"
    assert detect_format(["question"]) is None


def test_explicit_format_and_json_lines_in_dot_json(tmp_path):
    f = write_jsonl(tmp_path / "d.json", [{"prompt": "a", "completion": "b", "text": "t"}])
    assert load_records(f, "text")[0].fields == {"text": "t"}
    assert load_records(f)[0].fmt == "prompt_completion"


def test_conversational_prompt_completion_and_preference(tmp_path, chatml_tok):
    user = [{"role": "user", "content": "hi"}]
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]}])
    (row,) = to_rows(load_records(f), chatml_tok, max_seq_length=256)
    for side, text in (("chosen", "hello"), ("rejected", "go away")):
        labels = [t for t in row[side]["labels"] if t != IGNORE]
        assert chatml_tok.decode(labels) == f"{text}<|im_end|>\n"


def test_hub_names_go_to_datasets(monkeypatch):
    calls = []

    def fake_hub(name, split, config_name):
        calls.append((name, split, config_name))
        return [{"prompt": "a", "completion": "b"}, {"prompt": "a"}]

    monkeypatch.setattr(loaders, "read_hub", fake_hub)
    with pytest.raises(DataError, match=r"org/set\[test\] record 2: missing field 'completion'"):
        load_records("org/set", split="test", config_name="cfg")
    assert calls == [("org/set", "test", "cfg")]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every message names the file and the 1-based line.

GOOD = json.dumps(SAMPLES["prompt_completion"])


@pytest.mark.parametrize("lines,fragment", [
    ([GOOD, GOOD, '{"prompt": "a", "completion": '], ":3: malformed JSON"),
    ([GOOD, "[1, 2]"], ":2: expected one JSON object per line, got a list"),
    ([GOOD, '{"prompt": "a"}'], ":2: missing field 'completion'"),
    ([GOOD, '{"prompt": "a", "completion": 5}'], ":2: field 'completion' must be a string, got a number"),
    ([GOOD, "", '{"prompt": null, "completion": "x"}'], ":3: field 'prompt' must be a string, got null"),
    (['{"question": "a"}'], ":1: cannot detect the data format from the keys question"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: the last message of 'messages' must have role"),
    (['{"messages": [{"role": "bot", "content": "hi"}]}'], ":1: messages[0] has role 'bot'"),
    (['{"messages": [{"role": "assistant"}]}'], ":1: messages[0] is missing field 'content'"),
    (['{"messages": []}'], ":1: field 'messages' is an empty list"),
    (['{"messages": "hi"}'], ":1: field 'messages' must be a list of messages"),
    (['{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}'], ":1: field 'completion' is a string"),
    (['{"prompt": "q", "answer": true}'], ":1: field 'answer' must be a string or a number"),
    (['{"prompt": " ", "answer": "1"}'], ":1: field 'prompt' is empty"),
    (['{"prompt": "q", "chosen": "a", "rejected": ["x"]}'], ":1: field 'rejected' must be a string"),
    (['{"a": 1' + "9" * 5000 + "}"], ":1: "),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert f"{path}{fragment}" in str(e.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_records(str(path))


def test_line_numbers_ignore_unicode_line_separators(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b\x85", "completion": "c"}, ensure_ascii=False) + "\n{oops\n")
    with pytest.raises(DataError, match=r"s\.jsonl:2: malformed JSON"):
        load_records(str(path))


@pytest.mark.parametrize("text,fragment", [
    ('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a", "completion": 3}\n]', ":3: field 'completion'"),
    ('[\n  {"prompt": "a", "completion": "b"},\n  7\n]', ":3: record 2 must be a JSON object"),
    ('[\n  {"prompt": "a", "completion": "b"}\n  {"prompt": "c"}\n]', ":3: malformed JSON"),
    ('[\n  {"prompt": "a",\n   "completion": }\n]', ":3: malformed JSON"),
    ('"just a string"', ":1: expected a JSON list"),
    ('[{"prompt": "a", "completion": "b"}] extra', ":1: malformed JSON: extra data"),
])
def test_malformed_json_list_names_line(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert f"{path}{fragment}" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_empty_files(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}: empty file"):
        load_records(str(path))
    with pytest.raises(DataError, match="the target set is empty") as e:
        load_records(str(path), role="target")
    assert str(path) in str(e.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        load_records(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="is a directory"):
        load_records(str(tmp_path))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read Parquet"):
        load_records(str(tmp_path / "broken.parquet"))


def test_explicit_format_mismatch_names_line(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [SAMPLES["text"], SAMPLES["prompt_completion"]])
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing field 'prompt'"):
        load_records(f, "prompt_completion")
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'text'"):
        load_records(f)  # auto-detected from line 1


# ---------------------------------------------------------------------------------------------------------------
# Records -> rows.

def test_prompt_completion_rows_are_completion_only(tmp_path, tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab", "completion": "cd"}])
    (row,) = to_rows(load_records(f), tok, "prompt_completion", max_seq_length=64)
    assert tok.decode(row["input_ids"]) == "abcd</s>"
    assert row["labels"] == [IGNORE, IGNORE] + row["input_ids"][2:]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_text_rows_train_on_everything(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "xyz"}])
    (row,) = to_rows(load_records(f), tok)
    assert row["labels"] == row["input_ids"] and tok.decode(row["input_ids"]) == "xyz</s>"


def test_truncation_leaving_no_loss_tokens_names_file_line(tmp_path, tok):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab", "completion": "c"},
                                              {"prompt": "a" * 20, "completion": "c"}])
    rows = to_rows(load_records(f)[:1], tok, max_seq_length=8)
    assert len(rows) == 1
    with pytest.raises(DataError, match=r"long\.jsonl:2: no completion tokens left.*max_seq_length=8.*20 tokens"):
        to_rows(load_records(f), tok, max_seq_length=8)


def test_preference_rows_and_collate(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"},
                                           {"prompt": "R", "chosen": "a", "rejected": "bb"}])
    pairs = to_rows(load_records(f), tok, "preference")
    assert tok.decode(pairs[0]["chosen"]["input_ids"]) == "Qyes</s>"
    assert tok.decode(pairs[1]["rejected"]["input_ids"]) == "Rbb</s>"
    batch = collate_preference(pairs, pad_id=0)
    assert batch["input_ids"].shape == (4, 5) and batch["sample_index"].tolist() == [0, 0, 1, 1]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0]  # "Ra</s>" (pair 1's chosen) padded to 5
    with pytest.raises(DataError, match=r"p\.jsonl:1: no chosen tokens"):
        to_rows(load_records(f), byte_tokenizer(eos=None), max_seq_length=1)


def test_prompt_answer_rows(tmp_path, tok, chatml_tok):
    f = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "12345", "answer": 15},
                                           {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4"}])
    rows = to_rows(load_records(f), tok, max_seq_length=3)
    assert rows[0]["answer"] == "15" and tok.decode(rows[0]["prompt_ids"]) == "345"  # keeps the end
    assert rows[1]["prompt"] == "### User:\n2+2\n\n### Assistant:\n"
    rows = to_rows(load_records(f), chatml_tok)
    assert rows[1]["prompt"] == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    assert chatml_tok.decode(rows[1]["prompt_ids"]) == rows[1]["prompt"]


def test_to_rows_format_mismatch(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: record has format text, expected preference"):
        to_rows(load_records(f), tok, "preference")


# ---------------------------------------------------------------------------------------------------------------
# Chat templates.

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again?"},
        {"role": "assistant", "content": "sure"}]


def loss_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE])


def test_template_round_trip(tmp_path, chatml_tok):
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}])
    (row,) = to_rows(load_records(f), chatml_tok)
    full = chatml_tok.apply_chat_template(CONV, tokenize=False)
    assert chatml_tok.decode(row["input_ids"]) == full  # the whole conversation, EOS not doubled
    assert loss_text(chatml_tok, row) == "sure<|im_end|>\n"  # only the final assistant turn
    assert row["input_ids"].count(chatml_tok.eos_token_id) == 5  # one end marker per turn


def test_template_bos_not_doubled():
    tok = byte_tokenizer("{{ bos_token }}" + CHATML, eos="<|im_end|>")
    for add_bos in (False, True):
        tok.add_bos_token = add_bos
        prompt, completion, add_eos = chat.messages_to_prompt_completion(tok, CONV[1:3])
        assert prompt.startswith("<s>") != add_bos and completion == "yo<|im_end|>\n" and not add_eos
        ids = loaders.tokenize_prompt_completion(tok, prompt, completion, add_eos=add_eos)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_fallback_template_for_base_models(tmp_path, tok):
    assert not chat.has_chat_template(tok)
    prompt, completion, add_eos = chat.messages_to_prompt_completion(tok, CONV)
    assert prompt == ("### System:\nbe brief\n\n### User:\nhi\n\n### Assistant:\nyo\n\n"
                      "### User:\nagain?\n\n### Assistant:\n")
    assert completion == "sure" and add_eos
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}])
    (row,) = to_rows(load_records(f), tok)
    assert tok.decode(row["input_ids"]) == prompt + "sure</s>"
    assert loss_text(tok, row) == "sure</s>"


def test_pad_token_handling(caplog):
    tok = byte_tokenizer()
    assert tok.pad_token is None
    with caplog.at_level(logging.INFO, logger="drpost.data.chat"):
        chat.ensure_pad_token(tok)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id and "no pad token" in caplog.text
    bare = byte_tokenizer(eos=None)
    with pytest.raises(DataError, match="neither a pad token nor an EOS token"):
        chat.ensure_pad_token(bare)


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: the JSONL loader raises nothing but DataError.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
# Arbitrary shapes: the format's keys present or not, holding anything.
record_like = st.fixed_dictionaries(
    {}, optional={k: json_values | st.text(max_size=5) for k in ("prompt", "completion", "messages", "text",
                                                                  "chosen", "rejected", "answer")}) | json_values
message_lists = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | json_values,
    "content": st.text(max_size=5) | json_values}), max_size=3)
# Well-formed records of one format (random text, including empty strings and odd characters).
texts = st.text(max_size=12)
valid_messages = st.lists(st.builds(lambda r, c: {"role": r, "content": c},
                                    st.sampled_from(["system", "user", "assistant"]), texts), max_size=3)
VALID = [
    st.builds(lambda p, c: {"prompt": p, "completion": c}, texts, texts),
    st.builds(lambda m, c: {"messages": m + [{"role": "assistant", "content": c}]}, valid_messages, texts),
    st.builds(lambda t: {"text": t}, texts),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, texts, texts, texts),
    st.builds(lambda p, a: {"prompt": p, "answer": a}, texts, st.integers() | texts),
]
record_lists = (st.sampled_from(VALID).flatmap(lambda s: st.lists(s, min_size=1, max_size=4))
                | st.lists(record_like | st.builds(lambda m: {"messages": m}, message_lists) | st.one_of(VALID),
                           max_size=4))
_FUZZ_TOK = byte_tokenizer()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    try:
        parse_jsonl(data, "fuzz.jsonl")
    except DataError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_lists, st.sampled_from(["auto", "prompt_completion", "messages", "text", "preference", "prompt_answer"]))
def test_fuzz_json_shapes_through_loader_and_rows(records, fmt):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        try:
            rows = to_rows(load_records(str(path), fmt), _FUZZ_TOK, max_seq_length=16)
        except DataError as e:
            assert "fuzz.jsonl" in str(e)
        else:
            assert len(rows) == len(records)
