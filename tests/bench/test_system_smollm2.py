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


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run, its floors at fixed rates (these CPUs, one thread): rates calibrated on a loaded machine can
    make a GEMV look dearer than a GEMM, and the floor checks below are about the model, not the machine's load."""
    from drpost.geometry import cost

    out = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "calibrate", lambda *a, **k: cost.Rates(flops_per_s=77e9, bytes_per_s=16.6e9))
        res = system.run_system_bench(out, micro=True, model="smollm2", repeats=1, log=lambda *a: None)
    return out, res


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


@pytest.mark.parametrize("size, mode", [("smollm2-micro", "lora"), ("smollm2-micro", "full"), ("micro", "full")])
def test_floor_held_weights_are_the_engines(size, mode):
    """``floors.block_weights`` says which weights hold per-row gradients; the captured backward agrees."""
    from drpost.objectives import causal_lm_loss

    methods = [m for m in system.method_list() if m.name == "layerwise/one_pass/auto"]
    case = system.Case(size, mode, 16, 4, 1, "cpu", methods)
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
    assert [any(w.held for w in ws) for ws in block_weights(reg, 16)] == engine
    if size == "smollm2-micro" and mode == "full":  # the tied embedding / LM head: one weight, two uses
        tied = [w for ws in block_weights(reg, 16) for w in ws if w.onehot]
        assert [(w.p, w.q, w.dense, w.onehot) for w in tied] == [(1024, 576, 1, 1)]


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
