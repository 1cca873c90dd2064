"""Byte-level tokenizer of the benchmark world, built offline as a real Hugging Face fast tokenizer.

Owns: ``build_tokenizer()``. Vocabulary: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then the 256 bytes (ids 3..258), no
merges, so any text round-trips exactly. No special token is added by ``encode`` (``add_bos_token`` is False: transformers
5 does not persist that flag across ``save_pretrained``, so "never" is the only choice that stays consistent after a
reload); ``<bos>`` exists but sequences start directly with text. ``save_pretrained`` / ``from_pretrained`` work; a
plain-text chat template is attached whose rendering of ``[user, assistant]`` is ``prompt + completion + <eos>``, the
same tokens as the prompt/completion path (``drpost.data.collate.tokenize_prompt_completion``).

Try it: ``python -m drpost.world.tokenizer``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB_SIZE = len(SPECIALS) + 256

# no bos; user and system turns are rendered verbatim, assistant turns are followed by <eos>; no role markers, so a
# messages pair renders exactly like the prompt/completion pair.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level ``PreTrainedTokenizerFast`` (no files, no downloads)."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                 padding_side="right", model_max_length=512)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes-to-unicode table (printable bytes map to themselves, the rest to 256+)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


if __name__ == "__main__":
    t = build_tokenizer()
    ids = t.encode("Q: Reverse the string: abc\nA: cba")
    print(len(t), ids, repr(t.decode(ids, skip_special_tokens=True)))
