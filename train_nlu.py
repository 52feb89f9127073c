"""
BA-LoRA fine-tuning of a DeBERTa-v3 encoder on GLUE (Section 2.2.1, Section 3.1, Appendix B.3-B.4).

    python train_nlu.py                                  # offline: bundled tiny encoder, toy 3-class NLI task
    OMP_NUM_THREADS=1 python train_nlu.py                # the same on a busy CPU (tiny ops: threads only spin)
    python train_nlu.py --model path/to/deberta-v3-base --task rte
    python train_nlu.py --model ... --task mnli --imbalance 100:10:1     # the imbalanced MNLI of B.3
    torchrun --nproc_per_node 2 train_nlu.py --model ... --task sst2

One optimizer step: student logits (LoRA-adapted encoder + classification head) -> teacher logits
(the same inputs through the pretrained encoder and the same, current head, B.3) -> Eq. 8 ->
backward -> AdamW -> linear learning-rate decay. Evaluation every epoch keeps the best adapter.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import balora
from data import DebertaTokenizer, load_hub_dataset
from model import DebertaClassifier
from train_nlg import append_jsonl, atomic_torch_save, autocast_context, check_finite, cleanup_distributed
from train_nlg import METHODS, exit_torchrun_worker, load_checkpoint, lr_schedule_with_warmup, save_checkpoint
from train_nlg import check_resume_config, remove_stale_temp_files, rewind_log, run_config, setup_distributed

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
# Offline default: no --model given -> the bundled tiny encoder (on the bundled toy task, --task nli,
# the default), sized to finish in well under 3 minutes on a 2-core CPU: 92 optimizer steps. A tiny
# model's step is all per-op overhead, so a few large batches beat many small ones (batch 64 x 92 steps
# reaches the validation accuracy of Table 8's batch 16 x 374 steps). Explicit flags win.
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
OFFLINE_DEFAULTS = dict(
    model=os.path.join(ASSETS, "tiny-deberta"),
    epochs=2,  # validation accuracy plateaus after the first epoch
    batch_size=64,
    lr=1e-3,  # (with batch 16, 2e-3 collapsed the tiny model to a constant prediction)
    max_length=64,  # the toy pairs are at most 18 tokens
)

# PiSSA's DeBERTa GLUE setup adapts every linear layer of the encoder (all-linear minus the head):
# the attention projections, the attention output, and the two feed-forward layers.
TARGET_MODULES = "query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense"

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


def load_split(task_name, split, data_file, local_flag="--train-file / --validation-file FILE"):
    """A `datasets.Dataset`: a local .json/.jsonl/.parquet/.csv file, or the split of the GLUE task on the
    hub (offline, an error naming `local_flag`, the flag that takes a file instead)."""
    import datasets

    task = TASKS[task_name]
    if data_file is None:
        if task.hub_config is None:
            raise ValueError(f"task {task_name!r} is not on the hub: give --train-file and --validation-file")
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


# -----------------------------------------------------------------------------
# Flags

REGRESSION_NOTE = """\
STS-B (regression, one logit): the task loss is MSE; --lambda1 weighs the consistency term
½·mean((z_F − z_P)²), the KL between unit-variance Gaussians on the teacher's and student's scores
(softmax over one logit is constant, so Eq. 4 would be 0); --lambda2/--lambda3 are ignored, since
Eq. 5 (no off-diagonal covariance) and Eq. 7 (top-1/all singular values = 1) are constants for D = 1.
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="BA-LoRA fine-tuning of a DeBERTa-v3 encoder on a GLUE task (Sec. 2.2.1, B.3, B.4).",
        epilog=REGRESSION_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model",
                        help="DeBERTa-v3 model directory (config.json, weights, spm.model); default: the offline block (assets/tiny-deberta)")
    parser.add_argument("--task", choices=sorted(TASKS), default="nli",
                        help="GLUE task, or 'nli' = the bundled toy 3-class NLI task (default)")
    parser.add_argument("--train-file",
                        help=".json/.jsonl/.parquet/.csv with the task's columns; default: the hub (nyu-mll/glue), or assets/data for 'nli'")
    parser.add_argument("--validation-file", nargs="+",
                        help="one file per validation split of the task (MNLI: matched, then mismatched)")
    parser.add_argument("--out", default="out/nlu",
                        help="output directory: log.jsonl, checkpoint.pt, best.pt, adapter/, peft_adapter/")
    parser.add_argument("--method", choices=list(METHODS), default="balora",
                        help="lora | pissa | balora (PiSSA + Reg) | lora+reg (Table 10)")
    # Table 8 per task (None = the task's row, or the offline block without --model)
    parser.add_argument("--epochs", type=int, help="default: the task's row of Table 8 (offline block without --model)")
    parser.add_argument("--batch-size", type=int,
                        help="examples per optimizer step, over all processes (default: Table 8 / offline block)")
    parser.add_argument("--micro-batch-size", type=int,
                        help="examples per forward on one process, the batch the regularizers see (default: batch size / world size)")
    parser.add_argument("--lr", type=float,
                        help="AdamW peak learning rate, no weight decay (default: Table 8 / offline block)")
    parser.add_argument("--lora-alpha", type=float, help="default: Table 8 / offline block")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (B.4: 8 on every task)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--targets", default=TARGET_MODULES,
                        help="comma-separated module-name suffixes to adapt (default: every encoder linear, PiSSA's DeBERTa setup)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0,
                        help="linear warm-up fraction of the steps before the linear decay")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    parser.add_argument("--max-length", type=int, help="tokens per example (default 256, 64 offline)")
    # BA-LoRA (Sec. 3.1, NLU): λ1 = 0.15, λ2 = 0.03, λ3 = 0.03, k = 5
    parser.add_argument("--lambda1", type=float, default=0.15, help="consistency weight (Eq. 4)")
    parser.add_argument("--lambda2", type=float, default=0.03, help="diversity weight (Eq. 5)")
    parser.add_argument("--lambda3", type=float, default=0.03, help="SVD weight (Eq. 7)")
    parser.add_argument("--svd-k", type=int, default=5,
                        help="k of Eq. 7 (Sec. 3.1: 5). With k >= D classes the ratio is 1 for every batch, a constant "
                             "without gradient: on GLUE (D <= 3) the SVD term only acts with k < D")
    # The paper gives no NLU temperature and the official code (llm172/BA-LoRA) only ships the NLG
    # script, whose setting is --distill_temp 2.0 (also B.4); D.1 says T is fixed per backbone and
    # reused across datasets, so the one published value, 2.0, is the default here too.
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="T of Eq. 4 (B.4's value; the paper gives none for NLU)")
    parser.add_argument("--lambda1-schedule", choices=["constant", "cosine"], default="constant",
                        help="Sec. 3.1 gives constant NLU weights; 'cosine' is B.4's NLG schedule")
    parser.add_argument("--focus-schedule", choices=["constant", "two_phase"], default="constant",
                        help="λ2/λ3 schedule; 'two_phase' is B.4's NLG schedule")
    parser.add_argument("--imbalance",
                        help="e.g. 100:10:1 keeps 100%% / 10%% / 1%% of the training examples of classes 0, 1, 2 (B.3)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (0: every epoch)")
    parser.add_argument("--save-every", type=int, default=0, help="write checkpoint.pt every N steps (0: every epoch)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: all epochs)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast for the forward passes")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)

    task = TASKS[args.task]
    defaults = dict(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, lora_alpha=task.lora_alpha, max_length=256)
    args.offline_default = args.model is None
    if args.offline_default:
        defaults.update(OFFLINE_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.task == "nli":
        args.train_file = args.train_file or os.path.join(ASSETS, "data", "nli_train.jsonl")
        args.validation_file = args.validation_file or [os.path.join(ASSETS, "data", "nli_validation.jsonl")]
    if args.validation_file is not None and len(args.validation_file) != len(task.validation_splits):
        raise ValueError(f"--validation-file: task {args.task!r} has the validation split(s) {list(task.validation_splits)}, "
                         f"got {len(args.validation_file)} file(s)")
    if args.imbalance is not None:
        if task.num_labels == 1:
            raise ValueError(f"--imbalance needs classes, task {args.task!r} is a regression")
        try:
            args.imbalance = tuple(float(ratio) for ratio in args.imbalance.split(":"))
        except ValueError:
            raise ValueError(f"--imbalance {args.imbalance!r}: expected ratios like 100:10:1") from None
    return args


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world_size, device, is_master = setup_distributed(args.device)
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
        hint = " (the offline default's bundled encoder: build it with tools/make_assets.py)" if args.offline_default else ""
        raise FileNotFoundError(f"--model {args.model!r} is not a model directory{hint}")
    tokenizer = DebertaTokenizer(args.model)
    model = DebertaClassifier.from_pretrained(args.model, num_labels=task.num_labels, device=device, seed=args.seed)
    init, regularized = METHODS[args.method]
    lambdas = (args.lambda1, args.lambda2, args.lambda3) if regularized else (0.0, 0.0, 0.0)
    balora.add_lora(model, args.targets.split(","), r=args.lora_r, alpha=args.lora_alpha, init=init,
                    dropout=args.lora_dropout, trainable=("classifier", "pooler"))
    raw_model = model  # the teacher pass, evaluation and checkpoints use the module itself, never the DDP wrapper
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # training-time randomness (dropout) differs per rank

    # data
    train_split = load_split(args.task, "train", args.train_file)
    train_ids, train_labels = encode_split(train_split, args.task, tokenizer, args.max_length, args.train_file or "train")
    if args.imbalance is not None:
        keep = imbalance_indices(train_labels, args.imbalance, args.seed)
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
    step, best = 0, {"value": -math.inf, "metrics": None}
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
        if args.offline_default:
            toy = ", ".join(f"{key}={getattr(args, key)}" for key in OFFLINE_DEFAULTS if key != "model")
            print(f"no --model given: offline default run on {args.model} ({toy}); pass --model for Table 8's settings")
        if task.num_labels > 1:
            counts = torch.bincount(train_labels, minlength=task.num_labels).tolist()
            imbalance = f" (--imbalance {':'.join(f'{r:g}' for r in args.imbalance)})" if args.imbalance else ""
            print(f"train examples per class: {dict(enumerate(counts))}{imbalance}")
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
        append_jsonl(log_path, {"step": step, "epoch": step / steps_per_epoch, "validation": results})
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
            for name, value in {"loss": loss.detach(), **components}.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accumulation_steps
        # the loss terms averaged over every micro-batch of the global batch (the same on every rank)
        names = sorted(totals)
        reduced = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=device)
        if world_size > 1:
            torch.distributed.all_reduce(reduced)
        totals = dict(zip(names, (reduced / world_size).tolist()))
        check_finite(totals["loss"], step + 1, "loss", checkpoint_path)
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
            append_jsonl(log_path, {"step": step, "lr": lr, "lambdas": [l1, l2, l3], **totals})
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
        balora.export_peft(raw_model, os.path.join(args.out, "peft_adapter"), args.model, task_type="SEQ_CLS")
        results = {"best": best["metrics"], "baseline": baseline, "steps": step, "seconds": time.time() - start_time}
        print(f"trained {step} steps in {results['seconds']:.1f}s; adapter in {os.path.join(args.out, 'adapter')}")
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
