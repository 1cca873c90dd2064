"""Security: tensors are read only through safetensors or ``torch.load(weights_only=True)``; hub code runs only with
``model.trust_remote_code``; YAML configs cannot construct Python objects. Plus the model-loading paths of the run
(world default, local directory) and the run's metrics.json under an injected NaN."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import drpost
from drpost.config import ConfigError, SFTConfig, parse_config
from tests.reliability.conftest import SMALL, read_metrics, run_sft

SRC = Path(drpost.__file__).parent


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in SRC.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(SRC)}:{i}")
            if re.search(r"\bpickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|(?<![.\w])eval\(|(?<![.\w])exec\(", line):
                offenders.append(f"{path.relative_to(SRC)}:{i}")
    assert not offenders, offenders


def test_yaml_config_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.yaml"
    bad.write_text('regularizer: !!python/object/apply:os.system ["touch PWNED_BY_YAML"]\n')
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config(SFTConfig, ["--config", str(bad)])
    assert not (tmp_path / "PWNED_BY_YAML").exists()


def test_trust_remote_code_is_off_unless_set(monkeypatch, micro_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpost.trainers import setup

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy(real):
        def f(*a, **kw):
            seen.append(kw.get("trust_remote_code"))
            return real(*a, **kw)

        return f

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(real_tok))
    config = parse_config(SFTConfig, [f"model.name_or_path={micro_dir}"])
    assert config.model.trust_remote_code is False
    setup.load_model(config.model, torch.device("cpu"))
    config.model.trust_remote_code = True
    setup.load_model(config.model, torch.device("cpu"))
    assert seen == [False, False, True, True]


def test_unloadable_model_names_the_option(tmp_path):
    from drpost.trainers import setup

    config = parse_config(SFTConfig, [f"model.name_or_path={tmp_path / 'nothing_here'}"])
    with pytest.raises(ConfigError, match="model.name_or_path"):
        setup.load_model(config.model, torch.device("cpu"))


def test_default_model_is_the_world_base_model(monkeypatch, micro_dir, tmp_path, capsys):
    """name_or_path=world goes through world.model.load_base_model(model.size) (stubbed: no pretraining here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpost.trainers import sft
    from drpost.world import model as world_model

    sizes = []

    def fake_base(size):
        sizes.append(size)
        return AutoModelForCausalLM.from_pretrained(micro_dir).eval(), AutoTokenizer.from_pretrained(micro_dir)

    monkeypatch.setattr(world_model, "load_base_model", fake_base)
    calls = {"n": 0}
    real_loss = sft.causal_lm_loss

    def nan_on_second_step(model, batch):
        loss, counts = real_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), counts

    monkeypatch.setattr(sft, "causal_lm_loss", nan_on_second_step)
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", "model.size=micro", *SMALL, "steps=3", "log.tensorboard=true"], capsys)
    assert code == 0, err
    assert sizes == ["micro"]
    m = read_metrics(out)
    assert m["skipped_steps"] == 1 and m["skip_reasons"] == {"non-finite loss": 1} and len(m["train_loss"]) == 2
    assert "step 2 skipped: non-finite loss" in (out / "train.log").read_text()
    assert "eval_loss" in m["evals"][-1] and "exact_match" in m["evals"][-1]
    log = (out / "train.log").read_text()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard' package is not installed" in log
    else:
        assert (out / "tb").is_dir()
