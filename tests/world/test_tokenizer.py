"""Byte-level tokenizer: round trip, special tokens, save/load, chat template == prompt/completion tokens."""

from __future__ import annotations

from transformers import AutoTokenizer

from drpost.data.collate import tokenize_prompt_completion
from drpost.world.tokenizer import VOCAB_SIZE, build_tokenizer

TEXTS = ["Q: Reverse it: abc\nA: cba", "", "  spaces  and\ttabs", "unicode: é ☃ 𝄞", "[sum these up] 1 2 3 = "]


def test_round_trip_and_ids():
    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for t in TEXTS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == len(t.encode("utf-8"))  # one token per byte
        assert all(3 <= i < VOCAB_SIZE for i in ids)
        assert tok.decode(ids) == t
    assert tok.encode("A", add_special_tokens=False) == [ord("A") + 3]


def test_save_load(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    for t in TEXTS:
        assert tok2.encode(t) == tok.encode(t)
        assert tok2.decode(tok2.encode(t), skip_special_tokens=True) == t
    assert tok2.pad_token_id == 0 and tok2.eos_token_id == 2 and tok2.chat_template


def test_chat_template_matches_prompt_completion():
    tok = build_tokenizer()
    row = tokenize_prompt_completion(tok, "Q: Add: 1 + 2\nA: ", "3")
    msgs = [{"role": "user", "content": "Q: Add: 1 + 2\nA: "}, {"role": "assistant", "content": "3"}]
    out = tok.apply_chat_template(msgs, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    assert list(ids) == row["input_ids"]
    assert row["labels"][-2:] == [ord("3") + 3, tok.eos_token_id]
