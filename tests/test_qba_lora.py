"""
QBA-LoRA (Fig. 5) and DoRA + Reg (Table 10) through the training scripts: a 4-bit run on the tiny
Llama resumes to the same adapter as an uninterrupted one, a DoRA + Reg run on a 4-bit base is
evaluated by eval.py on the base it was trained on, train_nlu.py runs both, and SmolLM2 trains a few
4-bit steps with a resume; the consistency term's teacher on a 4-bit base is the full-precision model
(--teacher full) or the quantized one (--teacher quantized), as logged.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import adapters
import balora
import eval as evaluation
import nf4
import train_nlg
import train_nlu
from model import Llama
from test_train_nlg import (crash_after_saving, max_abs_diff, read_log, response_token_batch, run_killed_and_resumed,  # noqa: F401
                            tiny, tiny_args, trainable_after, write_jsonl)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def adapter_config(out):
    return json.loads((out / "adapter" / adapters.CONFIG_NAME).read_text())


@pytest.mark.parametrize("teacher", ["full", "quantized"])
def test_the_logged_consistency_on_a_4bit_base_is_against_the_chosen_teacher(tiny, tmp_path, teacher):
    # step 1 sees the adapter at its start, on the quantized base: the student is Q(W_res) + s B0 A0
    rows = tiny["rows"][:4]
    train_nlg.main(tiny_args(tiny, tmp_path, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--method", "balora",
                             "--quantize", "nf4", "--teacher", teacher, "--batch-size", "4", "--micro-batch-size", "4",
                             "--max-steps", "1", "--max-length", "512"))
    logged = read_log(tmp_path)[0]
    input_ids, attention_mask, valid = response_token_batch(tiny, rows)
    full_precision = Llama.from_pretrained(tiny["model"])
    student = Llama.from_pretrained(tiny["model"])
    balora.add_lora(student, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(","), r=4, alpha=8, init="pissa")
    nf4.quantize_base(student, "nf4")
    with torch.no_grad():
        student_logits = student(input_ids, attention_mask)[:, :-1][valid]
        full_logits = full_precision(input_ids, attention_mask)[:, :-1][valid]
    if teacher == "full":  # the official teacher: KL(full-precision model || 4-bit student)
        expected = balora.nlg_consistency_loss(full_logits, student_logits, 2.0).item()
        assert expected > 1e-5  # 4 bits move the tiny model's distributions a little
        assert abs(logged["consistency"] - expected) <= 1e-3 * expected
    else:  # the quantized model is its own teacher: the student starts on it
        assert abs(logged["consistency"]) <= 1e-8


@pytest.mark.slow
def test_qba_lora_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    common = ["--method", "balora", "--quantize", "nf4-dq", "--batch-size", "4", "--micro-batch-size", "2",
              "--max-steps", "4", "--save-every", "2", "--dropout", "0.1", "--lambda-warmup-ratio", "0",
              "--svd-k", "3", "--top-k", "5"]
    full, resumed = run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step=2)
    assert all(r["consistency"] is not None for r in full) and full[-1]["consistency"] > 0  # the 4-bit teacher ran
    assert adapter_config(tmp_path / "full")["quantize"] == "nf4-dq"
    with pytest.raises(ValueError, match=r"--quantize 'nf4-dq' -> 'nf4'"):  # the base is a result-changing setting
        train_nlg.main(tiny_args(tiny, tmp_path / "resumed", *common[:3], "nf4", *common[4:], "--resume"))


@pytest.mark.slow
def test_dora_reg_on_a_4bit_base_is_evaluated_on_that_base(tiny, tmp_path):
    out = tmp_path / "run"
    train_nlg.main(tiny_args(tiny, out, "--method", "dora+reg", "--quantize", "nf4", "--batch-size", "4",
                             "--micro-batch-size", "4", "--max-steps", "2", "--lambda-warmup-ratio", "0"))
    config = adapter_config(out)
    assert config["dora"] is True and config["quantize"] == "nf4"
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["use_dora"] is True
    # eval.py's model (adapter loaded, re-quantized, merged) computes what the trained model computed
    trained = Llama.from_pretrained(tiny["model"])
    adapters.load_adapter(trained, str(out / "adapter"))
    assert all(layer.dora and layer.quantize == "nf4" for _, layer in balora.lora_layers(trained))
    merged, _ = evaluation.load_llama(evaluation.parse_args(
        ["ppl", "--model", tiny["model"], "--adapter", str(out / "adapter"), "--device", "cpu"]))
    ids = torch.randint(trained.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids), trained.eval()(ids), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"--quantize none: the adapter .* was trained on a 'nf4' base"):
        evaluation.load_llama(evaluation.parse_args(
            ["ppl", "--model", tiny["model"], "--adapter", str(out / "adapter"), "--quantize", "none"]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora+reg", "balora"])
def test_train_nlu_on_a_4bit_base(method, tmp_path):
    results = train_nlu.main(["--method", method, "--quantize", "nf4", "--max-steps", "2", "--out", str(tmp_path),
                              "--no-progress"])
    assert results["steps"] == 2
    config = adapter_config(tmp_path)
    assert config["quantize"] == "nf4" and config["dora"] == (method == "dora+reg")
    assert set(config["trainable"]) == {"classifier", "pooler.dense"}  # the trainable head is not quantized


@pytest.mark.slow
def test_qba_lora_on_smollm2_a_few_steps_with_resume(smollm2_dir, tmp_path, monkeypatch):
    flags = ["--model", smollm2_dir, "--data", os.path.join(ASSETS, "data", "metamath_train.jsonl"),
             "--method", "balora", "--quantize", "nf4", "--prompt-format", "chat", "--max-steps", "2",
             "--max-samples", "4", "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "96",
             "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--dtype", "fp32", "--save-every", "1",
             "--pissa-niter", "4", "--lambda-warmup-ratio", "0", "--no-progress"]
    train_nlg.main([*flags, "--out", str(tmp_path / "full")])
    crash_after_saving(monkeypatch, at_step=1)
    with pytest.raises(KeyboardInterrupt):
        train_nlg.main([*flags, "--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    train_nlg.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    assert max_abs_diff(trainable_after(tmp_path / "full"), trainable_after(tmp_path / "resumed")) == 0.0
    log = read_log(tmp_path / "resumed")
    assert [r["step"] for r in log] == [1, 2] and log[-1]["svd"] is not None
    assert adapter_config(tmp_path / "full")["quantize"] == "nf4"
