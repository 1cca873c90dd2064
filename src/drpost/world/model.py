"""The world's base model: a tiny Llama-architecture ``LlamaForCausalLM`` over the byte-level tokenizer.

Owns ``load_base_model(size)``, which returns the pretrained, disk-cached base model (pretraining it on first use;
see ``drpost.world.pretrain``). The sizes, config and random initialization live in ``drpost.world.arch`` and are
re-exported here (``MODEL_SIZES``, ``model_config``, ``build_model``, ``n_params``).

Try it: ``python -c "from drpost.world.model import load_base_model; print(load_base_model('tiny'))"``.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from drpost.world.arch import ATTN_IMPLEMENTATION, MODEL_SIZES, build_model, model_config, n_params
from drpost.world.pretrain import ensure_base_model

__all__ = ["ATTN_IMPLEMENTATION", "MODEL_SIZES", "build_model", "load_base_model", "model_config", "n_params"]


def load_base_model(size: str = "tiny", device: str | torch.device = "cpu"):
    """The pretrained base model and its tokenizer: ``(model in eval mode on device, tokenizer)``.

    Built and cached on first call (cache: ``$DRPOST_CACHE`` or ``~/.cache/drpost``, keyed by a hash of the model
    config and the pretraining recipe); later calls only load.
    """
    path = ensure_base_model(size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
    return model.to(device).eval(), tokenizer
