"""
Cost of a BA-LoRA training step next to LoRA, PiSSA and transformers+peft (paper Sec. 3.2.5, Table 5;
App. C.8, Table 14), all measured in ONE run so that every ratio compares numbers taken side by side.

    python tools/bench.py --shape tiny                       # CPU, a few minutes -> out/bench/BENCHMARKS.md
    python tools/bench.py --shape tiny --update-docs         # the same, updating the tracked BENCHMARKS.md
    python tools/bench.py --shape llama2-7b --device cuda    # Llama-2-7B config, random bf16 weights
    python tools/bench.py --shape tiny --profile balora      # torch.profiler table of one variant

For one model shape, each variant below runs `--warmup` + `--steps` training steps on one fixed batch;
we report the median step time, tokens/s and peak memory of the steps. On CPU the variants' steps run
round robin in one process (one step of each in turn), so that a busy machine slows them all alike:
  lora, pissa                      plain adapters (same cost per step: PiSSA only changes the init)
  balora                           PiSSA + the three NLG regularizers at the paper's defaults
  pissa+consistency / +diversity / +svd   one regularizer alone on top of PiSSA
  peft-lora                        the peer baseline: transformers LlamaForCausalLM (sdpa) + peft LoRA
A step is the one of train_nlg.py (whose loop is inline, so it is written once more here, line for
line): student forward (bf16 autocast for bf16 shapes; no mask, as the batch has no padding; the
LM head on the M valid rows only) -> task loss on the (M, V) valid-token logits in float32 -> teacher
forward under balora.pretrained_mode (only when lambda1 > 0) -> balora.nlg_objective -> backward ->
gradient clipping -> AdamW. Adapters are float32 for bf16 models, in peft as in ours.
Inside the balora steps we also time the teacher forward, and after them each regularizer's forward +
backward on the (M, V) valid-token logits, round robin, so their shares come from the same minutes.

Peak memory is the memory the training steps add on top of what was allocated before the model was
built (so it counts weights, adapters, optimizer state, activations and logits):
  GPU: torch.cuda.max_memory_allocated, reset after the model is built (the PiSSA SVD is not a step).
  CPU: the process RSS high-water mark (VmHWM, reset after the build by writing 5 to
       /proc/self/clear_refs, Linux) minus the RSS before the build, each variant alone in a child
       process of its own (two steps), so that no variant inherits another's allocator pool, and
       with glibc serving every block of 64 KiB or more by mmap, so that freed memory leaves RSS.
Timing: CUDA events with a synchronize at the end of each step on GPU; time.perf_counter on CPU.

tools/ may use transformers and peft, but only here, only for the peer baseline, and only on demand.
"""

import argparse
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import balora  # noqa: E402
import model  # noqa: E402
from train_nlg import autocast_context  # noqa: E402

# -----------------------------------------------------------------------------
# What is measured

LLAMA2_7B = dict(  # meta-llama/Llama-2-7b-hf config.json
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False,
)
SHAPES = {
    # a few seconds: for the smoke test only
    "smoke": dict(config=dict(LLAMA2_7B, vocab_size=512, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
                  batch=2, seq=32, r=4, dtype=torch.float32, pissa_niter=None),
    # ~23M parameters, LLaMA vocabulary so the (M, V) logits cost what they cost at 7B per token
    "tiny": dict(config=dict(LLAMA2_7B, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=4),
                 batch=2, seq=128, r=16, dtype=torch.float32, pissa_niter=None),
    # the paper's setting (App. B): bf16, seq 512, micro-batch 4, r = alpha = 128, seven targets
    "llama2-7b": dict(config=LLAMA2_7B, batch=4, seq=512, r=128, dtype=torch.bfloat16, pissa_niter=4),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Paper NLG defaults (Sec. 3.1, App. B): lambda = (0.025, 0.005, 0.005), svd_k 10, top-k 20, T 2, lr 2e-5.
LAMBDAS = (0.025, 0.005, 0.005)
SVD_K, TOP_K, TEMPERATURE, LR, GRAD_CLIP = 10, 20, 2.0, 2e-5, 1.0
IGNORE_INDEX = -100
REGULARIZERS = ("consistency", "diversity", "svd")
VARIANTS = {  # name -> (adapter init, lambdas); peft-lora is built by transformers + peft
    "lora": ("lora", (0.0, 0.0, 0.0)),
    "pissa": ("pissa", (0.0, 0.0, 0.0)),
    "balora": ("pissa", LAMBDAS),
    "pissa+consistency": ("pissa", (LAMBDAS[0], 0.0, 0.0)),
    "pissa+diversity": ("pissa", (0.0, LAMBDAS[1], 0.0)),
    "pissa+svd": ("pissa", (0.0, 0.0, LAMBDAS[2])),
    "peft-lora": None,
}
# Table 5 (two A40, LLaMA-2-7B): PiSSA 66.59 GB / 4 h 17 min, BA-LoRA 77.34 GB / 4 h 48 min.
PAPER_MEMORY_RATIO, PAPER_TIME_RATIO = 77.34 / 66.59, (4 * 60 + 48) / (4 * 60 + 17)

# -----------------------------------------------------------------------------
# Clocks and memory meters


class Stopwatch:
    """Marks in time: CUDA events on GPU (kernels run asynchronously), time.perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end):
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: CPU peak memory needs Linux")


class PeakMemory:
    """Peak bytes the training steps hold above what was allocated before the model build (see top)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.before_build = torch.cuda.memory_allocated() if self.cuda else _proc_status_kib("VmRSS") * 1024

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def peak_bytes(self):
        peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_kib("VmHWM") * 1024
        return peak - self.before_build


# -----------------------------------------------------------------------------
# Models, batch and the training step


def make_batch(shape, device):
    """Random tokens, no padding; the first quarter of each row is the prompt (label -100), as in SFT."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["config"]["vocab_size"], (shape["batch"], shape["seq"]), generator=generator)
    labels = input_ids.clone()
    labels[:, : shape["seq"] // 4] = IGNORE_INDEX
    return input_ids.to(device), torch.ones_like(input_ids).to(device), labels.to(device)


def build_ours(shape, init, device, gradient_checkpointing):
    """Our Llama with random weights built directly on `device` (no slow CPU init), adapters on all 7 targets."""
    torch.manual_seed(0)
    with torch.device(device):
        llama = model.Llama(model.LlamaConfig.from_hf(shape["config"]))
    llama.to(shape["dtype"])  # base weights in the shape's dtype; add_lora keeps adapters float32
    llama.model.rotary_emb.inv_freq = model.rope_inv_freq(llama.config, device=device)  # float32, as from_pretrained
    balora.add_lora(llama, TARGETS, r=shape["r"], alpha=shape["r"], init=init, pissa_niter=shape["pissa_niter"])
    llama.gradient_checkpointing = gradient_checkpointing
    return llama.train()


def import_peer_libraries():
    """transformers and peft, imported only for the peer baseline (project code never imports them)."""
    try:
        import peft
        import transformers
    except ImportError as error:
        raise SystemExit(f"the peft-lora baseline needs transformers and peft ({error}); "
                         "pip install -r requirements-dev.txt, or leave it out with --variants") from error
    return transformers, peft


def build_peft(shape, device, gradient_checkpointing):
    """The peer baseline: transformers' LlamaForCausalLM with the sdpa kernel, peft LoRA on the same targets."""
    transformers, peft = import_peer_libraries()
    torch.manual_seed(0)
    hf_config = {key: value for key, value in shape["config"].items() if key != "model_type"}
    # use_cache=False: a training forward needs no KV cache (transformers would build one by default)
    config = transformers.LlamaConfig(**hf_config, attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        hf_model = transformers.LlamaForCausalLM(config)
    hf_model.to(shape["dtype"])
    if gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = peft.LoraConfig(r=shape["r"], lora_alpha=shape["r"], lora_dropout=0.0, target_modules=TARGETS,
                                  task_type="CAUSAL_LM")
    return peft.get_peft_model(hf_model, lora_config).train()


def balora_loss(llama, batch, lambdas, dtype, stopwatch):
    """
    The loss of one train_nlg.py micro-batch: student logits -> task loss on the valid tokens -> teacher
    logits (pretrained_mode, no_grad; only when lambda1 > 0) -> nlg_objective (Eq. 13).
    Returns (loss, (start, end) marks of the teacher forward or None).
    """
    input_ids, _, labels = batch  # no padding: train_nlg.py then passes no mask (SDPA's causal kernel)
    device = input_ids.device
    targets = labels[:, 1:]  # position t predicts token t + 1
    valid_mask = targets != IGNORE_INDEX
    output_mask = F.pad(valid_mask, (0, 1), value=False)  # the LM head runs on the M valid rows only
    with autocast_context(device, dtype):
        student_logits = llama(input_ids, output_mask=output_mask).float()  # (M, V)
    task_loss = F.cross_entropy(student_logits, targets[valid_mask])
    teacher_logits, teacher_marks = None, None
    if lambdas[0] > 0:
        start = stopwatch.mark()
        with torch.no_grad(), balora.pretrained_mode(llama), autocast_context(device, dtype):
            teacher_logits = llama(input_ids, output_mask=output_mask)  # autocast dtype, as train_nlg.py
        teacher_marks = (start, stopwatch.mark())
    generator = torch.Generator(device=device).manual_seed(0)  # the randomized SVD's sketch
    loss, _ = balora.nlg_objective(task_loss, student_logits, teacher_logits, lambdas, TEMPERATURE, SVD_K, TOP_K,
                                   generator=generator)
    return loss, teacher_marks


def peft_loss(peft_model, batch, dtype):
    """What a transformers + peft user runs: the model's own shifted cross-entropy on the labels."""
    input_ids, attention_mask, labels = batch
    with autocast_context(input_ids.device, dtype):
        return peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, None


def timed_step(compute_loss, optimizer, stopwatch):
    """One training step: loss -> backward -> clip -> AdamW. Returns (step seconds, teacher seconds or None)."""
    start = stopwatch.mark()
    loss, teacher_marks = compute_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_seconds = stopwatch.seconds(start, stopwatch.mark())
    return step_seconds, teacher_marks and stopwatch.seconds(*teacher_marks)


def time_regularizers(llama, batch, dtype, steps, stopwatch):
    """
    Forward + backward of each term of Eq. 13 alone on the (M, V) logits of `batch` (a leaf, so the
    backward stops at the logits: the model's own backward is the same with or without regularizers),
    round robin over the terms so machine noise hits all alike. Task cross-entropy as the reference.
    Returns {term: median seconds}.
    """
    input_ids, _, labels = batch
    valid_mask = labels[:, 1:] != IGNORE_INDEX
    output_mask = F.pad(valid_mask, (0, 1), value=False)
    with torch.no_grad(), autocast_context(input_ids.device, dtype):
        student_logits = llama(input_ids, output_mask=output_mask).float()
        with balora.pretrained_mode(llama):
            teacher_logits = llama(input_ids, output_mask=output_mask)  # autocast dtype, as train_nlg.py
    targets = labels[:, 1:][valid_mask]
    generator = torch.Generator(device=input_ids.device).manual_seed(0)
    terms = {
        "task": lambda z: F.cross_entropy(z, targets),
        "consistency": lambda z: balora.nlg_consistency_loss(teacher_logits, z, TEMPERATURE),
        "diversity": lambda z: balora.nlg_diversity_loss(z, TOP_K),
        "svd": lambda z: balora.nlg_svd_loss(z, SVD_K, generator=generator),
    }
    seconds = {name: [] for name in terms}
    for _ in range(steps):
        for name, term in terms.items():
            z = student_logits.detach().requires_grad_()
            start = stopwatch.mark()
            term(z).backward()
            seconds[name].append(stopwatch.seconds(start, stopwatch.mark()))
    return {name: statistics.median(values) for name, values in seconds.items()}


# -----------------------------------------------------------------------------
# One variant


def build_variant(variant, shape, device, gradient_checkpointing, stopwatch):
    """(model, AdamW over its trainable parameters, a closure computing one step's loss) of `variant`."""
    batch = make_batch(shape, device)
    if variant == "peft-lora":
        net = build_peft(shape, device, gradient_checkpointing)
        compute_loss = lambda: peft_loss(net, batch, shape["dtype"])  # noqa: E731
    else:
        init, lambdas = VARIANTS[variant]
        net = build_ours(shape, init, device, gradient_checkpointing)
        compute_loss = lambda: balora_loss(net, batch, lambdas, shape["dtype"], stopwatch)  # noqa: E731
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return net, optimizer, compute_loss


def measure(variants, shape_name, device, steps, warmup, gradient_checkpointing):
    """
    Build `variants` side by side and run their warm-up + timed steps round robin (one step of each in
    turn), so that a busy machine slows them all alike. Returns {variant: numbers}, JSON-able. Peak memory
    is only that of a variant measured alone (see PeakMemory), so it is reported for a single variant.
    """
    shape = SHAPES[shape_name]
    stopwatch = Stopwatch(device)
    if "peft-lora" in variants:
        import_peer_libraries()  # before the memory baseline: the libraries' own memory is no step's
    memory = PeakMemory(device)
    runs = {variant: build_variant(variant, shape, device, gradient_checkpointing, stopwatch) for variant in variants}
    memory.reset()
    samples = {variant: [] for variant in variants}
    for step in range(warmup + steps):
        for variant, (_, optimizer, compute_loss) in runs.items():
            timing = timed_step(compute_loss, optimizer, stopwatch)
            if step >= warmup:
                samples[variant].append(timing)
    results = {}
    for variant, timings in samples.items():
        step_seconds, teacher_seconds = zip(*timings)
        results[variant] = dict(
            step_s=statistics.median(step_seconds), step_s_all=list(step_seconds),
            tokens_per_s=shape["batch"] * shape["seq"] / statistics.median(step_seconds),
            teacher_s=statistics.median(teacher_seconds) if teacher_seconds[0] is not None else None,
        )
    if len(variants) == 1:
        results[variants[0]]["peak_bytes"] = memory.peak_bytes()
    if "balora" in runs:
        results["balora"]["terms_s"] = time_regularizers(runs["balora"][0], make_batch(shape, device),
                                                         shape["dtype"], steps, stopwatch)
    return results


def fork_server(preload_peer):
    """
    CPU memory children come from a fork server that imports torch (and transformers + peft) once.
    Forking this process instead would hang in the child's first parallel op once this one has run one
    (OpenMP's threads do not survive fork), e.g. under pytest; spawning would pay every import per child.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "balora", "model", "train_nlg"] + (["transformers", "peft"]
                                                                                if preload_peer else []))
    return context


def peak_bytes_in_child(context, variant, shape_name, device, gradient_checkpointing):
    """
    CPU: `variant`'s peak memory alone in a child process (see PeakMemory), over two steps: the second
    is the first to run with AdamW's state allocated, and every later step repeats it.
    """
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, [variant], shape_name, device, 1, 1,
                                                      gradient_checkpointing))
    child.start()
    send.close()
    succeeded, payload = receive.recv()
    child.join()
    if not succeeded:
        raise RuntimeError(f"variant {variant!r} failed in its child process:\n{payload}")
    return payload[variant]["peak_bytes"]


def _map_large_allocations():
    """
    Serve every allocation of 64 KiB or more by its own mmap (glibc mallopt M_MMAP_THRESHOLD), which
    free() unmaps at once. glibc otherwise keeps freed blocks in its heap, so RSS also counts whatever
    the build freed (PiSSA's SVD work buffers: tens of MiB that `lora` never allocates) and pool slack
    that differs between runs; with this the RSS high-water mark follows the tensors that are alive.
    """
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: CPU peak memory needs glibc")


def _child_main(send, *measure_args):
    try:
        _map_large_allocations()
        send.send((True, measure(*measure_args)))
    except BaseException:
        send.send((False, traceback.format_exc()))


def measure_setting(variants, shape_name, device, steps, warmup, gradient_checkpointing):
    """
    All variants at one gradient-checkpointing setting. GPU: one variant after the other, each alone (a
    7B model at a time; the GPU is not shared, and max_memory_allocated is per variant). CPU: peak memory
    of each variant alone in a child process, then the timings of all together, round robin.
    """
    if device.type == "cuda":
        results = {}
        for variant in variants:
            results.update(measure([variant], shape_name, device, steps, warmup, gradient_checkpointing))
            gc.collect()  # give the memory back before the next variant is built
            torch.cuda.empty_cache()
        return results
    context = fork_server("peft-lora" in variants)
    peaks = {variant: peak_bytes_in_child(context, variant, shape_name, device, gradient_checkpointing)
             for variant in variants}
    results = measure(variants, shape_name, device, steps, warmup, gradient_checkpointing)
    for variant, peak in peaks.items():
        results[variant]["peak_bytes"] = peak
    return results


# -----------------------------------------------------------------------------
# Ratios and the report


def ratios(results):
    """The headline numbers of one gradient-checkpointing setting, from its variants' results."""
    pissa, balora_run, peft = results["pissa"], results["balora"], results["peft-lora"]
    out = dict(
        balora_over_pissa_time=balora_run["step_s"] / pissa["step_s"],
        balora_over_pissa_memory=balora_run["peak_bytes"] / pissa["peak_bytes"],
        teacher_share_of_balora_step=balora_run["teacher_s"] / balora_run["step_s"],
        # what BA-LoRA costs beyond one extra (no-grad) forward, relative to a PiSSA step
        balora_beyond_teacher_over_pissa=(balora_run["step_s"] - balora_run["teacher_s"] - pissa["step_s"])
        / pissa["step_s"],
        # the same from the side-by-side term timings (less noisy: no difference of two medians)
        regularizers_over_pissa=sum(balora_run["terms_s"][name] for name in REGULARIZERS) / pissa["step_s"],
        pissa_over_peft_tokens_per_s=pissa["tokens_per_s"] / peft["tokens_per_s"],
        lora_over_peft_tokens_per_s=results["lora"]["tokens_per_s"] / peft["tokens_per_s"],
    )
    for name in REGULARIZERS:
        out[f"{name}_share_of_balora_step"] = balora_run["terms_s"][name] / balora_run["step_s"]
        out[f"pissa+{name}_over_pissa_time"] = results[f"pissa+{name}"]["step_s"] / pissa["step_s"]
    return out


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {text}"
    return text


def _mib(num_bytes):
    return f"{num_bytes / 2**20:,.0f}"


def markdown(report):
    """The report's markdown section: setup, one table per gradient-checkpointing setting, the ratios."""
    shape = SHAPES[report["shape"]]
    lines = [
        f"### `{report['shape']}` on {report['device']}",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; machine: {report['machine']}",
        f"- shape: {shape['config']['num_hidden_layers']} layers, hidden {shape['config']['hidden_size']}, "
        f"vocab {shape['config']['vocab_size']}, {report['parameters'] / 1e6:.1f}M parameters, "
        f"{str(shape['dtype']).removeprefix('torch.')}; micro-batch {shape['batch']} x seq {shape['seq']} "
        f"({report['valid_tokens']} valid tokens M); r = alpha = {shape['r']} on {', '.join(TARGETS)}; "
        f"median of {report['steps']} steps after {report['warmup']} warm-up",
    ]
    for setting, results in report["results"].items():
        r = report["ratios"][setting]
        pissa = results["pissa"]
        lines += ["", f"#### gradient checkpointing {setting}", "",
                  "| variant | step ms | tokens/s | peak MiB | teacher fwd ms | time / pissa | memory / pissa |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, run in results.items():
            teacher = f"{run['teacher_s'] * 1e3:.1f}" if run["teacher_s"] is not None else "-"
            lines.append(f"| {name} | {run['step_s'] * 1e3:.1f} | {run['tokens_per_s']:,.0f} | "
                         f"{_mib(run['peak_bytes'])} | {teacher} | {run['step_s'] / pissa['step_s']:.3f} | "
                         f"{run['peak_bytes'] / pissa['peak_bytes']:.3f} |")
        terms = results["balora"]["terms_s"]
        lines += ["", "| term of Eq. 13, fwd + bwd on the (M, V) logits | ms | share of balora step |",
                  "| --- | ---: | ---: |"]
        for name, seconds in terms.items():
            lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / results['balora']['step_s']:.3f} |")
        check = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        lines += ["", "| ratio | measured | target | paper (Table 5) | met |", "| --- | ---: | ---: | ---: | :---: |",
                  f"| balora / pissa step time | {r['balora_over_pissa_time']:.3f} | - | {PAPER_TIME_RATIO:.3f} | - |",
                  f"| balora time beyond the teacher forward / pissa step | {r['balora_beyond_teacher_over_pissa']:.3f} "
                  f"| <= 0.05 | - | {check(r['balora_beyond_teacher_over_pissa'] <= 0.05)} |",
                  f"| the three terms' fwd + bwd (table above) / pissa step | {r['regularizers_over_pissa']:.3f} "
                  f"| <= 0.05 | - | {check(r['regularizers_over_pissa'] <= 0.05)} |",
                  f"| balora / pissa peak memory | {r['balora_over_pissa_memory']:.3f} | <= 1.05 | "
                  f"{PAPER_MEMORY_RATIO:.3f} | {check(r['balora_over_pissa_memory'] <= 1.05)} |",
                  f"| teacher forward share of the balora step | {r['teacher_share_of_balora_step']:.3f} | - | - | - |"]
        for name in REGULARIZERS:
            lines.append(f"| {name}: share of the balora step (pissa+{name} / pissa step time) | "
                         f"{r[f'{name}_share_of_balora_step']:.3f} ({r[f'pissa+{name}_over_pissa_time']:.3f}) "
                         "| - | - | - |")
        lines += [f"| ours pissa / peft tokens/s | {r['pissa_over_peft_tokens_per_s']:.3f} | >= 1.0 | - | "
                  f"{check(r['pissa_over_peft_tokens_per_s'] >= 1.0)} |",
                  f"| ours lora / peft tokens/s | {r['lora_over_peft_tokens_per_s']:.3f} | >= 1.0 | - | "
                  f"{check(r['lora_over_peft_tokens_per_s'] >= 1.0)} |"]
    return "\n".join(lines) + "\n"


def write_section(path, key, text):
    """Replace the section between this shape/device's markers in `path` (append it if new); keep the rest."""
    begin, end = f"<!-- bench:{key} begin -->\n", f"<!-- bench:{key} end -->\n"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + begin + text + end + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + begin + text + end
    with open(path, "w") as f:
        f.write(new)


def profile(variant, shape_name, device, steps, warmup, gradient_checkpointing):
    """Print torch.profiler's op table for `steps` steps of one variant (after warm-up), slowest first."""
    stopwatch = Stopwatch(device)
    _, optimizer, compute_loss = build_variant(variant, SHAPES[shape_name], device, gradient_checkpointing, stopwatch)
    for _ in range(warmup):
        timed_step(compute_loss, optimizer, stopwatch)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            timed_step(compute_loss, optimizer, stopwatch)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=30))


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates AdamW state)")
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default=None,
                        help="default: both for llama2-7b, off otherwise")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="subset to run (the ratios need all of them)")
    parser.add_argument("--out", default=None,
                        help="markdown file whose section for this run is replaced (default: out/bench/BENCHMARKS.md)")
    parser.add_argument("--update-docs", action="store_true", help="write the tracked BENCHMARKS.md instead")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--profile", choices=VARIANTS, default=None,
                        help="print torch.profiler's op table for one variant instead of benchmarking")
    args = parser.parse_args(argv)
    if args.update_docs and args.out:
        parser.error("--update-docs writes BENCHMARKS.md: give it or --out, not both")
    if args.out is None:
        args.out = os.path.join(REPO, "BENCHMARKS.md") if args.update_docs else os.path.join("out", "bench", "BENCHMARKS.md")
    device = torch.device(args.device)
    if args.shape == "llama2-7b" and device.type != "cuda":
        raise ValueError("--shape llama2-7b needs --device cuda (a 7B model does not train on a CPU)")
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps ({args.steps}) and --warmup ({args.warmup}) must be >= 1")
    setting = args.gradient_checkpointing or ("both" if args.shape == "llama2-7b" else "off")
    settings = ["off", "on"] if setting == "both" else [setting]
    if args.profile:
        profile(args.profile, args.shape, device, args.steps, args.warmup, settings[0] == "on")
        return None

    shape = SHAPES[args.shape]
    with torch.device("meta"):
        parameters = sum(p.numel() for p in model.Llama(model.LlamaConfig.from_hf(shape["config"])).parameters())
    if "peft-lora" in args.variants:
        import_peer_libraries()  # fail now, not after the other variants
    report = dict(shape=args.shape, device=str(device), steps=args.steps, warmup=args.warmup,
                  command=" ".join(["python", os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  parameters=parameters, valid_tokens=int((make_batch(shape, "cpu")[2][:, 1:] != IGNORE_INDEX).sum()),
                  results={}, ratios={})
    for setting in settings:
        results = measure_setting(args.variants, args.shape, device, args.steps, args.warmup, setting == "on")
        report["results"][setting] = results
        for variant, run in results.items():
            print(f"[gradient checkpointing {setting}] {variant:18s} step {run['step_s'] * 1e3:9.1f} ms  "
                  f"{run['tokens_per_s']:9,.0f} tokens/s  peak {_mib(run['peak_bytes'])} MiB", flush=True)
        if set(args.variants) == set(VARIANTS):
            report["ratios"][setting] = ratios(results)
    report["machine"] = machine_description(device)
    if report["ratios"]:
        text = markdown(report)
        print(text)
        write_section(args.out, f"{args.shape}:{device.type}", text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
