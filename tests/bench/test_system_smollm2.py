"""The SmolLM2 path of the system benchmark (``drpost bench system model=smollm2``) on its shrunk ``smollm2-micro``
model (2 layers, vocabulary 1,024, T 16): rows, floors and memory fields exist and are sane, the floor model's held
weights are the ones the engine holds, the grid and the option. Never asserts a time.
"""

import json

import pytest

from drpost.bench import system
from drpost.bench.system.floors import block_weights
from drpost.bench.system.memory import cpu_peak_available

CORE = {m.name for m in system.method_list() if m.core}


RATES = dict(flops_per_s=77e9, bytes_per_s=16.6e9)


def _micro(tmp_path_factory, **kw):
    """One micro run, its floors at fixed rates (these CPUs, one thread): rates calibrated on a loaded machine can
    make a GEMV look dearer than a GEMM, and the floor checks below are about the model, not the machine's load."""
    from drpost.geometry import cost

    out = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "calibrate", lambda *a, **k: cost.Rates(**RATES))
        res = system.run_system_bench(out, micro=True, model="smollm2", repeats=1, log=lambda *a: None, **kw)
    return out, res


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    return _micro(tmp_path_factory)


def test_smollm2_micro_rows_floors_and_memory(micro_run):
    out, res = micro_run
    data = json.loads((out / "system.json").read_text())
    assert data["settings"]["model"] == "smollm2" and data["settings"]["smollm2"]["vocab_size"] == 49152
    assert "partial" not in data and data["crossovers"]["shape"] == [1536, 576]
    assert [(c["config"]["size"], c["config"]["mode"]) for c in res["cases"]] == [("smollm2-micro", "full"),
                                                                                    ("smollm2-micro", "lora")]
    memory = res["machine"]["device"].startswith("cuda") or cpu_peak_available()
    for c in res["cases"]:
        cf, rows = c["config"], c["methods"]
        assert set(rows) == CORE
        assert c["scoring_check"] == {}  # tiny sizes only
        lg = c["logits"]
        R = cf["n"] + cf["m"]
        assert lg["logits_bytes"] == R * cf["T"] * 1024 * 4
        assert lg["head_at_labels_saves_bytes"] == R * 1024 * 4  # every position but each row's last is a label
        for name, r in rows.items():
            assert r["ratio"] > 0 and r["total_s"] > 0
            if r["kind"] == "dr":
                assert r["floor_s"] > 0 and r["floor_ratio"] > 0 and r["over_floor"] > 0, name
                assert r["held_back_by"] in system.COMPONENTS
            if memory:
                assert r["peak_mem_bytes"] > 0 and r["step_mem_bytes"] > 0, name
                assert r["peak_mem_ratio"] > 0 and r["step_mem_ratio"] > 0, name
                assert r["peak_mem_bytes"] > r["step_mem_bytes"]
        assert rows["standard"]["ratio"] == 1.0
        if memory:
            assert rows["standard"]["step_mem_ratio"] == 1.0
            assert 0 < lg["logits_over_standard_step_mem"] < 1
    full, lora = (c["methods"]["layerwise/one_pass/auto"] for c in res["cases"])
    assert full["held_weights"] == 0  # 576 x 576 and wider: per-row gradients larger than the factors at T 16
    assert lora["held_weights"] == 2 * 7 * 2  # every LoRA A and B matrix of 2 layers x 7 linear layers
    assert lora["assembly_est_s"] < lora["wgrad_skipped_s"]  # one GEMV per weight vs the skipped GEMMs
    md = (out / "summary.md").read_text()
    assert "model=smollm2 micro=true" in md and "peak MiB" in md and "Logits:" in md


def test_a_prompt_moves_the_lm_head_to_the_loss_window(tmp_path_factory):
    """``prompt_frac=0.5`` times each configuration without and then with the first 8 of 16 positions masked: the LM
    head runs on the last 9, the floor's skipped weight-gradient GEMMs shrink by exactly the head's
    2 R (16 - 9) p q FLOPs, the logits fields say the window, and summary.md compares the pairs."""
    out, res = _micro(tmp_path_factory, prompt_frac=0.5)
    data = json.loads((out / "system.json").read_text())
    assert data["settings"]["prompt_frac"] == 0.5
    cases = res["cases"]
    assert [(c["config"]["mode"], c["config"].get("prompt_frac")) for c in cases] == [
        ("full", None), ("full", 0.5), ("lora", None), ("lora", 0.5)]
    for c0, c in zip(cases[::2], cases[1::2], strict=True):
        cf, lg = c["config"], c["logits"]
        R = cf["n"] + cf["m"]
        assert lg["window_positions"] == 9 and c0["logits"]["window_positions"] == 16
        assert lg["window_logits_bytes"] == R * 9 * 1024 * 4 and lg["label_positions"] == R * 8
        a, b = c["methods"]["layerwise/one_pass/auto"], c0["methods"]["layerwise/one_pass/auto"]
        if cf["mode"] == "full":  # the tied head is trained: its GEMM is skipped at 9 positions instead of 16
            want = 2 * R * (16 - 9) * 1024 * 576 / RATES["flops_per_s"]
            assert b["wgrad_skipped_s"] - a["wgrad_skipped_s"] == pytest.approx(want, rel=1e-9)
        else:  # LoRA leaves the head frozen: nothing of it in the floor
            assert a["wgrad_skipped_s"] == pytest.approx(b["wgrad_skipped_s"], rel=1e-9)
    md = (out / "summary.md").read_text()
    assert "prompt=0.5" in md and "last 9 of 16 positions" in md and "prompt_frac=0.5" in md
    window = md[md.index("## The loss window"):].split("\n\n")[2].splitlines()
    assert len(window) == 2 + 2 and window[2].startswith("| smollm2-micro full T=16 n=8 m=1 | 9 / 16 | ")


def test_prompt_frac_is_checked():
    with pytest.raises(ValueError, match="option 'prompt_frac'"):
        system.run_system_bench("/nonexistent/x", micro=True, prompt_frac=1.0, log=lambda *a: None)


@pytest.mark.parametrize("size, mode, prompt_frac", [("smollm2-micro", "lora", 0.0), ("smollm2-micro", "full", 0.0),
                                                      ("micro", "full", 0.0), ("smollm2-micro", "full", 0.75)])
def test_floor_held_weights_are_the_engines(size, mode, prompt_frac):
    """``floors.block_weights`` says which weights hold per-row gradients; the captured backward agrees (with a
    prompt too: the LM head then runs on the loss window)."""
    from drpost.objectives import causal_lm_loss

    methods = [m for m in system.method_list() if m.name == "layerwise/one_pass/auto"]
    case = system.Case(size, mode, 16, 4, 1, "cpu", methods, prompt_frac=prompt_frac)
    reg = case.regs["layerwise/one_pass/auto"]
    cap = reg.capture
    with cap:
        cap.start(5, 16)
        loss, _ = causal_lm_loss(case.model, case.merged)
    cap.backward(loss.sum())
    try:
        engine = [b.rows is not None for b in cap.collect()]
    finally:
        cap.reset()
    assert case.head_T == (16 if prompt_frac == 0 else 16 - 12 + 1)
    weights = block_weights(reg, 16, case.head_T)
    assert [any(w.held for w in ws) for ws in weights] == engine
    if size == "smollm2-micro" and mode == "full":  # the tied embedding / LM head: one weight, two uses
        tied = [w for ws in weights for w in ws if w.onehot]
        assert [(w.p, w.q, w.dense, w.onehot, w.tokens) for w in tied] == [(1024, 576, 1, 1, case.head_T)]


def test_smollm2_grid_and_seq_lengths():
    cfgs, x = system.grid(False, model="smollm2")
    assert {(c["mode"], c["T"], c["n"], c["m"]) for c in cfgs} == {
        (mode, T, n, 1) for mode in ("full", "lora") for T in (64, 256) for n in (8, 32)}
    assert all(c["size"] == "smollm2" and c["methods"] == "core" for c in cfgs)
    assert [(c["T"], c["n"]) for c in cfgs[:2]] == [(64, 8), (64, 8)]  # the cheapest first
    assert x["shape"] == (1536, 576)
    quick, _ = system.grid(True, model="smollm2")
    assert {(c["mode"], c["T"], c["n"]) for c in quick} == {("full", 64, 8), ("lora", 64, 8)}
    short, xs = system.grid(False, seq_lengths=[128], model="smollm2")
    assert len(short) == 4 and {c["T"] for c in short} == {128} and xs["T_sweep"] == [128]
    wide, xw = system.grid(True, seq_lengths=[64], model="smollm2", batch_sizes=[32, 8])
    assert [(c["mode"], c["T"], c["n"]) for c in wide] == [("full", 64, 32), ("full", 64, 8), ("lora", 64, 32),
                                                           ("lora", 64, 8)]
    assert xw["n"] == 8  # the crossovers keep their own n
    with pytest.raises(ValueError, match="option 'model'"):
        system.grid(False, model="smollm3")


def test_cli_model_option(capsys):
    from drpost import cli

    _, config, _ = cli.parse_args(["bench", "system", "model=smollm2", "micro=true"])
    assert config.model == "smollm2"
    _, config, _ = cli.parse_args(["bench", "system"])
    assert config.model == "tiny"
    assert cli.main(["bench", "system", "model=smollm3", "output_dir=/nonexistent/x"]) == 2
    assert "model" in capsys.readouterr().err


def test_smollm2_builder_shapes():
    cfg = system.llama_config("smollm2", 4096)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 4096
    assert system.llama_config("smollm2", 64, layers=2).num_hidden_layers == 2


def test_configurations_are_written_as_they_finish(tmp_path, monkeypatch):
    """A crash after the configurations (here: in the crossovers) leaves their results on disk, marked partial."""
    from drpost.bench.system import measure

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(measure, "crossovers", boom)
    with pytest.raises(RuntimeError, match="boom"):
        system.run_system_bench(tmp_path, micro=True, repeats=1, scorings=["auto"], log=lambda *a: None)
    data = json.loads((tmp_path / "system.json").read_text())
    assert data["partial"] is True and len(data["cases"]) == 1 and data["crossovers"] is None
    assert "**Partial**" in (tmp_path / "summary.md").read_text()
