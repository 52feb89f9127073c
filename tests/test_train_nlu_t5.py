"""train_nlu.py on a tiny random T5 (B.4's T5 recipe): the preset, a run end to end, and an exact resume."""

import json

import pytest
import torch

import data
import glue
import train_nlu
from test_model_t5 import random_t5_tool
from test_train_nlg import crash_after_saving
from test_train_nlu import toy_nli_rows, trainable_of, write_jsonl

transformers = pytest.importorskip("transformers")

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A T5 directory as google-t5/t5-base ships it, tiny and random: config.json, model.safetensors of
    T5ForConditionalGeneration (saved by transformers), spiece.model (<pad> 0, </s> 1, <unk> 2); toy jsonl."""
    root = tmp_path_factory.mktemp("tiny_t5_nlu")
    model_dir = root / "model"
    model_dir.mkdir()
    rows = toy_nli_rows(64, seed=0)
    train_file = write_jsonl(root / "train.jsonl", rows)
    random_t5_tool().train_vocabulary(train_file, str(model_dir), vocab_size=60)  # unigram, as T5's
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, decoder_start_token_id=0, dropout_rate=0.0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(str(model_dir))
    validation_file = write_jsonl(root / "validation.jsonl", toy_nli_rows(24, seed=1))
    return {"model": str(model_dir), "train": train_file, "validation": validation_file}


def flags(tiny_t5, out, *extra):
    return ["--model", tiny_t5["model"], "--task", "nli", "--data", tiny_t5["train"], "--validation-file",
            tiny_t5["validation"], "--out", str(out), "--batch-size", "8", "--max-length", str(MAX_LENGTH),
            "--no-progress", *extra]


def test_a_t5_model_directory_selects_the_t5_recipe(tiny_t5, capsys):
    # B.4, T5-base: 1 epoch, fp32, 128 tokens, batch 32, lr 1e-4, 3% warm-up then cosine, r = 8, alpha = 16 on
    # every linear module except the embeddings and the LM head; the same for every task of Table 3.
    for task in ("mnli", "sst2", "cola", "qnli", "mrpc"):
        settings = train_nlu.main(["--model", tiny_t5["model"], "--task", task, "--dry-run"])
        assert settings["preset"] == "paper"
        assert (settings["epochs"], settings["dtype"], settings["max_length"], settings["batch_size"], settings["lr"],
                settings["warmup_ratio"], settings["lr_schedule"], settings["rank"], settings["alpha"]) == \
            (1, "fp32", 128, 32, 1e-4, 0.03, "cosine", 8, 16)
        assert settings["targets"] == "q,k,v,o,wi,wi_0,wi_1,wo"
    changed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert changed[-1] == "  --task mrpc  (default: mnli)"  # the recipe's values are the preset's, not overrides
    assert train_nlu.presets("mnli")["paper"]["lr_schedule"] == "linear"  # DeBERTa's Table 8 is untouched


def test_tokenizer_equals_transformers(tiny_t5, tmp_path):
    """From spiece.model, and from the tokenizer.json transformers converts it to, as AutoTokenizer encodes."""
    theirs = transformers.T5Tokenizer.from_pretrained(tiny_t5["model"], extra_ids=0)
    theirs.save_pretrained(str(tmp_path))  # tokenizer.json
    for ours in (data.T5Tokenizer(tiny_t5["model"]), data.T5Tokenizer(str(tmp_path))):
        assert (ours.pad_id, ours.eos_id) == (0, 1)
        for row in toy_nli_rows(6, seed=3):
            for max_length in (4, 7, 15, MAX_LENGTH, 64):
                expected = theirs(row["premise"], row["hypothesis"], truncation=True, max_length=max_length)["input_ids"]
                assert ours.encode(row["premise"], row["hypothesis"], max_length) == expected
                assert ours.encode(row["premise"], max_length=max_length) == theirs(
                    row["premise"], truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.slow
def test_train_end_to_end_and_resume_exactly(tiny_t5, tmp_path, monkeypatch):
    """LoRA on every T5 linear and the head trained; a run stopped after its step-2 checkpoint and resumed ends
    bit-identical to the uninterrupted one."""
    run = ["--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--dropout", "0.1", "--lr", "5e-3"]
    straight = tmp_path / "straight"
    results = train_nlu.main(flags(tiny_t5, straight, *run))
    assert results["steps"] == 4
    log = [json.loads(line) for line in open(straight / "log.jsonl")]
    steps = [record for record in log if "validation" not in record]
    assert len(steps) == 4 and all(r["consistency"] >= 0 and "svd" in r for r in steps)
    # 3% warm-up of 4 steps is 0 steps: cosine from the peak lr
    assert steps[0]["lr"] == pytest.approx(5e-3) and steps[2]["lr"] == pytest.approx(5e-3 * 0.5 * (1 + 0.0))
    trained = trainable_of(straight)
    adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1] for name in trained if name.endswith(".lora_A")}
    assert adapted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # self- and cross-attention, the gated feed-forward
    assert sum(".EncDecAttention.q.lora_A" in name for name in trained) == 2  # the decoder's 2 blocks (num_layers)
    assert {"classification_head.dense.weight", "classification_head.out_proj.weight"} <= set(trained)
    assert not any("shared" in name or "lm_head" in name for name in trained)
    peft_config = json.loads((straight / "peft_adapter" / "adapter_config.json").read_text())
    assert peft_config["modules_to_save"] == ["classification_head.dense", "classification_head.out_proj"]

    interrupted = tmp_path / "interrupted"
    crash_after_saving(monkeypatch, at_step=2)
    with pytest.raises(KeyboardInterrupt):
        train_nlu.main(flags(tiny_t5, interrupted, *run))
    monkeypatch.undo()
    assert train_nlu.main(flags(tiny_t5, interrupted, *run, "--resume"))["steps"] == 4
    a, b = trainable_of(straight), trainable_of(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)  # bit-identical


def test_adapter_scores_in_eval_py_and_loads_onto_transformers_t5_classifier(tiny_t5, tmp_path):
    """eval.py glue on <out>/adapter gives the run's validation accuracy, eval.py cluster reads the </s> states;
    <out>/peft_adapter (LoRA on every linear, the head as modules_to_save) on the T5ForConditionalGeneration
    directory through AutoPeftModelForSequenceClassification gives our logits."""
    peft = pytest.importorskip("peft")
    import adapters
    import eval as evaluation
    from t5 import T5Classifier

    out = tmp_path / "out"
    trained = train_nlu.main(flags(tiny_t5, out, "--max-steps", "2", "--lr", "5e-2"))
    scored = evaluation.main(["glue", "--model", tiny_t5["model"], "--adapter", str(out / "adapter"), "--task", "nli",
                              "--data", tiny_t5["validation"], "--out", str(tmp_path / "glue.json")])
    assert scored["total"] == 24 and scored["max_length"] == MAX_LENGTH
    assert scored["accuracy"] == pytest.approx(trained["best"]["validation"]["accuracy"], abs=1e-9)
    cluster = evaluation.main(["cluster", "--model", tiny_t5["model"], "--adapter", str(out / "adapter"), "--task", "nli",
                               "--data", tiny_t5["validation"], "--projection", "pca", "--plot", str(tmp_path / "c.png"),
                               "--out", str(tmp_path / "cluster.json")])
    assert -1.0 <= cluster["global_silhouette"] <= 1.0 and (tmp_path / "c.png").stat().st_size > 0
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out / "peft_adapter"), num_labels=3).eval()
    ours = adapters.load_adapter(T5Classifier.from_pretrained(tiny_t5["model"], num_labels=3), str(out / "adapter")).eval()
    tokenizer = data.T5Tokenizer(tiny_t5["model"])
    pairs = [tokenizer.encode(row["premise"], row["hypothesis"], MAX_LENGTH) for row in toy_nli_rows(6, seed=5)]
    batch_ids, mask, _ = glue.collate(pairs, torch.zeros(6), list(range(6)), tokenizer.pad_id)  # padded rows
    with torch.no_grad():
        peft_logits = theirs(input_ids=batch_ids, attention_mask=mask).logits
        our_logits = ours(batch_ids, mask)
        before = T5Classifier.from_pretrained(tiny_t5["model"], num_labels=3, seed=42)(batch_ids, mask)
    assert (our_logits - before).abs().max() > 1e-3  # training moved the adapter and head: not a vacuous match
    assert (peft_logits - our_logits).abs().max() <= 1e-5 * our_logits.abs().max().clamp(min=1.0)


def test_merge_is_refused_before_training_a_t5(tiny_t5, tmp_path):
    """tools/merge_adapter.py rebuilds decoders and DeBERTa / RoBERTa: --merge on a T5 fails at once, nothing written."""
    with pytest.raises(ValueError, match="a t5 model's adapter cannot be merged"):
        train_nlu.main(flags(tiny_t5, tmp_path / "run", "--max-steps", "2", "--merge"))
    assert not (tmp_path / "run" / "log.jsonl").exists()
