"""Config parsing: YAML + dotted overrides, coercion, validation messages, resolved-config round trip, docs sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from drpost import config as C
from drpost.config import (
    CONFIGS,
    BenchConfig,
    ConfigError,
    DPOConfig,
    RLHFConfig,
    RLVRConfig,
    SFTConfig,
    config_reference_markdown,
    help_text,
    leaf_options,
    parse_config,
    save_resolved,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("cls", list(CONFIGS.values()) + list(C.GROUPS) + [C.DPOParams, C.PPOParams, C.GRPOParams])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("cls", list(CONFIGS.values()))
def test_defaults_are_valid(cls):
    validate(cls())


def test_defaults_match_brief():
    c = SFTConfig()
    assert (c.general_batch_size, c.target_batch_size) == (8, 1)
    assert c.model.lora_target_modules == "all-linear" and c.model.trust_remote_code is False
    assert c.optim.weight_decay == 0 and c.optim.warmup_ratio == 0.03 and c.optim.schedule == "linear"
    assert c.regularizer.sketch == "64x64"
    assert DPOConfig().dpo.beta == 0.1
    ppo = RLHFConfig().ppo
    assert (ppo.ppo_epochs, ppo.kl_coef, ppo.adaptive_kl) == (4, 0.02, True)
    grpo = RLVRConfig().grpo
    assert (grpo.group_size, grpo.clip_eps, grpo.kl_coef) == (8, 0.2, 0.001)


def test_yaml_then_dotted_overrides(tmp_path):
    f = write_yaml(tmp_path / "a.yaml", {"regularizer": {"method": "hull", "frac": 0.25},
                                         "optim": {"lr": "3e-4"}, "steps": 50})
    c = parse_config(SFTConfig, ["--config", f, "optim.lr=1e-4", "--regularizer.scope", "layer",
                                 "--model.lora_r=16", "--steps", "7"])
    assert c.regularizer.method == "hull" and c.regularizer.frac == 0.25 and c.regularizer.scope == "layer"
    assert c.optim.lr == pytest.approx(1e-4)  # command line beats YAML
    assert c.model.lora_r == 16 and c.steps == 7
    assert c.model.name_or_path == "world"  # untouched default


def test_yaml_files_apply_in_order_and_accept_dotted_keys(tmp_path):
    a = write_yaml(tmp_path / "a.yaml", {"optim": {"lr": 1e-3}, "seed": 3})
    b = write_yaml(tmp_path / "b.yaml", {"optim.lr": 2e-3})
    c = parse_config(SFTConfig, ["--config", a, f"--config={b}"])
    assert c.optim.lr == 2e-3 and c.seed == 3


def test_empty_yaml_is_no_overrides(tmp_path):
    f = write_yaml(tmp_path / "e.yaml", "")
    assert parse_config(SFTConfig, ["--config", f]) == SFTConfig()


@pytest.mark.parametrize("text,fragment", [
    ("- a\n- b\n", "mapping"),
    ("regularizer: [1, 2\n", "invalid YAML"),
    ("regularizer: hull\n", "group of options"),
    ("!!python/object/apply:os.system ['echo hi']\n", "invalid YAML"),  # safe_load never runs code
])
def test_bad_yaml(tmp_path, text, fragment):
    f = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=fragment) as e:
        parse_config(SFTConfig, ["--config", f])
    if fragment != "group of options":
        assert "bad.yaml" in str(e.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config(SFTConfig, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("arg,suggestion", [
    ("regularizer.metod=hull", "regularizer.method"),
    ("method=hull", "regularizer.method"),  # leaf name given without its group
    ("optim.learning_rat=1", "optim"),
    ("--stepz=3", "steps"),
])
def test_unknown_key_suggests_closest(arg, suggestion):
    with pytest.raises(ConfigError) as e:
        parse_config(SFTConfig, [arg])
    msg = str(e.value)
    assert "unknown option" in msg and "did you mean" in msg and suggestion in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = write_yaml(tmp_path / "x.yaml", {"regularizer": {"fracc": 0.3}})
    with pytest.raises(ConfigError, match=r"regularizer\.fracc.*x\.yaml.*did you mean 'regularizer\.frac'"):
        parse_config(SFTConfig, ["--config", f])


@pytest.mark.parametrize("arg,option", [
    ("regularizer.frac=1.5", "regularizer.frac"),
    ("regularizer.frac=-0.1", "regularizer.frac"),
    ("regularizer.k=0", "regularizer.k"),
    ("regularizer.radius=-1", "regularizer.radius"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.betas=0.9,1.5", "optim.betas"),
    ("general_batch_size=0", "general_batch_size"),
    ("regularizer.sketch=64", "regularizer.sketch"),
    ("device=gpu", "device"),
])
def test_out_of_range_names_the_option(arg, option):
    with pytest.raises(ConfigError) as e:
        parse_config(SFTConfig, [arg])
    assert f"'{option}'" in str(e.value)


def test_literal_choices_listed_and_suggested():
    with pytest.raises(ConfigError) as e:
        parse_config(SFTConfig, ["regularizer.method=hul"])
    msg = str(e.value)
    assert "'layerwise_subset'" in msg and "'gem'" in msg and "did you mean 'hull'" in msg


def test_a_list_item_of_choices_is_suggested_on_its_own():
    from drpost.config import BenchConfig

    with pytest.raises(ConfigError) as e:
        parse_config(BenchConfig, ["methods=hull,hulk"])
    assert "did you mean 'hull' for 'hulk'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(BenchConfig, ["methods=dsir,layerwise_subsett"])
    assert "did you mean 'layerwise_subset' for 'layerwise_subsett'" in str(e.value)


@pytest.mark.parametrize("arg,value", [
    ("model.gradient_checkpointing=true", True), ("model.gradient_checkpointing=False", False),
    ("model.gradient_checkpointing=yes", True), ("model.gradient_checkpointing=0", False),
])
def test_bool_parsing(arg, value):
    assert parse_config(SFTConfig, [arg]).model.gradient_checkpointing is value


def test_bare_bool_flag_and_flag_followed_by_override():
    c = parse_config(SFTConfig, ["--model.gradient_checkpointing", "optim.lr=2e-4", "--log.wandb"])
    assert c.model.gradient_checkpointing and c.log.wandb and c.optim.lr == 2e-4
    c = parse_config(SFTConfig, ["--model.gradient_checkpointing", "false"])
    assert c.model.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="true or false"):
        parse_config(SFTConfig, ["model.gradient_checkpointing=maybe"])


def test_none_and_unions():
    c = parse_config(SFTConfig, ["optim.max_grad_norm=none", "regularizer.radius=auto", "regularizer.slack=0.5",
                                 "data.max_target_samples=16", "model.attn_implementation=sdpa"])
    assert c.optim.max_grad_norm is None and c.regularizer.radius == "auto" and c.regularizer.slack == 0.5
    assert c.data.max_target_samples == 16 and c.model.attn_implementation == "sdpa"
    c = parse_config(SFTConfig, ["data.max_target_samples=null", "regularizer.slack=~"])
    assert c.data.max_target_samples is None and c.regularizer.slack is None
    with pytest.raises(ConfigError, match="a number or one of 'auto'"):
        parse_config(SFTConfig, ["regularizer.radius=big"])
    with pytest.raises(ConfigError, match="expected a number"):
        parse_config(SFTConfig, ["optim.weight_decay=none"])  # not optional


def test_int_and_float_coercion():
    c = parse_config(SFTConfig, ["steps=1e3", "optim.lr=1", "data.max_seq_length=2_048"])
    assert c.steps == 1000 and isinstance(c.optim.lr, float) and c.data.max_seq_length == 2048
    for bad in ("steps=1.5", "steps=ten", "optim.lr=nan", "optim.lr=inf"):
        with pytest.raises(ConfigError):
            parse_config(SFTConfig, [bad])


def test_lists_and_tuples(tmp_path):
    c = parse_config(BenchConfig, ["seeds=0,1,2", "methods=[hull, dsir]", "optim.betas=0.9,0.95"])
    assert c.seeds == [0, 1, 2] and c.methods == ["hull", "dsir"] and c.optim.betas == (0.9, 0.95)
    f = write_yaml(tmp_path / "l.yaml", {"seeds": [5], "settings": ["a", "b"], "optim": {"betas": [0.8, 0.9]}})
    c = parse_config(BenchConfig, ["--config", f])
    assert c.seeds == [5] and c.settings == ["a", "b"] and c.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="2 values"):
        parse_config(SFTConfig, ["optim.betas=0.9"])
    with pytest.raises(ConfigError, match="methods"):
        parse_config(BenchConfig, ["methods=hull,hulk"])
    with pytest.raises(ConfigError, match="seeds"):
        parse_config(BenchConfig, ["seeds=0,-1"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="regularizer.radius"):
        parse_config(SFTConfig, ["regularizer.method=ball"])
    assert parse_config(SFTConfig, ["regularizer.method=ball", "regularizer.radius=0.1"]).regularizer.radius == 0.1
    with pytest.raises(ConfigError, match="data.format"):
        parse_config(DPOConfig, ["data.format=text"])
    with pytest.raises(ConfigError, match="data.format"):
        parse_config(RLVRConfig, ["data.format=messages"])


def test_validate_catches_programmatic_values():
    c = SFTConfig()
    c.regularizer.frac = 2.0
    with pytest.raises(ConfigError, match="regularizer.frac"):
        validate(c)


def test_bad_argument_shapes():
    for argv, fragment in ([["hull"], "unexpected argument"], [["--steps"], "needs a value"],
                           [["--config"], "needs a YAML file"], [["regularizer=hull"], "group of options"]):
        with pytest.raises(ConfigError, match=fragment):
            parse_config(SFTConfig, argv)


def test_dashes_in_keys():
    assert parse_config(SFTConfig, ["--optim.max-grad-norm", "0.5"]).optim.max_grad_norm == 0.5


@pytest.mark.parametrize("cls", list(CONFIGS.values()))
def test_save_resolved_round_trip(tmp_path, cls):
    c = parse_config(cls, ["seed=3", "regularizer.method=cone", "regularizer.slack=auto", "optim.betas=0.9,0.95"])
    path = save_resolved(c, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    loaded = yaml.safe_load(path.read_text())
    assert loaded == to_dict(c) and loaded["optim"]["betas"] == [0.9, 0.95]
    assert parse_config(cls, ["--config", str(path)]) == c


def test_help_text_lists_every_option_with_default():
    text = help_text(RLHFConfig)
    for name, _f, _ in leaf_options(RLHFConfig):
        assert f"  {name}:" in text
    assert "ppo.kl_coef: float = 0.02" in text and "regularizer.method:" in text
    assert "Feasible set" in text  # help text itself


def test_reference_markdown_covers_everything_and_docs_are_in_sync():
    md = config_reference_markdown()
    for command, cls in CONFIGS.items():
        assert f"`drpost {command}`" in md
        for f in dataclasses.fields(cls):
            assert f"`{f.name}" in md or f"`{f.name}." in md
    for name in ("regularizer.method", "optim.lr", "data.format", "model.finetuning", "ppo.kl_coef", "grpo.group_size",
                 "dpo.beta", "log.tensorboard"):
        assert f"`{name}`" in md
    docs = REPO / "docs" / "configuration.md"
    assert docs.read_text() == md, "docs/configuration.md is stale: run python -m drpost.config"


def test_world_model_sizes_match_the_world():
    import typing

    from drpost.world.model import MODEL_SIZES

    size_type = typing.get_type_hints(C.ModelConfig)["size"]
    assert set(typing.get_args(size_type)) == set(MODEL_SIZES)
