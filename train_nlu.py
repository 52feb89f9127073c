"""
BA-LoRA fine-tuning of a DeBERTa-v3 or RoBERTa encoder on GLUE (Section 2.2.1, Section 3.1, Appendix B.3-B.4).

    python train_nlu.py                                  # toy preset: bundled tiny encoder, toy 3-class NLI task
    OMP_NUM_THREADS=1 python train_nlu.py                # the same on a busy CPU (tiny ops: threads only spin)
    python train_nlu.py --model path/to/deberta-v3-base --task rte   # paper preset: Table 8's RTE row, GLUE from the hub
    python train_nlu.py --model ... --task mnli --imbalance 100:10:1     # the imbalanced MNLI of B.3
    python train_nlu.py --model path/to/roberta-base --task mnli --imbalance 100:10:1 --epochs 3   # Fig. 3 / Table 12
    torchrun --nproc_per_node 2 train_nlu.py --model ... --task sst2

Settings come from the toy preset (no --model) or the paper preset (--model given; MNLI unless --task
says otherwise), as in train_nlg.py: --help shows both, a run prints what differs and saves every value
to <out>/config.json. The paper preset is Table 8's for a DeBERTa-v3 --model, Table 9's for a RoBERTa
one (its config.json's model_type decides).

One optimizer step: student logits (LoRA-adapted encoder + classification head) -> teacher logits
(the same inputs through the pretrained encoder and the same, current head, B.3) -> Eq. 8 ->
backward -> AdamW -> linear learning-rate decay. Evaluation every epoch keeps the best adapter.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import balora
import plot
from data import DebertaTokenizer, RobertaTokenizer, load_hub_dataset
from model import DebertaClassifier, read_config, roberta_hf_key
from train_nlg import append_jsonl, atomic_torch_save, autocast_context, check_finite, cleanup_distributed
from train_nlg import DORA_METHODS, METHODS, QUANTIZE_HELP, exit_torchrun_worker, load_checkpoint, lr_schedule_with_warmup
from train_nlg import save_checkpoint
from train_nlg import check_resume_config, remove_stale_temp_files, rewind_log, run_config, setup_distributed
from train_nlg import Reporter, add_deprecated_aliases, check_report_to, deprecated_epilog, preset_flag, resolve_settings
from train_nlg import settings_block, settings_record, shown, write_config

# -----------------------------------------------------------------------------
# GLUE tasks. Hyperparameters are Table 8 (DeBERTa-v3-base, aligned with the PiSSA baseline):
# LoRA rank 8 everywhere, AdamW, linear schedule, no weight decay; every value is overridable.


@dataclass(frozen=True)
class Task:
    text_columns: tuple  # one column (single sentence) or two (sentence pair)
    num_labels: int  # D, the width of the logits; 1 = regression (STS-B)
    metrics: tuple  # names of the metric functions below; the first one picks the best checkpoint
    validation_splits: tuple
    epochs: int
    batch_size: int
    lr: float
    lora_alpha: float
    hub_config: str = None  # config of the "nyu-mll/glue" hub dataset; None: local files only


TASKS = {
    #            text columns                D  metrics                    validation splits                                ep  bs  lr    α   hub config
    "cola": Task(("sentence",),              2, ("matthews_corrcoef",),    ("validation",),                                 20, 16, 1e-4, 8,  "cola"),
    "sst2": Task(("sentence",),              2, ("accuracy",),             ("validation",),                                 20, 16, 3e-5, 8,  "sst2"),
    "mrpc": Task(("sentence1", "sentence2"), 2, ("accuracy", "f1_binary"), ("validation",),                                 20, 32, 2e-4, 8,  "mrpc"),
    "qqp":  Task(("question1", "question2"), 2, ("accuracy", "f1_binary"), ("validation",),                                 10, 16, 1e-4, 8,  "qqp"),
    "stsb": Task(("sentence1", "sentence2"), 1, ("pearson", "spearman"),   ("validation",),                                 20, 8,  3e-4, 8,  "stsb"),
    "mnli": Task(("premise", "hypothesis"),  3, ("accuracy",),             ("validation_matched", "validation_mismatched"), 5,  16, 5e-4, 8,  "mnli"),
    "qnli": Task(("question", "sentence"),   2, ("accuracy",),             ("validation",),                                 10, 32, 1e-4, 16, "qnli"),
    "rte":  Task(("sentence1", "sentence2"), 2, ("accuracy",),             ("validation",),                                 50, 16, 1e-4, 8,  "rte"),
    # The bundled toy task (assets/data/nli_*.jsonl): MNLI-shaped, so it takes MNLI's row of Table 8; local files only.
    "nli":  Task(("premise", "hypothesis"),  3, ("accuracy",),             ("validation",),                                 5,  16, 5e-4, 8),
}

# -----------------------------------------------------------------------------
# The toy preset (no --model): the bundled tiny encoder on the bundled toy task (--task nli, its
# default), sized to finish in well under 3 minutes on a 2-core CPU: 92 optimizer steps. A tiny
# model's step is all per-op overhead, so a few large batches beat many small ones (batch 64 x 92 steps
# reaches the validation accuracy of Table 8's batch 16 x 374 steps). Explicit flags win. These values
# replace the paper preset's (see presets()).
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOY_VALUES = dict(
    model=os.path.join(ASSETS, "tiny-deberta"),
    task="nli",
    epochs=2,  # validation accuracy plateaus after the first epoch
    batch_size=64,
    lr=1e-3,  # (with batch 16, 2e-3 collapsed the tiny model to a constant prediction)
    max_length=64,  # the toy pairs are at most 18 tokens
)

# PiSSA's DeBERTa GLUE setup adapts every linear layer of the encoder (all-linear minus the head):
# the attention projections, the attention output, and the two feed-forward layers.
TARGET_MODULES = "query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense"

# -----------------------------------------------------------------------------
# RoBERTa-base (Table 3, Fig. 3, Table 12): Table 9's per-task rows, and B.4's settings shared by all
# tasks: LoRA r = 8 and alpha = 8 on the query and value projections (HF's `query`, `value`, our
# query_proj / value_proj: model.ROBERTA_KEYS), AdamW, linear schedule after a 6% warm-up, 512 tokens.

ROBERTA_TABLE9 = {
    #       batch size  epochs  peak lr
    "mnli": (16,        30,     5e-4),
    "sst2": (16,        60,     5e-4),
    "mrpc": (16,        30,     4e-4),
    "cola": (32,        80,     4e-4),
    "qnli": (32,        25,     4e-4),
    "qqp":  (16,        25,     5e-4),
    "rte":  (32,        80,     4e-4),
    "stsb": (16,        40,     4e-4),
}
ROBERTA_TABLE9["nli"] = ROBERTA_TABLE9["mnli"]  # the toy task is MNLI-shaped, as with Table 8
ROBERTA_SETTINGS = dict(rank=8, alpha=8, targets="query_proj,value_proj", warmup_ratio=0.06, max_length=512)
TOKENIZERS = {"deberta-v2": DebertaTokenizer, "roberta": RobertaTokenizer}  # by config.json's model_type


def encoder_family(model_dir):
    """
    The model_type of --model's config.json ("roberta": Table 9's recipe), or "deberta-v2" without
    one (no --model: the toy encoder; a directory without config.json is named when it loads).
    """
    if model_dir is None or not os.path.isfile(os.path.join(model_dir, "config.json")):
        return "deberta-v2"
    return read_config(model_dir).get("model_type")

# -----------------------------------------------------------------------------
# GLUE metrics (plain functions of predictions and labels; eval.py imports them)


def _as_float64(values):
    return torch.as_tensor(values).detach().to(torch.float64).flatten()


def accuracy(predictions, labels):
    """Fraction of exact matches."""
    predictions, labels = _as_float64(predictions), _as_float64(labels)
    return (predictions == labels).to(torch.float64).mean().item()


def f1_binary(predictions, labels):
    """F1 of the positive class 1 (MRPC, QQP): 2·TP / (2·TP + FP + FN); 0 when there is no true positive."""
    predictions, labels = _as_float64(predictions) == 1, _as_float64(labels) == 1
    true_positives = (predictions & labels).sum().item()
    false_positives = (predictions & ~labels).sum().item()
    false_negatives = (~predictions & labels).sum().item()
    if true_positives == 0:
        return 0.0
    return 2 * true_positives / (2 * true_positives + false_positives + false_negatives)


def matthews_corrcoef(predictions, labels):
    """
    Matthews correlation (CoLA). Binary: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); written
    in its K-class form (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)) with c correct, s
    samples, p_k / t_k predicted / true counts of class k. 0 when a marginal is constant (no signal).
    """
    predictions, labels = _as_float64(predictions), _as_float64(labels)
    classes = torch.unique(torch.cat([predictions, labels]))
    predicted_counts = (predictions[:, None] == classes).sum(0).to(torch.float64)
    true_counts = (labels[:, None] == classes).sum(0).to(torch.float64)
    correct = (predictions == labels).sum().to(torch.float64)
    samples = float(len(labels))
    numerator = correct * samples - (predicted_counts * true_counts).sum()
    denominator = ((samples**2 - (predicted_counts**2).sum()) * (samples**2 - (true_counts**2).sum())).sqrt()
    return 0.0 if denominator == 0 else (numerator / denominator).item()


def pearson(predictions, labels):
    """Pearson correlation (STS-B): Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²); nan when either side is constant."""
    x, y = _as_float64(predictions), _as_float64(labels)
    x, y = x - x.mean(), y - y.mean()
    denominator = ((x * x).sum() * (y * y).sum()).sqrt()
    return float("nan") if denominator == 0 else ((x * y).sum() / denominator).item()


def _average_ranks(values):
    """1-based ranks; tied values share the mean of the ranks they span (ranks 2,3,4 tied -> 3 each)."""
    order = torch.argsort(values, stable=True)
    _, group, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # rank of the last member of each tie group
    first = last - counts + 1
    ranks = torch.empty_like(values)
    ranks[order] = ((first + last) / 2)[group]
    return ranks


def spearman(predictions, labels):
    """Spearman correlation (STS-B): Pearson correlation of the average ranks."""
    return pearson(_average_ranks(_as_float64(predictions)), _average_ranks(_as_float64(labels)))


def compute_metrics(task, logits, labels):
    """{metric name: value} of the task's metrics on (N, D) logits; argmax picks the class, D = 1 is the score."""
    predictions = logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)
    return {name: globals()[name](predictions, labels) for name in task.metrics}


def majority_baseline(task, train_labels, labels):
    """The task's metrics when every example gets the most frequent training class (the training mean for D = 1)."""
    if task.num_labels == 1:
        constant = train_labels.to(torch.float64).mean()
    else:
        constant = torch.bincount(train_labels, minlength=task.num_labels).argmax()
    predictions = constant.expand(len(labels))
    return {name: globals()[name](predictions, labels) for name in task.metrics}


# -----------------------------------------------------------------------------
# Data


def imbalance_indices(labels, ratios, seed):
    """
    Indices of the imbalanced subset of B.3: class c (in label order) keeps ratios[c] / max(ratios) of
    its examples, drawn at random (100:10:1 keeps 100% / 10% / 1%); the kept examples are then
    shuffled together. Deterministic given `seed`.
    """
    labels = torch.as_tensor(labels)
    if len(ratios) <= labels.max().item():
        raise ValueError(f"--imbalance has {len(ratios)} ratios but the labels go up to {labels.max().item()}: "
                         "give one ratio per class")
    if min(ratios) < 0 or max(ratios) <= 0:
        raise ValueError(f"--imbalance ratios must be non-negative with a positive maximum, got {ratios}")
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for label, ratio in enumerate(ratios):
        members = (labels == label).nonzero().flatten()
        count = round(len(members) * ratio / max(ratios))
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    kept = torch.cat(kept)
    return kept[torch.randperm(len(kept), generator=generator)].tolist()


def load_split(task_name, split, data_file, local_flag="--data / --validation-file FILE"):
    """A `datasets.Dataset`: a local .json/.jsonl/.parquet/.csv file, or the split of the GLUE task on the
    hub (offline, an error naming `local_flag`, the flag that takes a file instead)."""
    import datasets

    task = TASKS[task_name]
    if data_file is None:
        if task.hub_config is None:
            raise ValueError(f"task {task_name!r} is not on the hub: give --data and --validation-file")
        return load_hub_dataset("nyu-mll/glue", task.hub_config, split, local_flag)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    extension = os.path.splitext(data_file)[1].lower()
    if extension not in builders:
        raise ValueError(f"data file {data_file!r}: unsupported extension {extension!r}, expected one of {sorted(builders)}")
    if not os.path.isfile(data_file):
        raise FileNotFoundError(f"data file {data_file!r} does not exist")
    with open(data_file, "rb") as f:
        if not f.read(1 << 16).strip():
            raise ValueError(f"data file {data_file}: no examples (the file is empty)")
    return datasets.load_dataset(builders[extension], data_files=data_file, split="train")


def encode_split(dataset, task_name, tokenizer, max_length, where):
    """Token ids (a list of lists, [CLS] a [SEP] (b [SEP])) and the label tensor of one split; checks columns and labels."""
    task = TASKS[task_name]
    needed = task.text_columns + ("label",)
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; task {task_name!r} needs {list(needed)}, "
                         f"the data has {dataset.column_names}")
    texts = [dataset[column] for column in task.text_columns]
    for column, values in zip(task.text_columns, texts):
        row = next((row for row, text in enumerate(values) if not isinstance(text, str)), None)
        if row is not None:
            raise ValueError(f"{where}: column {column!r} has {values[row]!r} at row {row}, expected a string")
    input_ids = [tokenizer.encode(*pair, max_length=max_length) for pair in zip(*texts)]
    return input_ids, label_tensor(dataset["label"], task, task_name, where)


def label_tensor(values, task, task_name, where):
    """
    The labels of a split: integers 0..D-1 for classification (1.0 counts as 1, 1.5 is refused rather
    than truncated), finite numbers for regression (STS-B); anything else is named with its row.
    """
    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if task.num_labels == 1:
        bad = next((row for row, value in enumerate(values) if not is_number(value)), None)
        expected = "a finite number (regression)"
    else:
        bad = next((row for row, value in enumerate(values)
                    if not (is_number(value) and float(value).is_integer() and 0 <= value < task.num_labels)), None)
        expected = f"an integer in the head's range 0..{task.num_labels - 1} of task {task_name!r}"
    if bad is not None:
        raise ValueError(f"{where}: column 'label' has {values[bad]!r} at row {bad}, expected {expected}")
    return torch.tensor(values, dtype=torch.float32 if task.num_labels == 1 else torch.long)


def collate(input_ids, labels, indices, pad_id):
    """Right-padded (B, T) input_ids and attention_mask of the examples `indices`, and their labels."""
    rows = [input_ids[i] for i in indices]
    length = max(len(row) for row in rows)
    batch_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        batch_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return batch_ids, attention_mask, labels[indices]


def micro_batch_indices(order, step, micro_step, batch_size, micro_batch_size, rank, world_size):
    """
    Deterministic sharding, as train_nlg.global_batch_indices: optimizer step `step` of the epoch takes
    the next `batch_size` examples of the epoch's `order`; rank r takes the r-th of `world_size` equal
    slices of it and walks it in micro-batches of `micro_batch_size`. One process with accumulation sees
    exactly the micro-batches that several processes see together, so both compute the same gradient.
    (The epoch's order is drawn once per epoch by the caller, not once per step.)
    """
    accumulation_steps = batch_size // (micro_batch_size * world_size)
    start = step * batch_size + (rank * accumulation_steps + micro_step) * micro_batch_size
    return order[start : start + micro_batch_size]


# -----------------------------------------------------------------------------
# Objective


def regression_objective(task_loss, student_logits, teacher_logits, lambda1):
    """
    Eq. 8 for STS-B (D = 1), where Eq. 4-7 degenerate: a softmax over one logit is constantly 1 (KL 0),
    the 1×1 covariance has no off-diagonal entry (Eq. 5 is 0) and top-1 over all singular values of an
    N×1 matrix is 1 (Eq. 7 is −1). Consistency becomes the KL between the unit-variance Gaussians
    centred on the teacher's and the student's score, ½·mean((z_F − z_P)²); diversity and SVD are
    left out (they would add constants with zero gradient).
    """
    total, components = task_loss, {"task": task_loss.detach()}
    if lambda1 > 0:
        consistency = 0.5 * (student_logits - teacher_logits).pow(2).mean()
        total = total + lambda1 * consistency
        components["consistency"] = consistency.detach()
    return total, components


def objective(task, student_logits, teacher_logits, labels, lambdas, temperature, svd_k):
    """Eq. 8: task loss (cross-entropy, MSE for regression) + λ1·L_CR + λ2·L_DR + λ3·L_SVDR on fp32 logits."""
    student_logits = student_logits.float()
    teacher_logits = None if teacher_logits is None else teacher_logits.float()
    if task.num_labels == 1:
        task_loss = F.mse_loss(student_logits[:, 0], labels)
        return regression_objective(task_loss, student_logits, teacher_logits, lambdas[0])
    task_loss = F.cross_entropy(student_logits, labels)
    return balora.nlu_objective(task_loss, student_logits, teacher_logits, lambdas, temperature, svd_k)


@torch.no_grad()
def teacher_logits(model, input_ids, attention_mask):
    """
    Z_P of Eq. 4 as B.3 defines it: the same inputs through the PRETRAINED encoder and the SHARED
    classification head as it is now. balora.pretrained_mode switches every LoRA layer back to its
    original weight and dropout off (a frozen teacher in eval mode); the pooler and classifier are
    plain trainable modules, which it leaves as trained so far.
    """
    with balora.pretrained_mode(model):
        return model(input_ids, attention_mask=attention_mask)


@torch.no_grad()
def evaluate(model, task, input_ids, labels, batch_size, device, dtype, pad_id):
    """The task's metrics on one validation split."""
    was_training = model.training
    model.eval()
    logits = []
    for start in range(0, len(input_ids), batch_size):
        indices = list(range(start, min(start + batch_size, len(input_ids))))
        batch_ids, attention_mask, _ = collate(input_ids, labels, indices, pad_id)
        with autocast_context(device, dtype):
            logits.append(model(batch_ids.to(device), attention_mask=attention_mask.to(device)).float().cpu())
    model.train(was_training)
    return compute_metrics(task, torch.cat(logits), labels)


def export_peft_adapter(model, out_dir, model_dir):
    """
    <out>/peft_adapter in peft's format (balora.export_peft) for AutoPeftModelForSequenceClassification.
    RoBERTa's modules carry DeBERTa's names, so its export takes transformers'
    RobertaForSequenceClassification names (model.ROBERTA_KEYS read backwards), and its head
    (classifier.dense + classifier.out_proj) is saved as the one module `classifier`, as peft does.
    """
    if model.config.model_type != "roberta":
        return balora.export_peft(model, out_dir, model_dir, task_type="SEQ_CLS")
    return balora.export_peft(model, out_dir, model_dir, task_type="SEQ_CLS", hf_name=roberta_hf_key,
                              modules_to_save=["classifier"])


# -----------------------------------------------------------------------------
# Flags

REGRESSION_NOTE = """\
STS-B (regression, one logit): the task loss is MSE; --lambda1 weighs the consistency term
½·mean((z_F − z_P)²), the KL between unit-variance Gaussians on the teacher's and student's scores
(softmax over one logit is constant, so Eq. 4 would be 0); --lambda2/--lambda3 are ignored, since
Eq. 5 (no off-diagonal covariance) and Eq. 7 (top-1/all singular values = 1) are constants for D = 1.
"""


def presets(task_name, family="deberta-v2"):
    """
    Every setting's default for --task `task_name`: {"toy": {...}, "paper": {...}}. The paper preset
    (--model given) is Sec. 3.1 with Table 8's row of the task (family "roberta": Table 9's row and
    B.4's RoBERTa settings), on the task's GLUE data from the hub (MNLI when no --task is given); the
    toy task nli is read from assets/data under either preset.
    """
    task = TASKS[task_name]
    local_task = task_name == "nli"  # the toy task: files only
    paper = dict(
        model=None, task="mnli",
        data=os.path.join(ASSETS, "data", "nli_train.jsonl") if local_task else None,
        validation_file=[os.path.join(ASSETS, "data", "nli_validation.jsonl")] if local_task else None,
        out=os.path.join("out", "nlu"), method="balora",
        # Table 8 (DeBERTa-v3-base): the task's row; rank 8 everywhere, linear schedule, no weight decay
        epochs=task.epochs, batch_size=task.batch_size, micro_batch_size=None, lr=task.lr, alpha=task.lora_alpha,
        rank=8, dropout=0.0, targets=TARGET_MODULES, quantize="none", warmup_ratio=0.0, grad_clip=1.0, max_length=256,
        # BA-LoRA (Sec. 3.1, NLU): lambda = (0.15, 0.03, 0.03), k = 5. The paper gives no NLU temperature and
        # the official code (llm172/BA-LoRA) only ships the NLG script, whose setting is --distill_temp 2.0
        # (also B.4); D.1 says T is fixed per backbone and reused across datasets, so 2.0 here too.
        lambda1=0.15, lambda2=0.03, lambda3=0.03, svd_k=5, temperature=2.0,
        lambda1_schedule="constant", focus_schedule="constant", imbalance=None,
        seed=42, eval_every=0, save_every=0, max_steps=0, resume=False, dtype="fp32", device=None,
        no_progress=False, report_to="none", dry_run=False,
    )
    if family == "roberta":
        batch_size, epochs, lr = ROBERTA_TABLE9[task_name]
        paper.update(batch_size=batch_size, epochs=epochs, lr=lr, **ROBERTA_SETTINGS)
    return {"toy": dict(paper, **TOY_VALUES), "paper": paper}


def paper_preset_as_help():
    """The paper preset as --help shows it: a value Table 8 sets per task is listed for every GLUE task."""
    per_task = {name: presets(name)["paper"] for name, task in TASKS.items() if task.hub_config}
    shown_values = {}
    for key, value in per_task["mnli"].items():
        if len({shown(preset[key]) for preset in per_task.values()}) == 1:
            shown_values[key] = value
        else:
            shown_values[key] = "Table 8 by --task: " + ", ".join(f"{name} {shown(p[key])}" for name, p in per_task.items())
    return shown_values


def imbalance_ratios(text, task_name):
    """--imbalance "100:10:1" -> (100.0, 10.0, 1.0); None -> None (balanced)."""
    if text is None:
        return None
    if TASKS[task_name].num_labels == 1:
        raise ValueError(f"--imbalance needs classes, task {task_name!r} is a regression")
    try:
        return tuple(float(ratio) for ratio in text.split(":"))
    except ValueError:
        raise ValueError(f"--imbalance {text!r}: expected ratios like 100:10:1") from None


ROBERTA_NOTE = (
    "a RoBERTa --model (config.json model_type roberta) takes Table 9's recipe instead of Table 8's:\n  every task: "
    + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in ROBERTA_SETTINGS.items())
    + "\n  per task, --batch-size --epochs --lr: "
    + ", ".join(f"{name} {bs} {ep} {lr:g}" for name, (bs, ep, lr) in ROBERTA_TABLE9.items() if name != "nli"))

NONE_MEANS = {"model": "your checkpoint", "data": "the task's train split from the hub (nyu-mll/glue)",
              "validation_file": "the task's validation split(s) from the hub", "micro_batch_size": "batch size / world size",
              "imbalance": "balanced", "device": "cuda when available"}
ALIASES = {"--lora-r": ("--rank", int), "--lora-alpha": ("--alpha", float), "--lora-dropout": ("--dropout", float),
           "--train-file": ("--data", str)}  # old name: (new flag, type)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="BA-LoRA fine-tuning of a DeBERTa-v3 or RoBERTa encoder on a GLUE task (Sec. 2.2.1, B.3, B.4).",
        epilog=REGRESSION_NOTE + "\n" + ROBERTA_NOTE + "\n\n" + deprecated_epilog(ALIASES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag = preset_flag(parser, presets("nli")["toy"], paper_preset_as_help(), NONE_MEANS)
    flag("--model", help="DeBERTa-v3 (config.json, weights, spm.model) or RoBERTa (config.json, weights, tokenizer.json "
                         "or vocab.json + merges.txt) model directory; giving one selects the paper preset")
    flag("--task", choices=sorted(TASKS), help="GLUE task, or nli: the bundled toy 3-class NLI task (local files only)")
    flag("--data", help="training file: .json/.jsonl/.parquet/.csv with the task's columns")
    flag("--validation-file", nargs="+", help="one file per validation split of the task (MNLI: matched, then mismatched)")
    flag("--out", help="output directory: log.jsonl, config.json, checkpoint.pt, best.pt, adapter/, peft_adapter/, curves.png")
    flag("--method", choices=list(METHODS), help="lora | pissa | balora (PiSSA + Reg) | lora+reg | dora | dora+reg (Table 10)")
    flag("--epochs", type=int, help="passes over the training set")
    flag("--batch-size", type=int, help="examples per optimizer step, over all processes")
    flag("--micro-batch-size", type=int, help="examples per forward on one process, the batch the regularizers see")
    flag("--lr", type=float, help="AdamW peak learning rate, no weight decay")
    flag("--rank", type=int, help="LoRA rank r")
    flag("--alpha", type=float, help="LoRA alpha (scale alpha / r)")
    flag("--dropout", type=float, help="LoRA dropout")
    flag("--targets", help="comma-separated module-name suffixes to adapt (every encoder linear: PiSSA's DeBERTa setup)")
    flag("--quantize", choices=list(balora.QUANTIZE), help=QUANTIZE_HELP)
    flag("--warmup-ratio", type=float, help="linear warm-up fraction of the steps before the linear decay")
    flag("--grad-clip", type=float, help="max gradient norm (0: off)")
    flag("--max-length", type=int, help="tokens per example")
    flag("--lambda1", type=float, help="consistency weight (Eq. 4)")
    flag("--lambda2", type=float, help="diversity weight (Eq. 5)")
    flag("--lambda3", type=float, help="SVD weight (Eq. 7)")
    flag("--svd-k", type=int, help="k of Eq. 7 (Sec. 3.1: 5). With k >= D classes the ratio is 1 for every batch, a "
                                   "constant without gradient: on GLUE (D <= 3) the SVD term only acts with k < D")
    flag("--temperature", type=float, help="T of Eq. 4 (B.4's value; the paper gives none for NLU)")
    flag("--lambda1-schedule", choices=["constant", "cosine"],
         help="Sec. 3.1 gives constant NLU weights; 'cosine' is B.4's NLG schedule")
    flag("--focus-schedule", choices=["constant", "two_phase"], help="λ2/λ3 schedule; 'two_phase' is B.4's NLG schedule")
    flag("--imbalance", help="e.g. 100:10:1 keeps 100%% / 10%% / 1%% of the training examples of classes 0, 1, 2 (B.3)")
    flag("--seed", type=int, help="head and adapter init, data order, dropout")
    flag("--eval-every", type=int, help="evaluate every N optimizer steps (0: every epoch)")
    flag("--save-every", type=int, help="write checkpoint.pt every N steps (0: every epoch)")
    flag("--max-steps", type=int, help="stop after N optimizer steps (0: all epochs)")
    flag("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    flag("--dtype", choices=["fp32", "bf16"], help="bf16 autocast for the forward passes")
    flag("--device", help="cpu or cuda")
    flag("--no-progress", action="store_true", help="no tqdm bar")
    flag("--report-to", choices=["none", "tensorboard", "wandb"],
         help="also send log.jsonl's numbers to TensorBoard (<out>/tensorboard) or W&B (WANDB_MODE=offline works)")
    flag("--dry-run", action="store_true", help="print the settings in force and stop, reading and writing nothing")
    add_deprecated_aliases(parser, ALIASES)
    args = parser.parse_args(argv)

    # the task first: it picks the Table 8 row of the paper preset (and the toy task's files)
    args.task = args.task or presets("nli")["paper" if args.model is not None else "toy"]["task"]
    resolve_settings(args, presets(args.task, encoder_family(args.model)))
    task = TASKS[args.task]
    if args.validation_file is not None and len(args.validation_file) != len(task.validation_splits):
        raise ValueError(f"--validation-file: task {args.task!r} has the validation split(s) {list(task.validation_splits)}, "
                         f"got {len(args.validation_file)} file(s)")
    imbalance_ratios(args.imbalance, args.task)  # a bad --imbalance is an error now, not after the model loads
    check_report_to(args.report_to)
    return args


def data_note(args):
    """The settings block's line on the data: files, or the GLUE task's splits from the hub."""
    task = TASKS[args.task]
    train = shown(args.data) if args.data else f"the hub's nyu-mll/glue {task.hub_config} train split"
    validation = shown(args.validation_file) if args.validation_file else f"the hub's {', '.join(task.validation_splits)}"
    balance = f", imbalanced {args.imbalance} (B.3)" if args.imbalance else ""
    return f"data: task {args.task}, train {train}{balance}; validation {validation}"


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    preset = presets(args.task, encoder_family(args.model))[args.preset]
    if args.dry_run:
        print(settings_block(args, preset, NONE_MEANS, [data_note(args)]))
        print(json.dumps(settings_record(args), indent=1))
        return settings_record(args)
    rank, local_rank, world_size, device, is_master = setup_distributed(args.device)
    if is_master:
        print(settings_block(args, preset, NONE_MEANS, [data_note(args)]))
    task = TASKS[args.task]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    micro_batch_size = args.micro_batch_size or args.batch_size // world_size
    if micro_batch_size < 1 or args.batch_size % (micro_batch_size * world_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {micro_batch_size} "
                         f"× {world_size} processes")
    accumulation_steps = args.batch_size // (micro_batch_size * world_size)
    torch.manual_seed(args.seed)  # same head initialization and LoRA init on every rank

    # model: pretrained encoder + fresh pooler/classifier, then LoRA on the encoder's linears
    if not os.path.isdir(args.model):
        hint = " (the toy preset's bundled encoder: build it with tools/make_assets.py)" if args.preset == "toy" else ""
        raise FileNotFoundError(f"--model {args.model!r} is not a model directory{hint}")
    model = DebertaClassifier.from_pretrained(args.model, num_labels=task.num_labels, device=device, seed=args.seed)
    tokenizer = TOKENIZERS[model.config.model_type](args.model)
    init, regularized = METHODS[args.method]
    lambdas = (args.lambda1, args.lambda2, args.lambda3) if regularized else (0.0, 0.0, 0.0)
    balora.add_lora(model, args.targets.split(","), r=args.rank, alpha=args.alpha, init=init,
                    dropout=args.dropout, trainable=("classifier", "pooler"), dora=args.method in DORA_METHODS,
                    quantize=args.quantize)
    raw_model = model  # the teacher pass, evaluation and checkpoints use the module itself, never the DDP wrapper
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # training-time randomness (dropout) differs per rank

    # data
    train_split = load_split(args.task, "train", args.data)
    train_ids, train_labels = encode_split(train_split, args.task, tokenizer, args.max_length, args.data or "train")
    imbalance = imbalance_ratios(args.imbalance, args.task)
    if imbalance is not None:
        keep = imbalance_indices(train_labels, imbalance, args.seed)
        train_ids, train_labels = [train_ids[i] for i in keep], train_labels[keep]
    validation = {}
    for i, split in enumerate(task.validation_splits):
        data_file = args.validation_file[i] if args.validation_file else None
        split_data = load_split(args.task, split, data_file)
        validation[split] = encode_split(split_data, args.task, tokenizer, args.max_length, data_file or split)
    steps_per_epoch = len(train_ids) // args.batch_size  # the last partial batch is dropped: equal steps on any world size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_ids)} training examples")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    primary_split, primary_metric = task.validation_splits[0], task.metrics[0]
    baseline = majority_baseline(task, train_labels, validation[primary_split][1])

    optimizer = torch.optim.AdamW([p for p in raw_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = lr_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps, "linear")
    step, best, reporter = 0, {"value": -math.inf, "metrics": None}, None
    checkpoint_path, best_path, log_path = (os.path.join(args.out, f) for f in ("checkpoint.pt", "best.pt", "log.jsonl"))
    if args.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path!r} (the interrupted run's --out?)")
        checkpoint = load_checkpoint(checkpoint_path, raw_model, optimizer, scheduler)
        check_resume_config(checkpoint["config"], run_config(args), checkpoint_path)
        step, best = checkpoint["step"], checkpoint["data_state"]["best"]
    if is_master:
        os.makedirs(args.out, exist_ok=True)
        # keep the log consistent with the checkpoint: drop what was logged after it was written
        kept = rewind_log(log_path, step) if args.resume else []
        remove_stale_temp_files(args.out)
        with open(log_path, "w") as f:
            f.writelines(kept)
        write_config(args, preset, derived=dict(
            train_examples=len(train_ids), validation_examples={split: len(ids) for split, (ids, _) in validation.items()},
            total_steps=total_steps, world_size=world_size, micro_batch_size=micro_batch_size,
            accumulation_steps=accumulation_steps))
        reporter = Reporter(args.report_to, args.out, settings_record(args))
        if task.num_labels > 1:
            counts = torch.bincount(train_labels, minlength=task.num_labels).tolist()
            imbalanced = f" (--imbalance {args.imbalance})" if args.imbalance else ""
            print(f"train examples per class: {dict(enumerate(counts))}{imbalanced}")
        print(f"task {args.task}: {len(train_ids)} train, {', '.join(f'{len(v[0])} {k}' for k, v in validation.items())}")
        print(f"{args.method}: {total_steps} steps of {args.batch_size} examples ({world_size} process(es) × "
              f"{accumulation_steps} micro-batches of {micro_batch_size}), λ = {lambdas}")

    def save(step):
        save_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, step, data_state={"best": best}, config=run_config(args))

    def run_evaluation(step):
        if not is_master:  # rank 0 evaluates alone with the unwrapped model; the others go on to the next collective
            return
        results = {split: evaluate(raw_model, task, ids, labels, micro_batch_size * 2, device, dtype, tokenizer.pad_id)
                   for split, (ids, labels) in validation.items()}
        value = results[primary_split][primary_metric]
        if value > best["value"] or best["metrics"] is None:
            best.update(value=value, metrics=results)
            trainable = {name: p.detach().cpu().clone() for name, p in raw_model.named_parameters() if p.requires_grad}
            atomic_torch_save(trainable, best_path)
        record = {"step": step, "epoch": step / steps_per_epoch, "validation": results}
        append_jsonl(log_path, record)
        reporter.log(record)
        tqdm.write(f"step {step}: " + ", ".join(f"{split} {name} {v:.4f}" for split, r in results.items() for name, v in r.items()))

    progress = tqdm(total=total_steps, initial=step, disable=not is_master or args.no_progress, dynamic_ncols=True)
    model.train()
    start_time = time.time()
    order_epoch = None
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # a fresh shuffle per epoch, from the seed alone: the same on every rank and on resume
            order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            order_epoch = epoch
        l1, l2, l3 = balora.scheduled_lambdas(step, total_steps, lambdas, args.lambda1_schedule, args.focus_schedule)
        totals = {}
        for micro_step in range(accumulation_steps):
            indices = micro_batch_indices(order, step_in_epoch, micro_step, args.batch_size, micro_batch_size, rank,
                                          world_size)
            batch = collate(train_ids, train_labels, indices, tokenizer.pad_id)
            input_ids, attention_mask, labels = (t.to(device) for t in batch)
            if world_size > 1:  # all-reduce the gradients only on the last micro-batch
                model.require_backward_grad_sync = micro_step == accumulation_steps - 1
            with autocast_context(device, dtype):
                student = model(input_ids, attention_mask=attention_mask)
                teacher = teacher_logits(raw_model, input_ids, attention_mask) if l1 > 0 else None
            # the SVD term cannot take a NaN/inf logit (linalg.svd fails): stop here, naming the step
            check_finite(student.detach(), step + 1, "student logits", checkpoint_path)
            loss, components = objective(task, student, teacher, labels, (l1, l2, l3), args.temperature, args.svd_k)
            (loss / accumulation_steps).backward()
            for name, value in {"total": loss.detach(), **components}.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accumulation_steps
        # the loss terms averaged over every micro-batch of the global batch (the same on every rank)
        names = sorted(totals)
        reduced = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=device)
        if world_size > 1:
            torch.distributed.all_reduce(reduced)
        totals = dict(zip(names, (reduced / world_size).tolist()))
        check_finite(totals["total"], step + 1, "loss", checkpoint_path)
        if args.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], args.grad_clip)
            check_finite(grad_norm, step + 1, "gradient norm", checkpoint_path)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        progress.set_postfix({name: f"{v:.4f}" for name, v in totals.items()})
        if is_master:
            record = {"step": step, "lr": lr, "lambda1": l1, "lambda2": l2, "lambda3": l3, **totals}
            append_jsonl(log_path, record)
            reporter.log(record)
        end_of_epoch, last = step % steps_per_epoch == 0, step == total_steps
        if last or (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and end_of_epoch):
            run_evaluation(step)
        if last or (args.save_every and step % args.save_every == 0) or (not args.save_every and end_of_epoch):
            save(step)
    progress.close()

    results = None
    if is_master:
        # export the best adapter (LoRA factors + pooler + classifier) as ours and in peft's format
        with torch.no_grad():
            for name, value in torch.load(best_path, map_location="cpu", weights_only=True).items():
                raw_model.get_parameter(name).copy_(value)
        balora.save_adapter(raw_model, os.path.join(args.out, "adapter"), training={"task": args.task, "max_length": args.max_length})
        export_peft_adapter(raw_model, os.path.join(args.out, "peft_adapter"), args.model)
        reporter.close()
        plot.plot_run(args.out)
        results = {"best": best["metrics"], "baseline": baseline, "steps": step, "seconds": time.time() - start_time}
        print(f"trained {step} steps in {results['seconds']:.1f}s; adapter in {os.path.join(args.out, 'adapter')}, "
              f"curves in {os.path.join(args.out, plot.CURVES)}")
        for split, metrics in best["metrics"].items():
            print(f"best {split}: " + ", ".join(f"{name} {v:.4f}" for name, v in metrics.items()))
        baseline_name = "constant (training-mean) baseline" if task.num_labels == 1 else "majority-class baseline"
        print(f"{baseline_name} {primary_split}: " + ", ".join(f"{name} {v:.4f}" for name, v in baseline.items()))
    cleanup_distributed()
    return results


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:  # launched by torchrun
        exit_torchrun_worker()
