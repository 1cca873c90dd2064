"""``drpost bench real paradigm=dpo|rlvr`` on a small local copy of the real-model path (a tiny Llama with a ChatML
template, converted from a GGUF the test writes; ``tests/test_models.write_tiny_gguf``), never the real model.

Checks: one record per run with the real-model schema plus ``kl`` (and ``target_reward`` for RLVR), re-runs run
only what is missing, the base model's rejected replies are cached per (setting, seed) and regenerated when the
cache is not this model's, the reward shaping (1 / 0.25 / 0), the DPO pair construction, the per-paradigm budgets
and the refusal of every option a paradigm does not read. Run: ``pytest -q -p no:xdist tests/bench/test_real_rl.py``.
"""

from __future__ import annotations

import json
import random
import typing

import pytest

from drpost import cli
from drpost.bench import real, real_rl, real_rl_data, real_rlhf
from drpost.bench.real_common import RealSizes, chat_examples
from drpost.bench.records import record_name
from drpost.config import BenchRealConfig, ConfigError, leaf_options

SMALL = RealSizes(n_pool=60, n_val=4, n_test=6, n_retention=2, max_new_tokens=4)
SCHEMA = {"setting", "method", "label", "knob", "seed", "model", "paradigm", "target_em", "retention_em", "val_em",
          "val_loss", "seconds_per_step", "wall_seconds", "budget", "kl"}


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(real_rl, "REAL_SIZES", SMALL)
    monkeypatch.setattr(real_rl_data, "N_PAIRS", 10)
    monkeypatch.setattr(real_rl, "_WORKER", None)  # each test loads its own worker
    monkeypatch.setattr(real_rl, "LR_GRID", {})  # the budget's lr only, unless a test gives lrs


@pytest.fixture(scope="module")
def tok(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_folder)


def _bench(folder, out, paradigm, *extra):
    return cli.main(["bench", "real", f"paradigm={paradigm}", f"model={folder}", f"output_dir={out}", "workers=1",
                     "steps=2", *extra])


def _names(methods, paradigm, seeds):
    return sorted(record_name("format_shift", m, real_rl.knob_of(paradigm, m), s) for m in methods for s in seeds)


def test_dpo_sweep_records_caches_rejected_replies_and_resumes(tiny_folder, tmp_path, small, monkeypatch):
    out = tmp_path / "dpo"
    methods = ("base", "full_training", "layerwise_subset")
    assert _bench(tiny_folder, out, "dpo", "seeds=0", f"methods={','.join(methods)}") == 0
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == _names(methods, "dpo", [0])
    rec = json.loads((out / "raw" / record_name("format_shift", "layerwise_subset", 0.5, 0)).read_text())
    assert SCHEMA <= set(rec) and "target_reward" not in rec
    assert rec["paradigm"] == "dpo" and rec["model"] == tiny_folder and rec["knob"] == 0.5
    assert rec["device"] == "cpu" or rec["device"].startswith("cuda (")  # device=auto, named in the record
    assert rec["budget"]["steps"] == 2 and rec["budget"]["beta"] == 0.1 and rec["budget"]["finetuning"] == "lora"
    assert rec["budget"]["lora_r"] == 8 and rec["seconds_per_step"] > 0 and rec["kl"] >= 0.0
    assert rec["target_family"] not in rec["retention_by_family"]
    base = json.loads((out / "raw" / record_name("format_shift", "base", None, 0)).read_text())
    assert base["kl"] == 0.0 and base["budget"] is None and base["seconds_per_step"] is None
    cache = json.loads((out / "cache" / "rejected__format_shift__s0.json").read_text())
    assert cache["model"] == tiny_folder and len(cache["general"]) == 10 and len(cache["target"]) == 16
    table = (out / "tables.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows[0].startswith("| base (untrained)") and len(rows) == 3 and "| KL |" in table
    assert len(json.loads((out / "summary.json").read_text())) == 3
    assert (out / "target_vs_kl_format_shift.png").stat().st_size > 0

    # a re-run trains only what is missing, and the cached replies of seed 0 are read, not generated again
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    runs, generated = [], []
    run_orig, gen_orig = real_rl.RLWorker.run, real_rl.base_replies

    def spy_run(self, *job):
        runs.append(job)
        return run_orig(self, *job)

    def spy_gen(model, tokenizer, examples):
        generated.append(len(examples))
        return gen_orig(model, tokenizer, examples)

    monkeypatch.setattr(real_rl.RLWorker, "run", spy_run)
    monkeypatch.setattr(real_rl, "base_replies", spy_gen)
    monkeypatch.setattr(real_rl, "_WORKER", None)
    assert _bench(tiny_folder, out, "dpo", "seeds=0,1", f"methods={','.join(methods)}") == 0
    assert sorted(runs) == sorted([("format_shift", "full_training", None, 0)]
                                  + [("format_shift", m, real_rl.knob_of("dpo", m), 1) for m in methods])
    assert generated == [10, 16]  # seed 1's general and target prompts only

    # a cache made by another model is not used
    path = out / "cache" / "rejected__format_shift__s0.json"
    path.write_text(json.dumps({**cache, "model": "another-model"}))
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    monkeypatch.setattr(real_rl, "_WORKER", None)
    generated.clear()
    assert _bench(tiny_folder, out, "dpo", "seeds=0", "methods=full_training") == 0
    assert generated == [10, 16] and json.loads(path.read_text())["model"] == tiny_folder


def test_dpo_tunes_the_learning_rate_on_the_first_seed(tiny_folder, tmp_path, small, rigged_lr):
    out, seen = tmp_path / "dpo", rigged_lr(real_rl.RLWorker, 1e-4)  # validation prefers 1e-4
    assert _bench(tiny_folder, out, "dpo", "seeds=0,1", "methods=base,full_training", "lrs=5e-4,1e-4") == 0
    assert seen == [(0, 5e-4), (0, 1e-4), (1, 1e-4)]  # both on the first seed, the winner on the second
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == sorted(
        [record_name("format_shift", "base", None, s) for s in (0, 1)]
        + [record_name("format_shift", "full_training", k, s) for k, s in ((None, 0), ("lr=0.0001", 0),
                                                                            ("lr=0.0001", 1))])
    rec = json.loads((out / "raw" / record_name("format_shift", "full_training", "lr=0.0001", 1)).read_text())
    assert rec["budget"]["lr"] == 1e-4 and real_rl.lr_of(rec["knob"], 5e-4) == 1e-4
    rows = [line for line in (out / "tables.md").read_text().splitlines() if line.startswith("| FullTraining")]
    assert len(rows) == 1 and "| 0.0001 |" in rows[0] and rows[0].rstrip().endswith("| 2 |")  # the tuning run left out


def test_the_default_grid_and_the_knob_names():
    assert real_rl.with_lr(0.5, 5e-4, 5e-4) == 0.5 and real_rl.with_lr(None, 5e-4, 5e-4) is None
    assert real_rl.with_lr(0.5, 1.5e-4, 5e-4) == "0.5,lr=0.00015" and real_rl.with_lr(None, 5e-5, 5e-4) == "lr=5e-05"
    for knob, lr in ((0.5, 5e-4), ("0.5,lr=0.00015", 1.5e-4), ("lr=5e-05", 5e-5), ("filter-1.0", 5e-4)):
        assert real_rl.lr_of(knob, 5e-4) == lr
    helps = {name: f.metadata["help"] for name, f, _ in leaf_options(BenchRealConfig)}
    budget_lr = {"dpo": real_rl.BUDGETS["dpo"].lr, "rlvr": real_rl.BUDGETS["rlvr"].lr, "rlhf": real_rlhf.BUDGET.lr}
    for paradigm, lr in budget_lr.items():
        assert lr in real_rl.LR_GRID[paradigm]  # untuned records stay the grid's runs
        grid = helps["lrs"].split(f"{paradigm} ")[1].split(" ")[0].rstrip(",").split(",")
        assert tuple(float(x) for x in grid) == real_rl.LR_GRID[paradigm]  # the help says the grid


@pytest.mark.parametrize("paradigm", ["dpo", "rlhf"])
def test_lr_and_lrs_together_are_refused(paradigm, tmp_path, capsys):
    assert cli.main(["bench", "real", f"paradigm={paradigm}", "lr=1e-4", "lrs=1e-4,5e-5",
                     f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'lr'" in err and "'lrs'" in err


def test_rlvr_sweep_records_reward_and_kl(tiny_folder, tmp_path, small):
    out = tmp_path / "rlvr"
    assert _bench(tiny_folder, out, "rlvr", "seeds=0", "methods=base,layerwise_subset", "group_size=2",
                  "warm_start=none") == 0
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == _names(("base", "layerwise_subset"), "rlvr", [0])
    rec = json.loads((out / "raw" / record_name("format_shift", "layerwise_subset", "filter-1.0", 0)).read_text())
    assert SCHEMA <= set(rec) and rec["paradigm"] == "rlvr" and 0.0 <= rec["target_reward"] <= 1.0
    assert rec["budget"]["group_size"] == 2 and rec["budget"]["prompts_per_step"] == 4 and rec["kl"] >= 0.0
    assert rec["n_test"] == SMALL.n_test and len(rec["curve"]) == 2
    assert not (out / "cache").exists()  # RLVR from the base model generates nothing up front
    assert rec["start"] == "base"
    assert "| target reward |" in (out / "tables.md").read_text()


def test_rlvr_starts_from_the_cached_sft_warm_start(tiny_folder, tmp_path, small, monkeypatch):
    import dataclasses

    from drpost.trainers import sft

    monkeypatch.setattr(real_rl, "REAL_RECIPE", dataclasses.replace(real_rl.REAL_RECIPE, steps=2))
    trained = []
    train_orig = sft.train_sft

    def spy(*a, **kw):
        trained.append(a[4].name)
        return train_orig(*a, **kw)

    monkeypatch.setattr(sft, "train_sft", spy)
    out = tmp_path / "rlvr_warm"
    assert _bench(tiny_folder, out, "rlvr", "seeds=0", "methods=base,warm_start,full_training", "group_size=2") == 0
    assert trained == ["SFT warm start"]  # once per (setting, seed), shared by every run
    warm_dir = out / "cache" / "warm__format_shift__s0"
    assert (warm_dir / "adapter_config.json").exists()
    assert json.loads((warm_dir / "warm_start.json").read_text())["recipe"]["steps"] == 2
    recs = {m: json.loads((out / "raw" / record_name("format_shift", m, None, 0)).read_text())
            for m in ("base", "warm_start", "full_training")}
    assert all(r["start"] == "sft_warm_start" for r in recs.values())
    assert recs["warm_start"]["kl"] == 0.0 and recs["warm_start"]["budget"] is None  # its own reference
    assert recs["base"]["label"] == "base (untrained)" and recs["full_training"]["kl"] >= 0.0
    # the warm start changed the model: the base row and the warm-start row are two different models
    start = real_rl._WORKER.start("format_shift", 0)
    diffs = [float((a - b).abs().max()) for a, b in zip(start.state_dict().values(),
                                                         real_rl._WORKER.base.state_dict().values())]
    assert max(diffs) > 0
    # a new process reads the cached adapter instead of training again
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    monkeypatch.setattr(real_rl, "_WORKER", None)
    assert _bench(tiny_folder, out, "rlvr", "seeds=0", "methods=base,warm_start,full_training", "group_size=2") == 0
    assert trained == ["SFT warm start"]
    # a warm start made by another model is trained again
    meta = json.loads((warm_dir / "warm_start.json").read_text())
    (warm_dir / "warm_start.json").write_text(json.dumps({**meta, "model": "another-model"}))
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    monkeypatch.setattr(real_rl, "_WORKER", None)
    assert _bench(tiny_folder, out, "rlvr", "seeds=0", "methods=full_training", "group_size=2") == 0
    assert trained == ["SFT warm start"] * 2
    assert json.loads((warm_dir / "warm_start.json").read_text())["model"] == tiny_folder
    assert cli.main(["bench", "real", "paradigm=dpo", "methods=warm_start", f"model={tiny_folder}",
                     f"output_dir={tmp_path / 'x'}"]) == 2  # dpo starts from the base model by default


def test_reward_shaping(tok):
    ex = {"family": "max_list", "answer": "42"}
    cases = {"42": 1.0, '"42"': 1.0, "42.": 1.0, "42\nThe largest.": 1.0, "The largest is 42.": real_rl.PARTIAL,
             "It is 42, the largest": real_rl.PARTIAL, "The largest is 142": 0.0, "43": 0.0, "": 0.0}
    for reply, want in cases.items():
        assert real_rl.shaped_reward(reply, ex) == want, reply
    assert real_rl.PARTIAL == 0.25
    fn = real_rl.reward_fn(tok)
    replies = ["42", "The largest is 42.", "43"]
    got = fn(None, [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in replies], [ex] * 3)
    assert got.tolist() == [1.0, 0.25, 0.0]


def test_dpo_pair_is_the_sft_answer_against_the_base_reply(tok):
    from drpost.data.collate import tokenize_prompt_completion
    from drpost.data.prompts import encode_preference
    from drpost.world.tasks import make_example

    e = chat_examples(tok, [make_example(random.Random(0), "max_list", "arrow")])[0]
    rng = random.Random(0)
    pair = real_rl.dpo_pair(tok, e, "The biggest one is 3.", rng)
    assert pair["chosen"] == e["answer"] and pair["rejected"] == "The biggest one is 3."
    assert pair["rejected_source"] == "base_reply" and pair["flipped"] is False
    chosen, _ = encode_preference(tok, pair)
    sft = tokenize_prompt_completion(tok, e["prompt"], e["completion"], add_eos=e["add_eos"])
    n = len(chosen["labels"])  # the SFT row's answer and end-of-turn (the SFT row adds the template's newline)
    assert chosen["input_ids"] == sft["input_ids"][:n] and chosen["labels"][-1] == tok.eos_token_id
    for correct in (e["answer"], f"{e['answer']}.", ""):  # a reply the verifier accepts (or none) is replaced
        p = real_rl.dpo_pair(tok, e, correct, rng)
        assert p["rejected_source"] == "corrupted" and not real_rl.strict_check(p["rejected"], e)
        assert p["rejected"] != p["chosen"]


def test_budgets_defaults_and_help_agree():
    dpo, rlvr = BenchRealConfig(paradigm="dpo"), BenchRealConfig(paradigm="rlvr")
    assert real_rl.recipe_of(dpo) == real_rl.BUDGETS["dpo"] and real_rl.recipe_of(rlvr) == real_rl.BUDGETS["rlvr"]
    assert real.recipe_of(BenchRealConfig()) == real.REAL_RECIPE  # sft: none keeps today's budget
    r = real_rl.recipe_of(BenchRealConfig(paradigm="rlvr", steps=3, general_batch_size=2, lr=1e-4, group_size=6))
    assert (r.steps, r.prompts_per_step, r.lr, r.group_size) == (3, 2, 1e-4, 6)
    from drpost.bench.real_common import output_dir_of

    assert str(output_dir_of(dpo)) == "results/real/dpo" and str(output_dir_of(BenchRealConfig())) == \
        "results/real/sft"
    helps = {name: f.metadata["help"] for name, f, _ in leaf_options(BenchRealConfig)}
    b = real_rl.BUDGETS
    assert f"sft {real.REAL_RECIPE.steps}, dpo {b['dpo'].steps}, rlvr {b['rlvr'].steps}" in helps["steps"]
    assert f"dpo {b['dpo'].general_batch_size}, rlvr {b['rlvr'].prompts_per_step}" in helps["general_batch_size"]
    assert f"dpo {b['dpo'].lr:.0e}, rlvr {b['rlvr'].lr:.0e}".replace("e-04", "e-4") in helps["lr"]
    assert BenchRealConfig().beta == b["dpo"].beta and BenchRealConfig().group_size == b["rlvr"].group_size


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "rlvr"])
def test_options_a_paradigm_does_not_read_are_refused(paradigm, tmp_path):
    from tests.test_options_read import _other_value

    read = real.READ if paradigm == "sft" else real_rl.READ[paradigm]
    refused = [name for name, _, _ in leaf_options(BenchRealConfig) if name not in read]
    assert refused, paradigm
    for name in refused:
        config = BenchRealConfig(paradigm=paradigm, output_dir=str(tmp_path))
        hint = typing.get_type_hints(BenchRealConfig)[name]
        setattr(config, name, _other_value(getattr(config, name), hint))
        with pytest.raises(ConfigError, match=f"'{name}'"):
            real.run(config)


def test_bad_method_and_setting_are_named(tmp_path, capsys):
    assert cli.main(["bench", "real", "paradigm=dpo", "methods=dsir", f"output_dir={tmp_path}"]) == 2
    assert "'methods'" in capsys.readouterr().err
    assert cli.main(["bench", "real", "paradigm=rlvr", "settings=nope", f"output_dir={tmp_path}"]) == 2
    assert "'settings'" in capsys.readouterr().err
    assert cli.main(["bench", "real", "paradigm=rlvr", "rewrite=true", f"output_dir={tmp_path}"]) == 2
    assert "no rlvr records" in capsys.readouterr().err


def test_the_resolved_config_goes_to_the_paradigms_default_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "real", "paradigm=rlvr", "rewrite=true"]) == 2  # no records yet
    assert "no rlvr records" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # not the working directory (output_dir is empty)
    saved = (tmp_path / "results" / "real" / "rlvr" / "config.yaml").read_text()
    assert "paradigm: rlvr" in saved
    # the lists the paradigm resolved, not the SFT defaults the options were left at
    import yaml

    resolved = yaml.safe_load(saved)
    assert resolved["settings"] == real_rl.RL_SETTINGS and "warm_start" in resolved["methods"]
    assert "dsir" not in resolved["methods"]


def test_a_sweep_directory_merges_the_learning_rates_it_tunes_over(tmp_path):
    """The learning rates are a run list: the default grid in another order is the same sweep, another rate adds
    tuning runs to it (config.yaml grows to name every rate on disk), one rate alone is a narrower invocation."""
    import yaml

    from drpost.bench.real_common import claim_output
    from drpost.bench.records import write_record
    from drpost.config import parse_config

    def claim(*argv):
        config = parse_config(BenchRealConfig, ["paradigm=rlvr", f"output_dir={tmp_path}", *argv])
        return claim_output(config, tmp_path, "made", real_rl.lr_grid("rlvr"))

    def saved():
        return yaml.safe_load((tmp_path / "config.yaml").read_text())["lrs"]

    assert claim("lrs=[1e-3,2e-4,5e-4]") == "made"
    write_record(tmp_path, {"setting": "format_shift", "method": "base", "knob": None, "seed": 0})
    assert claim() == "made"  # lrs=none: LR_GRID["rlvr"], the same three rates
    assert claim("lrs=[2e-3]") == f"drpost bench real --config {tmp_path / 'config.yaml'}"
    assert saved() == [2e-4, 5e-4, 1e-3, 2e-3]
    assert claim("lr=5e-4") == f"drpost bench real --config {tmp_path / 'config.yaml'}"  # narrower: nothing lost
    assert saved() == [2e-4, 5e-4, 1e-3, 2e-3]
    assert claim("lrs=[2e-4,5e-4,1e-3,2e-3]") == "made"
    with pytest.raises(ConfigError, match="option 'beta'"):
        claim("beta=0.2")
