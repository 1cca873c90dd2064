"""Preference pairs and RL prompts from user data (``drpost.data.prompts``), the answer verifiers
(``drpost.data.verifiers``) and the world's ``data.setting`` check: every bad input is a DataError / ConfigError
naming the file:line or the option. Offline: tiny byte tokenizers, a faked hub loader.
"""

from __future__ import annotations

import json

import pytest
from tests.data.test_formats import CHATML, byte_tokenizer

from drpost.config import ConfigError
from drpost.data import loaders
from drpost.data.formats import DataError
from drpost.data.prompts import encode_preference, load_preference_pairs, load_prompts
from drpost.data.verifiers import answer_matches, check_numeric_answers, make_verifier, parse_number


def jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def test_pairs_from_jsonl_json_parquet_and_the_hub(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = jsonl(tmp_path / "p.jsonl", [PAIR, {**PAIR, "family": "add"}])
    pairs = load_preference_pairs(f)
    assert pairs[0] == PAIR and pairs[1]["family"] == "add"
    pq.write_table(pa.Table.from_pylist([PAIR]), tmp_path / "p.parquet")
    assert load_preference_pairs(str(tmp_path / "p.parquet")) == [PAIR]
    (tmp_path / "p.json").write_text(json.dumps([PAIR, PAIR]))
    assert len(load_preference_pairs(str(tmp_path / "p.json"), limit=1)) == 1
    monkeypatch.setattr(loaders, "read_hub", lambda name, split, cfg: [PAIR] if name == "org/prefs" else [])
    assert load_preference_pairs("org/prefs") == [PAIR]


@pytest.mark.parametrize("lines, where", [
    ([json.dumps(PAIR), "{not json"], ":2: malformed JSON"),
    ([json.dumps(PAIR), json.dumps({"prompt": "x", "chosen": "y"})], ":2: missing field 'rejected'"),
    ([json.dumps({**PAIR, "chosen": 3})], ":1: field 'chosen' must be a string"),
])
def test_bad_pair_files_name_file_and_line(tmp_path, lines, where):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl{where}"):
        load_preference_pairs(str(f))


def test_bad_parquet_and_missing_and_empty_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"\x00\xffnot parquet")
    with pytest.raises(DataError, match="x.parquet: cannot read Parquet"):
        load_prompts(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match="file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the target data has no records"):
        load_prompts(str(tmp_path / "e.jsonl"), role="target")


def test_conversational_pairs_trl_format(tmp_path):
    tok = byte_tokenizer(CHATML, eos="<|im_end|>")
    rec = {"prompt": [{"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    pair = load_preference_pairs(jsonl(tmp_path / "c.jsonl", [rec]), tok)[0]
    assert pair["prompt"] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert pair["chosen"].startswith("4") and pair["rejected"].startswith("5")
    chosen, rejected = encode_preference(tok, pair)
    eos = tok.eos_token_id
    assert chosen["input_ids"].count(eos) == 2  # the prompt's end-of-turn and one after the response: no doubling
    # without a template: the fallback template
    plain = load_preference_pairs(jsonl(tmp_path / "c2.jsonl", [rec]), byte_tokenizer())[0]
    assert plain["prompt"].endswith("### Assistant:\n") and plain["chosen"] == "4"


def test_encode_preference_max_prompt_length():
    tok = byte_tokenizer()
    pair = {"prompt": "a long prompt " * 5, "chosen": "yes", "rejected": "no"}
    full, _ = encode_preference(tok, pair)
    chosen, rejected = encode_preference(tok, pair, max_prompt_length=4)
    assert sum(lab == -100 for lab in chosen["labels"]) == 4 and len(chosen["input_ids"]) < len(full["input_ids"])
    assert tok.decode([t for t, lab in zip(rejected["input_ids"], rejected["labels"]) if lab != -100]) == "no</s>"
    with pytest.raises(DataError, match="no 'chosen' tokens left"):
        encode_preference(tok, pair, max_length=5)


def test_prompts_plain_chat_and_messages(tmp_path):
    tok = byte_tokenizer(CHATML, eos="<|im_end|>")
    rows = [{"prompt": "hi"},
            {"prompt": [{"role": "user", "content": "hello"}], "family": "greet"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "completion": "c"}]
    out = load_prompts(jsonl(tmp_path / "r.jsonl", rows), tok)
    assert out[0] == {"prompt": "hi"}
    assert out[1] == {"prompt": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "family": "greet"}
    assert out[2]["prompt"] == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert out[3] == {"prompt": "p"}
    with pytest.raises(DataError, match=r"r2.jsonl:1: a prompt record needs 'prompt'"):
        load_prompts(jsonl(tmp_path / "r2.jsonl", [{"text": "x"}]))
    with pytest.raises(DataError, match=r"r3.jsonl:2: field 'prompt' is empty"):
        load_prompts(jsonl(tmp_path / "r3.jsonl", [{"prompt": "ok"}, {"prompt": "  "}]))


def test_rlvr_prompts_need_an_answer(tmp_path):
    f = jsonl(tmp_path / "v.jsonl", [{"prompt": "3*4=", "answer": 12}, {"prompt": "1+1=", "answer": "2"}])
    assert load_prompts(f, require_answer=True) == [{"prompt": "3*4=", "answer": "12"},
                                                    {"prompt": "1+1=", "answer": "2"}]
    g = jsonl(tmp_path / "w.jsonl", [{"prompt": "3*4=", "answer": 12}, {"prompt": "1+1="}])
    with pytest.raises(DataError, match=r"w.jsonl:2: missing field 'answer'"):
        load_prompts(g, require_answer=True)
    with pytest.raises(DataError, match=r"record 1: grpo.verifier=numeric needs a numeric 'answer'"):
        check_numeric_answers([{"prompt": "x", "answer": "abc"}])


@pytest.mark.parametrize("kind, completion, answer, ok", [
    ("exact", "  12 \nmore text", "12", True),
    ("exact", "12.0", "12", False),
    ("numeric", "12.0", "12", True),
    ("numeric", "so the total is 1,234.0 apples", "1234", True),
    ("numeric", "first 3 then 5", "5", True),
    ("numeric", "first 3 then 5", "3", False),
    ("numeric", "work 7 8 #### 42", "42", True),
    ("numeric", "answer \\boxed{3/4} done 9", "0.75", True),
    ("numeric", "-2.5", "-5/2", True),
    ("numeric", "no number", "1", False),
    ("contains", "the answer is 42.", "42", True),
    ("contains", "the answer is 4", "42", False),
])
def test_verifiers(kind, completion, answer, ok):
    assert answer_matches(kind, completion, answer) is ok
    assert make_verifier(kind)(completion, {"answer": answer}) == float(ok)


def test_verifier_errors_and_numbers():
    assert parse_number("x 1,000 y 2") == 2.0 and parse_number("none") is None
    with pytest.raises(ValueError, match="unknown verifier 'fuzzy'"):
        make_verifier("fuzzy")


def test_unknown_world_setting_is_a_config_error_naming_the_option():
    from drpost.world.rl_settings import build_rl_setting, get_rl_setting

    with pytest.raises(ConfigError, match=r"option 'data.setting': unknown world setting 'rlvr_arth'; "
                                          r"did you mean 'rlvr_arith'\?"):
        build_rl_setting("rlvr_arth")
    with pytest.raises(ConfigError, match=r"unknown dpo world setting 'rlvr_arith'.*settings: default, dpo_pairs"):
        get_rl_setting("rlvr_arith", paradigm="dpo")
    from drpost.world.settings import build_setting

    with pytest.raises(ConfigError, match=r"option 'data.setting': unknown world setting 'format_shfit'; did you "
                                          r"mean 'format_shift'\?"):
        build_setting("format_shfit")


def test_overlong_records_error_skip_or_truncate_the_prompt(tmp_path):
    from drpost.data.loaders import load_records, to_rows

    tok = byte_tokenizer()
    f = jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 30, "completion": "ok"}, {"prompt": "hi", "completion": "yo"}])
    records = load_records(f)
    with pytest.raises(DataError, match=r"long.jsonl:1: no completion tokens left.*overlong='skip'"):
        to_rows(records, tok, max_seq_length=12)
    skipped: list[str] = []
    rows = to_rows(records, tok, max_seq_length=12, overlong="skip", skipped=skipped)
    assert len(rows) == 1 and skipped == [f"{f}:1"]
    rows = to_rows(records, tok, max_seq_length=12, overlong="truncate_prompt")
    first = rows[0]
    full = to_rows(records, tok)[0]
    assert len(first["input_ids"]) == 12 and first["input_ids"][-3:] == full["input_ids"][-3:]
    assert first["input_ids"][0] == full["input_ids"][0]  # BOS (when the tokenizer adds one) stays first
    kept = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != -100]
    assert tok.decode(kept) == "ok</s>"  # the whole completion and EOS kept; the prompt lost its start
    assert rows[1] == to_rows(records[1:], tok, max_seq_length=12)[0]  # rows that fit are unchanged
    with pytest.raises(DataError, match="unknown overlong policy"):
        to_rows(records, tok, overlong="drop")
