"""
Every method of training.METHODS under one recipe, side by side in one table (Tables 1 and 2 of the
paper run here rather than quoted):

  NLG  train_nlg.py on GSM8K in MetaMath's format, the setup of tools/real_experiment.py (its data,
       its BUDGETS, its measurements): held-out GSM8K cross-entropy, GSM8K accuracy (main rows),
       Wikitext-2 perplexity and KL(base || tuned) (drift)
  NLU  train_nlu.py on the bundled toy NLI task, or on any GLUE task's files (--nlu-task, --nlu-data,
       --nlu-validation-file, --nlu-model): the best value of the task's first metric on its first
       validation split, for Table 2's methods (and their "+reg" forms), which are the paper's NLU rows

Each row also has the trainable parameter count (Table 1/2's #Params), and the step time and peak
memory relative to LoRA measured in the same run (peak memory: each run in its own process, its
VmHWM on a CPU, torch.cuda.max_memory_allocated on a GPU; not measured by the in-process smoke
budget). The methods are read from training.METHODS: a method added there is a row here. The
"+reg" rows use the paper's lambdas (B.4), the others none; all share every other setting.

    python tools/baselines.py --budget smoke                    # assets/tiny-llama, seconds: the CI check
    bash tools/get_smollm2.sh && python tools/baselines.py --budget cpu --update-readme  # SmolLM2-135M, 2 cores
    python tools/baselines.py --budget full --device cuda      # the paper's recipe (B.4) on a GPU
    python tools/baselines.py --budget cpu --nlu-task rte --nlu-data rte_train.jsonl \
        --nlu-validation-file rte_validation.jsonl             # the NLU rows on a GLUE task's files

Runs go to --out (default out/baselines/<budget>); results.json and table.md to --table-dir (default
assets/baselines/<budget>/). A run that finished (its result.json, beside the argv it ran with) is
reused, so an interrupted table continues where it stopped (unless its peak memory was measured
without a recorded source: see has_own). BitFit gets no NLG run on a model without
bias terms (SmolLM2, every LLaMA); MiLoRA runs with the exact SVD (--pissa-niter finds only the top).
"""

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tools/ (real_experiment) after the repository: the method's baselines.py is found before this file's namesake
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import glue  # noqa: E402
import real_experiment  # noqa: E402  (tools/real_experiment.py: the NLG data, budgets and measurements)
import train_nlg  # noqa: E402
import train_nlu  # noqa: E402
import training  # noqa: E402

TINY_LLAMA = os.path.join(REPO, "assets", "tiny-llama")
MAIN = ("lora", "pissa", "balora")  # the rows that get every seed of the budget and GSM8K accuracy

# One recipe per budget. nlg: tools/real_experiment.py's budget of the same name (smoke: assets/tiny-llama,
# on half its training problems: 2 steps). nlu: train_nlu.py's toy preset, with these flags changed
# (smoke: 2 steps of 16 and the first 64 validation examples; cpu: half its 92 steps, to fit the
# budget's time), run with the first seed only, for the NLU rows (nlu_applies). isolate: one process per
# run, so that its peak memory is its own.
BUDGETS = {
    "smoke": dict(model=TINY_LLAMA, nlg=dict(real_experiment.BUDGETS["smoke"], train_problems=8),
                  nlu=dict(max_steps=2, batch_size=16, validation_examples=64), main_seeds=[42], isolate=False),
    "cpu": dict(model=real_experiment.DEFAULT_MODEL, nlg=real_experiment.BUDGETS["cpu"], nlu=dict(max_steps=46),
                main_seeds=[42, 1024], isolate=True),
    "full": dict(model=real_experiment.DEFAULT_MODEL, nlg=real_experiment.BUDGETS["full"], nlu={},
                 main_seeds=[42, 1024, 2024], isolate=True),
}
FIRST_SEED = 42  # every method runs with it; LoRA's run with it is the reference of the relative columns


# -----------------------------------------------------------------------------
# One training run, in this process or in its own


OWN_PEAKS = ("VmHWM", "cuda.max_memory_allocated")  # the sources that measure a child's own peak


def peak_memory_bytes(device):
    """
    This process's peak: CUDA memory allocated by torch on a GPU; on a CPU its resident-set high-water
    mark, VmHWM of /proc/self/status (Linux). Not ru_maxrss: Linux carries it over from the parent at
    exec, so a child of this tool (which holds the base model and the references) would report the
    parent's size whenever that is larger. Elsewhere ru_maxrss (no /proc), with that caveat.
    Returns (bytes, the source's name).
    """
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated"
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def train(trainer, argv, device, isolate, threads):
    """
    Run train_nlg.py / train_nlu.py main(argv); returns (wall seconds, peak memory bytes or None).
    isolate: in a fresh interpreter (this file with --child), whose peak memory is the run's alone, with
    OMP_NUM_THREADS = threads whatever the caller's environment holds: on a CPU the variable changes
    the results (train_nlu.py's toy Full FT: 46.8% with it at 2, 50.5% without it, both with 2 torch threads).
    """
    start = time.time()
    if not isolate:
        {"nlg": train_nlg, "nlu": train_nlu}[trainer].main(argv)
        return time.time() - start, None
    out = argv[argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    peak_path = os.path.join(out, "peak_memory.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", trainer, device, peak_path, json.dumps(argv)],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    with open(peak_path) as f:
        peak = json.load(f)
    return time.time() - start, peak["peak_memory_bytes"] if peak["source"] in OWN_PEAKS else None


def child(trainer, device, peak_path, argv_json):
    """The --child entry: one training run, then its peak memory written to peak_path."""
    {"nlg": train_nlg, "nlu": train_nlu}[trainer].main(json.loads(argv_json))
    peak, source = peak_memory_bytes(device)
    with open(peak_path, "w") as f:
        json.dump({"peak_memory_bytes": peak, "source": source}, f)


def reused(run_dir, argv):
    """
    The result a finished run left in run_dir/result.json, when it ran with the same argv and its peak
    memory, if it has one, is its own (has_own); else None: the run trains again.
    """
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    result = saved["result"]
    own = all(has_own(result, key) for key, value in result.items() if key.endswith("peak_memory_bytes") and value is not None)
    return result if saved["argv"] == argv and own else None


def keep(run_dir, argv, result):
    """Write a finished run's result beside its argv (atomically): an interrupted table continues from it."""
    path = os.path.join(run_dir, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"argv": argv, "result": result}, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def nlg_applies(method, model):
    """Whether `method` can train the NLG model: BitFit needs bias terms, which LLaMA-family models lack."""
    if training.METHODS[method].kind != "bitfit":
        return True
    from model import checkpoint_keys
    return any(key.endswith(".bias") for key in checkpoint_keys(model))


def nlg_run(args, budget, reference, method, seed, data_path):
    """train_nlg.py with `method` under the recipe, then tools/real_experiment.py's measurements."""
    run_dir = os.path.join(args.out, "nlg", method, f"seed{seed}")
    # real_experiment's BA-LoRA argv carries the recipe and the paper's lambdas, which only a +reg
    # method (training.lambdas_of) applies: swap in the method
    argv = real_experiment.trainer_argv(args, budget, "BA-LoRA", seed, data_path, run_dir)
    argv[argv.index("--method") + 1] = method
    argv.append("--overwrite")  # a run without result.json was interrupted: start it again
    if training.METHODS[method].init == "milora" and "--pissa-niter" in argv:
        # a randomized SVD finds the top of the spectrum; MiLoRA's minor components need the exact one
        del argv[argv.index("--pissa-niter"):argv.index("--pissa-niter") + 2]
    if (result := reused(run_dir, argv)) is not None:
        return result
    started = time.time()
    seconds, peak = train("nlg", argv, args.device, BUDGETS[args.budget]["isolate"], args.threads)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        step_times = [json.loads(line)["time"] for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        trainable = json.load(f)["derived"]["trainable_parameters"]
    adapter_dir = os.path.join(run_dir, "adapter")
    result = {"method": method, "seed": seed, "trainable_parameters": trainable, "train_seconds": seconds,
              # the median step, without the first (warm-up: allocations, kernel choice)
              "step_seconds": statistics.median(step_times[1:] or step_times), "peak_memory_bytes": peak,
              "peak_memory_source": "own" if peak is not None else None}
    result.update(real_experiment.measure(real_experiment.load_model(args.model, adapter_dir, args.device), reference, budget))
    if method in MAIN:
        result.update(real_experiment.gsm8k_accuracy(args, budget, adapter_dir, os.path.join(run_dir, "gsm8k.json")))
    result["nlg_wall_seconds"] = time.time() - started  # training and every measurement
    return keep(run_dir, argv, result)


def nlu_applies(method):
    """Whether `method` is an NLU row: one of Table 2's (TABLE2_PARAMS' rows), or its "+reg" form."""
    return method.removesuffix("+reg") in TABLE2_PARAMS


def nlu_score_name(task_name):
    """(validation split, metric) of the NLU score: the task's first of each (the metric train_nlu.py's best.pt keeps)."""
    task = glue.TASKS[task_name]
    return task.validation_splits[0], task.metrics[0]


def nlu_validation_files(args):
    """The validation file(s) the NLU runs read: --nlu-validation-file, else train_nlu.py's (the toy task's, or None: the hub's)."""
    return args.nlu_validation_file or train_nlu.presets(args.nlu_task)["toy"]["validation_file"]


def nlu_run(args, method, seed):
    """train_nlu.py with `method` on the NLU task (toy preset unless --nlu-model): best score, trainable parameters, time per step."""
    run_dir = os.path.join(args.out, "nlu", args.nlu_task, method, f"seed{seed}")
    argv = ["--method", method, "--seed", str(seed), "--out", run_dir, "--no-progress", "--device", args.device,
            "--overwrite", "--task", args.nlu_task]
    argv += ["--model", args.nlu_model] if args.nlu_model else []
    argv += ["--data", args.nlu_data] if args.nlu_data else []
    validation_files = nlu_validation_files(args)
    for key, value in BUDGETS[args.budget]["nlu"].items():
        if key == "validation_examples":  # the first ones of each split, as files of their own
            if validation_files is None:
                raise ValueError(f"--budget {args.budget} trims the validation split to {value} examples: "
                                 "give its file with --nlu-validation-file")
            validation_files = [first_lines(path, value, os.path.join(args.out, f"validation{i}_{value}.jsonl"))
                                for i, path in enumerate(validation_files)]
        else:
            argv += ["--" + key.replace("_", "-"), str(value)]
    argv += ["--validation-file", *validation_files] if validation_files else []
    if (result := reused(run_dir, argv)) is not None:
        return result
    seconds, peak = train("nlu", argv, args.device, BUDGETS[args.budget]["isolate"], args.threads)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    split, metric = nlu_score_name(args.nlu_task)
    score = max(record["validation"][split][metric] for record in log if "validation" in record)
    best = torch.load(os.path.join(run_dir, "best.pt"), map_location="cpu", weights_only=True)  # the trainable parameters
    steps_run = max(record["step"] for record in log)
    return keep(run_dir, argv, {
        "method": method, "seed": seed, "nlu_score": score, "nlu_trainable_parameters": sum(t.numel() for t in best.values()),
        # the whole run (evaluation included) over its steps: train_nlu.py logs no per-step time
        "nlu_seconds_per_step": seconds / steps_run, "nlu_peak_memory_bytes": peak, "nlu_wall_seconds": seconds,
        "nlu_peak_memory_source": "own" if peak is not None else None})


def first_lines(path, count, out_path):
    """The first `count` lines of a JSONL file, written to out_path (returned)."""
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(path) as source, open(out_path, "w") as f:
        f.writelines(source.readlines()[:count])
    return out_path


# -----------------------------------------------------------------------------
# #Params at the paper's scale: each method applied by the trainers' own code (training.adapt, then
# training.build_optimizer, which freezes LoRA-FA's A) to the paper's models built on the meta device
# (shapes, no values): LLaMA-2-7B at r = 128 on every linear layer (Table 1's setup, Sec. 3.1; Table 1
# has no #Params column) and DeBERTa-v3-base at r = 8 on every encoder linear layer (Table 2's), its
# classification head left out of the count as Table 2 does.

LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
DEBERTA_V3_BASE = {"model_type": "deberta-v2", "vocab_size": 128100, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                   "relative_attention": True, "share_att_key": True, "norm_rel_ebd": "layer_norm",
                   "position_biased_input": False, "pos_att_type": ["p2c", "c2p"], "position_buckets": 256,
                   "max_relative_positions": -1, "type_vocab_size": 0, "layer_norm_eps": 1e-7, "pad_token_id": 0}
TABLE2_PARAMS = {"full": "184M", "bitfit": "0.1M", "hadapter": "1.22M", "padapter": "1.18M", "lora": "1.33M",
                 "dora": "1.27M", "adalora": "1.27M", "pissa": "1.33M", "balora": "1.33M"}  # Table 2's column
DEBERTA_HEAD = ("classifier.", "pooler.")


def paper_scale_parameters(method, architecture):
    """Trainable parameters of `method` on "llama-2-7b" or "deberta-v3-base" (None where it does not apply)."""
    from model import DebertaClassifier, DebertaConfig, Llama, LlamaConfig

    spec = training.METHODS[method]
    with torch.device("meta"):
        if architecture == "llama-2-7b":
            model, targets, r, head = Llama(LlamaConfig.from_hf(LLAMA2_7B)), "all-linear", 128, ()
        else:
            model = DebertaClassifier(DebertaConfig.from_hf(DEBERTA_V3_BASE), num_labels=2)
            targets, r, head = train_nlu.TARGET_MODULES.split(","), 8, DEBERTA_HEAD
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # add_lora's summary line
                training.adapt(model, "none", "none", kind=spec.kind, adalora=spec.adalora, target_modules=targets,
                               r=r, alpha=r, init="lora", dora=spec.dora)  # the init changes values, never the count
        except ValueError:  # BitFit on a model without biases
            return None
        training.build_optimizer(model, 1e-4, 0.0, spec)
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith(head))


def render_paper_scale(methods):
    """The #Params table: each method on LLaMA-2-7B and DeBERTa-v3-base, beside Table 2's number."""
    def millions(count):
        return "–" if count is None else f"{count / 1e6:,.2f}M"

    lines = ["| method | LLaMA-2-7B, r = 128 | DeBERTa-v3-base, r = 8 | Table 2 |", "|---|---|---|---|"]
    for method in dict.fromkeys(m.removesuffix("+reg") for m in methods):  # the regularizers train nothing
        lines.append(f"| {method} | {millions(paper_scale_parameters(method, 'llama-2-7b'))} | "
                     f"{millions(paper_scale_parameters(method, 'deberta-v3-base'))} | {TABLE2_PARAMS.get(method, '–')} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The table


# (key, column title, digits, relative to LoRA)
COLUMNS = [
    ("trainable_parameters", "#Params (NLG)", 0, False),
    ("step_seconds", "step time × LoRA", 2, True),
    ("peak_memory_bytes", "peak memory × LoRA", 2, True),
    ("gsm8k_accuracy", "GSM8K acc. %", 1, False),
    ("gsm8k_ce", "held-out CE ↓", 4, False),
    ("wikitext_ppl", "Wikitext-2 PPL ↓", 3, False),
    ("wikitext_kl", "KL(base‖tuned) Wikitext ↓", 5, False),
    ("nlu_trainable_parameters", "#Params (NLU)", 0, False),
    ("nlu_score", "NLU score", 1, False),  # titled by nlu_title
]


def has_own(run, key):
    """False for a peak memory that is not the run's own: measured before "peak_memory_source" was recorded,
    by ru_maxrss in a child, which on Linux holds the parent's size (see peak_memory_bytes)."""
    return not key.endswith("peak_memory_bytes") or run.get(key.replace("_bytes", "_source")) == "own"


def summarize(runs):
    """Per method: its seeds and, per column, the mean and sample std over seeds (relative columns: over LoRA's first seed)."""
    lora = {key: value for run in runs if run["method"] == "lora" and run["seed"] == FIRST_SEED for key, value in run.items()}
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        group = [run for run in runs if run["method"] == method]
        row = {"method": method, "seeds": sorted({run["seed"] for run in group})}
        for key, _, _, relative in COLUMNS:
            values = [run[key] for run in group if run.get(key) is not None and has_own(run, key)]
            if relative:
                values = [v / lora[key] for v in values] if lora.get(key) else []
            if values:
                row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "n": len(values)}
        rows.append(row)
    return rows


# README's table: the columns that compare methods at a glance (assets/baselines/cpu/table.md has all)
README_COLUMNS = ("trainable_parameters", "step_seconds", "peak_memory_bytes", "gsm8k_ce", "wikitext_ppl", "wikitext_kl",
                  "nlu_score")
README = os.path.join(REPO, "README.md")
README_BEGIN, README_END = "<!-- baselines:begin -->", "<!-- baselines:end -->"


def nlu_title(task_name):
    """The NLU column's title: the task and its metric, shown ×100 as GLUE scores are."""
    _, metric = nlu_score_name(task_name)
    return "toy NLI acc. %" if task_name == "nli" else f"{task_name.upper()} {metric} ×100"


def render_table(summary, keys=None, nlu_task="nli"):
    """The markdown table of summarize(runs): every column of COLUMNS, or those whose key is in `keys`."""
    columns = [(key, nlu_title(nlu_task) if key == "nlu_score" else title, digits, relative)
               for key, title, digits, relative in COLUMNS if keys is None or key in keys]

    def cell(stats, digits, key):
        if stats is None:
            return "–"
        scale = 100 if key in ("gsm8k_accuracy", "nlu_score") else 1
        text = f"{stats['mean'] * scale:,.{digits}f}"
        return text + (f" ± {stats['std'] * scale:.{digits}f}" if stats["n"] > 1 else "")

    lines = ["| method | seeds | " + " | ".join(title for _, title, _, _ in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for row in summary:
        cells = [cell(row.get(key), digits, key) for key, _, digits, _ in columns]
        lines.append(f"| {row['method']} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(summary, readme_path=README, nlu_task="nli"):
    """Replace README's table between its markers with render_table(summary, README_COLUMNS)."""
    real_experiment.write_between_markers(readme_path, README_BEGIN, README_END,
                                          render_table(summary, README_COLUMNS, nlu_task))


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="smoke", choices=list(BUDGETS), help="smoke: seconds, CI; cpu: SmolLM2-135M "
                        "on 2 cores; full: the GPU recipe (default: smoke)")
    parser.add_argument("--model", default=None, help="the NLG model directory (default: the budget's)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of training.METHODS (default: all)")
    parser.add_argument("--prompt-format", default=None, choices=["alpaca", "chat"], help="default: chat when the model has a template")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--out", default=None, help="the runs (default: out/baselines/<budget>)")
    parser.add_argument("--table-dir", default=None, help="results.json and table.md (default: assets/baselines/<budget>)")
    parser.add_argument("--nlu-task", default="nli", choices=sorted(glue.TASKS), help="the NLU rows' task: nli, the "
                        "bundled toy task (default), or a GLUE task (its files with --nlu-data / --nlu-validation-file, "
                        "else the hub's)")
    parser.add_argument("--nlu-data", default=None, help="the NLU task's training file (train_nlu.py --data)")
    parser.add_argument("--nlu-validation-file", nargs="+", default=None, help="its validation file(s), one per "
                        "validation split of the task (train_nlu.py --validation-file)")
    parser.add_argument("--nlu-model", default=None, help="the NLU encoder (train_nlu.py --model: its paper preset; "
                        "default: the toy preset's bundled encoder)")
    parser.add_argument("--update-readme", action="store_true", help="also write README.md's table (between its "
                        "baselines markers) from this run")
    parser.add_argument("--params-only", action="store_true", help="print the #Params table at the paper's scale "
                        "(LLaMA-2-7B, DeBERTa-v3-base; seconds, no model files) and stop")
    args = parser.parse_args(argv)
    args.methods = list(training.METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in training.METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(training.METHODS)}")
    if args.params_only:
        return args
    args.model = args.model or BUDGETS[args.budget]["model"]
    args.out = args.out or os.path.join("out", "baselines", args.budget)
    args.table_dir = args.table_dir or os.path.join(REPO, "assets", "baselines", args.budget)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json (for SmolLM2: bash tools/get_smollm2.sh)")
    # the NLU runs come after the NLG ones: their files are checked before any run
    for flag, path in [("--nlu-data", args.nlu_data)] + [("--nlu-validation-file", p) for p in args.nlu_validation_file or []]:
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path!r}: no such file")
    glue.check_validation_files(args.nlu_task, args.nlu_validation_file, "--nlu-validation-file")
    if "lora" not in args.methods:
        args.methods.insert(0, "lora")  # the reference of the relative columns
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.params_only:
        table = render_paper_scale(args.methods)
        print(table)
        return table
    budget = BUDGETS[args.budget]
    started = time.time()
    data_path, reference, _ = real_experiment.prepare_data(args, budget["nlg"])
    runs = []
    for method in args.methods:
        for seed in budget["main_seeds"] if method in MAIN else [FIRST_SEED]:
            if nlg_applies(method, args.model):
                run = nlg_run(args, budget["nlg"], reference, method, seed, data_path)
            else:
                run = {"method": method, "seed": seed}
                print(f"{method}: no NLG run ({os.path.basename(os.path.normpath(args.model))} has no bias terms)")
            if seed == FIRST_SEED and nlu_applies(method):
                run = dict(run, **nlu_run(args, method, seed))
            runs.append(run)
            print(f"{method}, seed {seed} ({time.time() - started:.0f} s so far): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in run.items() if isinstance(v, float)), flush=True)
    summary = summarize(runs)
    results = {"budget": args.budget, "model": os.path.basename(os.path.normpath(args.model)), "device": args.device,
               "threads": args.threads, "nlg_settings": budget["nlg"], "nlu_changes": budget["nlu"],
               "nlu_task": args.nlu_task, "nlu_score": "/".join(nlu_score_name(args.nlu_task)),
               "methods": {m: vars(training.METHODS[m]) for m in args.methods}, "runs": runs, "summary": summary,
               "wall_seconds": time.time() - started,
               # the runs' own times: the whole table's cost, also when earlier invocations ran some of them
               "runs_wall_seconds": sum(run.get("nlg_wall_seconds", 0) + run.get("nlu_wall_seconds", 0) for run in runs)}
    os.makedirs(args.table_dir, exist_ok=True)
    with open(os.path.join(args.table_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render_table(summary, nlu_task=args.nlu_task)
    with open(os.path.join(args.table_dir, "table.md"), "w") as f:
        paper_scale = render_paper_scale(args.methods)
        f.write(f"`python tools/baselines.py --budget {args.budget}`: {len(runs)} runs, {results['runs_wall_seconds']:.0f} s "
                f"of training and measurement on {args.device} ({args.threads} threads); this invocation "
                f"{results['wall_seconds']:.0f} s, the shared references included\n\n" + table
                + "\n#Params at the paper's scale, counted by the trainers' own code on the models' shapes "
                "(python tools/baselines.py --params-only):\n\n" + paper_scale)
    print(table)
    if args.update_readme:
        update_readme(summary, nlu_task=args.nlu_task)
    print(f"{len(runs)} runs in {results['wall_seconds']:.0f} s; table in {args.table_dir}")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
    else:
        main()
