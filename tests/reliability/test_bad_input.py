"""Bad configuration and bad data through the real ``drpost sft`` CLI: exit code 2, a message naming the option or
the file and line, and (for errors found while validating the run) nothing in output_dir but train.log with the
error. Also: a tokenizer without a pad token is handled, and a good run writes what it promises."""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import SMALL, read_metrics, run_sft


@pytest.mark.parametrize("override,fragment", [
    ("regularizer.metod=hull", "did you mean 'regularizer.method'"),
    ("optim.learning_rate=1e-3", "unknown option 'optim.learning_rate'"),
    ("regularizer.method=hul", "did you mean 'hull'"),
    ("regularizer.frac=1.5", "regularizer.frac"),
    ("regularizer.k=0", "regularizer.k"),
    ("regularizer.radius=-1", "regularizer.radius"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("data.max_seq_length=0", "data.max_seq_length"),
])
def test_bad_option_exits_2_naming_it(override, fragment, capsys, tmp_path):
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", override], capsys)
    assert code == 2 and fragment in err and err.startswith("drpost sft: error:")
    assert not out.exists()  # rejected while parsing: nothing at all is written


def _only_log(out, fragment):
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]
    assert fragment in (out / "train.log").read_text()


@pytest.mark.parametrize("override,fragment", [
    ("model.lora_target_modules=no_such_proj", "model.lora_target_modules"),
    ("regularizer.frac=0", "regularizer.frac"),  # in range for the parser, refused by the subset set
    ("data.setting=distribution_shfit", "did you mean 'distribution_shift'"),
    ("regularizer.radius=0.5", "regularizer.radius"),  # a radius on a method that has none
])
def test_run_level_config_errors_leave_only_the_log(override, fragment, capsys, tmp_path, micro_dir):
    out = tmp_path / "run"
    extra = ["model.finetuning=lora"] if "lora" in override else []
    code, err = run_sft([f"output_dir={out}", f"model.name_or_path={micro_dir}", *SMALL, *extra, override], capsys)
    assert code == 2 and fragment in err
    _only_log(out, fragment)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [{"prompt": f"say {i}\n", "completion": f"{i}{i}"} for i in range(6)]


@pytest.mark.parametrize("case", ["malformed", "empty_target", "no_loss_tokens", "wrong_format"])
def test_bad_data_is_found_before_the_first_step(case, capsys, tmp_path, micro_dir):
    general = _jsonl(tmp_path / "general.jsonl", GOOD)
    target = _jsonl(tmp_path / "target.jsonl", GOOD[:2])
    extra = []
    if case == "malformed":
        general.write_text(general.read_text() + '{"prompt": "x", "completion": \n')
        fragment = f"{general}:7: malformed JSON"
    elif case == "empty_target":
        target.write_text("\n")
        fragment = "the target set is empty"
    elif case == "no_loss_tokens":
        _jsonl(target, [{"prompt": "p" * 40, "completion": "c"}])
        extra = ["data.max_seq_length=20"]
        fragment = f"{target}:1: no completion tokens left"
    else:
        _jsonl(general, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
        fragment = f"{general}:1: records of format preference"
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", f"model.name_or_path={micro_dir}", *SMALL, f"data.general={general}",
                         f"data.target={target}", *extra], capsys)
    assert code == 2 and fragment in err, err
    _only_log(out, fragment)


def test_tokenizer_without_pad_token_trains_with_files(capsys, tmp_path, micro_dir):
    """A model whose tokenizer has no pad token: EOS is used as pad (logged) and the run completes."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "nopad"
    tok = AutoTokenizer.from_pretrained(micro_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    for f in micro_dir.iterdir():
        if not (model_dir / f.name).exists():
            (model_dir / f.name).symlink_to(f)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token_id is None
    general = _jsonl(tmp_path / "g.jsonl", GOOD)
    target = _jsonl(tmp_path / "t.jsonl", GOOD[:2])
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", f"model.name_or_path={model_dir}", *SMALL, "steps=2",
                         f"data.general={general}", f"data.target={target}", "regularizer.method=hull"], capsys)
    assert code == 0, err
    assert "no pad token" in (out / "train.log").read_text()
    m = read_metrics(out)
    assert len(m["train_loss"]) == 2 and m["skipped_steps"] == 0 and m["n_general"] == 6
    assert {"config.yaml", "metrics.json", "final", "train.log"} <= {p.name for p in out.iterdir()}
    assert (out / "final" / "model.safetensors").exists()


def test_gradient_checkpointing_run_completes(capsys, tmp_path, micro_dir):
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", f"model.name_or_path={micro_dir}", *SMALL,
                         "model.gradient_checkpointing=true"], capsys)
    assert code == 0, err
    assert (out / "metrics.json").exists()
