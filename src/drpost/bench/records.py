"""Resumable sweeps: one JSON record per finished run, written atomically; a re-run skips finished runs.

Shared by the world SFT benchmark (``drpost.bench.quality``) and the real-model benchmark (``drpost.bench.real``).
A run is named by ``(setting, method, knob, seed)``; its record lives at ``out_dir/raw/<setting>__<method>__k<knob>
__s<seed>.json``. ``tuned_sweep`` runs the knob-tuning runs (every knob value, first seed) of a setting, chooses each
method's knob by validation (``stats.best_by_validation``), then runs the other seeds with it, so an interrupted sweep
resumes exactly where it stopped. ``mark_tuning`` tells the tables which records only served the tuning.
``claim_dir`` writes the sweep's ``config.yaml``: a directory that holds records keeps the recipe they were made
with, and its run lists grow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from drpost.bench.stats import best_by_validation

Job = tuple  # (setting, method, knob, seed)


def record_name(setting: str, method: str, knob, seed: int) -> str:
    return f"{setting}__{method}__k{knob}__s{seed}.json"


def record_path(out_dir: str | Path, job: Job) -> Path:
    return Path(out_dir) / "raw" / record_name(*job)


def write_record(out_dir: str | Path, rec: dict) -> Path:
    """Write ``rec`` to its raw/ file; it appears whole or not at all (a temporary file, then a rename)."""
    path = record_path(out_dir, (rec["setting"], rec["method"], rec["knob"], rec["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)
    return path


def load_records(out_dir: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "raw").glob("*.json"))]


def missing(jobs: list[Job], out_dir: str | Path) -> list[Job]:
    """The jobs without a record yet, in order."""
    return [j for j in jobs if not record_path(out_dir, j).exists()]


def best_knobs(records: list[dict], setting: str, seed: int) -> dict:
    """Per method, the knob with the best validation EM (ties: lower validation loss) on ``seed``."""
    runs = [r for r in records if r["setting"] == setting and r["seed"] == seed]
    return {m: r["knob"] for m, r in best_by_validation(runs).items()}


def tuning_seed(out_dir: str | Path, seeds: list[int]) -> int:
    """The seed a sweep tunes its knobs on: the first seed of ``out_dir/config.yaml`` (``claim_dir`` keeps the saved
    seeds first, so a later invocation with more seeds, ``seeds=[3,4]``, tunes where the directory was tuned and
    runs its seeds with the knobs chosen there), else ``seeds[0]``."""
    import yaml

    path = Path(out_dir) / "config.yaml"
    saved = (yaml.safe_load(path.read_text()) or {}).get("seeds") if path.exists() else None
    return int(saved[0]) if saved else seeds[0]


def tuned_sweep(settings: list[str], methods: list[str], seeds: list[int], out_dir: str | Path,
                knob_values: Callable[[str], list], run_jobs: Callable[[list[Job]], None]) -> list[dict]:
    """Setting by setting: every knob value of every method on the tuning seed (``tuning_seed``: the directory's
    first seed, else ``seeds[0]``), then ``seeds`` with the knob chosen on validation. ``run_jobs(jobs)`` runs the
    given jobs (only missing ones are passed) and writes their records. Returns every record on disk for these
    settings, methods and seeds."""
    tune = tuning_seed(out_dir, seeds)
    for s in settings:  # an interrupted sweep leaves whole settings behind
        todo = missing([(s, m, k, tune) for m in methods for k in knob_values(m)], out_dir)
        if todo:
            run_jobs(todo)
        chosen = best_knobs(load_records(out_dir), s, tune)
        todo = missing([(s, m, chosen.get(m, knob_values(m)[0]), seed) for seed in seeds if seed != tune
                        for m in methods], out_dir)
        if todo:
            run_jobs(todo)
    return [r for r in load_records(out_dir) if r["setting"] in settings and r["method"] in methods
            and r["seed"] in seeds]


# the options that choose which runs a sweep makes (``lrs``: the learning rates a real-model RL sweep tunes over)
RUN_LISTS = ("settings", "methods", "seeds", "lrs")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def claim_dir(config: Any, out_dir: str | Path, free: frozenset[str] | set[str],
              resolve: Callable[[Any], dict] | None = None) -> tuple[Any, bool]:
    """Write ``out_dir/config.yaml`` for a resumable sweep so that it describes every run on disk.

    Where ``out_dir/raw/`` already holds records, a re-run skips the finished runs, so they must have been made the
    same way: an option outside ``RUN_LISTS`` and ``free`` (options that only say how to run: workers, device...)
    that differs from the saved ``config.yaml`` is refused by name (ConfigError) before anything runs. The run lists
    are merged, the saved entries first, so a narrower invocation (one setting, more seeds) adds to the file instead
    of shrinking it. ``resolve(config)`` gives options as they take effect (``none`` -> its default value), so
    that both configs are compared by what they run. Returns the config written and whether this invocation's lists
    already held all of it."""
    from drpost.config import ConfigError, parse_config, save_resolved, to_dict

    out = Path(out_dir)
    path = out / "config.yaml"
    if not (path.exists() and any((out / "raw").glob("*.json"))):
        save_resolved(config, out)
        return config, True
    try:
        saved = parse_config(type(config), ["--config", str(path)])
    except ConfigError as e:
        raise ConfigError(f"option 'output_dir': {out} holds runs, and its config.yaml does not load ({e}); "
                          "choose another output_dir or mend that file") from None
    # both configs as they take effect (``none`` -> its default value: ``lrs=none`` -> the paradigm's grid)
    now, then = (replace(c, **resolve(c)) if resolve else c for c in (config, saved))
    new, old = _flat(to_dict(now)), _flat(to_dict(then))
    for name, value in new.items():
        if name in RUN_LISTS or name in free or name not in old or old[name] == value:
            continue
        raise ConfigError(f"option '{name}': {out} holds runs made with {name}={old[name]!r} (its config.yaml), "
                          f"not {value!r}; a re-run skips finished runs, so give {name}={old[name]!r} to add runs "
                          "to that sweep, or another output_dir for a new one")
    merged = {k: list(getattr(then, k)) + [v for v in getattr(now, k) if v not in getattr(then, k)]
              for k in RUN_LISTS if getattr(then, k, None) is not None and getattr(now, k, None) is not None}
    covered = all(set(v) <= set(getattr(now, k)) for k, v in merged.items())
    if "lrs" in merged:  # ``lr`` alone is the one-rate list, folded into ``lrs`` (the two are exclusive)
        merged["lr"] = None
    config = replace(config, **merged)
    save_resolved(config, out)
    return config, covered


def mark_tuning(records: list[dict]) -> list[dict]:
    """Set ``tuning_only`` on every record: per (setting, method) whose runs carry several knob values, the knob
    run on the most seeds is the chosen one (ties, as while only the tuning seed has run: the best on validation
    on the first seed); the other knobs' runs only served the tuning."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    for runs in groups.values():
        by_knob: dict[str, list[dict]] = {}
        for r in runs:
            by_knob.setdefault(json.dumps(r["knob"]), []).append(r)
        first = min(r["seed"] for r in runs)
        tuned = json.dumps(best_by_validation([r for r in runs if r["seed"] == first])[runs[0]["method"]]["knob"])
        chosen = max(by_knob, key=lambda k: (len(by_knob[k]), k == tuned))
        for r in runs:
            r["tuning_only"] = json.dumps(r["knob"]) != chosen
    return records
