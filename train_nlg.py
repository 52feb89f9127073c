"""
Fine-tune a LLaMA-style model on instruction data with LoRA, PiSSA or BA-LoRA (paper Sec. 2.2.2, 3.1, B.4).

    python train_nlg.py                                   # toy preset: assets/tiny-llama, toy data (< 3 min on CPU)
    python train_nlg.py --model /path/to/Llama-2-7b-hf    # paper preset (B.4): 100K MetaMathQA samples from the hub
    python train_nlg.py --model ... --dry-run             # print the settings in force and stop
    torchrun --standalone --nproc_per_node=4 train_nlg.py --model ...    # DDP, same global batch
    torchrun --standalone --nproc_per_node=8 train_nlg.py --model ... --fsdp   # FSDP2: the model sharded (fsdp.py)
    python train_nlg.py --model ~/.cache/balora/smollm2-135m-instruct --data FILE ...   # an instruct model, in its chat template

Settings come from one of two presets, toy (no --model) or paper (--model given); every flag's --help
shows its value under both. A run prints the preset and each value that differs from it, and saves
every value to <out>/config.json. One loop, read top to bottom: parse flags -> load model -> add LoRA
-> data -> for each optimizer step: micro-batches (student logits -> teacher hidden states -> task loss
+ BA-LoRA regularizers in one node -> backward) -> clip -> step -> log -> maybe save. The first section holds the
training infrastructure train_nlu.py imports (distributed setup, atomic checkpoints, JSONL log and
reporting, LR schedule, finite-loss check, autocast, presets and settings).

Data parallelism (DDP or --fsdp) changes no loss: the regularizers (Eq. 9-12) are computed per
micro-batch, on its own (M, V) logits, and rank r takes the r-th contiguous slice of each global
batch, so every micro-batch, and every regularizer value, is the one a single process computes with
the same --batch-size and --micro-batch-size; only the gradient sum is spread over the ranks.
"""

import argparse
import importlib.util
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import balora
import fsdp
import plot
from data import FORMATS, PROMPT_FORMATS, Tokenizer, collate, load_examples, resolve_prompt_format
from model import Llama

# -----------------------------------------------------------------------------
# Shared training infrastructure (train_nlu.py imports these; keep the names stable)


def setup_distributed(device=None):
    """
    Start torch.distributed when launched by torchrun (RANK/LOCAL_RANK/WORLD_SIZE in the environment),
    otherwise run as a single process. Returns (rank, local_rank, world_size, device, is_master).
    `device` is the --device flag: None picks cuda when available; "cuda" becomes cuda:LOCAL_RANK
    under torchrun. The backend follows the device: nccl on GPU, gloo on CPU.
    """
    if "RANK" not in os.environ:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 0, 1, device, True
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device, rank == 0


def cleanup_distributed():
    """
    Tear down the process group if setup_distributed started one, after a barrier: every rank waits
    until rank 0 has written its final files (adapter, export), so that no rank tears down its
    communicator while another may still be in a collective.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_torchrun_worker():
    """
    End a torchrun worker without Python's interpreter shutdown, once main() has returned.

    Why: DDP keeps gloo's worker threads alive past destroy_process_group, and a worker thread that is
    still releasing the last collective's tensor takes the GIL; if the interpreter is shutting down at
    that moment the process aborts ("terminate called without an active exception", SIGABRT; see
    pytorch/pytorch#190489) and torchrun kills the other ranks. Here it hit ~1 bare 2-process run in 25,
    and 1 in 77 with a barrier before the teardown. Every file is written and closed by now, so flush
    the streams and leave with os._exit, which skips the shutdown. Not needed for a plain `python` run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def atomic_torch_save(obj, path):
    """
    torch.save that never leaves a half-written file at `path`: write a temp file in the same
    directory, fsync it, then os.replace (atomic on POSIX). A crash mid-save keeps the old file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def rng_state():
    """
    The RNG states of this process (python, torch CPU, and CUDA when present) as tensors and plain
    numbers, so that a checkpoint loads with torch.load(weights_only=True): Python's Mersenne Twister
    state is its 625 words (each < 2**32) plus the cached Gaussian, not a pickled tuple.
    """
    version, words, gauss_next = random.getstate()
    state = {"python": torch.tensor(words, dtype=torch.int64), "python_version": version,
             "python_gauss_next": gauss_next, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss_next"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, step, data_state=None, config=None):
    """
    Everything needed to continue a run exactly: the trainable weights (adapter, plus any head),
    optimizer and scheduler state, the step, the data position (`data_state`, any dict) and the RNG
    states of every rank. Collective under DDP (RNG states are gathered), so every rank calls it;
    rank 0 writes `path` atomically. `model` is the unwrapped module (not the DDP wrapper).
    """
    check_finite_parameters(model, path)  # identical on every rank, so all ranks raise together
    rng = [rng_state()]
    if dist.is_available() and dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state())
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    trainable = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    checkpoint = {
        "step": step,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_state": data_state,
        "rng": rng,
        "config": config,
    }
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path, model, optimizer, scheduler):
    """
    Restore a save_checkpoint file into `model` (unwrapped), `optimizer` and `scheduler`, and restore
    this rank's RNG state. Returns the checkpoint dict (step, data_state, config, ...).
    The model must already carry the same adapter structure (add_lora with the same settings).
    """
    try:  # weights_only: tensors and plain data only, so a crafted file cannot run code when read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"--resume: {path} holds more than tensors and plain data and was not read "
                         f"(a balora checkpoint never does): {str(error).splitlines()[0]}") from None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(checkpoint["trainable"]))
    unexpected = sorted(set(checkpoint["trainable"]) - set(trainable))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(checkpoint["trainable"][name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rank, world_size = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if len(checkpoint["rng"]) != world_size:
        raise ValueError(
            f"checkpoint {path!r} was written by {len(checkpoint['rng'])} processes, this run has {world_size}: "
            "resume with the same world size to continue exactly"
        )
    set_rng_state(checkpoint["rng"][rank])
    return checkpoint


def remove_stale_temp_files(directory):
    """Delete the temp files atomic_torch_save leaves when a run is killed mid-save (".tmp-<name>...")."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(directory, name))


def rewind_log(log_path, last_step):
    """
    The lines of log.jsonl up to `last_step` (the checkpoint a run resumes from), so the log matches it.
    A torn last line (the run was killed while writing it) is dropped, and said so; a broken line
    anywhere else is an error naming the file and line.
    """
    if not os.path.isfile(log_path):
        return []
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"{log_path}: dropped the torn last line {number} (the run was killed while writing it)")
                continue
            raise ValueError(f"{log_path}, line {number}: not a JSON record; cannot resume with this log") from None
        if record["step"] <= last_step:
            kept.append(line)
    return kept


def append_jsonl(path, record):
    """Append one JSON record as a line (the per-step training log)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def scalars_of(record, prefix=""):
    """(tag, number) pairs of a log record, the step aside; a nested dict's keys are joined by "/"."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from scalars_of(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and (prefix or key != "step"):
            yield prefix + key, value


def check_report_to(kind):
    """--report-to's library must be installed: say so now, before the model loads or anything is written."""
    if kind in ("tensorboard", "wandb") and importlib.util.find_spec(kind) is None:
        raise ModuleNotFoundError(f"--report-to {kind} needs the {kind} package: pip install {kind}")


class Reporter:
    """
    --report-to: the numbers of every log.jsonl record, under the record's own keys, go to TensorBoard
    as well (event files in <out>/tensorboard: `tensorboard --logdir <out>`) or to Weights & Biases
    (project $WANDB_PROJECT, else "balora"; with WANDB_MODE=offline the run is written under <out>/wandb
    for a later `wandb sync`). A nested record (NLU validation) gives tags like "validation/validation/
    accuracy". "none": nothing is sent. Only rank 0 makes one.
    """

    def __init__(self, kind, out, config):
        self.kind, self.sink = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.sink = SummaryWriter(os.path.join(out, "tensorboard"))
        elif kind == "wandb":
            import wandb

            self.sink = wandb.init(project=os.environ.get("WANDB_PROJECT", "balora"), dir=out, config=config)

    def log(self, record):
        scalars = dict(scalars_of(record))
        if self.kind == "tensorboard":
            for tag, value in scalars.items():
                self.sink.add_scalar(tag, value, record["step"])
        elif self.kind == "wandb":
            self.sink.log(scalars, step=record["step"])

    def close(self):
        if self.kind == "tensorboard":
            self.sink.close()
        elif self.kind == "wandb":
            self.sink.finish()


def lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, decay="cosine"):
    """
    LambdaLR: linear warm-up from 0 over `warmup_steps`, then decay to 0 at `total_steps`, "cosine"
    (the PiSSA / BA-LoRA NLG runs) or "linear" (the GLUE runs, B.4). With warm-up the first update has
    lr 0, as there.
    """
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")

    def lr_factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        remaining = max(1, total_steps - warmup_steps)
        if decay == "linear":
            return max(0.0, (total_steps - step) / remaining)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / remaining)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def check_finite(value, step, quantity="loss", checkpoint_path=None):
    """
    Stop the run before optimizer step `step` applies a NaN/inf `quantity` (the loss, the gradient
    norm, a logit matrix: a tensor is checked whole). Under DDP the ranks agree first (one all-reduce),
    so every rank stops at the same step. Since no non-finite update is ever applied, the last
    checkpoint holds finite values only: the error names it, so the run can resume with other flags.
    """
    finite = torch.isfinite(torch.as_tensor(value)).all().to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        finite = finite.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 1.0:
        return
    shown = f" ({float(value)})" if torch.as_tensor(value).numel() == 1 else ""
    if checkpoint_path is not None and os.path.isfile(checkpoint_path):
        last = f"the last checkpoint, {checkpoint_path}, holds only finite values"
    else:
        last = "no checkpoint was written before it"
    raise FloatingPointError(f"non-finite {quantity}{shown} at step {step}; stopped before the optimizer step "
                             f"(lower --lr?): {last}")


def check_finite_parameters(model, what):
    """Refuse to write `what` (a checkpoint, an adapter) when a trainable tensor holds NaN/inf."""
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise FloatingPointError(f"not writing {what}: {len(broken)} trainable tensors are non-finite, e.g. {broken[0]}")


def autocast_context(device, dtype):
    """bf16 autocast on `device` when dtype is bfloat16 (or "bf16"); a no-op context for fp32."""
    if dtype in (torch.bfloat16, "bf16"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# Settings: two presets (toy, paper), one rule to resolve them, printed at the start and saved

REPO = os.path.dirname(os.path.abspath(__file__))
# Settings that may change between a run and its --resume without changing the result (both
# trainers); every other one must match the checkpoint. --out is where the run lives, so it may move.
RESUME_MAY_CHANGE = ("resume", "save_every", "device", "grad_checkpointing", "no_progress", "out", "report_to", "dry_run")


def teacher_head(model, device, dtype):
    """
    The teacher's LM head for balora.nlg_objective_fused, which runs it on chunks of the teacher's
    final hidden states: under the teacher forward's autocast, so that each chunk of logits is the
    one that forward would have returned (bf16 for bf16 runs). lm_head is never a LoRA target, so the
    current head is the pretrained one.
    """
    def head(hidden):
        with autocast_context(device, dtype):
            return model.lm_head(hidden)
    return head


def normalized(value):
    """A setting as it is recorded and compared: paths that exist are resolved (realpath), so `DIR/`
    and `DIR`, or a relative and an absolute spelling, are one value."""
    if isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    if isinstance(value, (list, tuple)):
        return [normalized(item) for item in value]
    return value


def shown(value, none="none"):
    """A setting as --help and the settings block print it: paths in the repo relative to it."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(shown(item) for item in value)
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(REPO + os.sep):
        return os.path.relpath(value, REPO)
    return str(value)


def preset_flag(parser, toy, paper, none_means):
    """
    A function that adds one setting's flag: left None by argparse (resolve_settings fills it from the
    preset in force), its help ending with the default under both presets, "(toy: 8, paper: 128)" or
    "(toy and paper: 42)". `none_means` says what a None preset value stands for ({"max_steps": "no cap"}).
    """
    def flag(name, help, **kwargs):
        key = name[2:].replace("-", "_")
        none = none_means.get(key, "none")
        toy_value, paper_value = (shown(preset[key], none).replace("%", "%%") for preset in (toy, paper))
        default = f"toy and paper: {toy_value}" if toy_value == paper_value else f"toy: {toy_value}, paper: {paper_value}"
        parser.add_argument(name, default=None, help=f"{help} ({default})", **kwargs)
    return flag


class DeprecatedAlias(argparse.Action):
    """An old flag name, kept for one release: it sets its new flag and prints a note saying so."""

    def __init__(self, option_strings, dest, new, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"note: {option_string} is deprecated and goes in the next release: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated_epilog(aliases):
    return "deprecated names, accepted until the next release: " + ", ".join(
        f"{old} (now {new})" for old, (new, _) in aliases.items())


def add_deprecated_aliases(parser, aliases):
    """Accept each old name of `aliases` ({old: (new, type)}) as its new flag; --help lists the new one only."""
    for old, (new, value_type) in aliases.items():
        parser.add_argument(old, dest=new[2:].replace("-", "_"), type=value_type, action=DeprecatedAlias, new=new)


def resolve_settings(args, presets):
    """
    The settings in force, resolved once: the paper preset when --model is given, else the toy one
    (presets: {"toy": {...}, "paper": {...}}, one value per setting); every setting left unset takes
    the preset's value. Records which preset in args.preset.
    """
    args.preset = "paper" if args.model is not None else "toy"
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def changed_settings(args, preset):
    """{setting: value} of every setting that differs from the preset in force (--model and --dry-run aside)."""
    return {key: getattr(args, key) for key, value in preset.items()
            if key not in ("model", "dry_run") and normalized(getattr(args, key)) != normalized(value)}


def settings_block(args, preset, none_means, notes=()):
    """The block printed at the start of a run: the preset, every value that differs from it, `notes`."""
    why = ("--model given: the paper's settings, Sec. 3.1 and App. B" if args.preset == "paper" else
           "no --model: the bundled tiny model and toy data; give --model for the paper's settings")
    lines = [f"settings: the {args.preset} preset ({why})"]
    changed = changed_settings(args, preset)
    lines += [f"  --{key.replace('_', '-')} {shown(value)}  (preset: {shown(preset[key], none_means.get(key, 'none'))})"
              for key, value in changed.items()]
    if not changed:
        lines.append("  no value differs from the preset")
    lines += [f"  {note}" for note in notes]
    lines.append("  every value: below (a dry run writes nothing)" if args.dry_run else
                 f"  every value: {os.path.join(args.out, 'config.json')}")
    return "\n".join(lines)


def settings_record(args):
    """Every setting of the run, normalized: what <out>/config.json holds (resume compares run_config's share)."""
    return {key: normalized(value) for key, value in vars(args).items()}


def run_config(args):
    """The settings that decide a run's result, as its checkpoint records them."""
    return {key: value for key, value in settings_record(args).items() if key not in RESUME_MAY_CHANGE}


def check_resume_config(saved, config, path):
    """One resume rule for both trainers: refuse when a result-changing setting differs, listing each."""
    changed = [f"--{key.replace('_', '-')} {saved.get(key)!r} -> {config.get(key)!r}"
               for key in sorted(set(saved) | set(config)) if saved.get(key) != config.get(key)]
    if changed:
        raise ValueError(f"--resume: {path} was written with other flags ({'; '.join(changed)}); "
                         "resume with the checkpoint's values, or start a new --out")


def write_config(args, preset, derived):
    """
    <out>/config.json (rank 0, once the inputs are checked): the preset, what differs from it, every
    setting, and the values derived from them and the inputs (`derived`: steps, world size, ...).
    """
    changed = {key: normalized(value) for key, value in changed_settings(args, preset).items()}
    record = {"preset": args.preset, "changed": changed, "settings": settings_record(args), "derived": derived}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(record, f, indent=1)


# -----------------------------------------------------------------------------
# Data order


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


# -----------------------------------------------------------------------------
# Flags

# --method -> (adapter initialization, BA-LoRA regularizers on?) as in Table 10.
METHODS = {"lora": ("lora", False), "pissa": ("pissa", False), "balora": ("pissa", True), "lora+reg": ("lora", True),
           "dora": ("lora", False), "dora+reg": ("lora", True)}
DORA_METHODS = ("dora", "dora+reg")  # their layers are balora.DoRALinear (trainable magnitude), Table 10's DoRA rows
QUANTIZE_HELP = ("none | nf4: the frozen base in 4-bit NormalFloat, block size 64 (QLoRA; QPiSSA / QBA-LoRA with a "
                 "PiSSA init, Fig. 5) | nf4-dq: nf4 with double quantization of the block constants")

ASSETS = os.path.join(REPO, "assets")
# The paper preset (Sec. 3.1, B.4: LLaMA-2-7B on 100K MetaMathQA samples, one epoch), in force when --model is given.
PAPER = dict(
    model=None, data="meta-math/MetaMathQA", format="metamath", prompt_format=None, max_samples=100_000, max_length=512,
    out=os.path.join("out", "nlg"), method="balora", rank=128, alpha=128, dropout=0.0,
    targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", pissa_niter=None, quantize="none",
    lambda1=0.025, lambda2=0.005, lambda3=0.005, lambda1_schedule="cosine", focus_schedule="two_phase",
    lambda_warmup_ratio=0.2, lambda_rampup_ratio=0.05, svd_k=10, top_k=20, temperature=2.0, reg_tokens="task",
    lr=2e-5, weight_decay=0.0, warmup_ratio=0.03, batch_size=32, micro_batch_size=4, epochs=1, max_steps=None,
    grad_clip=1.0, dtype="bf16", grad_checkpointing=False, fsdp=False, fsdp_cpu_offload=False, device=None, seed=42,
    save_every=500, resume=False, report_to="none", no_progress=False, dry_run=False,
)
# The toy preset (no --model): the bundled tiny model and toy data, 24 steps on a CPU in well under 3
# minutes. A tiny model needs a small rank and a much larger learning rate to move in a few dozen steps.
TOY = dict(PAPER, model=os.path.join(ASSETS, "tiny-llama"), data=os.path.join(ASSETS, "data", "metamath_train.jsonl"),
           max_samples=384, max_length=256, rank=8, alpha=16, lr=5e-4, batch_size=16, micro_batch_size=8,
           dtype="fp32", save_every=8)
PRESETS = {"toy": TOY, "paper": PAPER}
NONE_MEANS = {"model": "your checkpoint", "prompt_format": "chat when the checkpoint has a template, else alpaca",
              "pissa_niter": "exact SVD", "max_steps": "no cap", "device": "cuda when available"}
ALIASES = {"--max-len": ("--max-length", int)}  # old name: (new flag, type)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=deprecated_epilog(ALIASES),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = preset_flag(parser, TOY, PAPER, NONE_MEANS)
    flag("--model", help="Hugging Face-format Llama directory; giving one selects the paper preset")
    flag("--data", help=".jsonl/.json/.parquet file or datasets hub name")
    flag("--format", choices=list(FORMATS), help="the records' field names (see data.FORMATS)")
    flag("--prompt-format", choices=list(PROMPT_FORMATS),
         help="alpaca: PiSSA/MetaMath's Alpaca prompt; chat: the checkpoint's chat template")
    flag("--max-samples", type=int, help="use the first N records")
    flag("--max-length", type=int, help="truncate examples to this many tokens")
    flag("--out", help="log.jsonl, config.json, checkpoint.pt, adapter/, peft_adapter/, curves.png")
    flag("--method", choices=list(METHODS),
         help="lora | pissa | balora (pissa + regularizers) | lora+reg | dora | dora+reg (Table 10)")
    flag("--rank", type=int, help="LoRA rank r")
    flag("--alpha", type=float, help="LoRA alpha (scale alpha / r)")
    flag("--dropout", type=float, help="LoRA dropout")
    flag("--targets", help="comma-separated suffixes of the nn.Linear names to adapt")
    flag("--pissa-niter", type=int, help="randomized SVD iterations for the PiSSA init")
    flag("--quantize", choices=list(balora.QUANTIZE), help=QUANTIZE_HELP)
    flag("--lambda1", type=float, help="consistency weight (Eq. 9)")
    flag("--lambda2", type=float, help="diversity weight (Eq. 10)")
    flag("--lambda3", type=float, help="SVD weight (Eq. 12)")
    flag("--lambda1-schedule", choices=["cosine", "constant"], help="cosine: lambda1 decays to 0.1 x (B.4)")
    flag("--focus-schedule", choices=["two_phase", "constant"], help="lambda2, lambda3: off, ramp, on (B.4)")
    flag("--lambda-warmup-ratio", type=float, help="focus schedule: share of steps with lambda2 = lambda3 = 0")
    flag("--lambda-rampup-ratio", type=float, help="focus schedule: share of steps ramping them up")
    flag("--svd-k", type=int, help="k of Eq. 12: the top-k singular values whose sum, over the logits' Frobenius norm, is raised")
    flag("--top-k", type=int, help="diversity (Eq. 10-11): entropy over the top-K tokens")
    flag("--temperature", type=float, help="distillation temperature T of Eq. 9")
    flag("--reg-tokens", choices=["task", "all"], help="regularize the response tokens (task) or every non-padded token (all)")
    flag("--lr", type=float, help="AdamW peak learning rate")
    flag("--weight-decay", type=float, help="AdamW weight decay")
    flag("--warmup-ratio", type=float, help="share of the steps warming the learning rate up before its cosine decay")
    flag("--batch-size", type=int, help="effective (global) batch size: examples per optimizer step")
    flag("--micro-batch-size", type=int, help="examples per forward on one process, the batch the regularizers see")
    flag("--epochs", type=int, help="passes over the --max-samples examples")
    flag("--max-steps", type=int, help="cap on optimizer steps (the schedules span the capped run)")
    flag("--grad-clip", type=float, help="max gradient norm")
    flag("--dtype", choices=["bf16", "fp32"], help="bf16: base weights bf16, adapter fp32, autocast")
    flag("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    flag("--fsdp", action="store_true", help="under torchrun: shard the model over the processes (FSDP2, see fsdp.py)")
    flag("--fsdp-cpu-offload", action="store_true", help="with --fsdp: keep the frozen base's shards in host memory")
    flag("--device", help="cpu | cuda")
    flag("--seed", type=int, help="adapter init, data order, dropout")
    flag("--save-every", type=int, help="write <out>/checkpoint.pt (--fsdp: <out>/checkpoint/) every N steps (0: never)")
    flag("--resume", action="store_true", help="continue from <out>/checkpoint.pt (--fsdp: <out>/checkpoint/)")
    flag("--report-to", choices=["none", "tensorboard", "wandb"],
         help="also send log.jsonl's numbers to TensorBoard (<out>/tensorboard) or W&B (WANDB_MODE=offline works)")
    flag("--no-progress", action="store_true", help="no tqdm bar")
    flag("--dry-run", action="store_true", help="print the settings in force and stop, reading and writing nothing")
    add_deprecated_aliases(parser, ALIASES)
    args = parser.parse_args(argv)
    resolve_settings(args, PRESETS)
    check_report_to(args.report_to)
    return args


def data_note(args):
    """The settings block's line on the data: which set, how much, and when it is the paper's."""
    note = f"data: {shown(args.data)}, its first {args.max_samples:,} records in the {args.format} format"
    if args.preset == "paper" and args.data == PAPER["data"]:
        note += " (the paper's data set, Sec. 3.1; read from the hub: pass --data FILE for another)"
    return note


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.dry_run:
        print(settings_block(args, preset, NONE_MEANS, [data_note(args)]))
        print(json.dumps(settings_record(args), indent=1))
        return settings_record(args)
    rank, local_rank, world_size, device, is_master = setup_distributed(args.device)
    if is_master:
        print(settings_block(args, preset, NONE_MEANS, [data_note(args)]))
    if args.fsdp and (args.method in DORA_METHODS or args.quantize != "none"):
        # fsdp.gathered_adapter rebuilds plain LoRA layers, and NF4 codes are buffers FSDP does not shard
        raise ValueError(f"--fsdp shards LoRA/PiSSA adapters on a full-precision base: --method {args.method} "
                         f"--quantize {args.quantize} is not supported with it (drop --fsdp, or use another --method "
                         f"and --quantize none)")
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the model over the processes torchrun starts: launch with torchrun")
    if args.fsdp_cpu_offload and not args.fsdp:
        raise ValueError("--fsdp-cpu-offload offloads FSDP shards: give --fsdp too")
    ddp = world_size > 1 and not args.fsdp
    distributed = ddp or args.fsdp  # the ranks sum their token counts and losses
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.batch_size % (args.micro_batch_size * world_size):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x {world_size} processes")
    grad_accum = args.batch_size // (args.micro_batch_size * world_size)
    num_micro_batches = grad_accum * world_size  # micro-batches in one global batch, over all ranks
    init, regularize = METHODS[args.method]
    lambdas = (args.lambda1, args.lambda2, args.lambda3) if regularize else (0.0, 0.0, 0.0)

    # data: the first --max-samples records; each step reads one global batch, this rank its slice
    tokenizer = Tokenizer(args.model)
    prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)  # None: from the checkpoint
    examples = load_examples(args.data, args.format, args.max_samples)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one global batch (--batch-size {args.batch_size})")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    # model: frozen base in --dtype, adapter in fp32 (balora keeps it fp32 on a bf16 base);
    # the same seed on every rank gives the same adapter init
    torch.manual_seed(args.seed)
    lora = dict(target_modules=args.targets.split(","), r=args.rank, alpha=args.alpha, init=init,
                dropout=args.dropout, pissa_niter=args.pissa_niter, dora=args.method in DORA_METHODS,
                quantize=args.quantize)
    if args.fsdp:  # built on the meta device, each Block read, adapted and sharded in turn
        model, adapter = fsdp.load_sharded_llama(args.model, dtype, device, lora, cpu_offload=args.fsdp_cpu_offload)
    else:
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        adapter = balora.add_lora(model, **lora)
    params = [p for p in model.parameters() if p.requires_grad]
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    raw_model = model  # the teacher pass and checkpoints use the module itself, never the DDP wrapper
    # (fully_shard changes the module in place: under --fsdp, model is raw_model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # training-time randomness (LoRA dropout) differs per rank
    random.seed(args.seed + rank)

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = lr_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps, "cosine")

    os.makedirs(args.out, exist_ok=True)
    log_path, checkpoint_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "checkpoint.pt")
    if args.fsdp:  # sharded: <out>/checkpoint/step-<N>/ and the latest.json that names it
        checkpoint_path = os.path.join(args.out, "checkpoint", fsdp.LATEST)
    config = run_config(args)
    start_step, skipped_batches, reporter = 0, 0, None
    if args.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path!r}")
        if args.fsdp:
            checkpoint = fsdp.load_checkpoint(os.path.dirname(checkpoint_path), raw_model, optimizer, scheduler)
            set_rng_state(checkpoint["rng"])
        else:
            checkpoint = load_checkpoint(checkpoint_path, raw_model, optimizer, scheduler)
        check_resume_config(checkpoint["config"], config, checkpoint_path)
        start_step, skipped_batches = checkpoint["step"], checkpoint["data_state"]["skipped_batches"]
    skipped_at_start = skipped_batches
    if is_master:
        # keep the log consistent with the checkpoint: drop steps logged after it was written
        kept = rewind_log(log_path, start_step) if args.resume else []
        remove_stale_temp_files(args.out)
        with open(log_path, "w") as f:
            f.writelines(kept)
        write_config(args, preset, derived=dict(prompt_format=prompt_format, examples=len(examples), total_steps=total_steps,
                                                world_size=world_size, gradient_accumulation=grad_accum))
        reporter = Reporter(args.report_to, args.out, settings_record(args))
        print(f"{args.method}: init={init}, {adapter['trainable']:,} trainable of {adapter['total']:,} parameters, "
              f"{len(examples)} examples in the {prompt_format} prompt format, {total_steps} steps of {args.batch_size} "
              f"({world_size} x {grad_accum} x {args.micro_batch_size}), start at step {start_step}")

    progress = tqdm(total=total_steps, initial=start_step, disable=not is_master or args.no_progress, dynamic_ncols=True)
    for step in range(start_step, total_steps):
        t0 = time.time()
        # Rank r takes the r-th contiguous slice of the global batch and cuts it into micro-batches,
        # so the micro-batches (which the regularizers see whole) are the same for any world size.
        batch = global_batch_indices(len(examples), args.batch_size, step, args.seed)
        per_rank = args.batch_size // world_size
        batch = batch[rank * per_rank : (rank + 1) * per_rank]
        micro_batches = [
            collate(tokenizer, [examples[i] for i in batch[j : j + args.micro_batch_size]], args.max_length, prompt_format)
            for j in range(0, per_rank, args.micro_batch_size)
        ]
        # The task loss is the mean CE over every response token of the GLOBAL batch, so it does not
        # depend on how the batch is split into micro-batches and ranks: count those tokens first.
        task_tokens = torch.tensor(float(sum((labels[:, 1:] != -100).sum() for _, _, labels in micro_batches)), device=device)
        if distributed:
            dist.all_reduce(task_tokens)
        step_lambdas = balora.scheduled_lambdas(step, total_steps, lambdas, lambda1_schedule=args.lambda1_schedule,
                                                focus_schedule=args.focus_schedule, warmup_ratio=args.lambda_warmup_ratio,
                                                rampup_ratio=args.lambda_rampup_ratio)
        # summed over micro-batches (and ranks), kept on the device until the step ends (one sync):
        # objective, task CE sum, each regularizer and how often it was computed, tokens, skipped
        sums = dict.fromkeys(["total", "task", "consistency", "consistency_n", "diversity", "diversity_n",
                              "svd", "svd_n", "tokens", "skipped"], 0.0)
        for micro_step, (input_ids, attention_mask, labels) in enumerate(micro_batches):
            unpadded = bool(attention_mask.all())  # checked on the CPU: no device sync
            input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
            # a batch without padding needs no explicit mask: the model then uses SDPA's causal kernel
            padding_mask = None if unpadded else attention_mask
            targets = labels[:, 1:]  # position t predicts token t + 1
            task_mask = targets != -100
            # the M valid tokens of Eq. 9-12: positions predicting a response token, or with
            # --reg-tokens all, positions predicting any real (non-padded) token
            valid_mask = task_mask if args.reg_tokens == "task" else attention_mask[:, 1:].bool()
            # the positions whose logits the losses see (the last position predicts nothing): the model
            # runs its LM head on these M rows only and returns (M, V), not (B, T, V)
            output_mask = F.pad(valid_mask, (0, 1), value=False)
            last_micro_step = micro_step == grad_accum - 1
            micro_lambdas = step_lambdas
            if not task_mask.any():
                sums["skipped"] += 1
                warnings.warn(f"step {step + 1}: a micro-batch has every label masked (prompts longer than "
                              f"--max-length {args.max_length}?); skipping it")
                # FSDP all-gathers every Block in every forward, so each rank runs every pass
                if not (args.fsdp or (ddp and last_micro_step)):
                    continue
                micro_lambdas = (0.0, 0.0, 0.0)  # DDP: still run backward (a zero loss) for the all-reduce
            if ddp:
                model.require_backward_grad_sync = last_micro_step  # all-reduce gradients once per step
            with autocast_context(device, dtype):
                student_logits = model(input_ids, padding_mask, output_mask=output_mask).float()  # (M, V)
            teacher_hidden = None
            # consistency (Eq. 9) needs the pretrained model on the same rows (under FSDP: on every rank
            # whenever the step needs it, since the teacher's forward is a collective too)
            if (step_lambdas if args.fsdp else micro_lambdas)[0] > 0:
                with torch.no_grad(), balora.pretrained_mode(raw_model), autocast_context(device, dtype):
                    # the teacher's final hidden states (M, hidden), not its (M, V) logits: the KL forms
                    # those chunk by chunk through the LM head (never adapted, so the teacher's own)
                    teacher_hidden = raw_model(input_ids, padding_mask, output_mask=output_mask, return_hidden=True)
            # Scaled so that the sum over the global batch's micro-batches of total / num_micro_batches
            # is (token-mean CE) + sum_i lambda_i * (micro-batch mean of regularizer i), Eq. 13.
            task_scale = num_micro_batches / task_tokens.clamp(min=1)
            # randomized SVD sketch: one fixed stream per (step, micro-batch), the same for any world size
            micro_index = rank * grad_accum + micro_step
            generator = torch.Generator(device=device).manual_seed((args.seed * 1_000_003 + step) * 1_009 + micro_index)
            # task_scale * (cross-entropy sum over the response tokens) + Eq. 13's regularizers, with the
            # gradient formed in forward into one (M, V) tensor (see balora.NLGObjectiveFused)
            total, components = balora.nlg_objective_fused(
                student_logits, targets[valid_mask], task_scale, teacher_hidden, micro_lambdas, args.temperature,
                args.svd_k, args.top_k, generator=generator, teacher_head=teacher_head(raw_model, device, dtype))
            # DDP averages gradients over ranks, so / grad_accum here makes it / num_micro_batches overall.
            # FSDP reduce-scatters (averages) them after every backward: each rank then accumulates its
            # shard only, never a whole gradient (6.6 GB in float32 for a 70B adapter at r = 128)
            (total / grad_accum).backward()
            sums["total"] += total.detach() / num_micro_batches
            sums["task"] += components["task_sum"]
            sums["tokens"] += attention_mask.sum()
            for name in ("consistency", "diversity", "svd"):
                if name in components:
                    sums[name] += components[name]
                    sums[name + "_n"] += 1
        reduced = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in sums.values()])
        if distributed:
            dist.all_reduce(reduced)
        sums = dict(zip(sums, reduced.tolist()))
        check_finite(sums["total"], step + 1, "loss", checkpoint_path)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if args.fsdp:
            grad_norm = grad_norm.full_tensor()  # a DTensor: the norm over every rank's shards
        check_finite(grad_norm, step + 1, "gradient norm", checkpoint_path)  # a finite loss can still have one
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        skipped_batches += int(sums["skipped"])

        dt = time.time() - t0
        record = {"step": step + 1, "lr": lr, "lambda1": step_lambdas[0], "lambda2": step_lambdas[1],
                  "lambda3": step_lambdas[2], "task": sums["task"] / max(task_tokens.item(), 1)}
        for name in ("consistency", "diversity", "svd"):
            record[name] = sums[name] / sums[name + "_n"] if sums[name + "_n"] else None
        record.update(total=sums["total"], tokens=int(sums["tokens"]), task_tokens=int(task_tokens.item()),
                      skipped_batches=skipped_batches, grad_norm=float(grad_norm), time=dt)
        if is_master:
            append_jsonl(log_path, record)
            reporter.log(record)
            short = {"task": "task", "consistency": "cons", "diversity": "div", "svd": "svd"}
            progress.set_postfix({"tok/s": f"{record['tokens'] / dt:.0f}",
                                  **{short[k]: f"{record[k]:.4f}" for k in short if record[k] is not None}})
            progress.update(1)
        if args.save_every and (step + 1) % args.save_every == 0:
            data_state = {"step": step + 1, "skipped_batches": skipped_batches}
            if args.fsdp:
                fsdp.save_checkpoint(os.path.dirname(checkpoint_path), raw_model, optimizer, scheduler, step + 1,
                                     rng_state(), data_state, config)
            else:
                save_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, step + 1, data_state=data_state,
                                config=config)
    progress.close()

    # A run that never trained must not end "saved": its adapter would equal the initial one.
    micro_batches_run = (total_steps - start_step) * num_micro_batches
    if total_steps == 0 or (micro_batches_run and skipped_batches - skipped_at_start >= micro_batches_run):
        raise RuntimeError(f"nothing was trained: {skipped_batches - skipped_at_start} of {micro_batches_run} micro-batches "
                           f"had every label masked (prompts longer than --max-length {args.max_length}?) or there were no "
                           f"steps (--max-steps {args.max_steps}); no adapter written")
    if is_master and skipped_batches:
        print(f"skipped {skipped_batches} micro-batches with every label masked (raise --max-length {args.max_length}?)")
    # under FSDP the adapter is all-gathered first (every rank takes part), then written as always
    adapter_model = fsdp.gathered_adapter(raw_model) if args.fsdp else raw_model
    if is_master:
        check_finite_parameters(adapter_model, os.path.join(args.out, "adapter"))
        balora.save_adapter(adapter_model, os.path.join(args.out, "adapter"))
        balora.export_peft(adapter_model, os.path.join(args.out, "peft_adapter"), args.model, task_type="CAUSAL_LM")
        reporter.close()
        plot.plot_run(args.out)
        print(f"adapter saved to {os.path.join(args.out, 'adapter')} (peft format: {os.path.join(args.out, 'peft_adapter')}); "
              f"curves: {os.path.join(args.out, plot.CURVES)}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:  # launched by torchrun
        exit_torchrun_worker()
