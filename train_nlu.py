"""
BA-LoRA fine-tuning of a DeBERTa-v3 or RoBERTa encoder on GLUE (Section 2.2.1, Section 3.1, Appendix B.3-B.4).

    python train_nlu.py                                  # toy preset: bundled tiny encoder, toy 3-class NLI task
    OMP_NUM_THREADS=1 python train_nlu.py                # the same on a busy CPU (tiny ops: threads only spin)
    python train_nlu.py --model path/to/deberta-v3-base --task rte   # paper preset: Table 8's RTE row, GLUE from the hub
    python train_nlu.py --model ... --task mnli --imbalance 100:10:1     # the imbalanced MNLI of B.3
    python train_nlu.py --model path/to/roberta-base --task mnli --imbalance 100:10:1 --epochs 3   # Fig. 3 / Table 12
    python train_nlu.py --model path/to/t5-base --task sst2              # Table 3's T5-base: B.4's T5 recipe
    torchrun --nproc_per_node 2 train_nlu.py --model ... --task sst2

Settings come from the toy preset (no --model) or the paper preset (--model given; MNLI unless --task
says otherwise), as in train_nlg.py: --help shows both, a run prints what differs and saves every value
to <out>/config.json. The paper preset is Table 8's for a DeBERTa-v3 --model, Table 9's for a RoBERTa
one, B.4's T5 recipe for a T5 one (its config.json's model_type decides).

One optimizer step: student logits (LoRA-adapted encoder + classification head) -> teacher logits
(the same inputs through the pretrained encoder and the same, current head, B.3) -> Eq. 8
(balora.nlu_objective) -> backward -> AdamW -> linear learning-rate decay. Evaluation every epoch
keeps the best adapter.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import balora
import baselines
import glue
import plot
import training
from model import DebertaClassifier, read_config, resolve_model_path, roberta_hf_key
from t5 import T5Classifier

# -----------------------------------------------------------------------------
# Recipes: Table 8 (DeBERTa-v3-base; each task's row is in glue.TASKS) and Table 9 (RoBERTa-base)

# PiSSA's DeBERTa GLUE setup adapts every linear layer of the encoder (all-linear minus the head):
# the attention projections, the attention output, and the two feed-forward layers.
TARGET_MODULES = "query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense"

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

# T5-base (Table 3): B.4's T5 settings, one row for every task: 1 epoch, fp32 (the default --dtype), 128
# tokens, batch 32, lr 1e-4, a 3% warm-up then cosine decay, LoRA r = 8 and alpha = 16 on every linear module
# but the embeddings and the LM head: q, k, v, o of the self- and cross-attention and the feed-forward's wi (v1.1: wi_0, wi_1) and wo.
# The classifier is T5ForSequenceClassification's (t5.T5Classifier): its head is trained whole, as DeBERTa's.
T5_SETTINGS = dict(epochs=1, batch_size=32, lr=1e-4, rank=8, alpha=16, targets="q,k,v,o,wi,wi_0,wi_1,wo",
                   warmup_ratio=0.03, lr_schedule="cosine", max_length=128)
# The modules trained whole beside the adapters, by family: the classification head.
HEAD_MODULES = {"t5": ("classification_head",)}

# The toy preset (no --model): the bundled tiny encoder on the bundled toy task (--task nli, its
# default), sized to finish in well under 3 minutes on a 2-core CPU: 92 optimizer steps. A tiny
# model's step is all per-op overhead, so a few large batches beat many small ones (batch 64 x 92 steps
# reaches the validation accuracy of Table 8's batch 16 x 374 steps). These values replace the paper's.
TOY_VALUES = dict(
    model=os.path.join(training.ASSETS, "tiny-deberta"),
    task="nli",
    epochs=2,  # validation accuracy plateaus after the first epoch
    batch_size=64,
    lr=1e-3,  # (with batch 16, 2e-3 collapsed the tiny model to a constant prediction)
    max_length=64,  # the toy pairs are at most 18 tokens
)


def presets(task_name, family="deberta-v2"):
    """
    The settings the presets set for --task `task_name`: {"toy": {...}, "paper": {...}}. The paper preset
    (--model given) is Sec. 3.1 with Table 8's row of the task (family "roberta": Table 9's row and
    B.4's RoBERTa settings), on the task's GLUE data from the hub (MNLI when no --task is given); the
    toy task nli is read from assets/data under either preset. Every other setting has one default.
    """
    task = glue.TASKS[task_name]
    local_task = task_name == "nli"  # the toy task: files only
    paper = dict(
        model=None, task="mnli",
        data=os.path.join(training.ASSETS, "data", "nli_train.jsonl") if local_task else None,
        validation_file=[os.path.join(training.ASSETS, "data", "nli_validation.jsonl")] if local_task else None,
        # Table 8 (DeBERTa-v3-base): the task's row; rank 8 everywhere, linear schedule, no weight decay
        epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, alpha=task.lora_alpha,
        rank=8, targets=TARGET_MODULES, warmup_ratio=0.0, lr_schedule="linear", max_length=256,
    )
    if family == "roberta":
        batch_size, epochs, lr = ROBERTA_TABLE9[task_name]
        paper.update(batch_size=batch_size, epochs=epochs, lr=lr, **ROBERTA_SETTINGS)
    if family == "t5":
        paper.update(T5_SETTINGS)
    return {"toy": dict(paper, **TOY_VALUES), "paper": paper}


def encoder_family(model_dir, revision=None):
    """
    The model_type of --model's config.json ("roberta": Table 9's recipe, "t5": B.4's T5 recipe), or
    "deberta-v2" without one (no --model: the toy encoder; a directory without config.json, or a hub id
    that cannot be resolved, is named when it loads).
    """
    if model_dir is not None and not os.path.isdir(model_dir):
        try:
            model_dir = resolve_model_path(model_dir, revision)
        except (FileNotFoundError, ConnectionError, PermissionError):
            return "deberta-v2"
    if model_dir is None or not os.path.isfile(os.path.join(model_dir, "config.json")):
        return "deberta-v2"
    return read_config(model_dir).get("model_type")


# -----------------------------------------------------------------------------
# The teacher and the objective


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


def objective(task, student_logits, teacher_logits, labels, lambdas, temperature, svd_k):
    """Eq. 8 on float32 logits: cross-entropy (MSE for a regression task) + the regularizers (balora.nlu_objective)."""
    student_logits = student_logits.float()
    teacher_logits = None if teacher_logits is None else teacher_logits.float()
    if task.num_labels == 1:
        task_loss = F.mse_loss(student_logits[:, 0], labels)
        return balora.nlu_regression_objective(task_loss, student_logits, teacher_logits, lambdas[0])
    task_loss = F.cross_entropy(student_logits, labels)
    return balora.nlu_objective(task_loss, student_logits, teacher_logits, lambdas, temperature, svd_k)


def export_peft_adapter(model, out_dir, model_dir):
    """
    <out>/peft_adapter in peft's format (adapters.export_peft) for AutoPeftModelForSequenceClassification.
    RoBERTa's modules carry DeBERTa's names, so its export takes transformers'
    RobertaForSequenceClassification names (model.ROBERTA_KEYS read backwards), and its head
    (classifier.dense + classifier.out_proj) is saved as the one module `classifier`, as peft does.
    """
    if model.config.model_type != "roberta":
        return adapters.export_peft(model, out_dir, model_dir, task_type="SEQ_CLS")
    return adapters.export_peft(model, out_dir, model_dir, task_type="SEQ_CLS", hf_name=roberta_hf_key,
                                modules_to_save=["classifier"])


# -----------------------------------------------------------------------------
# Flags

REGRESSION_NOTE = """\
STS-B (regression, one logit): the task loss is MSE; --lambda1 weighs the consistency term
½·mean((z_F − z_P)²), the KL between unit-variance Gaussians on the teacher's and student's scores
(softmax over one logit is constant, so Eq. 4 would be 0); --lambda2/--lambda3 are ignored, since
Eq. 5 (no off-diagonal covariance) and Eq. 7 (top-1/all singular values = 1) are constants for D = 1.
"""

ROBERTA_NOTE = (
    "a RoBERTa --model (config.json model_type roberta) takes Table 9's recipe instead of Table 8's:\n  every task: "
    + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in ROBERTA_SETTINGS.items())
    + "\n  per task, --batch-size --epochs --lr: "
    + ", ".join(f"{name} {bs} {ep} {lr:g}" for name, (bs, ep, lr) in ROBERTA_TABLE9.items() if name != "nli"))
T5_NOTE = ("a T5 --model (model_type t5; T5ForConditionalGeneration or T5ForSequenceClassification weights) takes B.4's T5 "
           "recipe:\n  every task: " + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in T5_SETTINGS.items()))

NONE_MEANS = {"model": "your checkpoint", "revision": "main", "data": "the task's train split from the hub (nyu-mll/glue)",
              "validation_file": "the task's validation split(s) from the hub", "micro_batch_size": "batch size / world size",
              "imbalance": "balanced", "device": "cuda when available"}


def paper_preset_as_help():
    """The paper preset as --help shows it: a value Table 8 sets per task is listed for every GLUE task."""
    per_task = {name: presets(name)["paper"] for name, task in glue.TASKS.items() if task.hub_config}
    shown_values = {}
    for key, value in per_task["mnli"].items():
        if len({training.shown(preset[key]) for preset in per_task.values()}) == 1:
            shown_values[key] = value
        else:
            shown_values[key] = "Table 8 by --task: " + ", ".join(
                f"{name} {training.shown(p[key])}" for name, p in per_task.items())
    return shown_values


def imbalance_ratios(text, task_name):
    """--imbalance "100:10:1" -> (100.0, 10.0, 1.0); None -> None (balanced)."""
    if text is None:
        return None
    if glue.TASKS[task_name].num_labels == 1:
        raise ValueError(f"--imbalance needs classes, task {task_name!r} is a regression")
    try:
        return tuple(float(ratio) for ratio in text.split(":"))
    except ValueError:
        raise ValueError(f"--imbalance {text!r}: expected ratios like 100:10:1") from None


def choose_preset(args):
    """The preset in force (--model given: paper, else toy) for --task (paper: mnli, toy: nli) and the encoder family."""
    name = "paper" if args.model is not None else "toy"
    task = args.task or ("mnli" if name == "paper" else "nli")
    return name, presets(task, encoder_family(args.model, args.revision))[name]


def parse_args(argv=None):
    """The run's settings (args) and every setting's default in force ({setting: value})."""
    parser = argparse.ArgumentParser(
        description="BA-LoRA fine-tuning of a DeBERTa-v3 or RoBERTa encoder or a T5 on a GLUE task (Sec. 2.2.1, B.3, B.4).",
        epilog=REGRESSION_NOTE + "\n" + ROBERTA_NOTE + "\n" + T5_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = training.preset_flag(parser, presets("nli")["toy"], paper_preset_as_help(), NONE_MEANS)
    flag("--model", help="DeBERTa-v3 (config.json, weights, spm.model), RoBERTa (config.json, weights, tokenizer.json "
                         "or vocab.json + merges.txt) or T5 (config.json, weights, tokenizer.json or spiece.model) model "
                         "directory, or a hub id (org/name, model.resolve_model_path); giving one selects the paper preset")
    flag("--revision", help="with a hub id: the branch, tag or commit to read")
    flag("--task", choices=sorted(glue.TASKS), help="GLUE task, or nli: the bundled toy 3-class NLI task (local files only)")
    flag("--data", help="training file: .json/.jsonl/.parquet/.csv with the task's columns")
    flag("--validation-file", nargs="+", help="one file per validation split of the task (MNLI: matched, then mismatched)")
    flag("--out", default=os.path.join("out", "nlu"),
         help="output directory: log.jsonl, config.json, checkpoint.pt, best.pt, adapter/, peft_adapter/, curves.png")
    flag("--method", default="balora", choices=list(training.METHODS), help=training.METHOD_HELP)
    flag("--epochs", type=int, help="passes over the training set")
    flag("--batch-size", type=int, help="examples per optimizer step, over all processes")
    flag("--micro-batch-size", type=int, help="examples per forward on one process, the batch the regularizers see")
    flag("--lr", type=float, help="AdamW peak learning rate, no weight decay")
    flag("--rank", type=int, help="LoRA rank r")
    flag("--alpha", type=float, help="LoRA alpha (scale alpha / r)")
    flag("--dropout", default=0.0, type=float, help="LoRA dropout")
    flag("--loraplus-lr-ratio", default=16.0, type=float, help="LoRA+ (--method loraplus): lora_B's lr over lora_A's")
    flag("--targets", help="comma-separated module-name suffixes to adapt (every encoder linear: PiSSA's DeBERTa setup)")
    flag("--quantize", default="none", choices=training.QUANTIZE_CHOICES, help=training.QUANTIZE_HELP)
    flag("--teacher", default="full", choices=training.TEACHER_CHOICES, help=training.TEACHER_HELP)
    flag("--warmup-ratio", type=float, help="linear warm-up fraction of the steps before the decay")
    flag("--lr-schedule", choices=["linear", "cosine"], help="the learning rate's decay to 0 after the warm-up")
    flag("--grad-clip", default=1.0, type=float, help="max gradient norm (0: off)")
    flag("--max-length", type=int, help="tokens per example")
    # BA-LoRA (Sec. 3.1, NLU): lambda = (0.15, 0.03, 0.03), k = 5. The paper gives no NLU temperature and
    # the official code (llm172/BA-LoRA at commit 2829797) only ships the NLG script, whose setting
    # (scripts/ba-lora.sh) is --distill_temp 2.0
    # (also B.4); D.1 says T is fixed per backbone and reused across datasets, so 2.0 here too.
    flag("--lambda1", default=0.15, type=float, help="consistency weight (Eq. 4)")
    flag("--lambda2", default=0.03, type=float, help="diversity weight (Eq. 5)")
    flag("--lambda3", default=0.03, type=float, help="SVD weight (Eq. 7)")
    flag("--svd-k", default=5, type=int, help="k of Eq. 7 (Sec. 3.1: 5). With k >= D classes the ratio is 1 for every "
                                              "batch, a constant without gradient: on GLUE (D <= 3) the SVD term only acts with k < D")
    flag("--temperature", default=2.0, type=float, help="T of Eq. 4 (B.4's value; the paper gives none for NLU)")
    flag("--lambda1-schedule", default="constant", choices=["constant", "cosine"],
         help="Sec. 3.1 gives constant NLU weights; 'cosine' is B.4's NLG schedule")
    flag("--focus-schedule", default="constant", choices=["constant", "two_phase"],
         help="λ2/λ3 schedule; 'two_phase' is B.4's NLG schedule")
    flag("--imbalance", help="e.g. 100:10:1 keeps 100%% / 10%% / 1%% of the training examples of classes 0, 1, 2 (B.3)")
    flag("--seed", default=42, type=int, help="head and adapter init, data order, dropout")
    flag("--eval-every", default=0, type=int, help="evaluate every N optimizer steps (0: every epoch)")
    flag("--save-every", default=0, type=int, help="write checkpoint.pt every N steps (0: every epoch)")
    flag("--max-steps", default=0, type=int, help="stop after N optimizer steps (0: all epochs)")
    flag("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    flag("--overwrite", action="store_true", help="replace the previous run in --out (without it, or --resume, it is refused)")
    flag("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast for the forward passes")
    flag("--device", help="cpu or cuda")
    flag("--no-progress", action="store_true", help="no tqdm bar")
    flag("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
         help="also send log.jsonl's numbers to TensorBoard (<out>/tensorboard) or W&B (WANDB_MODE=offline works)")
    flag("--merge", action="store_true", help="also write <out>/merged: base + best adapter + head as one standalone "
                                               "Hugging Face sequence classifier, float32 (tools/merge_adapter.py)")
    flag("--dry-run", action="store_true", help="print the settings in force and stop, reading and writing nothing")
    args, defaults = training.resolve_settings(parser, argv, choose_preset)
    glue.check_validation_files(args.task, args.validation_file)
    imbalance_ratios(args.imbalance, args.task)  # a bad --imbalance is an error now, not after the model loads
    training.check_report_to(args.report_to)
    return args, defaults


def data_note(args):
    """The settings block's line on the data: files, or the GLUE task's splits from the hub."""
    task = glue.TASKS[args.task]
    train = training.shown(args.data) if args.data else f"the hub's nyu-mll/glue {task.hub_config} train split"
    validation = (training.shown(args.validation_file) if args.validation_file
                  else f"the hub's {', '.join(task.validation_splits)}")
    balance = f", imbalanced {args.imbalance} (B.3)" if args.imbalance else ""
    return f"data: task {args.task}, train {train}{balance}; validation {validation}"


def load_data(args, tokenizer):
    """(train_ids, train_labels, {split: (ids, labels)}): the task's training split (imbalanced as --imbalance asks)
    and its validation splits, encoded."""
    task = glue.TASKS[args.task]
    train_ids, train_labels = glue.encode_split(glue.load_split(args.task, "train", args.data), args.task, tokenizer,
                                                args.max_length, args.data or "train")
    imbalance = imbalance_ratios(args.imbalance, args.task)
    if imbalance is not None:
        keep = glue.imbalance_indices(train_labels, imbalance, args.seed)
        train_ids, train_labels = [train_ids[i] for i in keep], train_labels[keep]
    validation = {}
    for i, split in enumerate(task.validation_splits):
        data_file = args.validation_file[i] if args.validation_file else None
        split_data = glue.load_split(args.task, split, data_file)
        validation[split] = glue.encode_split(split_data, args.task, tokenizer, args.max_length, data_file or split)
    return train_ids, train_labels, validation


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args, defaults = parse_args(argv)
    if args.dry_run:
        return training.dry_run(args, defaults, NONE_MEANS, [data_note(args)])
    training.check_merge(args.method, args.merge)
    training.check_loraplus_ratio(args.method, args.loraplus_lr_ratio, defaults["loraplus_lr_ratio"])
    training.check_out(args.out, args.resume, args.overwrite)
    rank, local_rank, world_size, device, is_master = training.start_processes(args, defaults, NONE_MEANS, [data_note(args)])
    task, method = glue.TASKS[args.task], training.METHODS[args.method]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    micro_batch_size = args.micro_batch_size or args.batch_size // world_size
    if micro_batch_size < 1 or args.batch_size % (micro_batch_size * world_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {micro_batch_size} "
                         f"× {world_size} processes")
    accumulation_steps = args.batch_size // (micro_batch_size * world_size)
    lambdas = training.lambdas_of(args, method)

    # model: pretrained encoder + fresh pooler/classifier (the same seed on every rank), then the adapters
    torch.manual_seed(args.seed)
    if args.preset == "toy" and not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r} is not a model directory (the toy preset's bundled encoder: "
                                "build it with tools/make_assets.py)")
    args.model = resolve_model_path(args.model, args.revision)
    family = encoder_family(args.model)
    if args.merge:  # refused before training when tools/merge_adapter.py cannot rebuild the family (T5)
        from tools import merge_adapter
        merge_adapter.check_mergeable(family, f"--merge with --model {args.model}")
    classifier = T5Classifier if family == "t5" else DebertaClassifier
    model = classifier.from_pretrained(args.model, num_labels=task.num_labels, device=device, seed=args.seed)
    tokenizer = glue.TOKENIZERS[model.config.model_type](args.model)
    training.set_threads(model, device)
    training.adapt(model, args.quantize, args.teacher, target_modules=args.targets.split(","), r=args.rank,
                   alpha=args.alpha, init=method.init, dropout=args.dropout,
                   trainable=HEAD_MODULES.get(family, ("classifier", "pooler")), dora=method.dora, kind=method.kind,
                   adalora=method.adalora)
    raw_model = model  # the teacher pass, evaluation and checkpoints use the module itself, never the DDP wrapper
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # training-time randomness (dropout) differs per rank

    # data
    train_ids, train_labels, validation = load_data(args, tokenizer)
    steps_per_epoch = len(train_ids) // args.batch_size  # the last partial batch is dropped: equal steps on any world size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_ids)} training examples")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    # LoRA-GA / CorDA start from the model on the first --batch-size training examples (the same on every rank)
    calibration = [glue.collate(train_ids, train_labels, list(range(j, min(j + micro_batch_size, args.batch_size))),
                                tokenizer.pad_id) for j in range(0, args.batch_size, micro_batch_size)]
    training.calibrate(raw_model, method, [
        lambda ids=ids, mask=mask, labels=labels: objective(
            task, raw_model(ids.to(device), attention_mask=mask.to(device)), None, labels.to(device),
            (0.0,) * len(lambdas), args.temperature, args.svd_k)[0]
        for ids, mask, labels in calibration])
    allocator = training.rank_allocator(raw_model, method, total_steps)  # AdaLoRA's rank budget, else None
    primary_split, primary_metric = task.validation_splits[0], task.metrics[0]
    baseline = glue.majority_baseline(task, train_labels, validation[primary_split][1])

    optimizer = training.build_optimizer(raw_model, args.lr, 0.0, method, args.loraplus_lr_ratio)
    scheduler = training.lr_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps,
                                                  args.lr_schedule)
    step, best, reporter = 0, {"value": -math.inf, "metrics": None}, None
    checkpoint_path, best_path, log_path = (os.path.join(args.out, f) for f in ("checkpoint.pt", "best.pt", "log.jsonl"))
    if args.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path!r} (the interrupted run's --out?)")
        checkpoint = training.load_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, allocator)
        training.check_resume_config(checkpoint["config"], training.run_config(args), checkpoint_path)
        step, best = checkpoint["step"], checkpoint["data_state"]["best"]
    if is_master:
        reporter = start_run(args, defaults, step, log_path, task, train_ids, train_labels, validation, total_steps,
                             world_size, micro_batch_size, accumulation_steps, lambdas)

    def run_evaluation(step):
        if not is_master:  # rank 0 evaluates alone with the unwrapped model; the others go on to the next collective
            return
        results = {split: glue.evaluate(raw_model, task, ids, labels, micro_batch_size * 2, device, dtype, tokenizer.pad_id)
                   for split, (ids, labels) in validation.items()}
        if results[primary_split][primary_metric] > best["value"] or best["metrics"] is None:
            best.update(value=results[primary_split][primary_metric], metrics=results)
            trainable = {name: p.detach().cpu().clone() for name, p in raw_model.named_parameters() if p.requires_grad}
            training.atomic_torch_save(trainable, best_path)
        record = {"step": step, "epoch": step / steps_per_epoch, "validation": results}
        training.append_jsonl(log_path, record)
        reporter.log(record)
        tqdm.write(f"step {step}: " + ", ".join(f"{split} {name} {v:.4f}" for split, r in results.items() for name, v in r.items()))

    progress = tqdm(total=total_steps, initial=step, disable=not is_master or args.no_progress, dynamic_ncols=True)
    model.train()
    start_time, order, order_epoch = time.time(), None, None
    interrupt = training.Interrupt()  # the first Ctrl-C saves after the step in flight
    while step < total_steps:
        step_start = time.time()
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # a fresh shuffle per epoch, from the seed alone: the same on every rank and on resume
            order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            order_epoch = epoch
        step_lambdas = balora.scheduled_lambdas(step, total_steps, lambdas, args.lambda1_schedule, args.focus_schedule)
        totals, tokens = {}, 0
        for micro_step in range(accumulation_steps):
            indices = glue.micro_batch_indices(order, step_in_epoch, micro_step, args.batch_size, micro_batch_size, rank,
                                               world_size)
            input_ids, attention_mask, labels = (t.to(device) for t in glue.collate(train_ids, train_labels, indices,
                                                                                    tokenizer.pad_id))
            tokens += int(attention_mask.sum())
            if world_size > 1:  # all-reduce the gradients only on the last micro-batch
                model.require_backward_grad_sync = micro_step == accumulation_steps - 1
            with training.autocast_context(device, dtype):
                student = model(input_ids, attention_mask=attention_mask)
                teacher = teacher_logits(raw_model, input_ids, attention_mask) if step_lambdas[0] > 0 else None
            # the SVD term cannot take a NaN/inf logit (linalg.svd fails): stop here, naming the step
            training.check_finite(student.detach(), step + 1, "student logits", checkpoint_path)
            loss, components = objective(task, student, teacher, labels, step_lambdas, args.temperature, args.svd_k)
            if allocator:  # AdaLoRA's orthogonality regularizer on P and Q, with every forward
                loss = loss + baselines.ORTH_REG_WEIGHT * baselines.orthogonality_regularizer(raw_model)
            (loss / accumulation_steps).backward()
            for name, value in {"total": loss.detach(), **components}.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accumulation_steps
        totals = mean_over_ranks(totals, world_size, device)  # the terms averaged over the global batch's micro-batches
        tokens = int(mean_over_ranks({"tokens": tokens}, world_size, device)["tokens"] * world_size)  # the global batch's
        training.check_finite(totals["total"], step + 1, "loss", checkpoint_path)
        # --grad-clip 0: no clipping, the norm still measured (a max of inf scales every gradient by exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                                   args.grad_clip if args.grad_clip > 0 else math.inf)
        training.check_finite(grad_norm, step + 1, "gradient norm", checkpoint_path)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        if allocator:  # AdaLoRA: importance from these gradients, then the step's rank budget
            allocator.update_and_allocate(raw_model, step)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        progress.set_postfix({name: f"{v:.4f}" for name, v in totals.items()})
        if is_master:
            record = {"step": step, "lr": lr, **{f"lambda{i}": w for i, w in enumerate(step_lambdas, 1)}, **totals,
                      "tokens": tokens, "grad_norm": float(grad_norm), "time": time.time() - step_start}
            training.append_jsonl(log_path, record)
            reporter.log(record)
        end_of_epoch, last = step % steps_per_epoch == 0, step == total_steps
        if last or (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and end_of_epoch):
            run_evaluation(step)
        interrupted = not last and interrupt.requested()
        if last or interrupted or (args.save_every and step % args.save_every == 0) or (not args.save_every and end_of_epoch):
            training.save_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, step, data_state={"best": best},
                                     config=training.run_config(args), allocator=allocator)
        if interrupted:
            progress.close()
            interrupt.stop(step, checkpoint_path, argv, is_master)
    interrupt.close()
    progress.close()

    results = None
    if is_master:
        results = finish_run(args, raw_model, best, best_path, baseline, task, step, time.time() - start_time, reporter)
    training.cleanup_distributed()
    return results


def mean_over_ranks(totals, world_size, device):
    """{term: value} averaged over the ranks (each holds its micro-batches' mean): the same dict on every rank."""
    names = sorted(totals)
    reduced = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(reduced)
    return dict(zip(names, (reduced / world_size).tolist()))


def start_run(args, defaults, step, log_path, task, train_ids, train_labels, validation, total_steps, world_size,
              micro_batch_size, accumulation_steps, lambdas):
    """Rank 0, before the first step: the log rewound to the checkpoint, config.json, the reporter, a summary."""
    if args.overwrite and not args.resume:
        training.clear_out(args.out)
    os.makedirs(args.out, exist_ok=True)
    kept = training.rewind_log(log_path, step) if args.resume else []  # drop what was logged after the checkpoint
    training.remove_stale_temp_files(args.out)
    with open(log_path, "w") as f:
        f.writelines(kept)
    training.write_config(args, defaults, derived=dict(
        train_examples=len(train_ids), validation_examples={split: len(ids) for split, (ids, _) in validation.items()},
        total_steps=total_steps, world_size=world_size, micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps))
    if task.num_labels > 1:
        counts = torch.bincount(train_labels, minlength=task.num_labels).tolist()
        imbalanced = f" (--imbalance {args.imbalance})" if args.imbalance else ""
        print(f"train examples per class: {dict(enumerate(counts))}{imbalanced}")
    print(f"task {args.task}: {len(train_ids)} train, {', '.join(f'{len(v[0])} {k}' for k, v in validation.items())}")
    print(f"{args.method}: {total_steps} steps of {args.batch_size} examples ({world_size} process(es) × "
          f"{accumulation_steps} micro-batches of {micro_batch_size}), λ = {lambdas}")
    return training.Reporter(args.report_to, args.out, training.settings_record(args))


def finish_run(args, model, best, best_path, baseline, task, steps, seconds, reporter):
    """Rank 0, after the last step: the best adapter written (ours and peft's), the curves, the summary."""
    with torch.no_grad():
        for name, value in torch.load(best_path, map_location="cpu", weights_only=True).items():
            model.get_parameter(name).copy_(value)
    baselines.adalora_to_lora(model)  # AdaLoRA layers are saved and exported as the LoRA they compute (else nothing)
    adapters.save_adapter(model, os.path.join(args.out, "adapter"), training={"task": args.task, "max_length": args.max_length})
    if balora.lora_layers(model):  # peft holds LoRA-shaped adapters only
        export_peft_adapter(model, os.path.join(args.out, "peft_adapter"), args.model)
    if args.merge:  # the base stays float32 in training (--dtype bf16 is autocast only)
        from tools import merge_adapter

        merged = merge_adapter.merge(args.model, os.path.join(args.out, "adapter"), os.path.join(args.out, "merged"),
                                     overwrite=True)
        print(f"merged checkpoint: {merged}")
    reporter.close()
    plot.plot_run(args.out)
    print(f"trained {steps} steps in {seconds:.1f}s; adapter in {os.path.join(args.out, 'adapter')}, "
          f"curves in {os.path.join(args.out, plot.CURVES)}")
    for split, metrics in best["metrics"].items():
        print(f"best {split}: " + ", ".join(f"{name} {v:.4f}" for name, v in metrics.items()))
    baseline_name = "constant (training-mean) baseline" if task.num_labels == 1 else "majority-class baseline"
    print(f"{baseline_name} {task.validation_splits[0]}: " + ", ".join(f"{name} {v:.4f}" for name, v in baseline.items()))
    return {"best": best["metrics"], "baseline": baseline, "steps": steps, "seconds": seconds}


if __name__ == "__main__":
    training.run_cli(main)
    if "RANK" in os.environ:  # launched by torchrun
        training.exit_torchrun_worker()
