"""
What both trainers share: the table of methods and the optimizer they build from it, distributed setup,
atomic checkpoints and exact resume, the JSONL log and its reporters, the learning-rate schedule, the
checks that stop a run before a NaN is applied or written, and the settings (two presets per trainer,
printed at the start and saved to <out>/config.json). train_nlg.py and train_nlu.py import this module;
nothing imports them.
"""

import importlib.util
import json
import math
import os
import pickle
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

import balora
import baselines
import nf4

REPO = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(REPO, "assets")

# -----------------------------------------------------------------------------
# Methods (--method of both trainers, Table 10's rows) and the optimizer


@dataclass(frozen=True)
class Method:
    init: str  # the adapter's start: "lora" (B = 0) or a balora.INITS name ("pissa")
    regularized: bool  # BA-LoRA's regularizers on (Eq. 8 / 13)
    dora: bool = False  # balora.DoRALinear layers (a trainable magnitude)
    optimizer: str = "adamw"  # "adamw", or baselines.py's "loraplus" (B's lr x ratio) / "lorafa" (A frozen, B projected)
    kind: str = "lora"  # what trains: LoRA layers (balora.add_lora), or a baselines.KINDS name (full, bitfit, adapters)
    calibration: str = None  # a baselines.CALIBRATED_INITS start from a few batches (LoRA-GA, CorDA): calibrate()
    adalora: bool = False  # baselines.AdaLoRALinear layers and their rank budget: rank_allocator()


METHODS = {
    "lora": Method("lora", False),
    "pissa": Method("pissa", False),
    "balora": Method("pissa", True),  # PiSSA + Reg: BA-LoRA
    "lora+reg": Method("lora", True),
    "dora": Method("lora", False, dora=True),
    "dora+reg": Method("lora", True, dora=True),
}
BASELINES = {  # Tables 1 and 2's baselines (baselines.py), each also with BA-LoRA's regularizers: <name>+reg
    "loraplus": Method("lora", False, optimizer="loraplus"),
    "lorafa": Method("lora", False, optimizer="lorafa"),
    "milora": Method("milora", False),
    "full": Method("lora", False, kind="full"),
    "bitfit": Method("lora", False, kind="bitfit"),
    "hadapter": Method("lora", False, kind="hadapter"),
    "padapter": Method("lora", False, kind="padapter"),
    "loraga": Method("lora", False, calibration="loraga"),
    "corda": Method("lora", False, calibration="corda-ipm"),
    "corda-kpm": Method("lora", False, calibration="corda-kpm"),
    "adalora": Method("lora", False, adalora=True),
}
for _name, _method in BASELINES.items():
    METHODS[_name], METHODS[_name + "+reg"] = _method, dataclasses.replace(_method, regularized=True)
METHOD_HELP = ("lora | pissa | balora (PiSSA + the regularizers) | lora+reg | dora | dora+reg (Table 10); the baselines "
               "of Tables 1-2 (docs/baselines.md), each also as <name>+reg: loraplus (LoRA+, --loraplus-lr-ratio) | "
               "lorafa (LoRA-FA) | milora (MiLoRA) | full (Full FT) | bitfit (BitFit, NLU) | hadapter (Houlsby "
               "adapters) | padapter (Pfeiffer adapters) | loraga (LoRA-GA) | corda (CorDA, IPM) | corda-kpm (CorDA, KPM) | "
               "adalora (AdaLoRA)")
QUANTIZE_HELP = ("none | nf4: the frozen base in 4-bit NormalFloat, block size 64 (QLoRA; QPiSSA / QBA-LoRA with a "
                 "PiSSA init, Fig. 5; nf4.py) | nf4-dq: nf4 with double quantization of the block constants")
QUANTIZE_CHOICES = list(nf4.QUANTIZE)
TEACHER_CHOICES = list(nf4.TEACHERS)
TEACHER_HELP = ("the consistency term's teacher on a 4-bit base (nf4.py): full, the full-precision pretrained model "
                "as the official QBA-LoRA's (llm172/BA-LoRA train.py at 2829797), at one extra copy of the quantized weights in the model dtype; quantized, "
                "the 4-bit model itself, at no extra memory (ours)")


def adapt(model, quantize, teacher, kind="lora", adalora=False, **lora):
    """
    balora.add_lora(model, **lora) (with adalora: as baselines.AdaLoRALinear layers), then the base in
    --quantize (nf4.quantize_base: after PiSSA's SVD, so that QPiSSA quantizes W_res). With --teacher
    full on a 4-bit base the pretrained weights are copied first, for the teacher. Returns add_lora's
    summary. A baselines.KINDS method (Method.kind) is applied by baselines.adapt instead, on a
    full-precision model.
    """
    if kind != "lora":
        if quantize != "none":
            raise ValueError(f"--quantize {quantize} quantizes the frozen base of LoRA-family methods, not --method {kind}")
        return baselines.adapt(model, kind, lora.get("trainable", ()))
    if adalora and quantize != "none":  # its layers end as plain LoRA ones (baselines.adalora_to_lora), on nn.Linear
        raise ValueError(f"--quantize {quantize}: AdaLoRA runs on a full-precision base only (use --quantize none)")
    teacher_weights = nf4.pretrained_weights(model) if teacher == "full" and quantize != "none" else None
    adapter = baselines.add_adalora(model, **lora) if adalora else balora.add_lora(model, **lora)
    nf4.quantize_base(model, quantize, teacher_weights)
    return adapter


def check_merge(method_name, merge):
    """--merge folds LoRA-shaped adapters into the base (tools/merge_adapter.py); one line if the method has none."""
    if merge and METHODS[method_name].kind != "lora":
        raise ValueError(f"--merge folds LoRA-family adapters into the base; --method {method_name} has none "
                         "(its adapter directory is the result: load it with adapters.load_adapter)")


def check_loraplus_ratio(method_name, ratio, default):
    """--loraplus-lr-ratio sets LoRA+'s lr ratio and nothing else: one line if another method is given a ratio."""
    if ratio != default and METHODS[method_name].optimizer != "loraplus":
        raise ValueError(f"--loraplus-lr-ratio {ratio:g} sets the lr ratio of --method loraplus (and loraplus+reg); "
                         f"--method {method_name} trains every parameter at --lr")


def calibrate(model, method, losses):
    """
    LoRA-GA / CorDA: start the adapters (added with init="lora") from the model on calibration batches,
    baselines.calibrate; `losses` are zero-argument functions, each one batch's task loss. Other methods: nothing.
    """
    if method.calibration:
        baselines.calibrate(model, method.calibration, losses)


def rank_allocator(model, method, total_steps):
    """
    AdaLoRA: its rank budget over the run (baselines.adalora_allocator), whose update_and_allocate(model,
    step) the trainer calls after optimizer.step() and before zero_grad(). Other methods: None. Its
    importance averages and masks travel in the checkpoints (save_checkpoint's `allocator`).
    """
    return baselines.adalora_allocator(model, total_steps) if method.adalora else None


def parameter_groups(model, weight_decay):
    """
    The optimizer's parameter groups: every trainable parameter (adapter factors, DoRA magnitudes, a
    trainable head) in one group with the run's weight decay. Both trainers build their optimizer here,
    so a method that needs its own groups (another learning rate for lora_B, say) is one change.
    """
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def build_optimizer(model, lr, weight_decay, method=None, loraplus_lr_ratio=16.0):
    """
    AdamW over parameter_groups(model), the optimizer of every method (B.4), but for Method.optimizer
    "loraplus" (AdamW, lora_B's group at lr x loraplus_lr_ratio) and "lorafa" (baselines.LoRAFAOptimizer).
    """
    kind = method.optimizer if method is not None else "adamw"
    if kind == "loraplus":
        return torch.optim.AdamW(baselines.loraplus_parameter_groups(model, lr, loraplus_lr_ratio, weight_decay), lr=lr)
    if kind == "lorafa":
        return baselines.LoRAFAOptimizer(model, lr, weight_decay)
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)


# -----------------------------------------------------------------------------
# Distributed setup (torchrun: DDP, or FSDP2 through fsdp.py)


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


# -----------------------------------------------------------------------------
# Checkpoints: atomic, tensors and plain data only, and exact on resume


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


@contextmanager
def atomic_directory(out_dir, overwrite=False):
    """
    Yield a temporary directory beside out_dir to fill; on success it is renamed to out_dir (an existing
    one, with overwrite, moved aside first and removed), on any failure removed: out_dir is never half written.
    """
    import shutil

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private (0700); a model directory is not
    try:
        yield tmp_dir
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "dir"))
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
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


def save_checkpoint(path, model, optimizer, scheduler, step, data_state=None, config=None, allocator=None):
    """
    Everything needed to continue a run exactly: the trainable weights (adapter, plus any head),
    optimizer and scheduler state, the step, the data position (`data_state`, any dict), AdaLoRA's
    rank allocator (`allocator`: its importance averages and masks) and the RNG states of every rank.
    Collective under DDP (RNG states are gathered), so every rank calls it; rank 0 writes `path`
    atomically. `model` is the unwrapped module (not the DDP wrapper).
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
        "allocator": None if allocator is None else allocator.state_dict(model),
        "rng": rng,
        "config": config,
    }
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path, model, optimizer, scheduler, allocator=None):
    """
    Restore a save_checkpoint file into `model` (unwrapped), `optimizer`, `scheduler` and AdaLoRA's
    `allocator`, and restore this rank's RNG state. Returns the checkpoint dict (step, data_state, config, ...).
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
    if allocator is not None:
        allocator.load_state_dict(model, checkpoint["allocator"])
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


# -----------------------------------------------------------------------------
# The log: log.jsonl, and TensorBoard / W&B beside it


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


# -----------------------------------------------------------------------------
# Schedule, numerics


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


def collective_device():
    """
    The device a tensor must be on to take part in the process group's collectives: the CPU when the
    backend reduces CPU tensors (gloo), else this process's GPU (NCCL reduces GPU tensors only, and a
    CPU tensor in its all_reduce raises).
    """
    if "cpu" in dist.Backend.backend_capability.get(dist.get_backend(), ["cpu"]):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def min_over_ranks(value):
    """A number's minimum over the ranks (the number itself without a process group): a flag every rank
    agrees on, e.g. "all finite", through one all-reduce on collective_device()."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    reduced = torch.tensor(float(value), device=collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    return reduced.item()


def check_finite(value, step, quantity="loss", checkpoint_path=None):
    """
    Stop the run before optimizer step `step` applies a NaN/inf `quantity` (the loss, the gradient
    norm, a logit matrix: a tensor is checked whole). Under DDP the ranks agree first (one all-reduce),
    so every rank stops at the same step. Since no non-finite update is ever applied, the last
    checkpoint holds finite values only: the error names it, so the run can resume with other flags.
    """
    if min_over_ranks(torch.isfinite(torch.as_tensor(value)).all()) == 1.0:
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




def teacher_head(model, device, dtype):
    """
    The teacher's LM head for chunked.nlg_objective_in_chunks, which runs it on chunks of the teacher's
    final hidden states: under the teacher forward's autocast, so that each chunk of logits is the one
    that forward would have returned (bf16 for bf16 runs), in pretrained mode: lm_head is never a LoRA
    target, but Full FT trains it (its pretrained copy is swapped in there). model.logits is the head
    with Gemma-2's final soft-capping.
    """
    def head(hidden):
        with autocast_context(device, dtype), balora.pretrained_mode(model):
            return model.logits(hidden)
    return head


# -----------------------------------------------------------------------------
# Settings: flags with their defaults, two presets (toy, paper) for the values that differ between them

# Settings that may change between a run and its --resume without changing the result (both
# trainers); every other one must match the checkpoint. --out is where the run lives, so it may move.
RESUME_MAY_CHANGE = ("resume", "save_every", "device", "grad_checkpointing", "no_progress", "out", "report_to", "dry_run",
                     "overwrite")


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
    A function that adds one setting's flag. A setting the presets set (a key of `toy` or `paper`) is
    left None here and takes the value of the preset in force (resolve_settings); its help ends with
    both, "(toy: 8, paper: 128)". Every other flag has its own ordinary default, "(default: 42)".
    `none_means` says what a None value stands for ({"max_steps": "no cap"}).
    """
    def flag(name, help, default=None, **kwargs):
        key = name[2:].replace("-", "_")
        none = none_means.get(key, "none")
        if kwargs.get("action") == "store_true" and default is None:
            default = False
        if key in toy or key in paper:
            toy_value, paper_value = (shown(preset.get(key), none).replace("%", "%%") for preset in (toy, paper))
            text = f"toy and paper: {toy_value}" if toy_value == paper_value else f"toy: {toy_value}, paper: {paper_value}"
        else:
            text = "default: " + shown(default, none).replace("%", "%%")
        parser.add_argument(name, default=default, help=f"{help} ({text})", **kwargs)
    return flag


def resolve_settings(parser, argv, choose_preset):
    """
    Parse `argv` with the values of the preset in force as the flags' defaults. choose_preset(args)
    picks it from a first parse (--model given: "paper", else "toy") and returns (name, {setting: value}).
    Returns (args, defaults): args.preset names the preset; defaults holds every setting's default in
    force, what the settings block and config.json compare the run against.
    """
    first, _ = parser.parse_known_args(argv)
    name, values = choose_preset(first)
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.preset = name
    defaults = {key: parser.get_default(key) for key in vars(args) if key != "preset"}
    return args, defaults


def changed_settings(args, defaults):
    """{setting: value} of every setting that differs from its default in force (--model and --dry-run aside)."""
    return {key: getattr(args, key) for key, value in defaults.items()
            if key not in ("model", "dry_run") and normalized(getattr(args, key)) != normalized(value)}


def settings_block(args, defaults, none_means, notes=()):
    """The block printed at the start of a run: the preset, every value that differs from it, `notes`."""
    why = ("--model given: the paper's settings, Sec. 3.1 and App. B" if args.preset == "paper" else
           "no --model: the bundled tiny model and toy data; give --model for the paper's settings")
    lines = [f"settings: the {args.preset} preset ({why})"]
    changed = changed_settings(args, defaults)
    lines += [f"  --{key.replace('_', '-')} {shown(value)}  (default: {shown(defaults[key], none_means.get(key, 'none'))})"
              for key, value in changed.items()]
    if not changed:
        lines.append("  no value differs from the defaults")
    lines += [f"  {note}" for note in notes]
    if args.dry_run:  # a run says where every value is once it has written config.json (write_config)
        lines.append("  every value: below (a dry run writes nothing)")
    return "\n".join(lines)


def dry_run(args, defaults, none_means, notes):
    """--dry-run: print the settings block and every value, and return them; nothing is read or written."""
    print(settings_block(args, defaults, none_means, notes))
    print(json.dumps(settings_record(args), indent=1))
    return settings_record(args)


def start_processes(args, defaults, none_means, notes):
    """Distributed setup (setup_distributed), then the settings block on rank 0. Returns setup_distributed's tuple."""
    rank, local_rank, world_size, device, is_master = setup_distributed(args.device)
    if is_master:
        print(settings_block(args, defaults, none_means, notes))
    return rank, local_rank, world_size, device, is_master


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


def write_config(args, defaults, derived):
    """
    <out>/config.json (rank 0, once the inputs are checked): the preset, what differs from the defaults
    in force, every setting, and the values derived from them and the inputs (`derived`: steps, ...).
    """
    changed = {key: normalized(value) for key, value in changed_settings(args, defaults).items()}
    record = {"preset": args.preset, "changed": changed, "settings": settings_record(args), "derived": derived}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"every value: {os.path.join(args.out, 'config.json')}")


def lambdas_of(args, method):
    """(--lambda1, --lambda2, ...): one weight per balora.REGULARIZERS term; all 0 for a method without them."""
    return tuple(getattr(args, f"lambda{i}") if method.regularized else 0.0 for i in range(1, len(balora.REGULARIZERS) + 1))


# -----------------------------------------------------------------------------
# The command line around a run: --out, threads, Ctrl-C, one-line errors

# What a run writes into its --out: a directory holding any of them holds a previous run
RUN_FILES = ("log.jsonl", "config.json", "checkpoint.pt", "checkpoint", "best.pt", "adapter", "peft_adapter", "curves.png")
TINY_MODEL = 20_000_000  # parameters: below this a CPU step is per-op overhead, which more threads only add to


def check_out(out, resume, overwrite):
    """
    Refuse, before anything is read or written, a --out that holds a previous run's files unless --resume
    continues it or --overwrite replaces it: a second run must not silently replace the adapter (and
    checkpoint) of the first.
    """
    previous = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if previous and not (resume or overwrite):
        raise FileExistsError(f"--out {out} holds a previous run ({', '.join(previous)}): pass --resume to continue it, "
                              "--overwrite to replace it, or another --out")


def clear_out(out):
    """--overwrite: remove the previous run's files (RUN_FILES) so that none of them is mistaken for this run's."""
    import shutil

    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def set_threads(model, device):
    """
    One CPU thread for a tiny model unless OMP_NUM_THREADS says otherwise: its ops are too small to
    split, and on a busy 2-core CPU two threads mostly wait on each other (the toy NLG run: 79 s with
    two threads at load 5, 13 s with one). Larger models keep torch's default.
    """
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if sum(p.numel() for p in model.parameters()) < TINY_MODEL:
            torch.set_num_threads(1)


def resume_command(argv):
    """The command that continues this run: the one typed, with --resume (torchrun users add their launcher)."""
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.relpath(os.path.abspath(sys.argv[0])) if sys.argv[0].endswith(".py") else "train_*.py"
    return "python " + shlex.join([script, *argv, *([] if "--resume" in argv else ["--resume"])])


class Interrupt:
    """
    Ctrl-C during training: the first SIGINT is remembered and the step in flight finishes, so the loop can
    save a checkpoint (atomically) and stop with exit status 130; a second one stops at once, saving
    nothing. Under DDP the ranks agree (requested()) so that they all save the same step together.
    Made by the training loop's function; once that has returned or raised, a SIGINT is a plain
    KeyboardInterrupt again (main() called in-process, as the tests and tools do, leaves no trace).
    """

    def __init__(self):
        import signal

        self.flag, self.loop = False, sys._getframe(1).f_code  # the code object only: no frame kept alive
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        while frame is not None and frame.f_code is not self.loop:
            frame = frame.f_back
        if frame is None:  # the loop ended with an exception before close()
            self.close()
            raise KeyboardInterrupt
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to stop without saving)",
              file=sys.stderr, flush=True)

    def requested(self):
        return min_over_ranks(0.0 if self.flag else 1.0) == 0.0

    def stop(self, step, checkpoint_path, argv, is_master):
        """After the checkpoint of `step` is written: say how to continue, restore Ctrl-C, exit 130."""
        self.close()
        if is_master:
            print(f"interrupted: checkpoint of step {step} in {checkpoint_path}; continue with:\n  {resume_command(argv)}",
                  flush=True)
        cleanup_distributed()
        raise SystemExit(130)

    def close(self):
        import signal

        signal.signal(signal.SIGINT, self.previous)


def run_cli(main):
    """
    A script's entry point: a bad flag, file or setting (the errors balora raises with a message naming
    it) is one line on stderr and exit status 2, not a traceback; Ctrl-C before the training loop
    (which saves, Interrupt) is one line and 130.
    """
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ModuleNotFoundError,
            FloatingPointError) as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{script}: interrupted before training started; nothing saved", file=sys.stderr)
        raise SystemExit(130) from None
