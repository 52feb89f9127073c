"""
The 4-bit base (QLoRA / QPiSSA / QBA-LoRA, Fig. 5) measured on real weights, SmolLM2-135M-Instruct:

  1. quantization error of every adapted matrix, QLoRA ||W - Q(W)||_F against QPiSSA
     ||W - (Q(W_res) + s B A)||_F (the trainers' path: balora.add_lora's SVD, then nf4.quantize_base of the residual);
  2. the teacher on a 4-bit base (--teacher quantized: pretrained_mode computes the quantized model;
     --teacher full: the pretrained W kept beside the codes): its distance from the full-precision model's
     next-token distributions on metamath_train's responses;
  3. peak memory (CPU resident set) of one training step, and bytes per base weight, with and without
     --quantize, and on a 4-bit base with either teacher, each in a fresh subprocess.

    python tools/nf4_report.py --model ~/.cache/balora/smollm2-135m-instruct                 # -> out/nf4/
    python tools/nf4_report.py --model ~/.cache/balora/smollm2-135m-instruct --update-docs   # -> assets/nf4/

Writes results.json and README.md (the tables). Memory is the process's peak resident set during the
step (Linux: VmHWM after resetting it through /proc/self/clear_refs), so it includes everything the
step touches on the CPU: weights, activations, gradients, optimizer state.
"""

import argparse
import contextlib
import copy
import ctypes
import io
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import balora  # noqa: E402
import nf4  # noqa: E402
import training  # noqa: E402
from data import Tokenizer, collate, load_examples  # noqa: E402
from model import Llama  # noqa: E402

DATA = os.path.join(REPO, "assets", "data", "metamath_train.jsonl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -----------------------------------------------------------------------------
# 1. QLoRA vs QPiSSA quantization error


def quantization_errors(model, rank, quantize):
    """
    {matrix type: [(||W - Q(W)||_F / ||W||_F, ||W - (Q(W_res) + s B A)||_F / ||W||_F)]} over every
    target matrix: QLoRA's error (init="lora": Q of W itself) and QPiSSA's (init="pissa", rank r).
    """
    errors = {}
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                         and n.rpartition(".")[2] in TARGETS]:
        W = linear.weight.detach().float()
        per_init = []
        for init in ("lora", "pissa"):
            holder = torch.nn.Sequential()
            holder.add_module("proj", copy.deepcopy(linear))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # per-layer prints
                balora.add_lora(holder, ["proj"], r=rank, alpha=rank, init=init)
                nf4.quantize_base(holder, quantize)
            with torch.no_grad():
                per_init.append(((W - holder.proj.merged_weight()).norm() / W.norm()).item())
        errors.setdefault(name.rpartition(".")[2], []).append(tuple(per_init))
    return errors


# -----------------------------------------------------------------------------
# 2. The teacher under quantization


def response_batch(model_dir, count, max_length):
    tokenizer = Tokenizer(model_dir)
    examples = load_examples(DATA, "metamath", count)
    input_ids, attention_mask, labels = collate(tokenizer, examples, max_length, "chat")
    return input_ids, attention_mask, labels[:, 1:] != -100


def teacher_distance(model, batch, init, rank, quantize, teacher):
    """KL(p_W || p_teacher) per response token (mean), top-1 agreement and max |logit difference|."""
    input_ids, attention_mask, response = batch
    output_mask = F.pad(response, (0, 1), value=False)
    with torch.no_grad():
        reference = model(input_ids, attention_mask, output_mask=output_mask).float()
        adapted = copy.deepcopy(model)
        training.adapt(adapted, quantize, teacher, target_modules=TARGETS, r=rank, alpha=rank, init=init)
        with balora.pretrained_mode(adapted):
            teacher = adapted(input_ids, attention_mask, output_mask=output_mask).float()
    log_p, log_q = F.log_softmax(reference, -1), F.log_softmax(teacher, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return dict(kl_mean=kl.mean().item(), kl_max=kl.max().item(),
                top1_agreement=(reference.argmax(-1) == teacher.argmax(-1)).float().mean().item(),
                max_abs_logit_diff=(reference - teacher).abs().max().item(), tokens=int(response.sum()))


# -----------------------------------------------------------------------------
# 3. Peak memory of one step (run in a fresh subprocess per setting)


def resident_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def one_step(model_dir, dtype, quantize, teacher, rank, micro_batch_size, max_length):
    """Load, adapt (PiSSA + the regularizers' teacher, as --method balora), then measure one step."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    model = Llama.from_pretrained(model_dir, dtype=dtype)
    with torch.no_grad():  # fp32 tensors from safetensors are views of the memory-mapped file, whose
        for tensor in [*model.parameters(), *model.buffers()]:  # pages would stay resident: own copies
            tensor.data = tensor.data.clone()
    # quantized after add_lora, as the trainers do (training.adapt): measure the base bytes here
    training.adapt(model, quantize, teacher, target_modules=TARGETS, r=rank, alpha=rank, init="pissa", pissa_niter=4)
    stored, weights = quantized_bytes(model)
    linear_weights = weights or sum(m.base.weight.numel() for _, m in balora.lora_layers(model))
    linear_bytes = stored or linear_weights * torch.finfo(dtype).bits // 8
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    input_ids, attention_mask, response = response_batch(model_dir, micro_batch_size, max_length)
    output_mask = F.pad(response, (0, 1), value=False)
    targets = input_ids[:, 1:][response]
    teacher_tensors = [m.teacher_weight for m in model.modules() if getattr(m, "teacher_weight", None) is not None]
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *teacher_tensors])
    # the full-precision weights freed by quantize_base stay in the C heap unless it is trimmed
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = resident_kib("VmRSS")
    start = time.time()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        student = model(input_ids, attention_mask, output_mask=output_mask).float()
        with torch.no_grad(), balora.pretrained_mode(model):
            teacher = model(input_ids, attention_mask, output_mask=output_mask)
    total, _ = balora.nlg_objective(F.cross_entropy(student, targets), student, teacher, (0.025, 0.005, 0.005),
                                    2.0, 10, 20)
    total.backward()
    optimizer.step()
    seconds = time.time() - start
    peak = resident_kib("VmHWM")
    return dict(model_tensors_mib=model_bytes / 2**20, teacher_weights_mib=sum(t.numel() * t.element_size()
                                                                                   for t in teacher_tensors) / 2**20,
                resident_before_step_mib=before / 1024,
                peak_during_step_mib=peak / 1024, step_increase_mib=(peak - before) / 1024, step_seconds=seconds, linear_weights=linear_weights, linear_bytes=linear_bytes,
                bytes_per_linear_weight=linear_bytes / linear_weights, tokens=int(attention_mask.sum()))


def quantized_bytes(model):
    """(bytes of the NF4 codes and constants, weights they hold) over the model's NF4Linear layers."""
    layers = [m for m in model.modules() if isinstance(m, nf4.NF4Linear)]
    return sum(m.base_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)


def step_in_subprocess(args, dtype, quantize, teacher):
    command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--step", dtype, quantize, teacher,
               "--rank", str(args.rank), "--micro-batch-size", str(args.micro_batch_size),
               "--max-length", str(args.max_length)]
    # a fixed mmap threshold: glibc otherwise raises it to the size of the first freed weight, and the
    # freed full-precision weights would stay in its heap, resident, after quantize_base
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------


def write_report(results, out):
    lines = [f"# The 4-bit base on SmolLM2-135M-Instruct (QLoRA, QPiSSA, QBA-LoRA)", "",
             f"`{' '.join(['python tools/nf4_report.py', *results['argv']])}`; {results['minutes']:.1f} minutes on the CPU"
             + (f" (part 3 rerun by `{' '.join(['python tools/nf4_report.py', *results['memory_argv']])}`)" if "memory_argv" in results else "")
             + ".", "",
             "## 1. Quantization error of the adapted matrices", "",
             "Relative Frobenius error of the frozen base plus the initial adapter against W: QLoRA "
             "||W - Q(W)|| / ||W||, QPiSSA ||W - (Q(W_res) + s B A)|| / ||W|| (PiSSA's rank-r principal part "
             "kept in the float32 adapter, its residual quantized), W in float32. Mean over the 30 layers of each "
             "matrix type; `all`: the mean over all 210 matrices.", ""]
    for key, rows in results["errors"].items():
        quantize, rank = key.split("@")
        lines += [f"### {quantize}, r = {rank}", "", "| matrices | QLoRA error | QPiSSA error | QPiSSA / QLoRA | QPiSSA smaller in |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        pooled = [pair for pairs in rows.values() for pair in pairs]
        for name, pairs in [*rows.items(), ("all", pooled)]:
            qlora = sum(p[0] for p in pairs) / len(pairs)
            qpissa = sum(p[1] for p in pairs) / len(pairs)
            smaller = sum(p[1] < p[0] for p in pairs)
            lines.append(f"| {name} ({len(pairs)}) | {qlora:.4f} | {qpissa:.4f} | {qpissa / qlora:.3f} | {smaller} / {len(pairs)} |")
        lines.append("")
    lines += ["## 2. The teacher on a 4-bit base", "",
              "The consistency terms' teacher on a 4-bit base: with --teacher quantized the quantized model "
              "(pretrained_mode computes Q(W) for init=lora, Q(W_res) + s B0 A0 for init=pissa), as in QLoRA; with "
              "--teacher full the full-precision model, the official QBA-LoRA's teacher (each quantized layer keeps "
              "its pretrained W). Its distance from the full-precision model on the "
              f"{results['teacher_tokens']} response tokens of the first {results['teacher_examples']} metamath_train "
              "examples (chat format, fp32):", "",
              "| teacher | mean KL(p_W ‖ p_teacher) | max KL | top-1 agreement | max abs logit diff |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in results["teacher"].items():
        lines.append(f"| {name} | {row['kl_mean']:.5f} | {row['kl_max']:.4f} | {100 * row['top1_agreement']:.1f}% | "
                     f"{row['max_abs_logit_diff']:.3f} |")
    lines += ["", "## 3. Memory of one training step", "",
              f"--method balora (PiSSA, r = {results['rank']}, the teacher pass and all three regularizers), one "
              f"micro-batch of {results['micro_batch_size']} examples (max length {results['max_length']}), AdamW; "
              "on the CPU: the model's tensors (parameters and buffers), the process's resident set before the step "
              "(Python and torch included), its peak during the step, and what the step adds (activations, gradients, "
              "AdamW state, the dequantized weight of the layer being computed). Only the 210 adapted linear layers "
              "are quantized; the tied embedding / LM head (28.3M of the 134.5M weights) stays in the model dtype, as in QLoRA. "
              "With --teacher full the model tensors include the pretrained linear weights the teacher computes with "
              "(the `teacher copy` column), in the model dtype, on the device the model runs on.", "",
              "| dtype | --quantize | --teacher | bytes per linear weight | linear weights (MiB) | teacher copy (MiB) | model tensors (MiB) | resident before (MiB) | peak during the step (MiB) | step adds (MiB) | step (s) |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results["memory"].items():
        dtype, quantize, teacher = name.split("/")
        lines.append(f"| {dtype} | {quantize} | {teacher if quantize != 'none' else '-'} | {row['bytes_per_linear_weight']:.4f} | "
                     f"{row['linear_bytes'] / 2**20:.1f} | {row['teacher_weights_mib']:.1f} | "
                     f"{row['model_tensors_mib']:.0f} | {row['resident_before_step_mib']:.0f} | {row['peak_during_step_mib']:.0f} | "
                     f"{row['step_increase_mib']:.0f} | {row['step_seconds']:.1f} |")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_errors_and_teacher(args, results, start):
    """Parts 1 and 2 on the fp32 model, into `results`."""
    model = Llama.from_pretrained(args.model).eval()
    for quantize in ("nf4", "nf4-dq"):
        for rank in args.ranks:
            results["errors"][f"{quantize}@{rank}"] = quantization_errors(model, rank, quantize)
            print(f"[{time.time() - start:5.0f}s] errors {quantize} r={rank}", flush=True)
    batch = response_batch(args.model, args.teacher_examples, args.max_length)
    for quantize in ("nf4", "nf4-dq"):
        for init, label in (("lora", "QLoRA: Q(W)"), ("pissa", f"QPiSSA: Q(W_res) + s B0 A0, r = {args.rank}")):
            row = teacher_distance(model, batch, init, args.rank, quantize, "quantized")
            results["teacher"][f"--teacher quantized, {label}, {quantize}"] = row
            print(f"[{time.time() - start:5.0f}s] teacher {label} {quantize}: {row}", flush=True)
        for init, label in (("lora", "QLoRA"), ("pissa", f"QPiSSA, r = {args.rank}")):
            row = teacher_distance(model, batch, init, args.rank, quantize, "full")
            results["teacher"][f"--teacher full: W, {label}, {quantize}"] = row
            results["teacher_tokens"] = row["tokens"]
            print(f"[{time.time() - start:5.0f}s] teacher {label} {quantize}: {row}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct directory (tools/get_smollm2.sh)")
    parser.add_argument("--out", default=os.path.join("out", "nf4"))
    parser.add_argument("--update-docs", action="store_true", help="write into the tracked assets/nf4/ instead")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="PiSSA ranks of the error table")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank of the teacher and memory runs")
    parser.add_argument("--teacher-examples", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--memory-only", action="store_true",
                        help="rerun part 3 only, keeping parts 1 and 2 of the results.json already in the output directory")
    parser.add_argument("--step", nargs=3, metavar=("DTYPE", "QUANTIZE", "TEACHER"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.step:
        print(json.dumps(one_step(args.model, *args.step, args.rank, args.micro_batch_size, args.max_length)))
        return None
    out = os.path.join(REPO, "assets", "nf4") if args.update_docs else args.out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()
    results = dict(argv=sys.argv[1:] if argv is None else list(argv), rank=args.rank, errors={}, teacher={}, memory={},
                   micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                   teacher_examples=args.teacher_examples)
    if args.memory_only:
        with open(os.path.join(out, "results.json")) as f:
            kept = json.load(f)
        results.update(errors=kept["errors"], teacher=kept["teacher"], teacher_tokens=kept["teacher_tokens"],
                       argv=kept["argv"], memory_argv=results["argv"], minutes_parts_1_2=kept["minutes"])
    else:
        run_errors_and_teacher(args, results, start)
    for dtype in ("fp32", "bf16"):
        for quantize, teacher in (("none", "full"), ("nf4", "quantized"), ("nf4", "full"), ("nf4-dq", "quantized"),
                                  ("nf4-dq", "full")):
            key = f"{dtype}/{quantize}/{teacher}"
            results["memory"][key] = step_in_subprocess(args, dtype, quantize, teacher)
            print(f"[{time.time() - start:5.0f}s] memory {key}: {results['memory'][key]}", flush=True)
    results["minutes"] = (time.time() - start) / 60 + results.get("minutes_parts_1_2", 0)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, out)
    print(open(os.path.join(out, "README.md")).read())
    return results


if __name__ == "__main__":
    main()
