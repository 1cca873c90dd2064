"""The shared training loop and CLI run (``drpost.trainers.loop`` / ``runner``) across SFT, DPO, RLHF and RLVR.

- ``model.finetuning=lora`` trains adapters only in dpo / rlhf / rlvr, and every command saves its trained model in
  ``output_dir/final`` (PEFT adapters; RLHF also its value head);
- resume reuses ``config.yaml``: changed options are refused by name, ``steps`` may grow, a finished run is not
  retrained; ``save_total_limit`` keeps the newest checkpoints and the last step is checkpointed; Ctrl-C exits 130
  with a partial metrics.json and the command that resumes;
- options shown but unusable are refused by name; metrics: RLHF ``kept_frac`` follows the regularizer's weights,
  KL is never negative, DPO's evaluation does not repeat ``em`` as ``reward``.
Tiny runs on a random-init micro model (no download); world data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.reliability.conftest import micro_dir  # noqa: F401 - a fixture

from drpost import cli
from drpost.trainers import checkpoint as ckpt
from drpost.trainers.loop import make_scheduler, warmup_linear

SFT = ["eval_every=0", "general_batch_size=4", "data.max_general_samples=32", "data.max_seq_length=64",
       "optim.lr=1e-3", "device=cpu"]
RL = ["device=cpu", "eval_every=0", "optim.lr=1e-3", "data.max_general_samples=32", "steps=2", "save_every=2",
      "model.finetuning=lora", "model.lora_target_modules=q_proj,v_proj"]
ARGS = {
    "dpo": ["general_batch_size=2", "target_batch_size=1", "regularizer.method=hull", "data.max_seq_length=64"],
    "rlvr": ["grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=3", "target_batch_size=1",
             "regularizer.method=global_subset", "regularizer.selection=filter", "regularizer.frac=1.0"],
    "rlhf": ["ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=3",
             "ppo.target_rollouts=2", "target_batch_size=2", "regularizer.method=layerwise_subset"],
}



@pytest.fixture(scope="module")
def classifier_dir(micro_dir, tmp_path_factory) -> Path:  # noqa: F811
    from transformers import AutoTokenizer

    from drpost.trainers.reward_model import load_classifier

    path = tmp_path_factory.mktemp("micro-rm")
    load_classifier(micro_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_dir).save_pretrained(path)
    return path


def run(command: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main([command, *argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ LoRA and the saved model
@pytest.mark.parametrize("command", ["dpo", "rlhf", "rlvr"])
def test_lora_trains_adapters_only_and_the_model_is_saved(command, tmp_path, micro_dir, classifier_dir,  # noqa: F811
                                                          capsys):
    out = tmp_path / command
    extra = [f"reward_model={classifier_dir}"] if command == "rlhf" else []
    code, err = run(command, [f"output_dir={out}", f"model.name_or_path={micro_dir}", *RL, *ARGS[command], *extra],
                    capsys)
    assert code == 0, err
    final = sorted(p.name for p in (out / "final").iterdir())
    assert "adapter_model.safetensors" in final and "adapter_config.json" in final and "model.safetensors" not in final
    trained = ckpt.load_checkpoint(out / "checkpoints" / ckpt.step_dir_name(2)).weights
    assert trained and all("lora_" in k or k.startswith("value_head.") for k in trained)
    adapters = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in adapters)
    if command != "rlvr":  # (a random model earns no verifier reward: all GRPO advantages, and updates, are 0)
        assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapters.items())  # lora_B starts at 0
    m = metrics(out)
    assert m["finished"] and m["completed_steps"] == 2 and (out / "train.log").read_text().count("/2 ") >= 1
    ev = m["evals"][-1]
    if command == "rlhf":
        assert (out / "final" / "value_head.safetensors").exists()
        # layerwise_subset keeps half of each mini-batch of 2 in every layer: the weights say so
        assert [r["kept_frac"] for r in m["rounds"]] == [0.5, 0.5]
    if command == "dpo":
        assert "reward" not in ev and {"em", "sampled_em", "pair_accuracy"} <= set(ev)
    assert ev["kl"] >= 0.0


# ------------------------------------------------------------------------------------------- resume and checkpoints
def test_resume_reuses_the_saved_config_refuses_changes_and_extends(tmp_path, micro_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    base = [f"output_dir={out}", f"model.name_or_path={micro_dir}"]
    assert run("sft", [*base, *SFT, "steps=4", "save_every=2"], capsys)[0] == 0
    final_time = (out / "final").stat().st_mtime_ns

    code, _ = run("sft", [f"output_dir={out}", "resume=auto"], capsys)  # the README's command, nothing else given
    assert code == 0 and (out / "final").stat().st_mtime_ns == final_time
    assert "is finished (4 steps)" in (out / "train.log").read_text()

    code, err = run("sft", [f"output_dir={out}", "resume=auto", "optim.lr=1e-4", "regularizer.method=hull"], capsys)
    assert code == 2 and "'optim.lr' (saved 0.001, given 0.0001)" in err and "'regularizer.method'" in err

    assert run("sft", [f"output_dir={out}", "resume=auto", "steps=6"], capsys)[0] == 0
    m = metrics(out)
    assert m["completed_steps"] == 6 and len(m["train_loss"]) == 6
    assert m["resumed_from"].endswith(ckpt.step_dir_name(4))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 6 and saved["optim"]["lr"] == 1e-3 and saved["data"]["max_general_samples"] == 32


def test_save_total_limit_and_the_last_step_is_checkpointed(tmp_path, micro_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, err = run("sft", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *SFT, "steps=5", "save_every=2",
                            "save_total_limit=2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.step_dir_name(4), ckpt.step_dir_name(5)]


def test_ctrl_c_exits_130_with_partial_metrics_and_resumes(tmp_path, micro_dir, capsys, monkeypatch):  # noqa: F811
    from drpost.trainers import sft

    real = sft.SFTTask.step

    def interrupted_at_third(self, i, m):
        if i == 2:
            raise KeyboardInterrupt
        return real(self, i, m)

    monkeypatch.setattr(sft.SFTTask, "step", interrupted_at_third)
    out = tmp_path / "run"
    argv = [f"output_dir={out}", f"model.name_or_path={micro_dir}", *SFT, "steps=4", "save_every=1"]
    code, err = run("sft", argv, capsys)
    assert code == 130 and "Traceback" not in err
    assert f"interrupted at step 2; resume with: drpost sft output_dir={out} resume=auto" in err
    m = metrics(out)
    assert m["interrupted"] and not m["finished"] and m["completed_steps"] == 2 and len(m["train_loss"]) == 2
    assert not (out / "final").exists()
    monkeypatch.setattr(sft.SFTTask, "step", real)
    assert run("sft", [f"output_dir={out}", "resume=auto"], capsys)[0] == 0
    assert metrics(out)["completed_steps"] == 4 and (out / "final" / "model.safetensors").exists()


def test_log_every_and_wandb(tmp_path, micro_dir, capsys, monkeypatch):  # noqa: F811
    """log.wandb reaches W&B (a stand-in module here: init with the project and run name, scalars per step, finish);
    log.log_every sets the train.log lines."""
    import sys
    import types

    calls: dict = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, sorted(values)))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "run"
    code, err = run("sft", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *SFT, "steps=3", "log.wandb=true",
                            "log.wandb_project=proj", "log.wandb_run_name=r1", "log.log_every=2"], capsys)
    assert code == 0, err
    assert calls["init"]["project"] == "proj" and calls["init"]["name"] == "r1" and calls.get("finished")
    assert [s for s, keys in calls["log"] if "train/loss" in keys] == [1, 2, 3]
    assert [s for s, keys in calls["log"] if "eval/exact_match" in keys] == [3]  # the end-of-run evaluation
    text = (out / "train.log").read_text()
    assert "step 2/3 " in text and "step 3/3 " in text and "step 1/3 " not in text


def test_prune_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (3, 10, 7, 1):
        (root / ckpt.step_dir_name(s)).mkdir(parents=True)
    (root / ".tmp-step-00000011-1").mkdir()
    removed = ckpt.prune(root, 2)
    assert sorted(p.name for p in removed) == [ckpt.step_dir_name(1), ckpt.step_dir_name(3)]
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000011-1", ckpt.step_dir_name(7),
                                                      ckpt.step_dir_name(10)]
    assert ckpt.prune(root, None) == []


# --------------------------------------------------------------------------------------- options and their effects
@pytest.mark.parametrize("command,argv,fragment", [
    ("rlvr", ["general_batch_size=4"], "option 'general_batch_size' is not used"),
    ("rlhf", ["general_batch_size=4"], "option 'general_batch_size' is not used"),
    ("rlvr", ["data.max_seq_length=4", "grpo.max_new_tokens=8"], "option 'data.max_seq_length'"),
    ("rlhf", ["data.overlong=skip"], "option 'data.overlong' is not used"),
    ("dpo", ["data.overlong=skip"], "option 'data.overlong' is not used"),
])
def test_options_that_cannot_apply_are_refused(command, argv, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(command, [f"output_dir={out}", "device=cpu", *argv], capsys)
    assert code == 2 and fragment in err
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]  # nothing but the log


@pytest.mark.parametrize("policy", ["error", "skip", "truncate_prompt"])
def test_sft_overlong_records(policy, tmp_path, micro_dir, capsys):  # noqa: F811
    rows = [{"prompt": "Q: ab\nA: ", "completion": "ba"} for _ in range(5)]
    rows.insert(2, {"prompt": "Q: " + "long " * 30 + "\nA: ", "completion": "x"})  # line 3: no room for "x"
    data = tmp_path / "general.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, err = run("sft", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *SFT, "steps=1",
                            "data.max_seq_length=32", f"data.general={data}", f"data.target={data}",
                            f"data.overlong={policy}"], capsys)
    if policy == "error":
        assert code == 2 and f"{data}:3" in err
    else:
        assert code == 0, err
        assert metrics(out)["n_general"] == (5 if policy == "skip" else 6)


def test_rlhf_on_user_prompts_needs_a_reward_model(tmp_path, micro_dir, capsys):  # noqa: F811
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}: "}) + "\n" for i in range(4)))
    code, err = run("rlhf", [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={micro_dir}", "device=cpu",
                             f"data.general={prompts}", f"data.target={prompts}"], capsys)
    assert code == 2 and "option 'reward_model'" in err


def test_rlvr_on_user_prompts_with_the_numeric_verifier(tmp_path, micro_dir, capsys):  # noqa: F811
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    code, err = run("rlvr", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *RL, *ARGS["rlvr"],
                             f"data.general={data}", f"data.target={data}", f"data.eval={data}",
                             "grpo.verifier=numeric"], capsys)
    assert code == 0, err
    ev = metrics(out)["evals"][-1]
    assert ev["step"] == 2 and 0.0 <= ev["reward"] <= 1.0 and "retention_em" not in ev  # no world data in sight
    bad = tmp_path / "words.jsonl"
    bad.write_text(json.dumps({"prompt": "say", "answer": "two"}) + "\n")
    code, err = run("rlvr", [f"output_dir={tmp_path / 'bad'}", f"model.name_or_path={micro_dir}", *RL,
                             f"data.general={bad}", f"data.target={bad}", "grpo.verifier=numeric"], capsys)
    assert code == 2 and "numeric" in err and str(bad) in err


def test_dpo_ipo_loss_and_max_prompt_length_run(tmp_path, micro_dir, capsys):  # noqa: F811
    pairs = tmp_path / "eval.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "Q: " + "x" * 40 + "\nA: ", "chosen": "yes", "rejected": "no"})
                             + "\n" for _ in range(2)))
    out = tmp_path / "run"
    code, err = run("dpo", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *RL, *ARGS["dpo"],
                            "dpo.loss_type=ipo", "dpo.max_prompt_length=8", f"data.eval={pairs}"], capsys)
    assert code == 0, err
    m = metrics(out)
    assert m["recipe"]["loss_type"] == "ipo" and m["recipe"]["max_prompt_length"] == 8
    assert set(m["evals"][-1]) == {"step", "pair_accuracy"}


def test_dpo_loss_types_are_their_formulas(micro_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpost.objectives.logprobs import sequence_logps
    from drpost.trainers.dpo import PairBank, pair_loss_fn

    tok = AutoTokenizer.from_pretrained(micro_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    ref = AutoModelForCausalLM.from_pretrained(micro_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bank = PairBank(tok, [{"prompt": "Q: ab\nA: ", "chosen": "ba", "rejected": "ab"}] * 2, ref, 64)
    b = bank.batch([0, 1])
    h = (sequence_logps(model, b) - b["ref_logps"]).view(-1, 2)
    h = h[:, 0] - h[:, 1]  # (P,)
    beta = 0.5
    for kind, want in (("ipo", (h - 1 / (2 * beta)) ** 2), ("hinge", torch.relu(1 - beta * h)),
                       ("sigmoid", -torch.nn.functional.logsigmoid(beta * h))):
        rows, counts = pair_loss_fn(kind, beta)(model, b)
        assert torch.allclose(rows[0::2], want, atol=1e-5) and float(rows[1::2].abs().sum()) == 0.0
        assert counts.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    lrs = []
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, "linear", 10, 0.2)  # transformers: warm-up from 0 over 2 steps, then linear to 0
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    opt = torch.optim.AdamW([p], lr=1.0)
    sched, lrs = warmup_linear(opt, 10, 0.2), []  # the library recipes' schedule (the committed results)
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    with pytest.raises(ValueError, match="optim.schedule"):
        make_scheduler(opt, "step", 10, 0.0)


def test_shared_schedules_keep_the_numbers_results_were_made_with():
    """warmup_decay is, float for float, the reward model's and the world pretraining's former inline schedules;
    constant_schedule (transformers' constant) keeps the optimizer's LR."""
    from drpost.trainers.loop import constant_schedule, warmup_decay

    def lrs(make, n):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched, out = make(opt), []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    for steps, warm, floor in ((500, 20, 0.0), (120, 10, 0.05), (37, 100, 0.05)):
        old = torch.optim.lr_scheduler.LambdaLR  # the former inline form, same expression
        want = lrs(lambda o, n=steps, w=warm, f=floor, lam=old: lam(o, lambda s: min(1.0, (s + 1) / w)
                                                                     * max(f, 1 - s / n)), steps)
        assert lrs(lambda o, n=steps, w=warm, f=floor: warmup_decay(o, n, w, f), steps) == want
    assert lrs(constant_schedule, 5) == [1e-3] * 5


@pytest.mark.skipif(os.name != "posix", reason="POSIX paths")
def test_resume_without_a_saved_config_starts_fresh(tmp_path, micro_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, err = run("sft", [f"output_dir={out}", f"model.name_or_path={micro_dir}", *SFT, "steps=2", "resume=auto"],
                    capsys)
    assert code == 0, err
    assert "no checkpoint" in (out / "train.log").read_text() and metrics(out)["completed_steps"] == 2
