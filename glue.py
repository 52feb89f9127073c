"""
GLUE for train_nlu.py and eval.py: the task table (columns, classes, metrics, Table 8's row of each
task), the metrics, and the data path of a split: read (a local file or the hub), encode, check the
labels, make a class-imbalanced subset (B.3), collate, and score a classifier on a split.
"""

import math
import os
from dataclasses import dataclass

import torch

from data import DebertaTokenizer, RobertaTokenizer, T5Tokenizer, load_hub_dataset
from training import autocast_context

TOKENIZERS = {"deberta-v2": DebertaTokenizer, "roberta": RobertaTokenizer, "t5": T5Tokenizer}  # by config.json's model_type

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


def check_validation_files(task_name, files, flag="--validation-file"):
    """One file per validation split of the task (MNLI: matched, mismatched), or none (the hub's)."""
    splits = TASKS[task_name].validation_splits
    if files is not None and len(files) != len(splits):
        raise ValueError(f"{flag}: task {task_name!r} has the validation split(s) {list(splits)}, got {len(files)} file(s)")


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

