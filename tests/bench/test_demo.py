"""``drpost demo`` (``drpost.bench.demo``): prints its lines and table with nothing from the libraries in between
(unless verbose=true), and refuses options it does not read. Two training steps of one method on the bundled base.
"""

from __future__ import annotations

import json

from drpost import cli


def test_demo_prints_a_clean_table_and_writes_records(tmp_path, capsys, recwarn):
    out = tmp_path / "demo"
    code = cli.main(["demo", "steps=2", "methods=full_training", f"output_dir={out}"])
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "FullTraining" in captured.out and "target EM" in captured.out
    for noise in ("Loading weights", "it/s]", "Warning", "deprecated"):
        assert noise not in text, noise
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning, UserWarning))]
    records = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in records] == ["full_training"] and records[0]["budget"]["steps"] == 2


def test_demo_refuses_options_it_does_not_read(tmp_path, capsys):
    code = cli.main(["demo", "regularizer.method=hull", "save_every=5", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "'regularizer.method'" in err and "'save_every'" in err and "not used by drpost demo" in err
