"""Smoke test of tools/bench.py: every variant (the paper's `official` recipe included) runs on the smallest
shape and the report is complete; without transformers / peft the peer variants are skipped, not fatal."""

import json
import math
import re
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench  # noqa: E402


@pytest.mark.slow
def test_bench_smoke_writes_every_row_with_positive_finite_numbers(tmp_path, monkeypatch):
    # a plain run writes out/bench/BENCHMARKS.md under the working directory, never the tracked file
    tracked = os.path.join(bench.REPO, "BENCHMARKS.md")
    tracked_before = open(tracked, "rb").read()
    monkeypatch.chdir(tmp_path)
    out, json_path = tmp_path / "out" / "bench" / "BENCHMARKS.md", tmp_path / "bench.json"
    out.parent.mkdir(parents=True)
    out.write_text("# Benchmarks\n\nhand-written notes stay\n")
    bench.main(["--shape", "smoke", "--steps", "2", "--warmup", "1", "--json", str(json_path)])
    assert open(tracked, "rb").read() == tracked_before

    report = json.loads(json_path.read_text())
    results, ratios = report["results"]["off"], report["ratios"]["off"]
    assert set(results) == set(bench.VARIANTS)
    for name, run in results.items():
        for key in ("step_s", "tokens_per_s", "peak_bytes"):
            assert math.isfinite(run[key]) and run[key] > 0, (name, key, run[key])
        assert (run["teacher_s"] is not None) == (name in ("balora", "pissa+consistency", "official")), name
        assert (run["student_s"] is not None) == (name != "peft-lora"), name
        assert (run["objective_s"] is not None) == (name not in bench.PEER_VARIANTS), name
    assert set(results["balora"]["terms_s"]) == {"task", "consistency", "diversity", "svd"}
    assert all(math.isfinite(s) and s > 0 for s in results["balora"]["terms_s"].values())
    assert all(math.isfinite(value) for value in ratios.values())
    assert 0 < ratios["teacher_share_of_balora_step"] < 1
    assert {"balora_over_official_time", "balora_over_official_memory", "unexplained_over_pissa",
            "teacher_over_student_forward"} <= set(ratios)
    # the official recipe holds a second model and the (B, T, V) teacher logits: it cannot use less memory
    assert results["official"]["peak_bytes"] > results["pissa"]["peak_bytes"]

    text = out.read_text()
    assert "hand-written notes stay" in text
    for name in bench.VARIANTS:
        assert f"| {name} |" in text
    for row in ("balora / official step time", "balora / official peak memory", "balora / pissa step time",
                "balora / pissa peak memory", "teacher forward share", "teacher forward / student forward",
                "unexplained", "ours pissa / peft tokens/s"):
        assert row in text

    # A second run replaces its own section instead of appending another.
    bench.write_section(str(out), "smoke:cpu", "replaced\n")
    assert out.read_text().count("<!-- bench:smoke:cpu begin -->") == 1 and "replaced" in out.read_text()


def test_bench_skips_the_peer_variants_without_transformers_or_peft(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "peer_libraries_missing", lambda: ["peft"])
    report = bench.main(["--shape", "smoke", "--steps", "1", "--warmup", "1", "--variants", "balora", "official"])
    assert "peft not installed: skipping the peer variants official" in capsys.readouterr().out
    assert set(report["results"]["off"]) == {"balora"} and report["ratios"] == {}


def test_bench_objective_runs_both_objectives_on_the_same_step(capsys):
    """tools/bench_objective.py: the chunked objective and an earlier commit's hand-derived one give the same
    first-step loss on the smoke shape (the same model, batch and sketch), and both are timed."""
    import bench_objective

    if os.system(f"git -C {bench.REPO} cat-file -e 96c8a35:balora.py 2>/dev/null") != 0:
        pytest.skip("this checkout has no history back to commit 96c8a35 (a shallow clone)")
    medians = bench_objective.main(["--shape", "smoke", "--against", "96c8a35", "--steps", "1"])
    assert len(medians) == 2 and all(step > objective > 0 for step, objective in medians.values())
    losses = re.search(r"first-step loss: (\S+) \(autograd\) vs (\S+) \(hand-derived\)", capsys.readouterr().out)
    assert abs(float(losses.group(1)) - float(losses.group(2))) <= 1e-5 * abs(float(losses.group(2)))
