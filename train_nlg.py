"""
Fine-tune a LLaMA-style model on instruction data with LoRA, PiSSA or BA-LoRA (paper Sec. 2.2.2, 3.1, B.4).

    python train_nlg.py                                   # toy preset: assets/tiny-llama, toy data (< 3 min on CPU)
    python train_nlg.py --model /path/to/Llama-2-7b-hf    # paper preset (B.4): 100K MetaMath samples of fxmeng/pissa-dataset
    python train_nlg.py --model ... --dry-run             # print the settings in force and stop
    torchrun --standalone --nproc_per_node=4 train_nlg.py --model ...    # DDP, same global batch
    torchrun --standalone --nproc_per_node=8 train_nlg.py --model ... --fsdp   # FSDP2: the model sharded (fsdp.py)
    python train_nlg.py --model ~/.cache/balora/smollm2-135m-instruct --data FILE ...   # an instruct model, in its chat template

Settings: every flag has a default; the few that differ between the toy preset (no --model) and the
paper preset (--model given) show both in --help. A run prints each value that differs from its default
and saves every value to <out>/config.json. Read top to bottom: flags -> model -> adapters -> data ->
the loop in main: for each optimizer step, for each micro-batch: student logits -> teacher hidden
states -> task loss + Eq. 13 (chunked.nlg_objective_in_chunks, which runs balora.nlg_objective a chunk
of rows at a time) -> backward; then clip -> step -> log -> maybe save.

Data parallelism (DDP or --fsdp) changes no loss: the regularizers (Eq. 9-12) are computed per
micro-batch, on its own (M, V) logits, and rank r takes the r-th contiguous slice of each global
batch, so every micro-batch, and every regularizer value, is the one a single process computes with
the same --batch-size and --micro-batch-size; only the gradient sum is spread over the ranks.
"""

import argparse
import math
import os
import random
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import adapters
import balora
import baselines
import chunked
import fsdp
import plot
import training
from data import FORMATS, PROMPT_FORMATS, Tokenizer, blend_sources, collate, load_blend, load_examples, resolve_prompt_format
from model import Llama, resolve_model_path, router_aux_loss

# -----------------------------------------------------------------------------
# Flags: the two presets set only what differs between them; every other flag has its own default

# The paper preset (Sec. 3.1, B.4: LLaMA-2-7B on 100K MetaMathQA samples, one epoch), in force when --model is
# given. The samples are those the official script reads (llm172/BA-LoRA scripts/ba-lora.sh and train.py at
# 2829797: --data_path pissa-dataset --sub_task metamath:100000 --dataset_field instruction output), the
# first 100,000 rows of the metamath directory of fxmeng/pissa-dataset. --data-dir and --format describe
# that data set: with another --data they are the toy preset's, so `--data meta-math/MetaMathQA` (or a
# MetaMath-style file) reads it in the metamath format.
PAPER = dict(model=None, data="fxmeng/pissa-dataset", data_dir="metamath", format="pissa", max_samples=100_000,
             max_length=512, rank=128, alpha=128, lr=2e-5, batch_size=32, micro_batch_size=4, dtype="bf16",
             save_every=500)
# The toy preset (no --model): the bundled tiny model and toy data, 24 steps on a CPU in well under 3
# minutes. A tiny model needs a small rank and a much larger learning rate to move in a few dozen steps.
TOY = dict(model=os.path.join(training.ASSETS, "tiny-llama"),
           data=os.path.join(training.ASSETS, "data", "metamath_train.jsonl"), data_dir=None, format="metamath",
           max_samples=384, max_length=256,
           rank=8, alpha=16, lr=5e-4, batch_size=16, micro_batch_size=8, dtype="fp32", save_every=8)
# --loss-normalization: how the task cross-entropy of a global batch is averaged (task_loss_scale)
LOSS_NORMALIZATIONS = ("tokens", "micro-batch")
NONE_MEANS = {"model": "your checkpoint", "revision": "main", "data_dir": "none", "prompt_format": "chat when the checkpoint has a template, else alpaca",
              "pissa_niter": "exact SVD", "max_steps": "no cap", "device": "cuda when available",
              "router_aux_loss_coef": "the checkpoint's router_aux_loss_coef if its config sets output_router_logits, else 0"}


def parse_args(argv=None):
    """The run's settings (args) and every setting's default in force ({setting: value})."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = training.preset_flag(parser, TOY, PAPER, NONE_MEANS)
    flag("--model", help="Hugging Face-format Llama directory or hub id (org/name, model.resolve_model_path); giving "
                         "one selects the paper preset")
    flag("--revision", help="with a hub id: the branch, tag or commit to read")
    flag("--data", help=".jsonl/.json/.parquet file, datasets hub name or local dataset directory, or a blend of them: "
                        "SOURCE[#DATA_DIR][@FORMAT]:N,... (the first N records of each, shuffled with --seed)")
    flag("--data-dir", type=lambda value: None if value in ("", "none") else value,
         help="with a hub name or dataset directory: the sub-directory to read (datasets' data_dir; none: the "
              "whole); the paper preset's only with its own --data")
    flag("--format", choices=list(FORMATS),
         help="the records' field names (see data.FORMATS); the paper preset's only with its own --data")
    flag("--prompt-format", choices=list(PROMPT_FORMATS),
         help="alpaca: PiSSA/MetaMath's Alpaca prompt; chat: the checkpoint's chat template")
    flag("--max-samples", type=int, help="use the first N records")
    flag("--max-length", type=int, help="truncate examples to this many tokens")
    flag("--out", default=os.path.join("out", "nlg"), help="log.jsonl, config.json, checkpoint.pt, adapter/, peft_adapter/, curves.png")
    flag("--method", default="balora", choices=list(training.METHODS), help=training.METHOD_HELP)
    flag("--rank", type=int, help="LoRA rank r")
    flag("--alpha", type=float, help="LoRA alpha (scale alpha / r)")
    flag("--dropout", default=0.0, type=float, help="LoRA dropout")
    flag("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
         help="comma-separated suffixes of the nn.Linear names to adapt")
    flag("--pissa-niter", type=int, help="randomized SVD iterations for the PiSSA init")
    flag("--loraplus-lr-ratio", default=16.0, type=float, help="LoRA+ (--method loraplus): lora_B's lr over lora_A's")
    flag("--quantize", default="none", choices=training.QUANTIZE_CHOICES, help=training.QUANTIZE_HELP)
    flag("--teacher", default="full", choices=training.TEACHER_CHOICES, help=training.TEACHER_HELP)
    flag("--lambda1", default=0.025, type=float, help="consistency weight (Eq. 9)")
    flag("--lambda2", default=0.005, type=float, help="diversity weight (Eq. 10)")
    flag("--lambda3", default=0.005, type=float, help="SVD weight (Eq. 12)")
    flag("--lambda1-schedule", default="cosine", choices=["cosine", "constant"], help="cosine: lambda1 decays to 0.1 x (B.4)")
    flag("--focus-schedule", default="two_phase", choices=["two_phase", "constant"],
         help="lambda2, lambda3: off, ramp, on (B.4)")
    flag("--lambda-warmup-ratio", default=0.2, type=float, help="focus schedule: share of steps with lambda2 = lambda3 = 0")
    flag("--lambda-rampup-ratio", default=0.05, type=float, help="focus schedule: share of steps ramping them up")
    flag("--svd-k", default=10, type=int,
         help="k of Eq. 12: the top-k singular values whose sum, over the logits' Frobenius norm, is raised")
    flag("--top-k", default=20, type=int, help="diversity (Eq. 10-11): entropy over the top-K tokens")
    flag("--temperature", default=2.0, type=float, help="distillation temperature T of Eq. 9")
    flag("--reg-tokens", default="task", choices=["task", "all"],
         help="regularize the response tokens (task) or every non-padded token (all)")
    flag("--router-aux-loss-coef", type=float,
         help="MoE checkpoints: weight of the routers' load-balancing loss (model.load_balancing_loss) added to the "
              "objective and logged as router_aux (transformers' formula; its default, as its forward adds it)")
    flag("--loss-normalization", default="tokens", choices=list(LOSS_NORMALIZATIONS),
         help="the task loss over a global batch: tokens, one mean over its response tokens; micro-batch, the mean "
              "of each micro-batch's token mean (llm172/BA-LoRA train.py at 2829797 through transformers 4.45.1's Trainer)")
    flag("--lr", type=float, help="AdamW peak learning rate")
    flag("--weight-decay", default=0.0, type=float, help="AdamW weight decay")
    flag("--warmup-ratio", default=0.03, type=float, help="share of the steps warming the learning rate up before its cosine decay")
    flag("--batch-size", type=int, help="effective (global) batch size: examples per optimizer step")
    flag("--micro-batch-size", type=int, help="examples per forward on one process, the batch the regularizers see")
    flag("--epochs", default=1, type=int, help="passes over the --max-samples examples")
    flag("--max-steps", type=int, help="cap on optimizer steps (the schedules span the capped run)")
    flag("--grad-clip", default=1.0, type=float, help="max gradient norm")
    flag("--dtype", choices=["bf16", "fp32"], help="bf16: base weights bf16, adapter fp32, autocast")
    flag("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    flag("--fsdp", action="store_true", help="under torchrun: shard the model over the processes (FSDP2, see fsdp.py)")
    flag("--fsdp-cpu-offload", action="store_true", help="with --fsdp: keep the frozen base's shards in host memory")
    flag("--device", help="cpu | cuda")
    flag("--seed", default=42, type=int, help="adapter init, data order, dropout")
    flag("--save-every", type=int, help="write <out>/checkpoint.pt (--fsdp: <out>/checkpoint/) every N steps (0: never)")
    flag("--resume", action="store_true", help="continue from <out>/checkpoint.pt (--fsdp: <out>/checkpoint/)")
    flag("--overwrite", action="store_true", help="replace the previous run in --out (without it, or --resume, it is refused)")
    flag("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
         help="also send log.jsonl's numbers to TensorBoard (<out>/tensorboard) or W&B (WANDB_MODE=offline works)")
    flag("--no-progress", action="store_true", help="no tqdm bar")
    flag("--merge", action="store_true", help="also write <out>/merged: base + adapter as one standalone Hugging Face "
                                               "checkpoint, in --dtype (tools/merge_adapter.py)")
    flag("--dry-run", action="store_true", help="print the settings in force and stop, reading and writing nothing")
    args, defaults = training.resolve_settings(parser, argv, choose_preset)
    training.check_report_to(args.report_to)
    return args, defaults


def choose_preset(first):
    """The preset in force (--model given: paper) and its values; --data-dir and --format belong to the
    paper's data set, so with another --data they are the toy preset's (none, metamath)."""
    if first.model is None:
        return "toy", TOY
    if first.data is not None and first.data != PAPER["data"]:
        # a blend's counts say how much of each source it takes: no cap on their sum
        max_samples = None if blend_sources(first.data) else PAPER["max_samples"]
        return "paper", dict(PAPER, data_dir=TOY["data_dir"], format=TOY["format"], max_samples=max_samples)
    return "paper", PAPER


def data_note(args):
    """The settings block's line on the data: which set, how much, and when it is the paper's."""
    if blend_sources(args.data):
        cap = f", its first {args.max_samples:,}" if args.max_samples else ""
        return (f"data: the blend {args.data} (each source's first N records, in its @FORMAT or the {args.format} format), "
                f"shuffled with --seed {args.seed}{cap}")
    if args.data_dir:
        note = (f"data: {args.data} ({args.data_dir}, {args.max_samples:,}): the first {args.max_samples:,} records of "
                f"its {args.data_dir} train split, in the {args.format} format")
    else:
        note = f"data: {training.shown(args.data)}, up to its first {args.max_samples:,} records in the {args.format} format"
    if (args.data, args.data_dir, args.format) == (PAPER["data"], PAPER["data_dir"], PAPER["format"]):
        note += (" (the official script's data: llm172/BA-LoRA scripts/ba-lora.sh at 2829797, "
                 "MetaMathQA as fxmeng/pissa-dataset holds it; read through `datasets`: pass --data FILE for another)")
    return note


def check_parallelism(args, world_size):
    """The flags that decide how the model is spread over the processes fit together; one line naming them if not."""
    method = training.METHODS[args.method]
    if args.fsdp and (method.dora or method.kind != "lora" or method.optimizer == "lorafa" or method.calibration
                      or method.adalora or args.quantize != "none"):
        # fsdp.gathered_adapter rebuilds plain LoRA layers, and NF4 codes are buffers FSDP does not shard
        raise ValueError(f"--fsdp shards LoRA/PiSSA adapters on a full-precision base: --method {args.method} "
                         f"--quantize {args.quantize} is not supported with it (drop --fsdp, or use another --method "
                         f"and --quantize none)")
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the model over the processes torchrun starts: launch with torchrun")
    if args.fsdp_cpu_offload and not args.fsdp:
        raise ValueError("--fsdp-cpu-offload offloads FSDP shards: give --fsdp too")
    if args.batch_size % (args.micro_batch_size * world_size):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x {world_size} processes")


# -----------------------------------------------------------------------------
# Data order and the micro-batches of a step


def global_batch_indices(num_samples, batch_size, step, seed):
    """
    Sample indices of optimizer step `step` (0-based). Epoch e reads a permutation seeded by seed + e,
    cut into global batches (an incomplete last batch is dropped). Any process can compute any step,
    so resuming is just starting the loop at the saved step.
    """
    steps_per_epoch = num_samples // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def step_micro_batches(args, examples, tokenizer, prompt_format, step, rank, world_size):
    """
    This rank's micro-batches of optimizer step `step`: rank r takes the r-th contiguous slice of the
    global batch and cuts it into micro-batches, so the micro-batches (which the regularizers see whole)
    are the same for any world size. Each is (input_ids, attention_mask, labels), (B, T).
    """
    batch = global_batch_indices(len(examples), args.batch_size, step, args.seed)
    per_rank = args.batch_size // world_size
    batch = batch[rank * per_rank : (rank + 1) * per_rank]
    return [collate(tokenizer, [examples[i] for i in batch[j : j + args.micro_batch_size]], args.max_length, prompt_format)
            for j in range(0, per_rank, args.micro_batch_size)]


def response_tokens(micro_batch):
    """How many tokens of a micro-batch the task loss scores (positions whose next token is a response token)."""
    return int((micro_batch[2][:, 1:] != -100).sum())


def global_task_counts(micro_batches, device, distributed):
    """
    (response tokens, micro-batches with any) of the GLOBAL batch, all ranks' micro-batches: the
    denominators of the task loss (task_loss_scale), the same for any split into micro-batches and ranks.
    """
    tokens = [response_tokens(micro_batch) for micro_batch in micro_batches]
    counts = torch.tensor([float(sum(tokens)), float(sum(n > 0 for n in tokens))], device=device)
    if distributed:
        dist.all_reduce(counts)
    return counts[0], counts[1]


def task_loss_scale(loss_normalization, micro_batch, task_tokens, task_micro_batches, num_micro_batches):
    """
    The factor on a micro-batch's summed response-token CE such that the sum over the global batch's
    micro-batches of (scaled CE) / num_micro_batches is the step's task loss:
      tokens       the CE summed over every response token of the global batch / their number: each
                   token weighs the same, however the batch is cut into micro-batches and ranks;
      micro-batch  the mean over the micro-batches of each one's token mean: a token weighs more in a
                   micro-batch with fewer response tokens. transformers 4.45.1's Trainer (the official
                   code's pin) averages its per-micro-batch mean loss so over gradient accumulation (and
                   DDP over ranks); micro-batches with no response token, which it cannot score, are left out.
    """
    if loss_normalization == "tokens":
        return num_micro_batches / task_tokens.clamp(min=1)
    return num_micro_batches / (task_micro_batches.clamp(min=1) * max(response_tokens(micro_batch), 1))


def sketch_generator(seed, step, micro_batch_index, device):
    """The randomized SVD's sketch (Eq. 12): one fixed stream per (step, micro-batch), the same for any world size."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + micro_batch_index)


# -----------------------------------------------------------------------------
# One micro-batch: student logits -> teacher hidden states -> task loss + Eq. 13


def micro_batch_objective(args, model, raw_model, micro_batch, lambdas, teacher_lambda1, task_scale, generator,
                          device, dtype):
    """
    (total, components) of one micro-batch: task_scale * (cross-entropy summed over its response tokens)
    + Eq. 13's regularizers on the (M, V) logits of its M valid tokens. `model` may be the DDP wrapper;
    the teacher runs on `raw_model` when teacher_lambda1 > 0.
    """
    unpadded = bool(micro_batch[1].all())  # checked on the CPU: no device sync
    input_ids, attention_mask, labels = (t.to(device) for t in micro_batch)
    # a batch without padding needs no explicit mask: the model then uses SDPA's causal kernel
    padding_mask = None if unpadded else attention_mask
    targets = labels[:, 1:]  # position t predicts token t + 1
    # the M valid tokens of Eq. 9-12: positions predicting a response token, or with --reg-tokens all,
    # positions predicting any real (non-padded) token
    valid_mask = targets != -100 if args.reg_tokens == "task" else attention_mask[:, 1:].bool()
    # the positions whose logits the losses see (the last position predicts nothing): the model runs its
    # LM head on these M rows only and returns (M, V), not (B, T, V)
    output_mask = F.pad(valid_mask, (0, 1), value=False)
    with training.autocast_context(device, dtype):
        student_logits = model(input_ids, padding_mask, output_mask=output_mask).float()  # (M, V)
    # MoE: the routers' load-balancing loss of this forward, read before the teacher's forward replaces
    # the router logits (a skipped, all-masked micro-batch adds nothing)
    aux_coef = args.router_aux_loss_coef if args.router_aux_loss_coef is not None else raw_model.config.router_aux_loss_coef
    aux_coef = aux_coef if response_tokens(micro_batch) else 0.0
    router_aux = router_aux_loss(raw_model, padding_mask) if aux_coef else None
    teacher_hidden = None
    if teacher_lambda1 > 0:  # consistency (Eq. 9) needs the pretrained model on the same rows
        with torch.no_grad(), balora.pretrained_mode(raw_model), training.autocast_context(device, dtype):
            # its final hidden states (M, hidden), not its (M, V) logits: the objective forms those chunk by
            # chunk through the LM head (never adapted, so the teacher's own)
            teacher_hidden = raw_model(input_ids, padding_mask, output_mask=output_mask, return_hidden=True)
    total, components = chunked.nlg_objective_in_chunks(
        student_logits, targets[valid_mask], task_scale, teacher_hidden, lambdas, args.temperature, args.svd_k,
        args.top_k, generator=generator, teacher_head=training.teacher_head(raw_model, device, dtype))
    if router_aux is not None:
        total = total + aux_coef * router_aux
        components["router_aux"] = router_aux.detach()
    return total, components


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args, defaults = parse_args(argv)
    if args.dry_run:
        return training.dry_run(args, defaults, NONE_MEANS, [data_note(args)])
    training.check_merge(args.method, args.merge)
    training.check_loraplus_ratio(args.method, args.loraplus_lr_ratio, defaults["loraplus_lr_ratio"])
    training.check_out(args.out, args.resume, args.overwrite)
    args.model = resolve_model_path(args.model, args.revision)
    rank, local_rank, world_size, device, is_master = training.start_processes(args, defaults, NONE_MEANS, [data_note(args)])
    check_parallelism(args, world_size)
    ddp = world_size > 1 and not args.fsdp
    distributed = ddp or args.fsdp  # the ranks sum their token counts and losses
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    grad_accum = args.batch_size // (args.micro_batch_size * world_size)
    num_micro_batches = grad_accum * world_size  # micro-batches in one global batch, over all ranks
    method = training.METHODS[args.method]
    lambdas = training.lambdas_of(args, method)

    # data: the first --max-samples records; each step reads one global batch, this rank its slice
    tokenizer = Tokenizer(args.model)
    prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)  # None: from the checkpoint
    if blend_sources(args.data):
        examples = load_blend(args.data, args.format, args.seed, args.max_samples, args.data_dir)
    else:
        examples = load_examples(args.data, args.format, args.max_samples, args.data_dir)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one global batch (--batch-size {args.batch_size})")
    total_steps = steps_per_epoch * args.epochs if args.max_steps is None else min(steps_per_epoch * args.epochs, args.max_steps)

    # model: frozen base in --dtype, adapters in fp32; the same seed on every rank gives the same adapter init
    torch.manual_seed(args.seed)
    lora = dict(target_modules=args.targets.split(","), r=args.rank, alpha=args.alpha, init=method.init,
                dropout=args.dropout, pissa_niter=args.pissa_niter, dora=method.dora)
    if args.fsdp:  # built on the meta device, each Block read, adapted and sharded in turn
        model, adapter = fsdp.load_sharded_llama(args.model, dtype, device, lora, cpu_offload=args.fsdp_cpu_offload)
    else:
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        adapter = training.adapt(model, args.quantize, args.teacher, kind=method.kind, adalora=method.adalora,
                                 **lora)  # PiSSA's SVD, then the 4-bit base
    model.gradient_checkpointing = args.grad_checkpointing
    training.set_threads(model, device)
    model.train()
    # LoRA-GA / CorDA start from the model on the first global batch (the same on every rank): its mean task CE
    training.calibrate(model, method, [
        lambda micro_batch=micro_batch: micro_batch_objective(
            args, model, model, micro_batch, (0.0,) * len(lambdas), 0.0, 1 / max(1, response_tokens(micro_batch)),
            None, device, dtype)[0]
        for micro_batch in step_micro_batches(args, examples, tokenizer, prompt_format, 0, 0, 1)])
    allocator = training.rank_allocator(model, method, total_steps)  # AdaLoRA's rank budget, else None
    raw_model = model  # the teacher pass and checkpoints use the module itself, never the DDP wrapper
    if ddp:  # (fully_shard changes the module in place: under --fsdp, model is raw_model)
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # training-time randomness (LoRA dropout) differs per rank
    random.seed(args.seed + rank)
    optimizer = training.build_optimizer(raw_model, args.lr, args.weight_decay, method, args.loraplus_lr_ratio)
    scheduler = training.lr_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps, "cosine")

    log_path, checkpoint_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "checkpoint.pt")
    if args.fsdp:  # sharded: <out>/checkpoint/step-<N>/ and the latest.json that names it
        checkpoint_path = os.path.join(args.out, "checkpoint", fsdp.LATEST)
    start_step, skipped_batches, reporter = 0, 0, None
    if args.resume:
        start_step, skipped_batches = resume(args, checkpoint_path, raw_model, optimizer, scheduler, allocator)
    skipped_at_start = skipped_batches
    if is_master:
        reporter = start_run(args, defaults, start_step, log_path, prompt_format, examples, total_steps, world_size,
                             grad_accum, method, adapter)

    progress = tqdm(total=total_steps, initial=start_step, disable=not is_master or args.no_progress, dynamic_ncols=True)
    interrupt = training.Interrupt()  # the first Ctrl-C saves after the step in flight
    for step in range(start_step, total_steps):
        t0 = time.time()
        micro_batches = step_micro_batches(args, examples, tokenizer, prompt_format, step, rank, world_size)
        task_tokens, task_micro_batches = global_task_counts(micro_batches, device, distributed)
        step_lambdas = balora.scheduled_lambdas(step, total_steps, lambdas, args.lambda1_schedule, args.focus_schedule,
                                                args.lambda_warmup_ratio, args.lambda_rampup_ratio)
        # summed over micro-batches (and ranks), kept on the device until the step ends (one sync): the
        # objective, the task CE sum, each regularizer and how many micro-batches computed it, tokens, skips
        sums = dict.fromkeys(["total", "task", "tokens", "skipped", *balora.REGULARIZERS,
                              *(name + "_n" for name in balora.REGULARIZERS), "router_aux", "router_aux_n"], 0.0)
        for micro_step, micro_batch in enumerate(micro_batches):
            last_micro_step, micro_lambdas = micro_step == grad_accum - 1, step_lambdas
            if not response_tokens(micro_batch):
                sums["skipped"] += 1
                warnings.warn(f"step {step + 1}: a micro-batch has every label masked (prompts longer than "
                              f"--max-length {args.max_length}?); skipping it")
                if not (args.fsdp or (ddp and last_micro_step)):  # FSDP all-gathers every Block in every forward
                    continue
                micro_lambdas = tuple(0.0 for _ in step_lambdas)  # DDP: still run backward (a zero loss) for the all-reduce
            if ddp:
                model.require_backward_grad_sync = last_micro_step  # all-reduce gradients once per step
            # scaled so that the sum over the global batch's micro-batches of total / num_micro_batches is
            # (mean CE, --loss-normalization) + sum_i lambda_i * (micro-batch mean of regularizer i), Eq. 13
            scale = task_loss_scale(args.loss_normalization, micro_batch, task_tokens, task_micro_batches, num_micro_batches)
            generator = sketch_generator(args.seed, step, rank * grad_accum + micro_step, device)
            # under FSDP the teacher forward is a collective: every rank runs it whenever the step needs it
            teacher_lambda1 = (step_lambdas if args.fsdp else micro_lambdas)[0]
            total, components = micro_batch_objective(args, model, raw_model, micro_batch, micro_lambdas, teacher_lambda1,
                                                      scale, generator, device, dtype)
            # DDP averages gradients over ranks, so / grad_accum here makes it / num_micro_batches overall.
            # FSDP reduce-scatters (averages) them after every backward: each rank then accumulates its
            # shard only, never a whole gradient (6.6 GB in float32 for a 70B adapter at r = 128)
            if allocator:  # AdaLoRA's orthogonality regularizer on P and Q, with every forward
                total = total + baselines.ORTH_REG_WEIGHT * baselines.orthogonality_regularizer(raw_model)
            (total / grad_accum).backward()
            sums["total"] += total.detach() / num_micro_batches
            sums["tokens"] += micro_batch[1].sum()
            sums["task"] += components.pop("task") * scale / num_micro_batches  # its share of the task loss; then each regularizer computed
            for name, value in components.items():
                sums[name] += value
                sums[name + "_n"] += 1
        sums = sum_over_ranks(sums, device, distributed)
        training.check_finite(sums["total"], step + 1, "loss", checkpoint_path)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], args.grad_clip)
        if args.fsdp:
            grad_norm = grad_norm.full_tensor()  # a DTensor: the norm over every rank's shards
        training.check_finite(grad_norm, step + 1, "gradient norm", checkpoint_path)  # a finite loss can still have one
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if allocator:  # AdaLoRA: importance from these gradients, then the step's rank budget
            allocator.update_and_allocate(raw_model, step)
        optimizer.zero_grad(set_to_none=True)
        skipped_batches += int(sums["skipped"])
        record = step_record(step, lr, step_lambdas, sums, task_tokens.item(), skipped_batches, grad_norm, time.time() - t0)
        if is_master:
            training.append_jsonl(log_path, record)
            reporter.log(record)
            show_progress(progress, record)
        interrupted = step + 1 < total_steps and interrupt.requested()
        if interrupted or (args.save_every and (step + 1) % args.save_every == 0):
            save(args, checkpoint_path, raw_model, optimizer, scheduler, allocator, step + 1, skipped_batches)
        if interrupted:
            progress.close()
            interrupt.stop(step + 1, checkpoint_path, argv, is_master)
    interrupt.close()
    progress.close()
    if allocator:  # saved and exported as the LoRA adapter it computes
        baselines.adalora_to_lora(raw_model)
    finish_run(args, raw_model, total_steps, start_step, num_micro_batches, skipped_batches - skipped_at_start,
               skipped_batches, is_master, reporter)


# -----------------------------------------------------------------------------
# Around the loop: resume, the step's record, checkpoints, the end of the run


def resume(args, checkpoint_path, raw_model, optimizer, scheduler, allocator):
    """Load the checkpoint into the model, optimizer, scheduler and RNG; refuse other flags. Returns (step, skipped)."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path!r}")
    if args.fsdp:
        checkpoint = fsdp.load_checkpoint(os.path.dirname(checkpoint_path), raw_model, optimizer, scheduler)
        training.set_rng_state(checkpoint["rng"])
    else:
        checkpoint = training.load_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, allocator)
    training.check_resume_config(checkpoint["config"], training.run_config(args), checkpoint_path)
    return checkpoint["step"], checkpoint["data_state"]["skipped_batches"]


def start_run(args, defaults, start_step, log_path, prompt_format, examples, total_steps, world_size, grad_accum,
              method, adapter):
    """Rank 0, before the first step: the log rewound to the checkpoint, config.json, the reporter, a summary."""
    if args.overwrite and not args.resume:
        training.clear_out(args.out)
    os.makedirs(args.out, exist_ok=True)
    kept = training.rewind_log(log_path, start_step) if args.resume else []  # drop steps logged after the checkpoint
    training.remove_stale_temp_files(args.out)
    with open(log_path, "w") as f:
        f.writelines(kept)
    training.write_config(args, defaults, derived=dict(prompt_format=prompt_format, examples=len(examples),
                                                       total_steps=total_steps, world_size=world_size,
                                                       gradient_accumulation=grad_accum,
                                                       trainable_parameters=adapter["trainable"]))
    print(f"{args.method}: init={method.init}, {adapter['trainable']:,} trainable of {adapter['total']:,} parameters, "
          f"{len(examples)} examples in the {prompt_format} prompt format, {total_steps} steps of {args.batch_size} "
          f"({world_size} x {grad_accum} x {args.micro_batch_size}), start at step {start_step}")
    return training.Reporter(args.report_to, args.out, training.settings_record(args))


def sum_over_ranks(sums, device, distributed):
    """The step's sums as Python numbers, added up over the ranks (one all-reduce; the same dict on every rank)."""
    reduced = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in sums.values()])
    if distributed:
        dist.all_reduce(reduced)
    return dict(zip(sums, reduced.tolist()))


def step_record(step, lr, lambdas, sums, task_tokens, skipped_batches, grad_norm, seconds):
    """
    The log.jsonl line of a step: lr, the lambdas, the task loss (mean CE, --loss-normalization), each
    regularizer of balora.REGULARIZERS as the mean over the micro-batches that computed it (None: none
    did), the total objective, and counts.
    """
    record = {"step": step + 1, "lr": lr, **{f"lambda{i}": weight for i, weight in enumerate(lambdas, 1)},
              "task": sums["task"]}
    for name in balora.REGULARIZERS:
        record[name] = sums[name] / sums[name + "_n"] if sums[name + "_n"] else None
    if sums["router_aux_n"]:  # MoE with --router-aux-loss-coef > 0: the mean over the micro-batches
        record["router_aux"] = sums["router_aux"] / sums["router_aux_n"]
    record.update(total=sums["total"], tokens=int(sums["tokens"]), task_tokens=int(task_tokens),
                  skipped_batches=skipped_batches, grad_norm=float(grad_norm), time=seconds)
    return record


def show_progress(progress, record):
    """The tqdm bar's step: tokens per second, the task loss and each regularizer computed."""
    progress.set_postfix({"tok/s": f"{record['tokens'] / record['time']:.0f}",
                          **{name: f"{record[name]:.4f}" for name in ("task", *balora.REGULARIZERS)
                             if record[name] is not None}})
    progress.update(1)


def save(args, checkpoint_path, raw_model, optimizer, scheduler, allocator, step, skipped_batches):
    """The checkpoint after `step` steps: <out>/checkpoint.pt, or under --fsdp the sharded <out>/checkpoint/."""
    data_state, config = {"step": step, "skipped_batches": skipped_batches}, training.run_config(args)
    if args.fsdp:
        fsdp.save_checkpoint(os.path.dirname(checkpoint_path), raw_model, optimizer, scheduler, step,
                             training.rng_state(), data_state, config)
    else:
        training.save_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, step, data_state=data_state,
                                 config=config, allocator=allocator)


def finish_run(args, raw_model, total_steps, start_step, num_micro_batches, skipped_in_run, skipped_batches, is_master,
               reporter):
    """The adapter written (ours and peft's) with its curves; a run that trained nothing exits with an error instead."""
    micro_batches_run = (total_steps - start_step) * num_micro_batches
    if total_steps == 0 or (micro_batches_run and skipped_in_run >= micro_batches_run):
        raise RuntimeError(f"nothing was trained: {skipped_in_run} of {micro_batches_run} micro-batches "
                           f"had every label masked (prompts longer than --max-length {args.max_length}?) or there were no "
                           f"steps (--max-steps {args.max_steps}); no adapter written")
    if is_master and skipped_batches:
        print(f"skipped {skipped_batches} micro-batches with every label masked (raise --max-length {args.max_length}?)")
    # under FSDP the adapter is all-gathered first (every rank takes part), then written as always
    adapter_model = fsdp.gathered_adapter(raw_model) if args.fsdp else raw_model
    if is_master:
        training.check_finite_parameters(adapter_model, os.path.join(args.out, "adapter"))
        adapters.save_adapter(adapter_model, os.path.join(args.out, "adapter"))
        if balora.lora_layers(adapter_model):  # peft holds LoRA-shaped adapters only
            adapters.export_peft(adapter_model, os.path.join(args.out, "peft_adapter"), args.model, task_type="CAUSAL_LM")
        if args.merge:
            from tools import merge_adapter

            merged = merge_adapter.merge(args.model, os.path.join(args.out, "adapter"), os.path.join(args.out, "merged"),
                                         dtype={"bf16": "bfloat16", "fp32": "float32"}[args.dtype], overwrite=True)
            print(f"merged checkpoint: {merged}")
        reporter.close()
        plot.plot_run(args.out)
        print(f"adapter saved to {os.path.join(args.out, 'adapter')} (peft format: {os.path.join(args.out, 'peft_adapter')}); "
              f"curves: {os.path.join(args.out, plot.CURVES)}")
    training.cleanup_distributed()


if __name__ == "__main__":
    training.run_cli(main)
    if "RANK" in os.environ:  # launched by torchrun
        training.exit_torchrun_worker()
