"""MeSO vs AdamW on the world: does SFT still learn with sketched optimizer moments, and what does it save?

    drpost bench meso output_dir=results/meso          # ~5 min on one CPU core; --help lists the options

Runs ``drpost sft`` (LayerWiseSubset, the world's tiny base model, one setting) with ``model.finetuning=full``
(AdamW) and ``model.finetuning=meso`` at sketch 64x64 and 32x32, on the same seeds and budget, and measures each
optimizer's state bytes on the same model after one step. Writes ``summary.json`` and ``README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drpost.bench.stats import mean_se

VARIANTS = {"AdamW": ["model.finetuning=full"],
            "MeSO 64x64": ["model.finetuning=meso", "regularizer.sketch=64x64"],
            "MeSO 32x32": ["model.finetuning=meso", "regularizer.sketch=32x32"]}


def state_bytes_after_one_step(sketch: tuple[int, int] | None) -> int:
    """Optimizer-state bytes of AdamW (sketch None) or MeSO on the tiny world model after one step."""
    from drpost.optim.meso import MeSO, state_bytes
    from drpost.world.model import build_model

    model = build_model("tiny")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if sketch is None else MeSO(params, lr=1e-3, sketch=sketch)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return state_bytes(opt)


def run(config) -> list[dict]:
    """``drpost bench meso``: ``config`` is a ``drpost.config.BenchMesoConfig``; returns the records."""
    from drpost.cli import main as cli
    from drpost.world.settings import get_setting

    get_setting(config.setting, option="setting")
    args = config
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    records = []
    for name, extra in VARIANTS.items():
        sketch = None if name == "AdamW" else tuple(int(x) for x in extra[1].split("=")[1].split("x"))
        sbytes = state_bytes_after_one_step(sketch)
        for seed in args.seeds:
            run_dir = Path(args.runs_dir) / f"{name.replace(' ', '_')}_s{seed}"  # checkpoints stay out of results/
            code = cli(["sft", f"output_dir={run_dir}", f"data.setting={args.setting}", f"steps={args.steps}",
                        f"seed={seed}", "eval_every=0", "regularizer.method=layerwise_subset", "optim.lr=1e-3",
                        *extra])
            if code:
                raise RuntimeError(f"drpost sft failed for {name} seed {seed}")
            m = json.loads((run_dir / "metrics.json").read_text())
            ev = m["evals"][-1]
            tl = m["target_loss"]
            records.append({"variant": name, "seed": seed, "state_bytes": sbytes, "target_em": ev["exact_match"],
                            "target_test_loss": ev["eval_loss"], "target_batch_loss_first50": sum(tl[:50]) / 50,
                            "target_batch_loss_last50": sum(tl[-50:]) / 50, "train_seconds": m["train_seconds"]})
    (out / "summary.json").write_text(json.dumps(records, indent=1))
    lines = [f"# MeSO vs AdamW (`drpost bench meso output_dir={args.output_dir}`)", "",
             f"Setting `{args.setting}`, LayerWiseSubset, {args.steps} steps, seeds {args.seeds}, lr 1e-3; "
             "mean ± s.e. over seeds. State bytes: optimizer state of the tiny world model after one step.", "",
             "| optimizer | state bytes | vs AdamW | target EM | target test loss | target-batch loss, first 50 -> last 50 steps |",
             "|---|---|---|---|---|---|"]
    base = records[0]["state_bytes"]
    for name in VARIANTS:
        rs = [r for r in records if r["variant"] == name]
        em, em_se = mean_se([r["target_em"] for r in rs])
        lo, lo_se = mean_se([r["target_test_loss"] for r in rs])
        a = sum(r["target_batch_loss_first50"] for r in rs) / len(rs)
        b = sum(r["target_batch_loss_last50"] for r in rs) / len(rs)
        ratio = "—" if name == "AdamW" else f"{base / rs[0]['state_bytes']:.1f}x smaller"
        lines.append(f"| {name} | {rs[0]['state_bytes']:,} | {ratio} "
                     f"| {em:.3f} ± {em_se:.3f} | {lo:.3f} ± {lo_se:.3f} | {a:.3f} -> {b:.3f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return records


if __name__ == "__main__":  # python -m drpost.bench.meso ARGS = drpost bench meso ARGS
    import sys

    from drpost.cli import main as cli_main

    raise SystemExit(cli_main(["bench", "meso", *sys.argv[1:]]))
