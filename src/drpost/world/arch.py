"""The world model's architecture: the sizes (``MODEL_SIZES``), their ``LlamaConfig`` and random initialization.

A leaf of ``drpost.world``: ``pretrain`` (which trains these models) and ``model`` (which loads the pretrained one)
both import it, and it imports neither.

Sizes: ``micro`` (43,360 parameters, for tests, pretrains in ~4 s), ``tiny`` (870,272, the default base model).
Attention: ``eager`` (at these sizes sdpa was not faster on CPU in our measurements; eager also suits torch.func).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drpost.world.tokenizer import VOCAB_SIZE, build_tokenizer

MODEL_SIZES: dict[str, dict] = {
    "micro": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4),
}
ATTN_IMPLEMENTATION = "eager"


def model_config(size: str = "tiny") -> LlamaConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SIZES)}")
    dims = MODEL_SIZES[size]
    tok = build_tokenizer()
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        num_key_value_heads=dims["num_attention_heads"], tie_word_embeddings=False, hidden_act="silu",
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        attention_dropout=0.0, initializer_range=0.02, **dims)


def build_model(size: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized model of ``size`` (deterministic in ``seed``)."""
    cfg = model_config(size)
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
