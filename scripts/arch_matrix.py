"""Run the architecture exactness matrix (issue 15) outside pytest and print a table.

    python scripts/arch_matrix.py                       # every causal-LM type transformers ships
    python scripts/arch_matrix.py llama gemma mixtral   # a few
    python scripts/arch_matrix.py --tie --json out.json # also the flipped tie_word_embeddings; write JSON

Each cell builds a tiny fp64 model (tests/geometry/zoo.py), runs one DataRegularizer step on 6 general + 2 target
padded rows and compares .grad, scores and weights with the per-row autograd oracle. Status: exact (max relative
error <= 1e-6), refused (a clear UnsupportedModelError; its first line shown), error (any other exception),
WRONG (silently wrong), skip (the type cannot be built tiny and text-only offline).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", help="model types (default: all)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variants (default: full-full_training, full-global_subset, "
                         "lora-global_subset; also full-layerwise_subset, lora-layerwise_subset, full-two_pass)")
    ap.add_argument("--tie", action="store_true", help="also run the flipped tie_word_embeddings")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per cell")
    ap.add_argument("--json", default=None, help="write the cells as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from tests.geometry import zoo

    types = args.types or zoo.model_types()
    variants = args.variants.split(",") if args.variants else [v[0] for v in zoo.VARIANTS]

    def on_alarm(*_):
        raise TimeoutError(f"cell took more than {args.timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    cells = []
    print(f"{'model_type':26} {'variant':20} {'tie':5} {'status':8} {'grad':>8} {'scores':>8} {'weights':>8}  detail")
    t_all = time.perf_counter()
    for t in types:
        signal.alarm(args.timeout)
        try:
            base = zoo.build(t)
        except TimeoutError as e:
            base = zoo.Built(t, skip=str(e))
        finally:
            signal.alarm(0)
        if base.model is None:
            print(f"{t:26} {'*':20} {'-':5} {'skip':8} {'-':>8} {'-':>8} {'-':>8}  {base.skip}", flush=True)
            cells.append({"model_type": t, "variant": "*", "tie": None, "status": "skip", "detail": base.skip})
            continue
        ties = zoo.tie_variants(t) if args.tie else [None]
        for v in variants:
            for tie in ties:
                t0 = time.perf_counter()
                signal.alarm(args.timeout)
                try:
                    out = zoo.run_case(t, v, tie)
                except TimeoutError as e:
                    out = zoo.Outcome(t, v, tie, "error", str(e))
                finally:
                    signal.alarm(0)
                dt = time.perf_counter() - t0
                r = out.result
                f = lambda x: "-" if x is None or math.isnan(x) else f"{x:.1e}"  # noqa: E731
                tie_s = "-" if tie is None else ("tied" if tie else "untie")
                detail = out.detail if out.status != "exact" else f"{dt:.2f}s"
                print(f"{t:26} {v:20} {tie_s:5} {out.status:8} {f(r and r.grad):>8} {f(r and r.scores):>8} "
                      f"{f(r and r.weights):>8}  {detail}", flush=True)
                cells.append({"model_type": t, "variant": v, "tie": tie, "status": out.status,
                              "detail": out.detail, "seconds": round(dt, 3),
                              **({} if r is None else {"grad": r.grad, "grad_param": r.grad_param,
                                                       "worst_param": r.worst_param, "scores": r.scores,
                                                       "weights": r.weights, "loss": r.loss,
                                                       "subset_ok": r.subset_ok})})
    counts = {}
    for c in cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    print(f"\n{len(cells)} cells in {time.perf_counter() - t_all:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1, default=str))
    return 1 if counts.get("WRONG") or counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
