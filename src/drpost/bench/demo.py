"""The world demo (``drpost demo`` / ``make demo``): a short version of the SFT quality benchmark on two CPU cores.

One built-in setting, a handful of methods side by side on the same budget, one seed, default knobs (no tuning:
the full protocol is ``drpost bench quality``). Prints one line per method and then the table, and writes
``metrics.json`` (one record per method) and ``config.yaml`` into the output directory.

Options read (``drpost demo --help``): output_dir, seed, steps, methods, verbose, data.setting, model.size,
general_batch_size, target_batch_size, optim.lr, optim.weight_decay, optim.warmup_ratio, optim.max_grad_norm; any
other option set to a non-default value is refused by name. Without ``verbose=true`` the libraries' warnings, info
logs and progress bars are hidden so that nothing prints between the lines of the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from drpost.bench.quality import METHODS, markdown_table, run_one, summarize
from drpost.config import refuse_unread
from drpost.trainers.sft import SFTRecipe

DEMO_SETTING = "distribution_shift"
DEMO_KNOBS = {"mixing": 0.1, "dsir": 0.05, "less": 0.05, "global_subset": 0.5, "layerwise_subset": 0.5,
              "capped_simplex": 4}
READ = frozenset({"output_dir", "seed", "steps", "methods", "verbose", "data.setting", "model.size",
                  "general_batch_size", "target_batch_size", "optim.lr", "optim.weight_decay", "optim.warmup_ratio",
                  "optim.max_grad_norm"})


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Hide warnings, transformers/datasets info logs and progress bars (weight loading) unless ``verbose``."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    old_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env
        logging.getLogger().setLevel(root_level)


def run(config) -> list[dict]:
    """``drpost demo``: train and evaluate each of ``config.methods`` once; print and return the records."""
    refuse_unread(config, READ, "demo")
    setting = DEMO_SETTING if config.data.setting == "default" else config.data.setting
    methods = list(config.methods)
    for m in methods:
        if m not in METHODS:
            from drpost.config import ConfigError

            raise ConfigError(f"option 'methods': {m!r} is not a method of the SFT demo; choose from "
                              f"{', '.join(sorted(METHODS))}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("DRPOST_THREADS", 1)))  # tiny models: 1 thread is fastest on 2 cores
    o = config.optim
    budget = SFTRecipe(steps=config.steps, seed=config.seed, general_batch_size=config.general_batch_size,
                       target_batch_size=config.target_batch_size, lr=o.lr, weight_decay=o.weight_decay,
                       warmup_ratio=o.warmup_ratio, max_grad_norm=o.max_grad_norm)
    t0 = time.perf_counter()
    ctx: dict = {}
    records = []
    with quiet_libraries(config.verbose):
        for m in methods:
            r = run_one(setting, m, DEMO_KNOBS.get(m), config.seed, budget, base_size=config.model.size, n_val=50,
                        _ctx=ctx)
            print(f"  {METHODS[m][0]:<22} target EM {r['target_em']:.3f}  target loss {r['target_loss']:.3f}  "
                  f"retention EM {r['retention_em']:.3f}  ({r['wall_seconds']:.0f}s)", flush=True)
            records.append(r)
    (out / "metrics.json").write_text(json.dumps(records, indent=1))
    print()
    print(markdown_table(summarize(records), f"drpost demo (setting {setting}, {config.steps} steps, "
                                             f"seed {config.seed})"))
    print(f"total {time.perf_counter() - t0:.0f}s; records in {out / 'metrics.json'}")
    return records
