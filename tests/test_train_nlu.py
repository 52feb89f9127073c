"""
train_nlu.py: GLUE metrics against hand-computed values, the imbalanced sampler, data checks, the
teacher of B.3 (pretrained encoder + CURRENT head), DDP equivalence, and the offline default run.
"""

import json
import math
import os
import random

import pytest
import torch

import glue
import train_nlu
import training

# -----------------------------------------------------------------------------
# metrics, hand-computed

# predictions / labels of six examples:
#   p: 1 1 0 0 1 0
#   y: 1 0 0 0 1 1
# TP = 2 (rows 0, 4), FP = 1 (row 1), TN = 2 (rows 2, 3), FN = 1 (row 5)
BINARY_PREDICTIONS = [1, 1, 0, 0, 1, 0]
BINARY_LABELS = [1, 0, 0, 0, 1, 1]


def test_accuracy_by_hand():
    # 4 of 6 agree (rows 0, 2, 3, 4)
    assert glue.accuracy(BINARY_PREDICTIONS, BINARY_LABELS) == pytest.approx(4 / 6, abs=1e-12)


def test_f1_binary_by_hand():
    # 2·TP / (2·TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert glue.f1_binary(BINARY_PREDICTIONS, BINARY_LABELS) == pytest.approx(2 / 3, abs=1e-12)
    # no positive prediction at all: F1 = 0
    assert glue.f1_binary([0, 0, 0], [1, 0, 1]) == 0.0


def test_matthews_by_hand():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / sqrt(3·3·3·3) = 3/9 = 1/3
    assert glue.matthews_corrcoef(BINARY_PREDICTIONS, BINARY_LABELS) == pytest.approx(1 / 3, abs=1e-12)
    # perfect / inverted / constant predictions: 1, −1, and 0 by convention
    assert glue.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert glue.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert glue.matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0


def test_pearson_by_hand():
    # x = 1 2 3 4 (mean 2.5, deviations −1.5 −.5 .5 1.5), y = 2 4 5 9 (mean 5, deviations −3 −1 0 4)
    # Σdxdy = 4.5 + .5 + 0 + 6 = 11, Σdx² = 5, Σdy² = 26  ->  r = 11 / sqrt(130)
    assert glue.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    assert math.isnan(glue.pearson([3, 3, 3], [1, 2, 3]))  # undefined for a constant side


def test_spearman_with_ties_by_hand():
    # x = 1 2 2 3: the tied 2s span ranks 2 and 3, so both get 2.5 -> ranks 1 2.5 2.5 4
    # y = 1 3 2 4 -> ranks 1 3 2 4
    # deviations from the mean rank 2.5: x −1.5 0 0 1.5, y −1.5 .5 −.5 1.5
    # Σdxdy = 2.25 + 0 + 0 + 2.25 = 4.5, Σdx² = 4.5, Σdy² = 5  ->  ρ = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    # (ordinal ranks 1 2 3 4 for x would give 4 / 5 = 0.8 instead)
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # ties on both sides: x = 5 5 1 (ranks 2.5 2.5 1), y = 0 0 7 (ranks 1.5 1.5 3): perfectly anti-ordered
    assert glue.spearman([5, 5, 1], [0, 0, 7]) == pytest.approx(-1.0, abs=1e-12)


def test_metrics_against_reference_libraries():
    scipy_stats = pytest.importorskip("scipy.stats")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=generator).double()  # many ties
    y = x + torch.randint(0, 4, (200,), generator=generator).double()
    assert glue.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert glue.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    predictions = torch.randint(0, 3, (300,), generator=generator)
    labels = torch.where(torch.rand(300, generator=generator) < 0.6, predictions, torch.randint(0, 3, (300,), generator=generator))
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    binary_predictions, binary_labels = predictions.clamp(max=1), labels.clamp(max=1)
    assert glue.f1_binary(binary_predictions, binary_labels) == pytest.approx(sklearn_metrics.f1_score(binary_labels, binary_predictions), abs=1e-12)


def test_majority_baseline():
    task = glue.TASKS["nli"]
    train_labels = torch.tensor([2, 2, 2, 0, 1])  # class 2 is the majority
    assert glue.majority_baseline(task, train_labels, torch.tensor([2, 0, 1, 2])) == {"accuracy": 0.5}


# -----------------------------------------------------------------------------
# imbalanced sampler (B.3)


def test_imbalance_keeps_exact_ratios():
    labels = torch.arange(3).repeat(1000)  # 1000 per class, interleaved
    indices = glue.imbalance_indices(labels, (100, 10, 1), seed=42)
    kept = labels[indices]
    assert torch.bincount(kept, minlength=3).tolist() == [1000, 100, 10]
    assert len(set(indices)) == len(indices)  # no duplicates
    assert indices == glue.imbalance_indices(labels, (100, 10, 1), seed=42)  # deterministic
    assert indices != glue.imbalance_indices(labels, (100, 10, 1), seed=43)
    assert kept[:20].tolist() != sorted(kept[:20].tolist()) or kept[-20:].tolist() != sorted(kept[-20:].tolist())  # shuffled
    # unequal class sizes: ratios apply to each class's own count, in label order
    labels = torch.tensor([0] * 500 + [1] * 200 + [2] * 300)
    assert torch.bincount(labels[glue.imbalance_indices(labels, (1, 0.5, 0.1), seed=0)]).tolist() == [500, 100, 30]


def test_imbalance_rejects_wrong_number_of_ratios():
    with pytest.raises(ValueError, match="--imbalance"):
        glue.imbalance_indices(torch.tensor([0, 1, 2]), (100, 10), seed=0)


# -----------------------------------------------------------------------------
# data checks


class WordTokenizer:
    """Stand-in with the DebertaTokenizer.encode signature: [CLS]=1 a [SEP]=2 (b [SEP]), words hashed to 4..99."""

    def encode(self, text_a, text_b=None, max_length=128):
        ids = [1] + [4 + hash(w) % 96 for w in text_a.split()] + [2]
        if text_b is not None:
            ids += [4 + hash(w) % 96 for w in text_b.split()] + [2]
        return ids[:max_length]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_encode_split_names_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"premise": "a b", "label": 0}])
    dataset = glue.load_split("nli", "train", path)
    with pytest.raises(ValueError, match="hypothesis"):
        glue.encode_split(dataset, "nli", WordTokenizer(), 32, path)


def test_encode_split_names_label_outside_head(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": label} for label in (0, 1, 3)])
    dataset = glue.load_split("nli", "train", path)
    with pytest.raises(ValueError, match=r"'label' has 3 at row 2.*0\.\.2"):
        glue.encode_split(dataset, "nli", WordTokenizer(), 32, path)


def test_encode_split_and_collate(tmp_path):
    rows = [{"premise": "a b c", "hypothesis": "d", "label": 2}, {"premise": "e", "hypothesis": "f g", "label": 0}]
    dataset = glue.load_split("nli", "train", write_jsonl(tmp_path / "train.jsonl", rows))
    input_ids, labels = glue.encode_split(dataset, "nli", WordTokenizer(), 32, "train")
    assert labels.tolist() == [2, 0] and [len(ids) for ids in input_ids] == [7, 6]
    batch_ids, attention_mask, batch_labels = glue.collate(input_ids, labels, [1, 0], pad_id=0)
    assert batch_ids.shape == (2, 7) and batch_ids[0, 6] == 0 and attention_mask.sum(1).tolist() == [6, 7]
    assert batch_labels.tolist() == [0, 2]


def test_unknown_task_is_named(capsys):
    with pytest.raises(SystemExit):
        train_nlu.parse_args(["--task", "squad"])
    assert "invalid choice: 'squad'" in capsys.readouterr().err


def test_flag_errors_are_named():
    with pytest.raises(ValueError, match="--imbalance"):
        train_nlu.parse_args(["--imbalance", "100:ten:1"])
    with pytest.raises(ValueError, match="--imbalance needs classes"):
        train_nlu.parse_args(["--task", "stsb", "--imbalance", "1:1"])
    with pytest.raises(ValueError, match="validation_matched"):  # MNLI has two validation splits
        train_nlu.parse_args(["--task", "mnli", "--validation-file", "only_one.jsonl"])


def test_table8_defaults_and_offline_block():
    args, _ = train_nlu.parse_args(["--model", "some/dir", "--task", "qnli"])
    assert (args.epochs, args.batch_size, args.lr, args.alpha, args.rank) == (10, 32, 1e-4, 16, 8)
    args, _ = train_nlu.parse_args(["--model", "some/dir", "--task", "stsb", "--lr", "1e-3"])
    assert (args.epochs, args.batch_size, args.lr, args.alpha) == (20, 8, 1e-3, 8)
    args, _ = train_nlu.parse_args([])
    assert args.model.endswith(os.path.join("assets", "tiny-deberta")) and args.task == "nli"
    assert args.data.endswith("nli_train.jsonl") and args.validation_file[0].endswith("nli_validation.jsonl")
    assert (args.lambda1, args.lambda2, args.lambda3, args.svd_k, args.temperature) == (0.15, 0.03, 0.03, 5, 2.0)


# -----------------------------------------------------------------------------
# a tiny random DeBERTa-v3 checkpoint + spm with DeBERTa-v3's special ids, and toy NLI files

WORDS = ["cat", "dog", "bird", "red", "blue", "green", "big", "small", "runs", "sleeps", "eats", "sings"]


def toy_nli_rows(count, seed):
    """premise 'the <color> <animal> <verb>'; the hypothesis repeats it (0), changes the verb (1) or the animal (2)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        color, animal, verb = rng.choice(WORDS[3:6]), rng.choice(WORDS[:3]), rng.choice(WORDS[8:])
        label = rng.randrange(3)
        other_verb = rng.choice([w for w in WORDS[8:] if w != verb])
        other_animal = rng.choice([w for w in WORDS[:3] if w != animal])
        hypothesis = [f"the {animal} {verb}", f"the {animal} {other_verb}", f"the {other_animal} {verb}"][label]
        rows.append({"premise": f"the {color} {animal} {verb}", "hypothesis": hypothesis, "label": label})
    return rows


def tiny_deberta_config(vocab_size):
    return {
        "model_type": "deberta-v2", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
        "relative_attention": True, "share_att_key": True, "norm_rel_ebd": "layer_norm",
        "position_biased_input": False, "pos_att_type": ["p2c", "c2p"], "position_buckets": 16,
        "max_relative_positions": 64, "type_vocab_size": 0, "layer_norm_eps": 1e-7,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """dir with config.json + model.safetensors (bare `deberta.` encoder, random) + spm.model; toy train/validation jsonl."""
    import sentencepiece
    from safetensors.torch import save_file

    import model

    root = tmp_path_factory.mktemp("tiny_nlu")
    model_dir = root / "model"
    model_dir.mkdir()
    rows = toy_nli_rows(64, seed=0)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([row["premise"] for row in rows] + [row["hypothesis"] for row in rows]),
        model_prefix=str(model_dir / "spm"), vocab_size=40, hard_vocab_limit=False, model_type="word", pad_id=0, pad_piece="[PAD]",
        bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", minloglevel=2,
    )
    config = tiny_deberta_config(vocab_size=40)
    (model_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    encoder = model.DebertaClassifier(model.DebertaConfig.from_hf(config), num_labels=3)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if k.startswith("deberta.")}
    save_file(state, str(model_dir / "model.safetensors"))
    train_file = write_jsonl(root / "train.jsonl", rows)
    validation_file = write_jsonl(root / "validation.jsonl", toy_nli_rows(24, seed=1))
    return {"model": str(model_dir), "train": train_file, "validation": validation_file, "root": root}


def tiny_flags(tiny, out, *extra):
    return ["--model", tiny["model"], "--task", "nli", "--data", tiny["train"], "--validation-file", tiny["validation"],
            "--out", str(out), "--max-length", "16", "--lr", "5e-3", "--no-progress", *extra]


def test_report_to_tensorboard_logs_training_and_validation_numbers(tiny, tmp_path, tensorboard_scalars, check_curves):
    pytest.importorskip("tensorboard")
    train_nlu.main(tiny_flags(tiny, tmp_path, "--batch-size", "8", "--max-steps", "4", "--eval-every", "2",
                              "--report-to", "tensorboard"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    training = [r for r in log if "validation" not in r]
    assert {"task", "consistency", "diversity", "svd", "total", "lr", "lambda1", "lambda2", "lambda3"} <= set(scalars)
    for tag in ("task", "total", "svd", "lambda1"):
        assert scalars[tag] == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in training], tag
    accuracy = [(r["step"], pytest.approx(r["validation"]["validation"]["accuracy"], rel=1e-6))
                for r in log if "validation" in r]
    assert len(accuracy) == 2 and scalars["validation/validation/accuracy"] == accuracy
    check_curves(tmp_path, log)


def test_rank_larger_than_a_layer_is_named(tiny, tmp_path):
    layer = r"'deberta\.encoder\.layer\.0\.attention\.self\.query_proj' \(32 x 32\)"
    with pytest.raises(ValueError, match=r"rank r=40 \(--rank\) exceeds the dimensions of " + layer):
        train_nlu.main(tiny_flags(tiny, tmp_path / "out", "--rank", "40"))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the teacher of B.3: pretrained encoder + the CURRENT shared head


def test_teacher_is_pretrained_encoder_with_current_head(tiny):
    import balora
    import model
    from data import DebertaTokenizer

    tokenizer = DebertaTokenizer(tiny["model"])
    rows = toy_nli_rows(8, seed=3)
    input_ids, attention_mask = tokenizer.encode_batch([r["premise"] for r in rows], [r["hypothesis"] for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    task = glue.TASKS["nli"]

    student_model = model.DebertaClassifier.from_pretrained(tiny["model"], num_labels=3, seed=7)
    initial_head = {k: v.clone() for k, v in student_model.state_dict().items() if k.startswith(("pooler.", "classifier."))}
    balora.add_lora(student_model, train_nlu.TARGET_MODULES.split(","), r=4, alpha=8, init="pissa", trainable=("classifier", "pooler"))
    student_model.train()
    optimizer = torch.optim.AdamW([p for p in student_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two training steps through the real objective move the adapter AND the head
        student = student_model(input_ids, attention_mask=attention_mask)
        teacher = train_nlu.teacher_logits(student_model, input_ids, attention_mask)
        loss, _ = train_nlu.objective(task, student, teacher, labels, (0.15, 0.03, 0.03), 2.0, 2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    teacher = train_nlu.teacher_logits(student_model, input_ids, attention_mask)
    assert student_model.training  # the train/eval state is restored
    assert not teacher.requires_grad

    # reference: the untouched pretrained encoder with the head copied from the trained model
    reference_model = model.DebertaClassifier.from_pretrained(tiny["model"], num_labels=3, seed=7)
    current_head = {k: v for k, v in student_model.state_dict().items() if k.startswith(("pooler.", "classifier."))}
    assert set(current_head) == set(initial_head)
    assert any(not torch.equal(current_head[k], initial_head[k]) for k in initial_head)  # the head did train
    reference_model.load_state_dict(current_head, strict=False)
    with torch.no_grad():
        expected = reference_model.eval()(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-5)

    # and it is neither the student nor the pretrained model with its INITIAL head
    with torch.no_grad():
        student = student_model.eval()(input_ids, attention_mask=attention_mask)
        reference_model.load_state_dict(initial_head, strict=False)
        with_initial_head = reference_model(input_ids, attention_mask=attention_mask)
    assert (teacher - student).abs().max() > 1e-3
    assert (teacher - with_initial_head).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# end-to-end runs on the tiny random checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_huge_learning_rate_stops_before_the_svd_sees_a_non_finite_logit(tiny, tmp_path, non_finite_tensors):
    with pytest.raises(FloatingPointError, match=r"non-finite (student logits|loss|gradient norm).* at step \d+"):
        train_nlu.main(tiny_flags(tiny, tmp_path, "--lr", "1e6", "--batch-size", "8", "--max-steps", "8",
                                  "--save-every", "1", "--eval-every", "1", "--warmup-ratio", "0"))
    assert non_finite_tensors(tmp_path)[0] == []
    assert not (tmp_path / "adapter").exists()


def trainable_of(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)["trainable"]


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tiny, tmp_path):
    """2 gloo processes × 1 micro-batch of 4 == 1 process × 2 accumulated micro-batches of 4 (adapter and head)."""
    import subprocess
    import sys

    flags = ["--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3", "--eval-every", "2"]
    train_nlu.main(tiny_flags(tiny, tmp_path / "one", *flags))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_nlu.py", *tiny_flags(tiny, tmp_path / "two", *flags)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 process(es) × 1 micro-batches of 4)" in result.stdout
    one, two = trainable_of(tmp_path / "one"), trainable_of(tmp_path / "two")
    assert set(one) == set(two) and any(".lora_A" in k for k in one) and "classifier.weight" in one and "pooler.dense.weight" in one
    initial = train_nlu.DebertaClassifier.from_pretrained(tiny["model"], num_labels=3, seed=42).state_dict()
    assert (one["classifier.weight"] - initial["classifier.weight"]).abs().max() > 1e-4  # it trained
    max_difference = max((one[name] - two[name]).abs().max().item() for name in one)
    assert max_difference <= 1e-5, max_difference


@pytest.mark.slow
@pytest.mark.parametrize("method", ["balora", "adalora"])  # AdaLoRA: its rank allocator's state is restored too
def test_resume_continues_exactly(tiny, tmp_path, monkeypatch, method):
    """A run stopped after its step-2 checkpoint and resumed ends where the uninterrupted run ends."""
    flags = ["--method", method, "--batch-size", "8", "--max-steps", "4", "--save-every", "2", "--eval-every", "2",
             "--dropout", "0.1"]
    straight = tmp_path / "straight"
    train_nlu.main(tiny_flags(tiny, straight, *flags))

    interrupted = tmp_path / "interrupted"
    check_finite = training.check_finite

    def crash_in_step_3(value, step, *args):  # after the step-2 checkpoint, before step 3's update
        if step == 3:
            raise KeyboardInterrupt
        check_finite(value, step, *args)

    monkeypatch.setattr(training, "check_finite", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_nlu.main(tiny_flags(tiny, interrupted, *flags))
    monkeypatch.setattr(training, "check_finite", check_finite)
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint.pt was written with other flags \(--lr 0.005 -> 0.5\)"):
        train_nlu.main(tiny_flags(tiny, interrupted, *flags, "--resume", "--lr", "0.5"))
    # --save-every only says when to write checkpoints: changing it continues the same run
    results = train_nlu.main(tiny_flags(tiny, interrupted, *flags, "--resume", "--save-every", "1"))
    assert results["steps"] == 4
    a, b = trainable_of(straight), trainable_of(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)  # bit-identical


def test_regression_objective_degenerate_terms():
    """STS-B (D = 1): consistency is ½·mean((z_F − z_P)²); diversity and SVD are not computed."""
    task = glue.TASKS["stsb"]
    student = torch.tensor([[1.0], [2.0], [0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0], [2.0], [1.5]])
    labels = torch.tensor([1.0, 1.0, 1.0])
    total, components = train_nlu.objective(task, student, teacher, labels, (0.15, 0.03, 0.03), 2.0, 5)
    # task: mean((0, 1, −.5)²) = 1.25/3; consistency: ½·mean((1, 0, −1)²) = 1/3
    assert components["task"].item() == pytest.approx(1.25 / 3)
    assert components["consistency"].item() == pytest.approx(1 / 3)
    assert set(components) == {"task", "consistency"}
    assert total.item() == pytest.approx(1.25 / 3 + 0.15 / 3)


@pytest.mark.slow
def test_regression_task_runs(tiny, tmp_path):
    """STS-B shape end to end: float labels, one logit, MSE + the Gaussian consistency term, Pearson/Spearman."""
    rng = random.Random(0)
    rows = [{"sentence1": f"the {rng.choice(WORDS[:3])} runs", "sentence2": f"the {rng.choice(WORDS[:3])} runs",
             "label": round(rng.uniform(0, 5), 2)} for _ in range(24)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    validation_file = write_jsonl(tmp_path / "validation.jsonl", rows[16:])
    results = train_nlu.main(["--model", tiny["model"], "--task", "stsb", "--data", train_file, "--validation-file", validation_file,
                              "--out", str(tmp_path / "out"), "--max-length", "16", "--max-steps", "2", "--no-progress"])
    assert set(results["best"]["validation"]) == {"pearson", "spearman"}
    assert math.isfinite(results["best"]["validation"]["pearson"])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert "consistency" in log[0] and "diversity" not in log[0] and "svd" not in log[0]


ASSET_MODEL = os.path.join(REPO, "assets", "tiny-deberta")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(ASSET_MODEL), reason="assets/tiny-deberta is missing (build it with tools/make_assets.py)")
def test_default_run_beats_majority_baseline(tmp_path, check_curves):
    """`python train_nlu.py` (the offline default block) on the bundled pretrained tiny encoder and toy NLI task."""
    # the default's first epoch, 46 of its 92 steps (the linear schedule then decays over those 46)
    results = train_nlu.main(["--out", str(tmp_path), "--no-progress", "--max-steps", "46"])
    accuracy, baseline = results["best"]["validation"]["accuracy"], results["baseline"]["accuracy"]
    assert accuracy > baseline + 0.05, (accuracy, baseline)
    assert os.path.isfile(tmp_path / "adapter" / "balora_adapter.safetensors")
    assert os.path.isfile(tmp_path / "peft_adapter" / "adapter_model.safetensors")

    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    drawn = check_curves(tmp_path, log)
    validation = [(float(r["step"]), r["validation"]["validation"]["accuracy"]) for r in log if "validation" in r]
    assert len(validation) == 1 and list(zip(*drawn["validation validation accuracy"]["validation accuracy"])) == validation

    # config.json: the toy preset with the three flags given, and every setting
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preset"] == "toy" and config["changed"] == {"out": str(tmp_path), "no_progress": True, "max_steps": 46}
    expected = {key: training.normalized(value) for key, value in train_nlu.parse_args([])[1].items()}
    expected.update(config["changed"], preset="toy")
    assert config["settings"] == expected
    assert config["derived"]["total_steps"] == 46 and config["derived"]["train_examples"] == 3000

def test_peft_export_loads_with_auto_peft_model_for_sequence_classification(tiny, tmp_path):
    """<out>/peft_adapter names its task (SEQ_CLS): AutoPeftModelForSequenceClassification builds the
    base encoder + LoRA + our pooler and classifier (modules_to_save) and gives our logits."""
    peft = pytest.importorskip("peft")
    import adapters
    import model
    from data import DebertaTokenizer

    train_nlu.main(tiny_flags(tiny, tmp_path / "out", "--max-steps", "2"))
    config = json.loads((tmp_path / "out" / "peft_adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and type(config["lora_alpha"]) is int
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out" / "peft_adapter"), num_labels=3).eval()  # the label count is the base config's to give
    ours = adapters.load_adapter(model.DebertaClassifier.from_pretrained(tiny["model"], num_labels=3),
                               str(tmp_path / "out" / "adapter")).eval()
    rows = [json.loads(line) for line in open(tiny["validation"])][:4]
    input_ids, attention_mask = DebertaTokenizer(tiny["model"]).encode_batch(
        [row["premise"] for row in rows], [row["hypothesis"] for row in rows], max_length=16)
    with torch.no_grad():
        expected = ours(input_ids, attention_mask)
        logits = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (logits - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
