"""System benchmark, the cases: the timed methods, the benchmark models and batches, the component clock, and
``Case`` (one configuration: model, batches, optimizer, and a runner per method returning seconds per component).

The models (``build_model``): tiny Llama sizes (``SIZES``, vocabulary 512, untied head), and ``smollm2``: a
LlamaForCausalLM with SmolLM2-135M-Instruct's config (``SMOLLM2``: 30 layers, hidden 576, 9 / 3 heads, tied
49,152-token embeddings) and random weights, so nothing is downloaded; ``smollm2-micro`` is the same architecture
shrunk to 2 layers and a 1,024-token vocabulary (smoke tests). ``mode="lora"`` wraps any of them in PEFT LoRA r 8,
alpha 16 on every linear layer, with B drawn from N(0, 0.02) so that the adapters' gradients are generic.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from drpost.geometry.step_geometry import STAGE_CLOCK

COMPONENTS = ("forward", "backward", "scoring", "solve", "assembly", "optimizer")
VOCAB = 512
LR = 1e-5
# tiny Llama shapes: (hidden, intermediate, layers, heads) -> ~params with vocab 512, untied head
SIZES = {
    "micro": (32, 64, 1, 2),
    "1M": (128, 352, 4, 2),
    "5M": (256, 688, 6, 4),
    "20M": (512, 1376, 6, 8),
    "50M": (640, 1728, 10, 10),
}
# SmolLM2-135M-Instruct's config (its config.json), random weights: LlamaConfig keywords
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=2048)
MODELS = {"smollm2": SMOLLM2, "smollm2-micro": dict(SMOLLM2, num_hidden_layers=2, vocab_size=1024)}


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str  # "standard" | "dr" | "func"
    kw: dict = field(default_factory=dict)
    core: bool = False  # also run in the sweep configurations

    @property
    def one_pass(self) -> bool:
        return self.kind == "dr" and self.kw.get("assembly", "one_pass") == "one_pass"


def method_list(include_convex: bool = True, scorings: list[str] | None = None) -> list[Method]:
    """The timed methods, in report order. ``scorings``: keep only the regularizer rows whose scoring method is
    listed (a row without an explicit scoring uses auto); the standard, full_training and torch.func rows stay."""
    lw, gs = "layerwise_subset", "global_subset"
    ms = [
        Method("standard", "standard", core=True),
        Method("full_training", "dr", dict(method="full_training"), core=True),
        Method("global/one_pass/auto", "dr", dict(method=gs, frac=0.5), core=True),
        Method("global/two_pass/auto", "dr", dict(method=gs, frac=0.5, assembly="two_pass")),
        Method("layerwise/one_pass/auto", "dr", dict(method=lw, frac=0.5), core=True),
        Method("layerwise/one_pass/autotune", "dr", dict(method=lw, frac=0.5, autotune=True)),
        Method("layerwise/one_pass/full_ghost", "dr", dict(method=lw, frac=0.5, scoring="full_ghost")),
        Method("layerwise/one_pass/reduced_ghost", "dr", dict(method=lw, frac=0.5, scoring="reduced_ghost")),
        Method("layerwise/one_pass/direct", "dr", dict(method=lw, frac=0.5, scoring="direct")),
        Method("layerwise/one_pass/compress", "dr", dict(method=lw, frac=0.5, scoring="compress"), core=True),
        Method("global/one_pass/compress", "dr", dict(method=gs, frac=0.5, scoring="compress")),
        Method("layerwise/two_pass/auto", "dr", dict(method=lw, frac=0.5, assembly="two_pass")),
        Method("greats/two_pass (greedy)", "dr", dict(method=gs, frac=0.5, selection="greedy", assembly="two_pass")),
        Method("torch.func vmap (layerwise topk)", "func"),
    ]
    if include_convex:
        try:
            import drpost.feasible.convex  # noqa: F401

            ms.insert(10, Method("hull/one_pass/auto (exact Gram)", "dr", dict(method="hull"), core=True))
            ms.insert(11, Method("hull/one_pass/compress", "dr", dict(method="hull", scoring="compress")))
        except ImportError:  # the convex family is optional here
            pass
    if scorings is not None:
        keep = set(scorings)
        ms = [m for m in ms if m.kind != "dr" or m.kw.get("method") == "full_training"
              or m.kw.get("scoring", "auto") in keep]
    return ms


# --------------------------------------------------------------------------- models and batches
def llama_config(size: str, T: int, attn: str = "sdpa", layers: int | None = None):
    """The LlamaConfig of a benchmark model: a tiny size (``SIZES``) or a SmolLM2 shape (``MODELS``); ``layers``
    overrides the number of layers."""
    from transformers import LlamaConfig

    if size in MODELS:
        kw = dict(MODELS[size])
        kw["max_position_embeddings"] = max(kw["max_position_embeddings"], T)
    else:
        h, inter, n_layers, heads = SIZES[size]
        kw = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=heads,
                  num_key_value_heads=heads, vocab_size=VOCAB, max_position_embeddings=max(1024, T),
                  tie_word_embeddings=False)
    if layers is not None:
        kw["num_hidden_layers"] = int(layers)
    return LlamaConfig(attn_implementation=attn, **kw)


def vocab_of(size: str) -> int:
    return MODELS[size]["vocab_size"] if size in MODELS else VOCAB


def build_model(size: str, mode: str, T: int, device, seed: int = 0, attn: str = "sdpa", layers: int | None = None):
    """A benchmark model in train mode (module docstring): ``size`` in ``SIZES`` or ``MODELS``, ``mode`` full or
    lora, ``T`` the longest sequence it must take; ``torch.manual_seed(seed)`` weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, T, attn, layers)).to(device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():  # LoRA B starts at zero: make the adapters' gradients generic
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    model.train()
    return model


def make_batch(rows: int, T: int, seed: int, device, vocab: int = VOCAB, prompt: int = 0) -> dict:
    """``rows`` rows of ``T`` random tokens, every position a label but the first ``prompt`` (a prompt: label
    -100, so the LM head runs on the last T - prompt + 1 positions only, ``objectives.label_window``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, T), generator=g)  # (rows, T)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def check_prompt_frac(prompt_frac: float) -> float:
    """``prompt_frac`` itself, refused by name outside [0, 1)."""
    if not 0.0 <= prompt_frac < 1.0:
        raise ValueError(f"option 'prompt_frac' must be in [0, 1), got {prompt_frac!r}")
    return prompt_frac


def prompt_tokens(T: int, prompt_frac: float) -> int:
    """The prompt positions of a row of T tokens at ``prompt_frac`` (at least 2 positions keep a label)."""
    return min(int(round(check_prompt_frac(prompt_frac) * T)), T - 2)


# --------------------------------------------------------------------------- clocks
def use_clock(kind: str) -> None:
    """The CPU clock of every timing in the benchmark, the regularizer's own stage timings included
    (``step_geometry.STAGE_CLOCK``): ``wall`` (``time.perf_counter``) or ``cpu`` (``time.process_time``: the CPU
    seconds of this process, all its threads). With one torch thread the CPU clock counts only the work of the timed
    step, so it stays meaningful on a machine that other jobs share (wall time then also counts the time the step
    waited for a core); with several threads it sums them."""
    if kind not in ("wall", "cpu"):
        raise ValueError(f"option 'clock' must be 'wall' or 'cpu', got {kind!r}")
    STAGE_CLOCK["fn"] = time.perf_counter if kind == "wall" else time.process_time


def now() -> float:
    """The benchmark's CPU clock (``use_clock``)."""
    return STAGE_CLOCK["fn"]()


class Clock:
    """Component timer: the benchmark's clock on CPU (``use_clock``); CUDA events on GPU (read after one sync at
    the end)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return now()

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


# --------------------------------------------------------------------------- one case
class Case:
    """One configuration: model, batches, optimizer and a runner per method."""

    def __init__(self, size, mode, T, n, m, device, methods: list[Method], sketch="64x64", precision="fp32",
                 prompt_frac: float = 0.0):
        from drpost.objectives.sft import accepts_logits_to_keep, label_window
        from drpost.step import merge_batches

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"option 'precision' must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision  # bf16: every method's forward and backward under bf16 autocast (fp32 weights)
        self.size, self.mode, self.T, self.n, self.m = size, mode, T, n, m
        self.device = torch.device(device)
        self.vocab = vocab_of(size)
        self.model = build_model(size, mode, T, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        self.prompt = prompt_tokens(T, prompt_frac)
        self.gen = make_batch(n, T, 1, device, self.vocab, self.prompt)
        self.tgt = make_batch(m, T, 2, device, self.vocab, self.prompt)
        self.merged = merge_batches(self.gen, self.tgt, device)
        # positions the LM head runs on (causal_lm_loss): the loss window where the model takes logits_to_keep
        self.head_T = label_window(self.merged["labels"]) if accepts_logits_to_keep(self.model) else T
        self.methods = methods
        self.regs = {}
        self.reports = {}
        self.sketch = sketch
        self.func_mode = None
        import drpost

        for me in methods:
            if me.kind == "dr":
                self.regs[me.name] = drpost.DataRegularizer(self.model, sketch=sketch, optimizer=self.opt, **me.kw)

    def n_params(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        return total, sum(p.numel() for p in self.params)

    def autocast(self):
        """The precision context of every method's forward and backward: bf16 autocast, or nothing (fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ---- runners: each returns {component: seconds}
    def _opt_step(self, clock):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")

    def run_standard(self):
        from drpost.objectives import causal_lm_loss

        clock = Clock(self.device)
        clock.start()
        with self.autocast():
            loss, counts = causal_lm_loss(self.model, self.merged)
            clock.mark("forward")
            (loss.sum() / counts.sum()).backward()
            clock.mark("backward")
        self._opt_step(clock)
        return clock.read()

    def run_dr(self, name):
        from drpost.objectives import causal_lm_loss

        reg = self.regs[name]
        with self.autocast():
            rep = reg.step(self.gen, self.tgt, causal_lm_loss, lr=1e-3)
        self.reports[name] = rep
        t = {k: float(rep.timings.get(k, 0.0)) for k in COMPONENTS if k != "optimizer"}
        clock = Clock(self.device)
        clock.start()
        self._opt_step(clock)
        t.update(clock.read())
        return t

    def run_func(self):
        """torch.func anchor: per-sample grads of every row by vmap(grad), scores, per-tensor top-k, weighted sum."""
        from drpost.geometry.oracle import per_sample_grads
        from drpost.objectives import causal_lm_loss

        clock = Clock(self.device)
        clock.start()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        ids, labels = self.merged["input_ids"], self.merged["labels"]
        grads = None
        if self.func_mode in (None, "vmap"):
            try:
                grads = self._vmap_grads(names, ids, labels)
                self.func_mode = "vmap"
            except Exception as e:  # noqa: BLE001 - fall back to the oracle loop
                warnings.warn(f"torch.func vmap failed ({type(e).__name__}: {e}); using oracle.per_sample_grads",
                              stacklevel=2)
                self.func_mode = "oracle"
        if self.precision != "fp32":
            raise ValueError("the torch.func anchor runs in fp32 only: leave it out of a bf16 run")
        if grads is None:
            g, _ = per_sample_grads(self.model, self.merged, causal_lm_loss)
            grads = [g[k] for k in names]
        clock.mark("backward")
        n = self.n
        counts_t = (labels[n:, 1:] != -100).sum()
        picks = []
        for g in grads:  # g: (R, *shape)
            f = g.reshape(g.shape[0], -1)  # (R, P)
            gt = f[n:].sum(0) / counts_t  # (P,)  token-mean target gradient
            picks.append(f[:n] @ gt)  # (n,)
        clock.mark("scoring")
        k = max(1, n // 2)
        masks = [torch.zeros(n, device=s.device).scatter_(0, torch.topk(s, k).indices, 1.0) for s in picks]
        clock.mark("solve")
        counts = (labels[:n, 1:] != -100).sum(1).to(grads[0].dtype)  # (n,)
        for p_name, g, w in zip(names, grads, masks):
            c = w / (w @ counts)  # (n,)
            p = dict(self.model.named_parameters())[p_name]
            p.grad = torch.tensordot(c.to(g.dtype), g[:n], dims=1).to(p.dtype)
        clock.mark("assembly")
        self._opt_step(clock)
        return clock.read()

    def _vmap_grads(self, names, ids, labels):
        model = self.model
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

        def f(ps, x, y):
            out = torch.func.functional_call(model, {**frozen, **ps}, (x[None],), {})
            logits = out.logits if hasattr(out, "logits") else out[0]  # (1, T, V)
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), y[1:], reduction="sum",
                                                     ignore_index=-100)

        g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, ids, labels)
        return [g[k] for k in names]

    def run(self, me: Method):
        if me.kind == "standard":
            return self.run_standard()
        if me.kind == "func":
            return self.run_func()
        return self.run_dr(me.name)


def cfg_label(c: dict) -> str:
    return f"{c['size']} {c['mode']} T={c['T']} n={c['n']} m={c['m']}" + (
        f" prompt={c['prompt_frac']:g}" if c.get("prompt_frac") else "")
