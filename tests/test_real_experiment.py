"""tools/real_experiment.py: its metrics against naive references, the whole path on tiny data, and README's table."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import real_experiment  # noqa: E402

import eval as evaluate  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import Llama  # noqa: E402

TINY_LLAMA = os.path.join(REPO, "assets", "tiny-llama")


def test_metamath_response_rewrites_the_first_gsm8k_training_solution():
    first = real_experiment.gsm8k_problems(real_experiment.GSM8K_TRAIN, 1)[0]
    # train.jsonl line 1: "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72
    # clips altogether in April and May.\n#### 72": the annotations go, "#### 72" becomes MetaMath's marker
    assert real_experiment.metamath_response(first["answer"]) == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is: 72")


def test_shipped_gsm8k_and_wikitext_are_the_full_splits():
    # the sizes openai/grade-school-math's README gives: 7,473 training and 1,319 test problems
    assert len(real_experiment.gsm8k_problems(real_experiment.GSM8K_TRAIN)) == 7473
    assert len(real_experiment.gsm8k_problems(real_experiment.GSM8K_TEST)) == 1319
    with open(real_experiment.WIKITEXT_TEST) as f:
        lines = f.read().split("\n")
    # Wikitext-2 test (Merity et al. 2016): 4,358 lines with the article headings "= Title =" among them
    assert len(lines) - 1 == 4358 and lines[1] == " = Robert <unk> = "


def test_gsm8k_problems_names_the_file_and_record_of_a_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 2 is not a GSM8K problem"):
        real_experiment.gsm8k_problems(str(path))


def test_metrics_match_naive_float64_references():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    base = torch.randn(7, 50) * 3
    # top-K entropy: renormalize the K largest probabilities row by row, -sum p log p, mean over rows
    expected = 0.0
    for row in logits.double():
        p = torch.sort(row.softmax(-1), descending=True).values[:5]
        p = p / p.sum()
        expected += -(p * p.log()).sum().item() / len(logits)
    assert real_experiment.topk_entropy(logits, 5) == pytest.approx(expected, rel=1e-12)
    # energy share and Eq. 12's ratio from the singular values of an SVD (not the Gram matrix the code uses)
    sigma = torch.linalg.svdvals(logits.double())
    assert real_experiment.svd_ratio(real_experiment.logit_spectrum(logits), 3) == pytest.approx(sigma[:3].sum().item() / torch.linalg.norm(logits.double()).item(), rel=1e-10)
    assert real_experiment.spectral_energy_ratio(real_experiment.logit_spectrum(logits), 3) == pytest.approx((sigma[:3] ** 2).sum().item() / (sigma ** 2).sum().item(), rel=1e-10)
    # KL(base || tuned) summed over rows, one row at a time from the definition
    p_base, p_tuned = base.double().softmax(-1), logits.double().softmax(-1)
    expected_kl = sum((p_base[i] * (p_base[i] / p_tuned[i]).log()).sum().item() for i in range(len(logits)))
    assert real_experiment.kl_sum(F.log_softmax(base.double(), -1), logits) == pytest.approx(expected_kl, rel=1e-10)


def test_wikitext_perplexity_is_eval_py_ppl_and_base_has_zero_drift():
    tokenizer, model = Tokenizer(TINY_LLAMA), Llama.from_pretrained(TINY_LLAMA).eval()
    budget = dict(real_experiment.BUDGETS["smoke"], wikitext_tokens=300, ppl_window=128, ppl_stride=48)
    ids = real_experiment.wikitext_ids(tokenizer, real_experiment.WIKITEXT_TEST, budget["wikitext_tokens"])
    problems = real_experiment.gsm8k_problems(real_experiment.GSM8K_TEST, 3)
    reference = {"heldout": real_experiment.heldout_batches(tokenizer, problems, 2, 160, "alpaca"), "wikitext_ids": ids,
                 "ppl_window": 128}
    reference["heldout_base"] = real_experiment.base_log_probs(real_experiment.response_logits(model, reference["heldout"]))
    reference["wikitext_base"] = real_experiment.base_log_probs(real_experiment.wikitext_logits(model, ids, 128, 48))
    metrics = real_experiment.measure(model, reference, budget)
    assert metrics["wikitext_ppl"] == pytest.approx(evaluate.perplexity(model, ids, 128, 48)["perplexity"], rel=1e-5)
    assert metrics["wikitext_tokens"] == len(ids) - 1  # every token but the first is scored once
    assert abs(metrics["wikitext_kl"]) < 1e-12 and abs(metrics["gsm8k_kl"]) < 1e-12  # the model against itself
    # the held-out CE is train_nlg.py's task loss: labels -100 on the prompt, the response scored
    ce_sum, tokens = 0.0, 0
    for input_ids, attention_mask, labels in reference["heldout"]:
        logits = model(input_ids, attention_mask).double()
        ce_sum += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum").item()
        tokens += int((labels[:, 1:] != -100).sum())
    assert metrics["gsm8k_ce"] == pytest.approx(ce_sum / tokens, rel=1e-5)


def test_summarize_means_and_sample_std_per_variant():
    runs = [{"variant": "LoRA", "seed": 1, "gsm8k_ce": 1.0, "gsm8k_accuracy": 0.25, "steps": 2},
            {"variant": "LoRA", "seed": 2, "gsm8k_ce": 2.0, "gsm8k_accuracy": 0.75, "steps": 2}]
    row = real_experiment.summarize(runs)[0]
    # mean 1.5, sample std sqrt(((1 - 1.5)^2 + (2 - 1.5)^2) / 1) = sqrt(0.5); accuracy in percent
    assert row["gsm8k_ce"] == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5))}
    assert row["gsm8k_accuracy"]["mean"] == pytest.approx(50.0)
    assert "| LoRA | 2 | 50.0 ± 35.4 | 1.5000 ± 0.7071 |" in real_experiment.render_table([row])


@pytest.mark.slow
def test_whole_path_on_tiny_data_repeats_bit_for_bit(tmp_path):
    argv = ["--budget", "smoke", "--model", TINY_LLAMA, "--variants", "LoRA,BA-LoRA,PiSSA + L_CR"]
    real_experiment.main(argv + ["--out", str(tmp_path / "a")])
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [
        ("pretrained", 0), ("LoRA", 42), ("LoRA", 1024), ("BA-LoRA", 42), ("BA-LoRA", 1024), ("PiSSA + L_CR", 42)]
    for run in results["runs"][1:]:
        assert run["steps"] == 4 and run["tokens"] > 0  # 16 problems / batch 4, one epoch
        assert run["wikitext_kl"] > 0 and run["gsm8k_kl"] > 0  # every run moved the model
        assert ("gsm8k_accuracy" in run) == (run["variant"] != "PiSSA + L_CR")  # accuracy: main rows only
    assert os.path.getsize(tmp_path / "a" / "drift_vs_task.png") > 1000
    table = (tmp_path / "a" / "table.md").read_text()
    assert table == real_experiment.render_table(results["summary"])

    # a rerun with the same seeds gives the same table; a finished run is reused, not retrained
    real_experiment.main(argv + ["--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "table.md").read_text() == table
    mtime = os.path.getmtime(tmp_path / "a" / "runs" / "lora" / "seed42" / "metrics.json")
    real_experiment.main(argv + ["--out", str(tmp_path / "a")])
    assert os.path.getmtime(tmp_path / "a" / "runs" / "lora" / "seed42" / "metrics.json") == mtime
    # a saved run that lacks a metric measure() now returns is measured again from its adapter, not retrained
    metrics_path = tmp_path / "a" / "runs" / "lora" / "seed42" / "metrics.json"
    saved = json.loads(metrics_path.read_text())
    del saved["result"]["svd_ratio"]
    metrics_path.write_text(json.dumps(saved))
    log_mtime = os.path.getmtime(tmp_path / "a" / "runs" / "lora" / "seed42" / "log.jsonl")
    real_experiment.main(argv + ["--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "table.md").read_text() == table
    assert os.path.getmtime(tmp_path / "a" / "runs" / "lora" / "seed42" / "log.jsonl") == log_mtime

    # --update-docs: the files land in the docs folder and README's table is replaced between the markers
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{real_experiment.README_BEGIN}\nold table\n{real_experiment.README_END}\nverdict\n")
    real_experiment.update_docs(str(tmp_path / "a"), str(tmp_path / "docs"), str(readme))
    assert readme.read_text() == f"intro\n{real_experiment.README_BEGIN}\n{table}{real_experiment.README_END}\nverdict\n"
    assert (tmp_path / "docs" / "results.json").read_text() == (tmp_path / "a" / "results.json").read_text()


def test_readme_table_is_the_committed_results():
    with open(os.path.join(real_experiment.DOCS, "results.json")) as f:
        results = json.load(f)
    assert results["budget"] == "cpu" and results["model"] == "smollm2-135m-instruct"
    with open(real_experiment.README) as f:
        readme = f.read()
    table = readme.split(real_experiment.README_BEGIN + "\n")[1].split(real_experiment.README_END)[0]
    # the table is recomputed from the runs, not copied from the file's own summary
    assert table == real_experiment.render_table(real_experiment.summarize(results["runs"]))
