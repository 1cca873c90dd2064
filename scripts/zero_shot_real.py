"""Zero-shot greedy accuracy of a real chat model on the world's tasks, per family x phrasing.

Writes ``<out>/zero_shot.json`` (cells, margins, the answer-in-line diagnostic, sample replies, timings) and
``<out>/table.md``. The model must be set up first (``make model``). The committed run (results/real/zero_shot):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/zero_shot_real.py --phrasings natural,natural_bare,qa,bracket

Rendering, answer extraction and the measurement live in ``drpost.world.chat_render``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from drpost.models import load_pretrained
from drpost.world import chat_render as cr
from drpost.world.tasks import FAMILY_NAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder, .gguf or hub name")
    ap.add_argument("--n", type=int, default=48, help="prompts per family x phrasing cell")
    ap.add_argument("--phrasings", default=",".join(cr.PHRASINGS), help=f"comma-separated, of {cr.PHRASINGS}")
    ap.add_argument("--families", default=",".join(FAMILY_NAMES), help="comma-separated world families")
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="CPU/GPU bf16 autocast (default fp32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="results/real/zero_shot")
    args = ap.parse_args()
    phrasings = [p for p in args.phrasings.split(",") if p]
    families = [f for f in args.families.split(",") if f]
    for p in phrasings:
        if p not in cr.PHRASINGS:
            ap.error(f"--phrasings: unknown phrasing {p!r} (known: {', '.join(cr.PHRASINGS)})")
    for f in families:
        if f not in FAMILY_NAMES:
            ap.error(f"--families: unknown family {f!r} (known: {', '.join(FAMILY_NAMES)})")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(args.model)
    load_s = time.perf_counter() - t0
    res = cr.zero_shot_table(model, tokenizer, n=args.n, families=families, phrasings=phrasings, seed=args.seed,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, bf16=args.bf16,
                             progress=True)
    res.update(model=args.model, parameters=sum(p.numel() for p in model.parameters()), load_seconds=round(load_s, 1),
               torch_threads=args.threads, batch_size=args.batch_size, torch=torch.__version__,
               machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
               answer_extraction="first non-empty line; one wrapping quote/backtick/** pair and one final period "
                                 "removed; family normalizer; exact match (drpost.world.chat_render.extract_answer)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_shot.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "table.md").write_text(f"Exact match, {args.n} prompts per cell, greedy, {args.max_new_tokens} new tokens "
                                  f"({args.model}):\n\n{cr.markdown_table(res)}\n\nDiagnostic (not a score): the true "
                                  f"answer occurs in the reply's first line:\n\n"
                                  f"{cr.markdown_table(res, 'answer_in_line')}\n")
    print(cr.markdown_table(res))
    print(f"overall {res['overall']}; {res['n_prompts']} prompts generated in {res['generate_seconds']} s; "
          f"written to {out}")


if __name__ == "__main__":
    main()
