"""Turning (prompt, completion) text into training rows, and rows into padded batches.

Row format (one dict per sequence): ``input_ids`` list[int], ``labels`` list[int] (-100 = no loss). Batches are
right-padded dicts of ``input_ids``, ``attention_mask``, ``labels`` (R, T) tensors, optionally ``sample_index`` (R,).
Preference pairs (DPO) are batched by ``collate_preference``: chosen and rejected rows alternate, one sample per pair.
"""

from __future__ import annotations

import torch

IGNORE = -100


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int | None = None,
                               add_eos: bool = True) -> dict:
    """Completion-only SFT row: loss on the completion tokens (and EOS), none on the prompt.

    Prompt and completion are encoded separately and concatenated, so the boundary is exact for any tokenizer.
    Truncation keeps the left part (prompt first); a row may end with no loss tokens, which callers must check.
    """
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    c_ids = tokenizer.encode(completion, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", True):
        p_ids = [bos] + p_ids
    if add_eos and eos is not None:
        c_ids = c_ids + [eos]
    ids = p_ids + c_ids
    labels = [IGNORE] * len(p_ids) + c_ids
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int = 0, sample_index: list[int] | None = None) -> dict:
    """Right-pad rows to the longest; padded positions get attention 0 and label -100."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    T = max(len(r["input_ids"]) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((R, T), dtype=torch.long)
    for i, r in enumerate(rows):
        L = len(r["input_ids"])
        input_ids[i, :L] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :L] = torch.tensor(r.get("labels", r["input_ids"]), dtype=torch.long)
        attn[i, :L] = 1
    batch = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
    if sample_index is not None:
        batch["sample_index"] = torch.tensor(sample_index, dtype=torch.long)
    return batch


def collate_preference(pairs: list[dict], pad_id: int = 0) -> dict:
    """Batch DPO pairs (``{"chosen": row, "rejected": row}``, from ``loaders.to_rows``) as one padded batch.

    Rows alternate chosen, rejected (row 2p = pair p's chosen response, row 2p+1 its rejected one), the layout
    ``drpost.objectives.dpo_loss_fn`` expects; ``sample_index`` (2P,) maps both rows of pair p to sample p, so the
    regularizer treats a pair as one sample.
    """
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    rows = [r for p in pairs for r in (p["chosen"], p["rejected"])]
    return collate(rows, pad_id=pad_id, sample_index=[i for i in range(len(pairs)) for _ in (0, 1)])
