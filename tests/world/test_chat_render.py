"""The world on a chat tokenizer (drpost.world.chat_render): phrasings, the assistant-turn loss split, answer
extraction for chat replies, and the zero-shot table on a tiny random model. Offline and fast.

Run: ``pytest -q -p no:xdist tests/world/test_chat_render.py``.
"""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from drpost.world import chat_render as cr
from drpost.world.tasks import FAMILY_NAMES, FORMATS, make_example

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """One token per byte plus ChatML specials; EOS = <|im_end|>, no BOS (like SmolLM2's tokenizer)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in ("<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = CHATML
    return t


def test_split_prompt_recovers_instruction_and_input_for_every_family_and_format():
    rng = random.Random(0)
    for fam in FAMILY_NAMES:
        for fmt in FORMATS:
            for _ in range(5):
                e = make_example(rng, fam, fmt)
                instruction, text = cr.split_prompt(e)
                assert instruction in cr.FAMILIES[fam].phrases[FORMATS[fmt][1]]
                assert cr.user_message(e, fmt) == cr.CHAT_TEMPLATES[fmt].format(instruction=instruction, input=text)


def test_phrasings():
    e = make_example(random.Random(1), "add", "qa")
    _, text = cr.split_prompt(e)
    assert cr.user_message(e, "natural") == f"What is {text}? {cr.ANSWER_HINT}"
    assert cr.user_message(e, "natural_bare") == f"What is {text}?"
    assert cr.user_message(e, "qa").startswith("Q: ") and not cr.user_message(e, "qa").endswith("A: ")
    b = cr.user_message(e, "bracket")  # another phrase set: the instruction comes from set "b"
    assert b.startswith("[") and b.split("]")[0][1:] in cr.FAMILIES["add"].phrases["b"] and b.endswith(text)
    c = make_example(random.Random(2), "count_char", "inst")
    s, ch = cr.split_prompt(c)[1].split("; ")
    assert cr.user_message(c, "natural_bare") == f'How many times does the letter "{ch}" occur in "{s}"?'
    with pytest.raises(ValueError, match="unknown phrasing"):
        cr.user_message(e, "haiku")


def test_chat_record_and_loss_on_the_assistant_turn(tok):
    e = make_example(random.Random(3), "reverse", "bracket")
    rec = cr.to_chat(e, "natural")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["messages"][1]["content"] == e["completion"] and rec["phrasing"] == "natural"
    assert rec["family"] == "reverse" and "prompt" not in rec
    prompt, completion, add_eos = cr.chat_prompt_completion(tok, e, "natural")
    assert prompt == cr.chat_prompt(tok, e, "natural")
    assert prompt.endswith("<|im_start|>assistant\n") and cr.user_message(e, "natural") in prompt
    assert completion == e["completion"] + "<|im_end|>\n" and not add_eos  # the template's own end of turn


@pytest.mark.parametrize("reply,expected", [
    ("42", "42"), ("42.", "42"), ("  42\nBecause 40 + 2.", "42"), ('"olleh"', "olleh"), ("`abc`", "abc"),
    ("**17**", "17"), ("\n\nABC.\n", "ABC"), ("The answer is 42.", "The answer is 42"), ("...", "..."),
])
def test_extract_answer(reply, expected):
    assert cr.extract_answer(reply) == expected


def test_verifier_is_not_lenient():
    assert cr.verify_chat("add", "42.", "42") and cr.verify_chat("reverse", '"olleh"', "olleh")
    assert not cr.verify_chat("add", "17 + 25 = 42", "42")
    assert not cr.verify_chat("add", "The answer is 42.", "42")
    assert not cr.verify_chat("reverse", "Olleh", "olleh")  # case is part of string answers
    assert cr.verify_chat("sort_nums", "1  2 3.", "1 2 3")  # the family's own normalizer still applies
    assert cr.answer_in_line("The answer is 42.", "42") and not cr.answer_in_line("The answer is 421", "42")


def test_eval_set_is_deterministic_and_balanced():
    a = cr.make_eval_set(3, families=["add", "upper"], phrasings=["natural", "bracket"], seed=5)
    b = cr.make_eval_set(3, families=["add", "upper"], phrasings=["natural", "bracket"], seed=5)
    assert a == b and len(a) == 12
    assert {(e["family"], e["phrasing"]) for e in a} == {(f, p) for f in ("add", "upper") for p in ("natural", "bracket")}
    assert all(e["format"] == "bracket" for e in a if e["phrasing"] == "bracket")


def test_zero_shot_table_on_a_tiny_model(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    res = cr.zero_shot_table(model, tok, n=2, families=["add", "first_char"], phrasings=["natural", "qa"],
                             batch_size=3, max_new_tokens=3)
    assert res["n_prompts"] == 8 and set(res["cells"]) == {"add", "first_char"}
    assert all(0 <= v <= 1 for row in res["cells"].values() for v in row.values())
    assert set(res["by_phrasing"]) == {"natural", "qa"} and 0 <= res["overall"] <= 1
    assert len(res["samples"]["add"]["natural"]) == 2 and tok.padding_side == "right"  # restored
    md = cr.markdown_table(res)
    assert md.splitlines()[0] == "| family | natural | qa | all |" and "**all**" in md
    assert "| add |" in cr.markdown_table(res, "answer_in_line")
