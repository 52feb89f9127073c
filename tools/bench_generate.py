"""
Generated tokens per second of eval.py's generation (eval.generate_completions: our KV-cache
Llama.generate, left-padded batches) against transformers' `generate`, on the same real model, the
same prompts and the same greedy settings, side by side in one run.

    OMP_NUM_THREADS=1 python tools/bench_generate.py                 # SmolLM2-135M-Instruct, batches 1, 8, 32
    OMP_NUM_THREADS=1 python tools/bench_generate.py --update-docs   # the same, into BENCHMARKS.md's Generation section

The prompts are the first questions of GSM8K's test split (assets/data/gsm8k/test.jsonl) in the
prompt `eval.py gsm8k` builds for the model (its chat template, else Alpaca's), sorted longest first (as generate_completions
batches them). For each batch size both generators run on the same batch in turn, --repeats times
(alternating, so a change of machine load hits both); the table gives the median seconds, the tokens
each generated (up to, not including, the first end id) and the tokens/s, their ratio, and how far the
two greedy outputs agree (rows equal token for token; positions equal before the first difference).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench  # noqa: E402
import eval as evaluation  # noqa: E402
from data import Tokenizer, prompt_ids, resolve_prompt_format  # noqa: E402
from model import Llama  # noqa: E402

SMOLLM2 = os.path.expanduser(os.environ.get("BALORA_SMOLLM2_DIR", "~/.cache/balora/smollm2-135m-instruct"))
GSM8K = os.path.join(REPO, "assets", "data", "gsm8k", "test.jsonl")


class Recorder:
    """Our model as generate_completions uses it, keeping each Llama.generate output (for the comparison)."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, *args, **kwargs):
        self.outputs.append(self.model.generate(*args, **kwargs))
        return self.outputs[-1]


def new_tokens(output, prompt_length, eos_ids):
    """Each row's generated ids, up to (not including) its first end id."""
    rows = []
    for row in output[:, prompt_length:].tolist():
        rows.append(row[:next((n for n, token in enumerate(row) if token in eos_ids), len(row))])
    return rows


def run_ours(model, tokenizer, prompts, max_new_tokens):
    recorder = Recorder(model)
    start = time.perf_counter()
    evaluation.generate_completions(recorder, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
    seconds = time.perf_counter() - start
    (output,) = recorder.outputs
    return seconds, new_tokens(output, max(map(len, prompts)), tokenizer.eos_ids)


def run_transformers(reference, tokenizer, prompts, max_new_tokens):
    start = time.perf_counter()
    input_ids, attention_mask = tokenizer.pad_batch(prompts, padding_side="left")
    with torch.no_grad():
        output = reference.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_ids,
                                    pad_token_id=tokenizer.pad_id)
    rows = new_tokens(output, input_ids.shape[1], tokenizer.eos_ids)
    [tokenizer.decode(row) for row in rows]  # the completions' text, as generate_completions returns them
    return time.perf_counter() - start, rows


def agreement(ours, theirs):
    """(rows equal token for token, positions equal before each row's first difference / positions of the longer)."""
    same_rows = sum(a == b for a, b in zip(ours, theirs))
    prefix = sum(next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ours, theirs))
    return same_rows, prefix / max(1, sum(max(len(a), len(b)) for a, b in zip(ours, theirs)))


def measure(model, reference, tokenizer, prompts, batch_size, max_new_tokens, repeats):
    batch = prompts[:batch_size]
    times = {"ours": [], "transformers": []}
    for _ in range(repeats):
        seconds, ours = run_ours(model, tokenizer, batch, max_new_tokens)
        times["ours"].append(seconds)
        seconds, theirs = run_transformers(reference, tokenizer, batch, max_new_tokens)
        times["transformers"].append(seconds)
    same_rows, same_positions = agreement(ours, theirs)
    result = {"batch_size": batch_size, "prompt_tokens": [min(map(len, batch)), max(map(len, batch))],
              "same_rows": same_rows, "same_positions": same_positions}
    for name, rows in (("ours", ours), ("transformers", theirs)):
        tokens, seconds = sum(map(len, rows)), statistics.median(times[name])
        result[name] = {"seconds": seconds, "all_seconds": times[name], "tokens": tokens, "tokens_per_s": tokens / seconds}
    result["ratio"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def markdown(report, command):
    lines = ["## Generation", "",
             "Generated tokens/s of eval.py's generation (`eval.generate_completions`) against transformers' "
             "`generate` on the same real model, prompts and greedy settings, in one run, by "
             "[`tools/bench_generate.py`](tools/bench_generate.py):", "",
             "```bash", command, "```", "",
             f"- model: {report['model']} (fp32), transformers {report['transformers_version']}",
             f"- machine: {report['machine']}",
             f"- prompts: the first {max(report['batch_sizes'])} GSM8K test questions, {report['prompt_format']} format, "
             f"longest first; greedy, max_new_tokens = {report['max_new_tokens']}, the end ids of "
             "generation_config.json",
             f"- each cell: the median of {report['repeats']} runs, the two generators alternating; tokens are "
             "those generated before each row's first end id",
             f"- load average (1 min) at the start / end: {report['load_average'][0]:.1f} / {report['load_average'][1]:.1f}",
             "",
             "| batch | prompt tokens | ours s | ours tokens | ours tokens/s | transformers s | transformers tokens "
             "| transformers tokens/s | ours / transformers | rows equal | positions equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['batch_size']} | {r['prompt_tokens'][0]}-{r['prompt_tokens'][1]} | {r['ours']['seconds']:.2f} "
                     f"| {r['ours']['tokens']} | {r['ours']['tokens_per_s']:.1f} | {r['transformers']['seconds']:.2f} "
                     f"| {r['transformers']['tokens']} | {r['transformers']['tokens_per_s']:.1f} | {r['ratio']:.2f} "
                     f"| {r['same_rows']}/{r['batch_size']} | {100 * r['same_positions']:.1f}% |")
    lines += ["", "Each run's seconds, ours / transformers:", ""]
    lines += [f"- batch {r['batch_size']}: " + " ".join(f"{s:.1f}" for s in r["ours"]["all_seconds"]) + " / "
              + " ".join(f"{s:.1f}" for s in r["transformers"]["all_seconds"]) for r in report["results"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="a Hugging Face Llama-family directory (default: the "
                        "SmolLM2-135M-Instruct that tools/get_smollm2.sh converts)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--update-docs", action="store_true", help="write the Generation section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model}: no config.json there (tools/get_smollm2.sh converts SmolLM2-135M-Instruct)")
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes}: expected comma-separated integers")
    from transformers import AutoModelForCausalLM, __version__ as transformers_version

    tokenizer = Tokenizer(args.model)
    with open(GSM8K) as f:
        questions = [json.loads(line)["question"] for line in f][:max(batch_sizes)]
    prompt_format = resolve_prompt_format(None, tokenizer)
    prompts = sorted((prompt_ids(tokenizer, question, prompt_format) for question in questions), key=lambda p: -len(p))
    model = Llama.from_pretrained(args.model)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    # load_average: the machine's other load, at start and end (the ratio is side by side, the seconds are not)
    report = {"machine": bench.machine_description(torch.device("cpu")), "transformers_version": transformers_version,
              "model": os.path.basename(os.path.normpath(args.model)), "prompt_format": prompt_format,
              "batch_sizes": batch_sizes, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "results": [],
              "load_average": [os.getloadavg()[0]]}
    for batch_size in batch_sizes:
        result = measure(model, reference, tokenizer, prompts, batch_size, args.max_new_tokens, args.repeats)
        report["results"].append(result)
        print(f"batch {batch_size}: ours {result['ours']['tokens_per_s']:.1f} tokens/s, transformers "
              f"{result['transformers']['tokens_per_s']:.1f} tokens/s, ratio {result['ratio']:.2f}, rows equal "
              f"{result['same_rows']}/{batch_size}, positions equal {100 * result['same_positions']:.1f}%", flush=True)
    report["load_average"].append(os.getloadavg()[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    command = ("OMP_NUM_THREADS=1 python tools/bench_generate.py --update-docs"
               + "".join(f" --{name.replace('_', '-')} {getattr(args, name)}" for name, default in
                         (("batch_sizes", "1,8,32"), ("max_new_tokens", 128), ("repeats", 3))
                         if getattr(args, name) != default))
    text = markdown(report, command)
    print(text)
    if args.update_docs:
        bench.write_section(os.path.join(REPO, "BENCHMARKS.md"), "generation", text)


if __name__ == "__main__":
    main()
