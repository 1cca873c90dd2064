"""Step time of the TRL adapters (``DrSFTTrainer``, ``DrDPOTrainer``, ``DrGRPOTrainer``) against their plain TRL
trainers, single process, on a small random-weight Llama (no downloads; drpost's byte tokenizer, a larger vocabulary
for the model's embedding and LM head so their cost is realistic).

For each trainer and each variant (plain TRL, a global-scope method, a layer-scope method) it trains ``--steps``
optimizer steps, drops the first ``--warmup`` and reports the median wall time of the rest (a ``TrainerCallback``
timing ``on_step_begin`` -> ``on_step_end``: data loading, forward, backward, clipping, optimizer), as wall time and
as this process's CPU time (all its threads; steadier than wall time on a shared machine). Variants run interleaved
over ``--repeats`` rounds to spread machine noise; the table gives the median over rounds and the ratio to the plain
trainer. GRPO's step includes generation (the adapter's target prompts join TRL's generate call).

Run (the figures in the docstring of drpost/integrations/trl/__init__.py):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trl_adapters.py --repeats 2 --steps 4 --warmup 1 --precision fp32
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trl_adapters.py --trainers grpo --repeats 3 --steps 5 --warmup 1 \
        --precision fp32 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trl_adapters.py --repeats 1 --steps 4 --warmup 1 --trainers sft,dpo
Options: ``--hidden 256 --layers 4 --vocab 8192 --seq 64 --batch 8 --steps 6 --warmup 2 --repeats 3
--precision bf16|fp32 --threads N --methods global_subset,layerwise_subset --json out.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings

import torch


def _model(tok, hidden, layers, vocab, seq):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(2 * seq, 128), tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg)


def _text(i, n):
    """A deterministic string of about ``n`` bytes (one byte = one token with drpost's tokenizer)."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    out, k = [], i
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[k % len(words)])
        k = k * 7 + 3
    return " ".join(out)[:n]


def _data(kind, n, seq, off=0):
    import datasets

    half = seq // 2 - 1
    idx = range(off, off + n)
    if kind == "sft":
        return datasets.Dataset.from_dict({"prompt": [_text(i, half) for i in idx],
                                           "completion": [_text(i + 1, half) for i in idx]})
    if kind == "dpo":
        return datasets.Dataset.from_dict({"prompt": [_text(i, half) for i in idx],
                                           "chosen": [_text(i + 1, half) for i in idx],
                                           "rejected": [_text(i + 2, half) for i in idx]})
    return datasets.Dataset.from_dict({"prompt": [_text(i, half) for i in idx]})


def _reward(completions, **kw):
    return [float(sum(map(ord, c)) % 5) for c in completions]


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                timer.wall.append(time.perf_counter() - timer.t0[0])
                timer.cpu.append(time.process_time() - timer.t0[1])

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.callback = CB()


def _run(kind, method, base, tok, a, out_dir):
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from drpost.integrations.trl import DrDPOTrainer, DrGRPOTrainer, DrSFTTrainer

    common = dict(output_dir=out_dir, report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                  max_steps=a.steps, learning_rate=1e-4, disable_tqdm=True, bf16=a.precision == "bf16",
                  per_device_train_batch_size=a.batch)
    n = a.batch * a.steps
    model = copy.deepcopy(base)
    dr = {} if method == "plain" else dict(dr_method=method, dr_options={"frac": 0.5}, target_batch_size=1)
    if kind == "sft":
        args = SFTConfig(max_length=a.seq, **common)
        kw = dict(model=model, args=args, train_dataset=_data(kind, n, a.seq), processing_class=tok)
        tr = SFTTrainer(**kw) if not dr else DrSFTTrainer(**kw, target_dataset=_data(kind, 4, a.seq, 1000), **dr)
    elif kind == "dpo":
        args = DPOConfig(max_length=a.seq, beta=0.1, **common)
        kw = dict(model=model, ref_model=copy.deepcopy(base), args=args, train_dataset=_data(kind, n, a.seq),
                  processing_class=tok)
        tr = DPOTrainer(**kw) if not dr else DrDPOTrainer(**kw, target_dataset=_data(kind, 4, a.seq, 1000), **dr)
    else:
        if dr:
            dr["dr_options"] = {"frac": 0.5, "selection": "filter"}
        args = GRPOConfig(max_completion_length=a.seq // 2, num_generations=4, beta=0.0, loss_type="bnpo", **common)
        kw = dict(model=model, reward_funcs=_reward, args=args, train_dataset=_data(kind, n, a.seq),
                  processing_class=tok)
        tr = GRPOTrainer(**kw) if not dr else DrGRPOTrainer(**kw, target_dataset=_data(kind, 4, a.seq, 1000), **dr)
    from transformers.trainer_callback import PrinterCallback

    tr.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    timer = _StepTimer()
    tr.add_callback(timer.callback)
    tr.train()
    return statistics.median(timer.wall[a.warmup:]), statistics.median(timer.cpu[a.warmup:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trainers", default="sft,dpo,grpo", help="comma list of sft, dpo, grpo")
    p.add_argument("--methods", default="global_subset,layerwise_subset", help="drpost methods beside 'plain'")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="model vocabulary (>= the tokenizer's 259)")
    p.add_argument("--seq", type=int, default=64, help="tokens per row (prompt + completion)")
    p.add_argument("--batch", type=int, default=8, help="general rows (pairs for DPO, prompts for GRPO) per step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 = TRL's default config")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    kinds = [k for k in a.trainers.split(",") if k]
    bad = [k for k in kinds if k not in ("sft", "dpo", "grpo")]
    if bad:
        p.error(f"option --trainers: unknown trainer(s) {bad}; choose from sft, dpo, grpo")
    if a.warmup >= a.steps:
        p.error("option --warmup must be smaller than --steps")
    if a.threads:
        torch.set_num_threads(a.threads)
    from drpost.world.tokenizer import build_tokenizer

    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tok = build_tokenizer()
    base = _model(tok, a.hidden, a.layers, a.vocab, a.seq)
    variants = ["plain"] + [m for m in a.methods.split(",") if m]
    res = {k: {v: [] for v in variants} for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for k in kinds:
                for v in variants:
                    res[k][v].append(_run(k, v, base, tok, a, tmp))
                    w, c = res[k][v][-1]
                    print(f"round {r} {k:4s} {v:18s} wall {w:.3f} s/step, cpu {c:.3f} s/step", flush=True)
    print(f"\nmodel: Llama hidden {a.hidden}, {a.layers} layers, vocab {base.config.vocab_size}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params; T={a.seq}, batch {a.batch} (+1 target), "
          f"{a.precision}, torch threads {torch.get_num_threads()}; median over {a.repeats} rounds of the median "
          f"of steps {a.warmup + 1}..{a.steps}")
    print("| trainer | variant | wall s/step | wall ratio | cpu s/step | cpu ratio |\n|---|---|---|---|---|---|")
    table = {}
    for k in kinds:
        pw = statistics.median(x[0] for x in res[k]["plain"])
        pc = statistics.median(x[1] for x in res[k]["plain"])
        for v in variants:
            w = statistics.median(x[0] for x in res[k][v])
            c = statistics.median(x[1] for x in res[k][v])
            table[f"{k}/{v}"] = {"wall_s": w, "wall_ratio": w / pw, "cpu_s": c, "cpu_ratio": c / pc,
                                 "rounds": res[k][v]}
            print(f"| {k} | {v} | {w:.3f} | {w / pw:.2f}x | {c:.3f} | {c / pc:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": table}, f, indent=1)


if __name__ == "__main__":
    main()
