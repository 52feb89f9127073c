"""--data blends (Fig. 5's MetaMathQA + CodeFeedback): parsing, each source in its format, the seed's shuffle,
and a train_nlg.py run on a blend that resumes exactly."""

import json

import pytest

import train_nlg
from data import blend_sources, load_blend
from test_train_nlg import make_examples, pissa_dataset_copy, run_killed_and_resumed, tiny, tiny_args, write_jsonl  # noqa: F401


def code_rows(count):
    """CodeFeedback's fields (m-a-p/CodeFeedback-Filtered-Instruction): query, answer."""
    return [{"query": f"Write a function returning {i}.", "answer": f"def f():\n    return {i}", "resource": "x"}
            for i in range(count)]


@pytest.fixture
def sources(tmp_path):
    math_file = write_jsonl(tmp_path / "math.jsonl", make_examples(10, seed=1))
    code_file = write_jsonl(tmp_path / "code.jsonl", code_rows(8))
    return math_file, code_file


def test_blend_specs_parse_and_single_sources_are_not_blends(sources):
    math_file, code_file = sources
    assert blend_sources(f"{math_file}:6,{code_file}@codefeedback:4") == [(math_file, None, None, 6),
                                                                            (code_file, None, "codefeedback", 4)]
    assert blend_sources("meta-math/MetaMathQA:100000,m-a-p/CodeFeedback-Filtered-Instruction@codefeedback:100000") == [
        ("meta-math/MetaMathQA", None, None, 100000), ("m-a-p/CodeFeedback-Filtered-Instruction", None, "codefeedback", 100000)]
    assert blend_sources("fxmeng/pissa-dataset#metamath@pissa:100000,fxmeng/pissa-dataset#python@pissa:50000") == [
        ("fxmeng/pissa-dataset", "metamath", "pissa", 100000), ("fxmeng/pissa-dataset", "python", "pissa", 50000)]
    assert blend_sources(f"{math_file}:3") == [(math_file, None, None, 3)]  # one source with a count
    assert blend_sources(math_file) is None and blend_sources("fxmeng/pissa-dataset") is None
    for bad, named in ((f"{math_file}:6,{code_file}", repr(code_file)), (f"{math_file}:0,{code_file}:1", ":0"),
                       (f"{math_file}@nope:2,{code_file}:1", "'nope'")):
        with pytest.raises(ValueError, match=named):
            blend_sources(bad)


def test_each_source_gives_its_first_n_records_in_its_format_shuffled_by_the_seed(sources):
    math_file, code_file = sources
    spec = f"{math_file}:6,{code_file}@codefeedback:4"
    blend = load_blend(spec, "metamath", seed=3)
    math_rows, code = make_examples(10, seed=1), code_rows(8)
    expected = [(r["query"], r["response"]) for r in math_rows[:6]] + [(r["query"], r["answer"]) for r in code[:4]]
    assert sorted(blend) == sorted(expected) and len(blend) == 10  # exactly those records, once each
    assert blend == load_blend(spec, "metamath", seed=3)  # deterministic: a resumed run rebuilds the same list
    assert blend != load_blend(spec, "metamath", seed=4) and blend != expected  # shuffled, by the seed
    assert load_blend(spec, "metamath", seed=3, max_samples=5) == blend[:5]  # --max-samples caps the shuffled blend
    # the sources are mixed through the list, not concatenated: both appear in its first half
    assert {pair in expected[:6] for pair in blend[:5]} == {True, False}


def test_sub_directories_of_one_dataset_blend_as_the_official_sub_task_list(tmp_path):
    """SOURCE#DATA_DIR: the sub-directories of a dataset directory laid out as fxmeng/pissa-dataset (the official
    train.py's --sub_task metamath:N python:N reads those), each its first N train records."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    root = pissa_dataset_copy(tmp_path / "pissa-dataset", rows)
    blend = load_blend(f"{root}#metamath@pissa:3,{root}#python@pissa:1", "metamath", seed=0)
    assert sorted(blend) == [("def f", "pass"), ("q0", "a0"), ("q1", "a1"), ("q2", "a2")]


def test_blend_errors_name_the_source(sources):
    math_file, code_file = sources
    with pytest.raises(ValueError, match=r"code.jsonl' has 8 records, the blend asks for 9"):
        load_blend(f"{math_file}:2,{code_file}@codefeedback:9", "metamath", seed=0)
    with pytest.raises(ValueError, match=r"code.jsonl: --format metamath needs the fields \['response'\]"):
        load_blend(f"{math_file}:2,{code_file}:2", "metamath", seed=0)  # CodeFeedback's rows read as MetaMath
    with pytest.raises(ValueError, match="--data-dir 'metamath' .* SOURCE#DATA_DIR"):
        load_blend(f"{math_file}:2,{code_file}@codefeedback:2", "metamath", seed=0, data_dir="metamath")


def test_paper_preset_takes_a_blend_whole(sources, tiny, capsys):  # noqa: F811
    math_file, code_file = sources
    spec = f"{math_file}:6,{code_file}@codefeedback:4"
    settings = train_nlg.main(["--model", tiny["model"], "--data", spec, "--dry-run"])
    assert settings["max_samples"] is None and settings["data_dir"] is None  # the counts decide, not a 100K cap
    assert f"data: the blend {spec}" in capsys.readouterr().out


def test_training_on_a_blend_resumes_exactly(sources, tiny, tmp_path, monkeypatch):  # noqa: F811
    math_file, code_file = sources
    common = ["--data", f"{math_file}:6,{code_file}@codefeedback:6", "--max-samples", "12", "--method", "lora",
              "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--save-every", "1", "--dropout", "0.1"]
    full, _ = run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step=2)
    assert len(full) == 3
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["derived"]["examples"] == 12
