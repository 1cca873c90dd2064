"""An architecture zoo for the exactness matrix (issue 15): tiny fp64 causal LMs of every type transformers ships,
padded batches, and an fp64 per-row gradient oracle that runs in the batch's own context.

    model = zoo.tiny_model("llama")               # or zoo.build(...) for the reason a type is skipped
    res = zoo.check(model, "global_subset", frac=0.5)
    res.max_err <= zoo.EXACT

No downloads: every model is built from its transformers config class with tiny sizes. Helpers only; the tests
live in ``test_architectures.py`` and ``scripts/arch_matrix.py`` prints the whole matrix.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch

EXACT = 1e-6  # relative error at or below which a result counts as exact (fp64)
VOCAB = 128
TINY = 1e-30
MAX_PARAMS = 1_000_000
# Per-parameter errors are relative to max(||d_p||, PARAM_FLOOR * ||d||): a parameter whose true gradient is
# analytically ~0 (a key-projection bias: softmax is shift invariant) carries only rounding noise, which a
# re-ordered but exact computation changes; anything at least 1e-4 of the whole gradient is held to EXACT.
PARAM_FLOOR = 1e-4

# --------------------------------------------------------------------------- config sizing
# Canonical tiny sizes, by config field name (only fields the config class knows are passed).
SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "dim": 32, "embed_dim": 32, "emb_dim": 32,
    "embedding_size": 32, "embedding_dim": 32, "word_embed_proj_dim": 32, "input_embedding_size": 32,
    "output_embedding_size": 32, "attention_hidden_size": 32, "lru_width": 32, "backbone_hidden_size": 32,
    "intermediate_size": 64, "ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "n_inner": 64,
    "ffn_hidden_size": 64, "d_inner": 64, "feed_forward_size": 64, "intermediate_size_mlp": 64,
    "dense_intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "expert_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4, "num_decoder_attention_heads": 4,
    "num_encoder_attention_heads": 4,
    "num_key_value_heads": 2, "multi_query_group_num": 2, "num_kv_heads": 2,
    "head_dim": 8, "d_head": 8, "attention_head_size": 8, "kv_channels": 8, "attention_head_dim": 8,
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "context_length": 64,
    "max_target_positions": 64, "max_source_positions": 64, "n_ctx": 64, "seq_length": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "moe_top_k": 2, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8,
    # windows shorter than T (10) but reaching a real token from every padded position (min length 6)
    "sliding_window": 8, "window_size": 8, "attention_window_size": 8, "sliding_window_size": 8,
    "state_size": 8, "mamba_d_state": 8, "ssm_state_size": 8, "time_step_rank": 4, "mamba_dt_rank": 4,
    "n_groups": 1, "mamba_n_groups": 1, "chunk_size": 16, "mamba_chunk_size": 16, "mamba_n_heads": 4,
    "mamba_d_head": 16, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_headdim": 16, "n_mamba_heads": 4,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 8, "linear_num_heads": 4,
    "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "ple_embed_dim": 8,
    "pronunciation_embed_dim": 8, "pronunciation_vocab_size": 32, "shape_embed_dim": 8, "shape_vocab_size": 32,
    "dim_head": 8, "dim_ff": 64, "position_bias_num_buckets": 8, "position_bias_max_distance": 16, "dff": 64,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8, "d_rel": 4, "rel_extent": 16,
    "unpadded_vocab_size": VOCAB, "zero_expert_num": 2,
    "rotary_dim": 4, "partial_rotary_factor": None,  # None = not passed (placeholder for the override table)
}
DROPOUT_WORDS = ("dropout", "pdrop", "drop_path", "layerdrop", "jitter")
PAD, BOS, EOS = 0, 1, 2
LOW_ID = 3  # batches draw ids in [LOW_ID, HIGH_ID): clear of special and multimodal placeholder ids
HIGH_ID = 100

# Per-type extra kwargs (applied last) for configs the generic table does not fit.
OVERRIDES: dict[str, dict] = {
    "codegen": {"rotary_dim": 4},
    "gptj": {"rotary_dim": 4},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2, "window_size": 8},
    "mamba2": {"num_heads": 4, "head_dim": 16, "expand": 2, "n_groups": 1, "hidden_size": 32},
    "reformer": {"attn_layers": ["local", "local"], "axial_pos_shape": [2, 5], "axial_pos_embds_dim": [16, 16],
                 "max_position_embeddings": 10, "local_attn_chunk_length": 5, "lsh_attn_chunk_length": 5,
                 "is_decoder": True},  # training needs T = 10 = prod(axial_pos_shape), a multiple of the chunks
    "xmod": {"default_language": "en_XX"},
    "xlnet": {"d_head": 8, "mem_len": None},
    "prophetnet": {"ngram": 2},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "big_bird": {"attention_type": "original_full"},
    "zamba2": {"mamba_headdim": 16, "n_mamba_heads": 4, "adapter_rank": 4, "num_query_groups": 2,
               "layers_block_type": ["mamba", "hybrid"]},
    "zamba": {"attention_head_dim": 16, "mamba_expand": 2, "layers_block_type": ["mamba", "hybrid"]},
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_expand": 2},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
}

# Types skipped up front, with the reason.
SKIP: dict[str, str] = {
    "blt": "byte latent transformer: patcher/encoder/decoder sub-models, no tiny text-only form",
    "moshi": "speech model: the forward needs audio codebooks",
    "musicgen": "audio model: the forward needs audio codebooks",
    "musicgen_melody": "audio model: the forward needs audio codebooks",
    "phi4_multimodal": "multimodal: vision and audio sub-models",
    "git": "multimodal: vision sub-model",
    "fuyu": "multimodal: image patches",
    "emu3": "multimodal: the VQ image tokenizer sub-model is built at full size (minutes on CPU)",
    "mllama": "multimodal: the vision sub-config is built at full size (minutes on CPU)",
    "gemma4_unified_assistant": "assistant head of a multimodal model: sub-models built at full size",
}


def _fields(cls) -> set[str]:
    """Constructor keyword names of a config class (its signature and attribute_map aliases)."""
    names = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            names |= set(inspect.signature(klass.__init__).parameters)
        except (TypeError, ValueError):
            pass
    names |= set(getattr(cls, "attribute_map", {}) or {})
    return names


def config_kwargs(model_type: str, tie: bool | None = None) -> dict:
    """Tiny-size constructor kwargs for ``model_type``'s config class."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = _fields(cls)
    try:
        defaults = cls().to_dict()
    except Exception:
        defaults = {}
    known |= set(defaults)
    kw = {k: v for k, v in SIZES.items() if k in known and v is not None}
    for k, v in defaults.items():  # special token ids inside the tiny vocabulary; ids at or above LOW_ID stay free
        if k.endswith(("_token_id", "_token_index")) and isinstance(v, int) and v >= VOCAB:
            kw[k] = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}.get(k, VOCAB - 1)
        elif k.endswith(("_token_id", "_token_index")) and isinstance(v, list):
            kw[k] = [EOS]
        elif isinstance(v, float) and not isinstance(v, bool) and any(w in k for w in DROPOUT_WORDS):
            kw[k] = 0.0
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if k in known and isinstance(defaults.get(k), int) and defaults[k] >= VOCAB:
            kw[k] = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}[k]
    if "use_cache" in known:
        kw["use_cache"] = False
    if "is_decoder" in known:
        kw["is_decoder"] = True  # BERT-style *ForCausalLM refuse to run (or run bidirectionally) otherwise
    kw["attn_implementation"] = "eager"
    kw["experts_implementation"] = "eager"  # grouped_mm kernels refuse float64
    if "qk_rope_head_dim" in kw:  # multi-head latent attention: head_dim is the rotary part
        kw["head_dim"] = kw["qk_rope_head_dim"]
        if "num_key_value_heads" in kw:  # keys/values are per head (no grouping) in these models
            kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    if tie is not None:
        kw["tie_word_embeddings"] = tie
    kw.update(OVERRIDES.get(model_type, {}))
    return kw


@dataclass
class Built:
    """A zoo entry: the model, or why it was skipped."""

    model_type: str
    model: torch.nn.Module | None = None
    skip: str | None = None
    mode: str = "train"  # "eval" where training mode is not deterministic with every dropout at 0
    tied: bool | None = None  # output embedding is the input embedding


def _causal_lm_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_types() -> list[str]:
    """Every causal-LM model type transformers ships, one per model class (aliases of a class dropped)."""
    seen, out = {}, []
    types = _causal_lm_types()

    def own(t):  # the type named after its class (llama for LlamaForCausalLM, not exaone)
        c = types[t].lower().replace("forcausallm", "").replace("lmheadmodel", "")
        return c == t.replace("_", "").replace("-", "")

    # prefer the *_text type of a pair (its config is the text config), then the class's own type
    for t in sorted(types, key=lambda t: (not t.endswith("_text"), not own(t), t)):
        cls = types[t]
        if cls in seen:
            continue
        seen[cls] = t
        out.append(t)
    return sorted(out)


def _is_tied(model) -> bool | None:
    try:
        i, o = model.get_input_embeddings(), model.get_output_embeddings()
    except Exception:
        return None
    if i is None or o is None or not hasattr(i, "weight") or not hasattr(o, "weight"):
        return None
    return i.weight is o.weight


def _generic_params(model, seed: int) -> None:
    """Make constant-initialized parameters (norm weights of ones, zero biases) generic, so their gradients are."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 1 and bool(p.max() == p.min()):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def build(model_type: str, *, tie: bool | None = None, seed: int = 0, lora: bool = False,
          device: str | torch.device = "cpu") -> Built:
    """Build the tiny fp64 model of ``model_type`` (or say why not). ``lora``: wrap it with PEFT LoRA r=4 on
    all-linear, lora_B random (it starts at zero). ``device``: where the model is moved once it is built and
    checked on the CPU (the same weights on every device)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    types = _causal_lm_types()
    if model_type not in types:
        return Built(model_type, skip="not a causal-LM model type of this transformers")
    if model_type in SKIP:
        return Built(model_type, skip=SKIP[model_type])
    cls_name = types[model_type]
    if "ConditionalGeneration" in cls_name:
        return Built(model_type, skip=f"multimodal ({cls_name}): forward needs non-text inputs")
    try:
        cfg_cls = CONFIG_MAPPING[model_type]
        if tie is not None and "tie_word_embeddings" not in _fields(cfg_cls):
            return Built(model_type, skip="config has no tie_word_embeddings")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = cfg_cls(**config_kwargs(model_type, tie))
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except ImportError as e:
        return Built(model_type, skip=f"needs an extra package: {str(e).splitlines()[0][:120]}")
    except Exception as e:  # noqa: BLE001 - any failure to build is a skip reason, recorded as such
        return Built(model_type, skip=f"does not build tiny offline: {type(e).__name__}: {_first(e)}")
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:  # a size the table missed: per-row gradients of it would take gigabytes
        return Built(model_type, skip=f"{n_params} parameters at tiny size (> {MAX_PARAMS}): extend zoo.SIZES")
    model = model.double()
    _generic_params(model, seed)
    tied = _is_tied(model)
    if tie is not None and tied is not None and tied != tie:
        return Built(model_type, skip=f"tie_word_embeddings={tie} is not honoured by the model")
    b = batch(model)
    mode = "train"
    try:
        model.train()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from drpost.objectives import causal_lm_loss

            a, _ = causal_lm_loss(model, b)
            c, _ = causal_lm_loss(model, b)
        if not torch.isfinite(a).all():
            return Built(model_type, skip="non-finite loss at tiny size")
        if not torch.equal(a, c):
            mode = "eval"
            model.eval()
    except Exception as e:  # noqa: BLE001
        return Built(model_type, skip=f"text-only forward fails: {type(e).__name__}: {_first(e)}")
    if lora:
        try:
            from peft import LoraConfig, get_peft_model

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules="all-linear"))
        except Exception as e:  # noqa: BLE001
            return Built(model_type, skip=f"peft LoRA does not wrap it: {type(e).__name__}: {_first(e)}")
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():  # LoRA B starts at zero: make it generic
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.train(mode == "train")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from drpost.objectives import causal_lm_loss

                loss, _ = causal_lm_loss(model, b)
        except Exception as e:  # noqa: BLE001
            return Built(model_type, skip=f"the peft LoRA model's forward fails: {type(e).__name__}: {_first(e)}")
        if not loss.requires_grad:  # e.g. reversible layers that run their forward under no_grad
            return Built(model_type, skip="the peft LoRA model's loss does not depend on the LoRA parameters "
                                          "through autograd")
    return Built(model_type, model=model.to(device), mode=mode, tied=tied)


def tiny_model(model_type: str, *, tie: bool | None = None, seed: int = 0, lora: bool = False,
               device: str | torch.device = "cpu"):
    """The tiny fp64 model of ``model_type``; ``pytest.skip`` / ``RuntimeError`` with the reason if it is skipped."""
    built = build(model_type, tie=tie, seed=seed, lora=lora, device=device)
    if built.model is None:
        raise SkipModel(f"{model_type}: {built.skip}")
    return built.model


class SkipModel(RuntimeError):
    """A zoo type that cannot be built or run as a tiny text-only causal LM."""


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:160]


def _logits(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------- batches
def vocab_of(model) -> int:
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        n = model.config.get_text_config().vocab_size
    return int(n)


def batch(model, rows: int = 8, T: int = 10, seed: int = 0, device: str | torch.device | None = None) -> dict:
    """Right-padded rows of random in-vocabulary ids with unequal lengths (several rows padded, general and
    target), ``labels`` = ids with -100 on padding, on a 2-token prompt in every row and on the third token of
    every third row (the earliest loss token is at position 2: ``causal_lm_loss`` runs the LM head on the last
    T - 1 positions only, where the model takes ``logits_to_keep``, and the oracle on all). ``device``: None =
    the model's (the ids are drawn on the CPU, so they are the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    hi = min(HIGH_ID, vocab_of(model))
    lengths = [T - (3 * r) % 5 for r in range(rows)]  # T, T-3, T-1, T-4, T-2, T, T-3, T-1, ...
    ids = torch.full((rows, T), PAD, dtype=torch.long)
    attn = torch.zeros(rows, T, dtype=torch.long)
    labels = torch.full((rows, T), -100, dtype=torch.long)
    for r, L in enumerate(lengths):
        ids[r, :L] = torch.randint(LOW_ID, hi, (L,), generator=g)
        attn[r, :L] = 1
        labels[r, 2:L] = ids[r, 2:L]  # a 2-token prompt: no loss
        if r % 3 == 0:
            labels[r, 2] = -100  # the first scored token (position 2) carries no loss in some rows
    if device is None:
        device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def split(b: dict, n_general: int = 6) -> tuple[dict, dict]:
    return ({k: v[:n_general] for k, v in b.items()}, {k: v[n_general:] for k, v in b.items()})


# --------------------------------------------------------------------------- the oracle
def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_sample_grads(model, b: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Exact per-row gradients in the batch's own context: one forward of the whole batch (logits at every
    position: ``full_logits_loss``, not drpost's windowed loss), then one ``autograd.grad`` of each row's summed
    loss (unused parameters -> zeros). Returns ({name: (R, *shape)}, counts (R,), loss_sums (R,))."""
    params = trainable(model)
    names, ps = list(params), list(params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_sums, counts = full_logits_loss(model, b)
    rows = []
    for r in range(loss_sums.shape[0]):
        gs = torch.autograd.grad(loss_sums[r], ps, retain_graph=r + 1 < loss_sums.shape[0], allow_unused=True)
        rows.append([torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(ps, gs)])
    u = {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}
    return u, counts.detach(), loss_sums.detach()


def full_logits_loss(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy from the logits at every position (what ``causal_lm_loss`` computes
    with its LM-head window): (loss_sums (R,), counts (R,))."""
    from drpost.objectives.sft import token_logprobs

    logp, mask = token_logprobs(_logits(model, b), b["labels"])
    return -logp.sum(-1), mask.sum(-1).to(logp.dtype)


def flat(u: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([u[n].reshape(u[n].shape[0], -1) for n in names], 1)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / max(||y||, tiny)."""
    x, y = x.detach().double().flatten().cpu(), y.detach().double().flatten().cpu()
    if x.shape != y.shape:
        return math.inf
    return float((x - y).norm() / max(float(y.norm()), TINY))


# --------------------------------------------------------------------------- one check
@dataclass
class Result:
    """Relative errors of one DataRegularizer step against the oracle (nan = not applicable)."""

    grad: float = math.nan  # all trainable parameters' .grad, concatenated
    grad_param: float = math.nan  # worst single parameter (denominator floored at PARAM_FLOOR of the whole norm)
    worst_param: str = ""
    scores: float = math.nan  # report.scores (layerwise: report.block_scores)
    weights: float = math.nan  # report.weights
    loss: float = math.nan  # report.loss, report.target_loss
    subset_ok: bool = True  # the chosen subset(s) equal the oracle's top-k
    missing: list[str] = field(default_factory=list)  # trainable parameters left without .grad

    @property
    def max_err(self) -> float:
        vals = [v for v in (self.grad, self.grad_param, self.scores, self.weights, self.loss) if not math.isnan(v)]
        m = max(vals) if vals else math.inf
        return m if self.subset_ok else math.inf

    @property
    def exact(self) -> bool:
        return self.max_err <= EXACT

    def summary(self) -> str:
        f = lambda v: "-" if math.isnan(v) else f"{v:.1e}"  # noqa: E731
        s = (f"grad {f(self.grad)} param {f(self.grad_param)} scores {f(self.scores)} "
             f"weights {f(self.weights)} loss {f(self.loss)}")
        if not self.subset_ok:
            s += " WRONG-SUBSET"
        if self.missing:
            s += f" no-grad: {','.join(self.missing[:3])}"
        return s


def check(model, method: str, *, rows: int = 8, n_general: int = 6, seed: int = 0, **opts) -> Result:
    """Run ``DataRegularizer(model, method, **opts).step`` on general rows 0..n_general-1 and target rows after,
    and compare ``.grad``, the scores, the weights and the losses with the oracle, on the model's device.
    Exceptions propagate."""
    import drpost
    from drpost.feasible.base import frac_to_k
    from drpost.objectives import causal_lm_loss

    b = batch(model, rows=rows, seed=seed)
    gen, tgt = split(b, n_general)
    model.zero_grad(set_to_none=True)
    u, counts, loss_sums = per_sample_grads(model, b)
    params = trainable(model)
    names = list(params)
    U = flat(u, names)  # (R, P)
    dev = U.device
    ng = n_general
    N, N_T = counts[:ng].sum(), counts[ng:].sum()
    g_T = U[ng:].sum(0) / N_T
    res = Result()

    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = drpost.DataRegularizer(model, method, **opts)
        rep = reg.step(general=gen, target=tgt, loss_fn=causal_lm_loss)
    got = {}
    for n, p in params.items():
        if p.grad is None:
            res.missing.append(n)
            got[n] = torch.zeros_like(p)
        else:
            got[n] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    true_loss = float(loss_sums[:ng].sum() / N)
    true_tloss = float(loss_sums[ng:].sum() / N_T)
    res.loss = max(abs(rep.loss - true_loss) / max(abs(true_loss), TINY),
                   abs(rep.target_loss - true_tloss) / max(abs(true_tloss), TINY))
    if rep.skipped:
        raise RuntimeError(f"step skipped: {rep.skip_reason}")

    sizes = [params[n].numel() for n in names]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    cols = {n: slice(offs[j], offs[j + 1]) for j, n in enumerate(names)}
    scores_all = U[:ng] @ g_T  # (n,)
    if method == "full_training":
        d = U[:ng].sum(0) / N
        w = torch.full((1, ng), 1.0, dtype=U.dtype, device=dev) / N
    elif method == "target_only":
        d = g_T
        w = torch.zeros(1, ng, dtype=U.dtype, device=dev)
    elif method in ("global_subset", "layerwise_subset"):
        frac = opts.get("frac", 0.5)
        k = opts.get("k") or frac_to_k(frac, ng)
        if method == "global_subset":
            groups = [names]
            got_scores = rep.scores
            ref_scores = scores_all[None]
        else:  # one selection per block of the capture
            by_id = {id(p): n for n, p in params.items()}
            groups = [[by_id[id(p)] for p in blk.params if id(p) in by_id] for blk in reg.capture.blocks]
            covered = {n for grp in groups for n in grp}
            res.missing += [n for n in names if n not in covered]
            ref_scores = torch.stack([U[:ng, torch.cat([_ar(cols[n], dev) for n in grp])]
                                      @ g_T[torch.cat([_ar(cols[n], dev) for n in grp])] for grp in groups])
            got_scores = rep.block_scores
        res.scores = rel(got_scores, ref_scores) if got_scores is not None else math.inf
        d = torch.zeros_like(g_T)
        w = torch.zeros(len(groups), ng, dtype=U.dtype, device=dev)
        for l, grp in enumerate(groups):
            top = torch.topk(ref_scores[l], k).indices
            mask = torch.zeros(ng, dtype=torch.bool, device=dev)
            mask[top] = True
            w[l, mask] = 1.0 / counts[:ng][mask].sum()
            if rep.weights is not None and rep.weights.shape[0] > l:
                if not torch.equal((rep.weights[l] > 0).to(dev), mask):
                    res.subset_ok = False
            idx = torch.cat([_ar(cols[n], dev) for n in grp])
            d[idx] = (w[l] @ U[:ng])[idx]
    else:
        raise ValueError(f"zoo.check does not know the expected update of method {method!r}")
    if method in ("full_training", "target_only") and rep.scores is not None and opts.get("report_scores"):
        res.scores = rel(rep.scores, scores_all)
    res.weights = rel(rep.weights, w) if rep.weights is not None else math.inf
    G = torch.cat([got[n].reshape(-1) for n in names])
    res.grad = rel(G, d)
    floor = PARAM_FLOOR * float(d.norm())
    worst, worst_n = 0.0, ""
    for n in names:
        e = float((G[cols[n]] - d[cols[n]]).norm() / max(float(d[cols[n]].norm()), floor, TINY))
        if e > worst:
            worst, worst_n = e, n
    res.grad_param, res.worst_param = worst, worst_n
    return res


# --------------------------------------------------------------------------- the matrix
# (name, lora, method, options): full fine-tuning with full_training and global_subset, LoRA with global_subset
VARIANTS = [
    ("full-full_training", False, "full_training", {"report_scores": True}),  # scores: the captured path
    ("full-global_subset", False, "global_subset", {"frac": 0.5}),
    ("lora-global_subset", True, "global_subset", {"frac": 0.5}),
]


# run by scripts/arch_matrix.py on request (--variants), not by the test (time budget)
EXTRA_VARIANTS = [
    ("full-layerwise_subset", False, "layerwise_subset", {"frac": 0.5}),
    ("lora-layerwise_subset", True, "layerwise_subset", {"frac": 0.5}),
    ("full-two_pass", False, "global_subset", {"frac": 0.5, "assembly": "two_pass"}),
]


def refusal_error():
    """The exception class a clear refusal raises (``UnsupportedModelError`` once it exists)."""
    from drpost.geometry import capture

    return getattr(capture, "UnsupportedModelError", None)


def is_refusal(e: BaseException) -> bool:
    err = refusal_error()
    if err is not None:
        return isinstance(e, err)
    return isinstance(e, ValueError) and "drpost" in str(e)


@dataclass
class Outcome:
    """One matrix cell: ``exact``, ``refused`` (clear error), ``error`` (unexpected exception), ``WRONG`` (silently
    wrong beyond EXACT) or ``skip`` (the model cannot be built)."""

    model_type: str
    variant: str
    tie: bool | None
    status: str
    detail: str = ""
    result: Result | None = None


def run_case(model_type: str, variant: str, tie: bool | None = None, seed: int = 0) -> Outcome:
    name, lora, method, opts = next(v for v in VARIANTS + EXTRA_VARIANTS if v[0] == variant)
    built = build(model_type, tie=tie, seed=seed, lora=lora)
    if built.model is None:
        return Outcome(model_type, variant, tie, "skip", built.skip)
    try:
        res = check(built.model, method, seed=seed, **opts)
    except Exception as e:  # noqa: BLE001 - classified below
        status = "refused" if is_refusal(e) else "error"
        return Outcome(model_type, variant, tie, status, f"{type(e).__name__}: {_first(e)}")
    status = "exact" if res.exact else "WRONG"
    detail = res.summary() + ("" if built.mode == "train" else " (eval mode)")
    return Outcome(model_type, variant, tie, status, detail, res)


def tie_variants(model_type: str) -> list[bool | None]:
    """None (the config's default), plus the other tying where the config has tie_word_embeddings and the model
    honours it."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return [None]
    for klass in cls.__mro__:  # the constructor's default (instantiating every config is slow at collection)
        try:
            p = inspect.signature(klass.__init__).parameters.get("tie_word_embeddings")
        except (TypeError, ValueError):
            p = None
        if p is not None and p.default is not inspect.Parameter.empty:
            return [None, not bool(p.default)]
    return [None]


def _ar(s: slice, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.arange(s.start, s.stop, device=device)
