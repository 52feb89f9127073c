"""
Cost of the NLG regularizers (Eq. 9, 10, 12) next to the cross-entropy task loss on the same logits.

For an (M, V) matrix of valid-token logits (default M = 2048 tokens, V = 32000, LLaMA-2's vocabulary)
each function runs forward + backward:
  time:   median wall-clock over --reps rounds; the functions take turns within each round, so they
          share the same machine conditions.
  memory: peak resident memory above the starting point, measured in a fresh subprocess per function:
          the subprocess builds the inputs, resets the kernel's peak-RSS counter (writing 5 to
          /proc/self/clear_refs, Linux >= 4.0), runs forward + backward once and reads VmHWM. torch's
          CPU allocator does not cache, and the subprocess runs with MALLOC_MMAP_THRESHOLD_=128 KiB so
          that glibc serves every tensor above that with its own mmap and unmaps it on free (by default
          glibc keeps freed blocks of up to 32 MiB in its heap, and the RSS would overstate live memory).
          The peak RSS is then the peak of live tensor memory, plus small malloc overhead. It includes
          the gradient of the logits. Reported also in "copies" of one float32 (M, V) logit matrix.

    python tools/bench_regularizers.py [--M 2048] [--V 32000] [--reps 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import balora  # noqa: E402


def make_inputs(M, V, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(M, V, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(M, V, generator=generator)
    targets = torch.randint(V, (M,), generator=generator)
    return student, teacher, targets


def losses(args):
    """name -> loss(student, teacher, targets); cross-entropy first, the baseline."""
    return {
        "cross_entropy": lambda s, t, y: F.cross_entropy(s, y),
        "nlg_consistency_loss": lambda s, t, y: balora.nlg_consistency_loss(t, s, args.temperature),
        "nlg_diversity_loss": lambda s, t, y: balora.nlg_diversity_loss(s, args.top_k),
        "nlg_svd_loss": lambda s, t, y: balora.nlg_svd_loss(
            s, args.svd_k, generator=torch.Generator().manual_seed(0)),
    }


def forward_backward(loss_fn, student, teacher, targets):
    student.grad = None
    loss_fn(student, teacher, targets).backward()


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def peak_memory(args, name):
    """Run in the subprocess: bytes of peak RSS above the start during one forward + backward."""
    student, teacher, targets = make_inputs(args.M, args.V)
    start = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    forward_backward(losses(args)[name], student, teacher, targets)
    return proc_status("VmHWM") - start


def measure_memory_in_subprocess(args, name):
    command = [sys.executable, os.path.abspath(__file__), "--memory-of", name,
               "--M", str(args.M), "--V", str(args.V),
               "--svd-k", str(args.svd_k), "--top-k", str(args.top_k), "--temperature", str(args.temperature)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return int(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--M", type=int, default=2048, help="valid tokens (rows of the logit matrix)")
    parser.add_argument("--V", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--svd-k", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the subprocess measuring one loss
    args = parser.parse_args(argv)
    if args.memory_of:
        print(peak_memory(args, args.memory_of))
        return None

    student, teacher, targets = make_inputs(args.M, args.V)
    names = list(losses(args))
    seconds = {name: [] for name in names}
    for _ in range(args.reps):
        for name, loss_fn in losses(args).items():
            t0 = time.perf_counter()
            forward_backward(loss_fn, student, teacher, targets)
            seconds[name].append(time.perf_counter() - t0)
    del student, teacher, targets
    time_s = {name: statistics.median(values) for name, values in seconds.items()}
    peak = {name: measure_memory_in_subprocess(args, name) for name in names}

    copy_bytes = args.M * args.V * 4
    print(f"M={args.M} V={args.V} float32, forward+backward, median of {args.reps}, "
          f"torch threads={torch.get_num_threads()}; one logits copy = {copy_bytes / 2**20:.0f} MiB")
    print(f"| {'function':<22} | {'time s':>7} | {'time/CE':>7} | {'peak MiB':>8} | {'peak/CE':>7} | {'copies':>6} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 8}|")
    for name in names:
        time_ratio, peak_ratio = time_s[name] / time_s["cross_entropy"], peak[name] / peak["cross_entropy"]
        print(f"| {name:<22} | {time_s[name]:7.3f} | {time_ratio:7.2f} | "
              f"{peak[name] / 2**20:8.0f} | {peak_ratio:7.2f} | {peak[name] / copy_bytes:6.2f} |")
    return dict(time_s=time_s, peak_bytes=peak)


if __name__ == "__main__":
    main()
