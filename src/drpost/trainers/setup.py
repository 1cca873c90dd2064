"""Building a CLI training run from its config: model, tokenizer, data, optimizer, schedule, regularizer, run log.

Every function validates what it builds and raises ``ConfigError`` (naming the option) or ``DataError`` (naming the
file and line), so a trainer's ``run(config)`` can check everything before its first step and before it writes
anything but its log. Used by the ``build`` functions of ``drpost.trainers.sft|dpo|rlhf|rlvr``.

- ``load_model(config.model, device, models)``: a Hugging Face causal LM by hub name or local path
  (``trust_remote_code`` only when set), or a built-in model named in ``models`` (the world's base model is
  ``name_or_path: world``, given by ``drpost.world.runs``); dtype and attention kernel applied.
- ``apply_finetuning``: full, LoRA (PEFT; target modules checked against the model) or MeSO (gradient
  checkpointing is refused with a clear error: it conflicts with the capture hooks).
- ``load_sft_data(config, tokenizer, setting)``: general / target / eval token rows from files or datasets names, or
  from ``setting(config, tokenizer)`` when neither is given (a built-in setting, ``data.setting``; the world's come
  from ``drpost.world.runs``); ``sft_rows`` tokenizes records for either.
- ``make_optimizer``, ``make_regularizer``; ``run_log(output_dir)`` (file log of the run). The LR schedule is
  ``drpost.trainers.loop.make_scheduler``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drpost.config import ConfigError
from drpost.data import chat
from drpost.data.formats import DataError
from drpost.data.loaders import load_records, to_rows

log = logging.getLogger("drpost")

SFT_FORMATS = ("prompt_completion", "messages", "text")
_SUBSET = ("global_subset", "layerwise_subset")


# ---------------------------------------------------------------------------------------------------------- model
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {device} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]


def load_model(mc, device: torch.device, models: Mapping[str, Callable] | None = None):
    """(model in train mode on device, tokenizer with a pad token) for ``config.model``; ``models``: built-in model
    names -> ``loader(config.model) -> (model, tokenizer)``, tried before the hub."""
    dtype = resolve_dtype(mc.dtype, device)
    from drpost.models import resolve_model  # alias / local GGUF -> converted folder; else unchanged

    source = resolve_model(mc.name_or_path, getattr(mc, "gguf_file", None))
    if models and source in models:
        model, tokenizer = models[source](mc)
        model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"trust_remote_code": bool(mc.trust_remote_code)}
        if mc.attn_implementation:
            kw["attn_implementation"] = mc.attn_implementation
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(mc.trust_remote_code))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            hint = " (it may need model.trust_remote_code=true, only for code you trust)" \
                if "trust_remote_code" in str(e) else ""
            raise ConfigError(f"option 'model.name_or_path': cannot load {mc.name_or_path!r} as a causal LM{hint}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    chat.ensure_pad_token(tokenizer)
    return model.to(device).train(), tokenizer


def _lora_targets(model, spec: str):
    if spec.strip() == "all-linear":
        if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
            raise ConfigError("option 'model.lora_target_modules': 'all-linear' matches no Linear module of this model")
        return "all-linear"
    suffixes = [s.strip() for s in spec.split(",") if s.strip()]
    names = [n for n, _ in model.named_modules()]
    hits = [s for s in suffixes if any(n == s or n.endswith("." + s) for n in names)]
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"option 'model.lora_target_modules': {spec!r} matches no module of this model; its "
                          f"linear modules are named {', '.join(leaves) or '(none)'}")
    return suffixes


def apply_finetuning(model, mc):
    """Make the right weights trainable: full, LoRA adapters (PEFT) or full with MeSO (optimizer-side)."""
    if mc.gradient_checkpointing:  # the capture stays installed during the backward, so recomputation is seen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if mc.finetuning != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout,
                     target_modules=_lora_targets(model, mc.lora_target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"option 'model.lora_target_modules': {e}") from None


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class SFTData:
    """Token rows of a run and what evaluation uses."""

    g_rows: list[dict]
    t_rows: list[dict]
    families: list[str | None]  # per general row
    eval_rows: list[dict] = field(default_factory=list)
    evaluate: Callable | None = None  # model -> metrics of the data's own (a world setting: target exact match)
    source: str = ""


def sft_rows(records, tokenizer, max_len: int, overlong: str = "error", role: str = "general") -> list[dict]:
    """Token rows; with ``overlong=skip`` the records dropped are removed from ``records`` too (in place), so that
    per-record metadata (families) stays aligned with the rows."""
    for r in records:
        if r.fmt not in SFT_FORMATS:
            raise DataError(f"{r.where}: records of format {r.fmt} cannot be used by drpost sft; expected one of "
                            f"{', '.join(SFT_FORMATS)}")
    skipped: list[str] = []
    rows = to_rows(records, tokenizer, None, max_len, overlong=overlong, skipped=skipped)
    if skipped:
        drop = set(skipped)
        records[:] = [r for r in records if r.where not in drop]
    if records and not rows:
        raise DataError(f"every {role} record was skipped (data.overlong=skip): none fits data.max_seq_length="
                        f"{max_len}")
    return rows


def load_sft_data(config, tokenizer, setting: Callable) -> SFTData:
    """``config.data`` -> token rows: files or ``datasets`` names (``data.general`` and ``data.target``, and
    ``data.eval``), or ``setting(config, tokenizer)`` when neither is given (a built-in setting, ``data.setting``)."""
    d = config.data
    if (d.general is None) != (d.target is None):
        missing = "data.target" if d.target is None else "data.general"
        raise ConfigError(f"option '{missing}' is needed when the other data source is a file or dataset "
                          f"(set both data.general and data.target, or neither for a world setting)")
    if d.general is None:
        return setting(config, tokenizer)
    g = load_records(d.general, d.format, role="general", split=d.general_split, config_name=d.general_config,
                     limit=d.max_general_samples)
    t = load_records(d.target, d.format, role="target", split=d.target_split, config_name=d.target_config,
                     limit=d.max_target_samples)
    g_rows = sft_rows(g, tokenizer, d.max_seq_length, d.overlong, "general")
    out = SFTData(g_rows, sft_rows(t, tokenizer, d.max_seq_length, d.overlong, "target"),
                  [r.meta.get("family") for r in g], source=f"{d.general} -> {d.target}")
    if d.eval is not None:
        e = load_records(d.eval, d.format, role="eval", split=d.eval_split, limit=None)
        out.eval_rows = sft_rows(e, tokenizer, d.max_seq_length, d.overlong, "eval")
    return out


# ------------------------------------------------------------------------------------------- optimizer, regularizer
def make_optimizer(params: list, config) -> torch.optim.Optimizer:
    """AdamW (MeSO when ``model.finetuning=meso``) from ``config.optim``; ``params`` is a list of tensors or of
    param-group dicts (a group may set its own ``lr``)."""
    o = config.optim
    if config.model.finetuning == "meso":
        from drpost.optim.meso import MeSO

        k_out, k_in = (int(x) for x in config.regularizer.sketch.split("x"))
        return MeSO(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                    sketch=(k_out, k_in), seed=config.regularizer.seed)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def regularizer_options(rc) -> dict:
    """The DataRegularizer / feasible-set options that apply to ``rc.method`` (others would be rejected)."""
    opts: dict = {"scoring": rc.scoring, "assembly": rc.assembly, "sketch": rc.sketch, "seed": rc.seed}
    if rc.slack is not None:
        opts["slack"] = rc.slack
    if rc.scope is not None:
        opts["scope"] = rc.scope
    if rc.method in _SUBSET:
        opts.update(frac=rc.frac, selection=rc.selection)
        if rc.k is not None:
            opts["k"] = rc.k
    elif rc.method == "capped_simplex":
        opts.update({"k": rc.k} if rc.k is not None else {"frac": rc.frac})
    elif rc.method == "ball":
        opts["radius"] = rc.radius
    if rc.radius is not None and rc.method != "ball":
        raise ConfigError(f"option 'regularizer.radius' applies only to method ball (use regularizer.slack to add a "
                          f"ball around {rc.method})")
    return opts


def make_regularizer(model, config, opt):
    from drpost.step import DataRegularizer

    try:
        return DataRegularizer(model, method=config.regularizer.method, optimizer=opt,
                               **regularizer_options(config.regularizer))
    except ValueError as e:  # the library names its option 'frac'; the CLI user knows it as regularizer.frac
        if isinstance(e, ConfigError):
            raise
        msg = re.sub(r"option '(\w+)'", r"option 'regularizer.\1'", str(e))
        raise ConfigError(msg) from None


# ------------------------------------------------------------------------------------------------------------ log
class run_log:
    """Context manager: the 'drpost' logger also writes to ``output_dir/train.log`` (created on entry)."""

    def __init__(self, output_dir: str | Path, name: str = "train.log"):
        self.path = Path(output_dir) / name

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.old_level = log.level
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        log.addHandler(self.handler)
        return self.path

    def __exit__(self, *exc) -> None:
        log.removeHandler(self.handler)
        self.handler.close()
        log.setLevel(self.old_level)
