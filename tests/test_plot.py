"""Tests of plot.py: the panels come from the log itself, so a new logged term is drawn without an edit."""

import json

import plot


def test_a_new_term_in_the_log_gets_its_own_panel_and_an_uncomputed_one_an_empty_panel(tmp_path):
    records = [{"step": step, "lr": 0.1, "lambda1": 0.2, "lambda2": 0.0, "lambda4": 0.3, "task": 1.0 / step,
                "consistency": None, "flatness": 0.5 * step, "total": 2.0, "tokens": 10, "time": 0.1}
               for step in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert plot.panels_of(records) == [
        ("task loss", ["task"]), ("L_CR consistency (Eq. 4 / 9)", ["consistency"]), ("flatness", ["flatness"]),
        ("learning rate", ["lr"]), ("total objective (Eq. 8 / 13)", ["total"]),
        (plot.LAMBDAS, ["lambda1", "lambda2", "lambda4"])]
    drawn = plot.plot_run(str(tmp_path))
    assert drawn["flatness"] == {"flatness": ([1.0, 2.0, 3.0], [0.5, 1.0, 1.5])}
    assert drawn["L_CR consistency (Eq. 4 / 9)"] == {}  # logged as None at every step: an empty panel
    assert (tmp_path / plot.CURVES).stat().st_size > 0
