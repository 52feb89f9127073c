"""train_nlu.py's RoBERTa recipe (Table 9) and eval.py cluster (App. B.3, Table 12) on a tiny random RoBERTa."""

import json

import pytest
import torch

import data
import eval as evaluation
import glue
import train_nlu
from test_train_nlu import toy_nli_rows, write_jsonl

transformers = pytest.importorskip("transformers")

MAX_LENGTH = 24  # the toy pairs are at most ~16 byte-level tokens; the tiny model has 24 + 2 + 4 positions


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A RoBERTa directory as FacebookAI/roberta-base ships it, tiny and random: config.json,
    model.safetensors of RobertaForMaskedLM (roberta.* + lm_head.*), vocab.json + merges.txt; toy jsonl."""
    import tokenizers

    root = tmp_path_factory.mktemp("tiny_roberta")
    model_dir = root / "model"
    model_dir.mkdir()
    rows = toy_nli_rows(64, seed=0)
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([row["premise"] for row in rows] + [row["hypothesis"] for row in rows], vocab_size=300,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(model_dir))
    config = transformers.RobertaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_LENGTH + 6, type_vocab_size=1, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(config).save_pretrained(str(model_dir))
    train_file = write_jsonl(root / "train.jsonl", rows)
    validation_file = write_jsonl(root / "validation.jsonl", toy_nli_rows(24, seed=1))
    return {"model": str(model_dir), "train": train_file, "validation": validation_file}


def test_table9_recipe_is_the_papers_row_by_row():
    # The paper's Table 9 ("Task-specific hyperparameters for fine-tuning RoBERTa-base with LoRA"), typed in:
    #   Hyperparameter  MNLI   SST-2  MRPC   CoLA   QNLI   QQP    RTE    STS-B
    #   Batch Size      16     16     16     32     32     16     32     16
    #   # Epochs        30     60     30     80     25     25     80     40
    #   Learning Rate   5e-4   5e-4   4e-4   4e-4   4e-4   5e-4   4e-4   4e-4
    # and B.4's ROBERTA-BASE paragraph: r = 8 on query and value, alpha = 8, linear schedule after a 6%
    # warm-up, maximum sequence length 512.
    table9 = {
        "mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
        "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 4e-4), "stsb": (16, 40, 4e-4),
    }
    assert sorted(table9) == sorted(task for task, t in glue.TASKS.items() if t.hub_config)  # every GLUE task
    for task, (batch_size, epochs, lr) in table9.items():
        paper = train_nlu.presets(task, "roberta")["paper"]
        deberta = train_nlu.presets(task)["paper"]
        assert (paper["batch_size"], paper["epochs"], paper["lr"]) == (batch_size, epochs, lr), task
        assert (paper["rank"], paper["alpha"], paper["warmup_ratio"], paper["max_length"]) == (8, 8, 0.06, 512)
        assert paper["targets"] == "query_proj,value_proj"  # transformers' query, value (model.ROBERTA_KEYS)
        # the same regularizers and teacher as for DeBERTa (Sec. 3.1): settings outside the presets
        same = ("method", "lambda1", "lambda2", "lambda3", "svd_k", "temperature", "lambda1_schedule", "focus_schedule")
        assert not set(same) & (set(paper) | set(deberta))
    # Table 8 (DeBERTa-v3) is untouched: MNLI 5 epochs, batch 16, lr 5e-4, alpha 8, every linear, no warm-up
    deberta = train_nlu.presets("mnli")["paper"]
    assert (deberta["epochs"], deberta["batch_size"], deberta["lr"], deberta["alpha"], deberta["warmup_ratio"]) == \
        (5, 16, 5e-4, 8, 0.0) and deberta["targets"] == train_nlu.TARGET_MODULES


def test_a_roberta_model_directory_selects_table9(tiny_roberta, capsys):
    settings = train_nlu.main(["--model", tiny_roberta["model"], "--task", "rte", "--dry-run"])
    assert settings["preset"] == "paper"
    assert (settings["batch_size"], settings["epochs"], settings["lr"], settings["warmup_ratio"]) == (32, 80, 4e-4, 0.06)
    changed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert changed == ["  --task rte  (default: mnli)"]  # the Table 9 values are the preset's, not overrides


def test_train_and_cluster_end_to_end(tiny_roberta, tmp_path):
    pytest.importorskip("sklearn")
    import adapters
    import balora
    from model import DebertaClassifier
    from sklearn.metrics import silhouette_score

    out = tmp_path / "out"
    results = train_nlu.main(["--model", tiny_roberta["model"], "--task", "nli", "--data", tiny_roberta["train"],
                              "--validation-file", tiny_roberta["validation"], "--out", str(out), "--batch-size", "16",
                              "--max-steps", "4", "--max-length", str(MAX_LENGTH), "--no-progress"])
    assert results["steps"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "paper" and config["settings"]["warmup_ratio"] == 0.06
    assert config["settings"]["targets"] == "query_proj,value_proj" and config["settings"]["alpha"] == 8
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [record for record in log if "validation" not in record]
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(r["total"])) for r in steps)
    assert all(r["consistency"] >= 0 and "diversity" in r and "svd" in r for r in steps)  # BA-LoRA's terms, the teacher's too
    # 6% warm-up of 4 steps is int(0.24) = 0 steps: the linear decay from the peak lr 5e-4 (MNLI's row)
    assert steps[0]["lr"] == pytest.approx(5e-4)

    # LoRA sits on query and value only (2 per layer), and the adapter reloads onto the checkpoint
    adapted = adapters.load_adapter(DebertaClassifier.from_pretrained(tiny_roberta["model"], num_labels=3), str(out / "adapter"))
    lora_layers = [name for name, module in adapted.named_modules() if isinstance(module, balora.LoRALinear)]
    assert len(lora_layers) == 4 and all(name.endswith(("query_proj", "value_proj")) for name in lora_layers)

    metrics = evaluation.main(["cluster", "--model", tiny_roberta["model"], "--adapter", str(out / "adapter"),
                               "--task", "nli", "--data", tiny_roberta["validation"], "--batch-size", "8",
                               "--plot", str(tmp_path / "cluster.png"), "--out", str(tmp_path / "cluster.json")])
    assert metrics["max_length"] == MAX_LENGTH and metrics["plot"].endswith("(t-SNE)")
    assert (tmp_path / "cluster.png").stat().st_size > 0
    # Table 12's silhouettes are cosine ones in logit space: scikit-learn's on the same logits agrees
    adapted = evaluation.apply_adapter(DebertaClassifier.from_pretrained(tiny_roberta["model"], num_labels=3),
                                       str(out / "adapter"))
    args = evaluation.parse_args(["cluster", "--model", tiny_roberta["model"], "--task", "nli", "--data",
                                  tiny_roberta["validation"], "--max-length", str(MAX_LENGTH)])
    logits, _, labels = evaluation.classifier_outputs(adapted, data.RobertaTokenizer(tiny_roberta["model"]),
                                                      glue.TASKS["nli"], args)
    assert metrics["global_silhouette"] == pytest.approx(silhouette_score(logits.double().numpy(), labels.numpy(), metric="cosine"),
                                                         abs=1e-5)


def test_peft_export_loads_onto_transformers_roberta(tiny_roberta, tmp_path):
    """<out>/peft_adapter in transformers' RoBERTa names: AutoPeftModelForSequenceClassification gives our logits."""
    peft = pytest.importorskip("peft")
    import adapters
    from model import DebertaClassifier

    out = tmp_path / "out"
    train_nlu.main(["--model", tiny_roberta["model"], "--task", "nli", "--data", tiny_roberta["train"],
                    "--validation-file", tiny_roberta["validation"], "--out", str(out), "--batch-size", "16",
                    "--max-steps", "2", "--max-length", str(MAX_LENGTH), "--lr", "5e-2", "--no-progress"])
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert all(name.startswith("roberta.encoder.layer.") and name.endswith(("query", "value"))
               for name in config["target_modules"])
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out / "peft_adapter"), num_labels=3).eval()
    ours = adapters.load_adapter(DebertaClassifier.from_pretrained(tiny_roberta["model"], num_labels=3),
                               str(out / "adapter")).eval()
    rows = [json.loads(line) for line in open(tiny_roberta["validation"])][:6]
    input_ids, attention_mask = data.RobertaTokenizer(tiny_roberta["model"]).encode_batch(
        [row["premise"] for row in rows], [row["hypothesis"] for row in rows], max_length=MAX_LENGTH)
    with torch.no_grad():
        expected = ours(input_ids, attention_mask)
        logits = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        untrained = DebertaClassifier.from_pretrained(tiny_roberta["model"], num_labels=3)(input_ids, attention_mask)
    assert (expected - untrained).abs().max() > 1e-3  # the adapter and head moved: the comparison is not vacuous
    assert (logits - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


def test_tsne_uses_appendix_b3_settings(monkeypatch):
    """B.3: t-SNE with perplexity 30, 1000 iterations, seed 42 (on N > 91 points, where perplexity 30 is allowed)."""
    sklearn_manifold = pytest.importorskip("sklearn.manifold")
    seen = {}

    class RecordingTSNE:
        def __init__(self, n_components, **kwargs):
            seen.update(kwargs, n_components=n_components)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setattr(sklearn_manifold, "TSNE", RecordingTSNE)
    points, method = evaluation.project_2d(torch.randn(100, 5))
    assert method == "t-SNE" and points.shape == (100, 2)
    assert (seen["n_components"], seen["perplexity"], seen["max_iter"], seen["random_state"]) == (2, 30.0, 1000, 42)
