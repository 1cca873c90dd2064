"""Tiny models and batches for tests: Llama, Qwen2 (qkv bias, tied embeddings), GPT-2 (Conv1D, tied), +LoRA.

No downloads: every model is built from a config with a fixed seed.
"""

from __future__ import annotations

import torch

VOCAB = 48

# Capture vs the torch.func oracle. transformers computes the attention softmax and RMSNorm statistics in float32
# even in a float64 model (transformers 5.x), and the oracle runs each sample alone while the capture runs the merged
# batch: a float64 value that differs in its last bit between the two batch shapes can round to a neighbouring
# float32 (6e-8 relative). Agreement is therefore checked at 1e-6 relative (observed: up to 7e-8; the bar for "exact"),
# not at float64 rounding; comparisons inside one forward (one-pass vs two-pass, per-row vs autograd) stay tighter.
ORACLE_RTOL = 1e-6


def tiny_model(family: str = "llama", dtype=torch.float64, lora: bool = False, seed: int = 0, device="cpu"):
    """``device``: where the model lives (its weights are drawn on the CPU first, so they match across devices)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    if family == "llama":
        cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model = model.to(dtype)
    # random (not zero) norm weights/biases so their gradients are generic
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():  # LoRA B starts at zero; make it generic
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.eval()
    return model.to(device)


def batch(rows: int, lengths: list[int] | None = None, T: int = 9, seed: int = 0, sample_index=None,
          prompt: int = 2, device="cpu") -> dict:
    """Right-padded rows of random tokens with unequal lengths; the first `prompt` tokens carry no loss. ``device``:
    where the tensors are put (drawn on the CPU, so the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [T - (i % 3) for i in range(rows)]
    T = max(lengths)
    ids = torch.zeros(rows, T, dtype=torch.long)
    attn = torch.zeros(rows, T, dtype=torch.long)
    labels = torch.full((rows, T), -100, dtype=torch.long)
    for r, L in enumerate(lengths):
        ids[r, :L] = torch.randint(1, VOCAB, (L,), generator=g)
        attn[r, :L] = 1
        labels[r, prompt:L] = ids[r, prompt:L]
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if sample_index is not None:
        out["sample_index"] = torch.tensor(sample_index)
    return {k: v.to(device) for k, v in out.items()}


CVX_TIGHT = dict(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)


def cvx_solve(prob) -> float:
    """Solve a cvxpy problem with CLARABEL at tight tolerances, or at its defaults where the tight run stops short."""
    import cvxpy as cp

    try:
        prob.solve(**CVX_TIGHT)
    except cp.error.SolverError:
        prob.solve(solver="CLARABEL")
    assert prob.status == "optimal", prob.status
    return prob.value
