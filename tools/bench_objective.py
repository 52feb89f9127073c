"""
What obtaining the objective's gradients by autograd costs: a BA-LoRA training step whose objective is
chunked.nlg_objective_in_chunks (balora's plain functions, a chunk of rows at a time, gradients by
torch.autograd.grad) against the same step with an earlier commit's hand-derived fused objective
(balora.nlg_objective_fused, whose gradients were written out by hand), in one process, round robin.

    python tools/bench_objective.py --shape smollm2-135m --against 96c8a35
    python tools/bench_objective.py --shape tiny --against 96c8a35 --steps 20
    python tools/bench_objective.py --shape tiny --against 96c8a35 --profile   # where the difference goes

Both steps are tools/bench.py's balora step on the same model, batch and sketch seed (student forward,
teacher forward to its hidden states, objective, backward, clipping, AdamW); only the objective differs.
The earlier commit's balora.py is read with `git show COMMIT:balora.py` (the repo's own history) and
run as a module beside ours. Prints the median step and objective times of both and their ratios;
with --profile, torch.profiler's ops of one objective forward + backward of each, by self CPU time.
"""

import argparse
import os
import statistics
import subprocess
import sys
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import balora  # noqa: E402
import bench  # noqa: E402
import chunked  # noqa: E402
from training import autocast_context, teacher_head  # noqa: E402


def balora_at(commit):
    """The module balora.py was at `commit` (git show), for its nlg_objective_fused."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{commit}:balora.py"], check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(f"balora_at_{commit}")
    exec(compile(source, f"{commit}:balora.py", "exec"), module.__dict__)
    if not hasattr(module, "nlg_objective_fused"):
        raise SystemExit(f"balora.py at {commit} has no nlg_objective_fused: give a commit that had the fused objective")
    return module


def step(llama, optimizer, batch, objective, dtype, timer):
    """One balora step of tools/bench.py with `objective` in place of the chunked one: (step s, objective s)."""
    input_ids, _, labels = batch
    device = input_ids.device
    targets = labels[:, 1:]
    valid_mask = targets != bench.IGNORE_INDEX
    output_mask = torch.nn.functional.pad(valid_mask, (0, 1), value=False)
    start = timer.mark()
    with autocast_context(device, dtype):
        student_logits = llama(input_ids, output_mask=output_mask).float()
    with torch.no_grad(), balora.pretrained_mode(llama), autocast_context(device, dtype):
        teacher_hidden = llama(input_ids, output_mask=output_mask, return_hidden=True)
    generator = torch.Generator(device=device).manual_seed(0)
    objective_start = timer.mark()
    loss, _ = objective(student_logits, targets[valid_mask], 1 / valid_mask.sum(), teacher_hidden, bench.LAMBDAS,
                        bench.TEMPERATURE, bench.SVD_K, bench.TOP_K, generator=generator,
                        teacher_head=teacher_head(llama, device, dtype))
    objective_end = timer.mark()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], bench.GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = timer.mark()
    return timer.seconds(start, end), timer.seconds(objective_start, objective_end), loss.item()


def profile_objectives(llama, batch, objectives, dtype, rows=12):
    """torch.profiler's top ops (self CPU time) of one forward + backward of each objective on the step's logits."""
    input_ids, _, labels = batch
    device = input_ids.device
    targets = labels[:, 1:]
    valid_mask = targets != bench.IGNORE_INDEX
    output_mask = torch.nn.functional.pad(valid_mask, (0, 1), value=False)
    with torch.no_grad(), autocast_context(device, dtype):
        student_logits = llama(input_ids, output_mask=output_mask).float()
        with balora.pretrained_mode(llama):
            teacher_hidden = llama(input_ids, output_mask=output_mask, return_hidden=True)
    head = teacher_head(llama, device, dtype)
    for name, objective in objectives.items():
        def forward_and_backward():
            loss, _ = objective(student_logits.detach().requires_grad_(), targets[valid_mask], 1 / valid_mask.sum(),
                                teacher_hidden, bench.LAMBDAS, bench.TEMPERATURE, bench.SVD_K, bench.TOP_K,
                                generator=torch.Generator(device=device).manual_seed(0), teacher_head=head)
            loss.backward()

        forward_and_backward()  # warm-up
        with torch.profiler.profile() as prof:
            forward_and_backward()
        print(f"\n{name}: one forward + backward")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=list(bench.SHAPES), help="tools/bench.py's shape (default: tiny)")
    parser.add_argument("--against", required=True, help="a commit whose balora.py has nlg_objective_fused")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each, after 2 warm-up steps (default: 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each objective, no timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape, device = bench.SHAPES[args.shape], torch.device(args.device)
    old = balora_at(args.against)
    objectives = {"autograd (chunked.py)": chunked.nlg_objective_in_chunks,
                  f"hand-derived ({args.against})": old.nlg_objective_fused}
    runs = {}
    for name in objectives:  # one model each, the same weights and init (seeded), so both steps do the same work
        llama = bench.build_ours(shape, "pissa", device, False)
        optimizer = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=bench.LR)
        runs[name] = (llama, optimizer)
    batch = bench.make_batch(shape, device)
    if args.profile:
        return profile_objectives(runs[next(iter(objectives))][0], batch, objectives, shape["dtype"])
    timer = bench.Stopwatch(device)
    seconds = {name: ([], []) for name in objectives}
    losses = {}
    for index in range(2 + args.steps):
        for name, objective in objectives.items():  # round robin: the machine's drift hits both alike
            step_s, objective_s, loss = step(*runs[name], batch, objective, shape["dtype"], timer)
            losses.setdefault(name, loss)
            if index >= 2:
                seconds[name][0].append(step_s)
                seconds[name][1].append(objective_s)
    medians = {name: tuple(1000 * statistics.median(values) for values in pair) for name, pair in seconds.items()}
    (new_name, (new_step, new_objective)), (old_name, (old_step, old_objective)) = medians.items()
    print(f"shape {args.shape}, {args.steps} steps each after 2 warm-up, {args.threads} thread(s), {device}")
    print(f"first-step loss: {losses[new_name]:.6f} (autograd) vs {losses[old_name]:.6f} (hand-derived)")
    print(f"{'objective':<32} {'step ms':>9} {'objective fwd ms':>17}")
    for name, (step_ms, objective_ms) in medians.items():
        print(f"{name:<32} {step_ms:>9.1f} {objective_ms:>17.1f}")
    print(f"step time autograd / hand-derived: {new_step / old_step:.3f}; "
          f"objective forward autograd / hand-derived: {new_objective / old_objective:.3f}; "
          f"the difference is {(new_step - old_step) / old_step:+.3f} of a step")
    return medians


if __name__ == "__main__":
    main()
