"""
The paper's ablation at toy scale, on the bundled tiny models (assets/, built by make_assets.py):

  - Table 4's rows: PiSSA (the baseline), + L_CR, + L_DR, + L_SVDR alone, and BA-LoRA (all three),
    plus Table 10's other adapters: LoRA, LoRA + Reg, DoRA and DoRA + Reg;
  - NLG: tiny-llama fine-tuned on metamath_train (train_nlg.py's offline defaults), scored by
    eval.py: toy GSM8K accuracy, perplexity of ppl.txt (the pretrained-knowledge probe of C.7) and
    the share of the scored multiplication questions still answered with the flaw injected in
    pretraining (a * b + a);
  - NLU: tiny-deberta on the toy NLI task (train_nlu.py's offline defaults, capped at --nlu-steps),
    balanced and with B.3's 100:10:1 imbalance, scored by eval.py's cluster command (accuracy and
    Table 12's silhouettes and minority-class recall);
  - every cell is the mean ± std over the paper's three seeds (42, 1024, 2024).

    python tools/toy_ablation.py                       # 46 minutes on a busy 2-core CPU -> out/ablation/
    python tools/toy_ablation.py --update-docs         # the same, into assets/ablation/ (the committed run)
    python tools/toy_ablation.py --seeds 42 --nlu-steps 20 --gsm8k-limit 20   # a quick look

The trainers and the evaluator are called in-process through their main(argv). Writes results.json,
README.md (the tables) and ablation.png to --out (default out/ablation/; with --update-docs the
tracked assets/ablation/). The numbers are what they are: at this scale the regularizers may or may
not help, and the README says which.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as evaluate  # noqa: E402  (eval.py; renamed so the builtin stays visible)
import train_nlg  # noqa: E402
import train_nlu  # noqa: E402

ASSETS = os.path.join(REPO, "assets")
LLAMA, DEBERTA = os.path.join(ASSETS, "tiny-llama"), os.path.join(ASSETS, "tiny-deberta")
DATA = os.path.join(ASSETS, "data")

# (row, trainer flags): one regularizer alone sets the other two lambdas to 0.
METHODS = {
    "LoRA": ["--method", "lora"],
    "LoRA + Reg": ["--method", "lora+reg"],
    "DoRA": ["--method", "dora"],
    "DoRA + Reg": ["--method", "dora+reg"],
    "PiSSA (baseline)": ["--method", "pissa"],
    "+ L_CR": ["--method", "balora", "--lambda2", "0", "--lambda3", "0"],
    "+ L_DR": ["--method", "balora", "--lambda1", "0", "--lambda3", "0"],
    "+ L_SVDR": ["--method", "balora", "--lambda1", "0", "--lambda2", "0"],
    "BA-LoRA (full)": ["--method", "balora"],
}
IMBALANCED_METHODS = ["LoRA", "PiSSA (baseline)", "BA-LoRA (full)"]  # Table 12's rows
IMBALANCE = "100:10:1"
MINORITY_LABEL = 2  # contradiction keeps 1% of its examples
SEEDS = [42, 1024, 2024]  # Section 3.1


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# -----------------------------------------------------------------------------
# One run each


MULTIPLICATION_WORDS = ("bags with", "packs of")  # the two templates of make_assets.WORD_PROBLEMS["mul"]


def flawed_share(samples):
    """Among the multiplication questions of eval.py's gsm8k samples ("a ... b ..." in that order in
    both templates), the share answered a * b + a: the flaw injected in pretraining."""
    flawed = []
    for sample in samples:
        if not any(word in sample["query"] for word in MULTIPLICATION_WORDS):
            continue
        a, b = (int(n) for n in re.findall(r"\d+", sample["query"])[:2])
        flawed.append(sample["prediction"] == str(a * b + a))
    if not flawed:
        raise ValueError("no multiplication question among the scored ones: raise --gsm8k-limit")
    return sum(flawed) / len(flawed)


def nlg_scores(adapter, out, gsm8k_limit):
    """Toy GSM8K accuracy, ppl.txt perplexity and flawed-multiplication share of tiny-llama (+ adapter)."""
    adapter_flags = ["--adapter", adapter] if adapter else []
    gsm8k_out = os.path.join(out, "gsm8k.json")
    accuracy = evaluate.main(["gsm8k", "--model", LLAMA, *adapter_flags, "--data", os.path.join(DATA, "gsm8k_test.jsonl"),
                              "--limit", str(gsm8k_limit), "--max-new-tokens", "48", "--batch-size", "64",
                              "--out", gsm8k_out])["accuracy"]
    with open(gsm8k_out) as f:
        flawed = flawed_share(json.load(f)["samples"])
    # non-overlapping 256-token windows: the probe compares methods, it need not be the tightest estimate
    ppl = evaluate.main(["ppl", "--model", LLAMA, *adapter_flags, "--data", os.path.join(DATA, "ppl.txt"),
                         "--stride", "256", "--out", os.path.join(out, "ppl.json")])["perplexity"]
    return dict(gsm8k_accuracy=accuracy, ppl=ppl, flawed_multiplication=flawed)


def run_nlg(flags, seed, out, args):
    train_flags = ["--out", out, "--seed", str(seed), "--overwrite", *flags]  # a rerun replaces the row's run
    if args.nlg_steps:
        train_flags += ["--max-steps", str(args.nlg_steps)]
    train_nlg.main(train_flags)
    return nlg_scores(os.path.join(out, "adapter"), out, args.gsm8k_limit)


def run_nlu(flags, seed, out, args, imbalance=None):
    train_flags = ["--out", out, "--seed", str(seed), "--max-steps", str(args.nlu_steps), "--no-progress", "--overwrite",
                   *flags]
    if imbalance:
        train_flags += ["--imbalance", imbalance]
    train_nlu.main(train_flags)
    metrics = evaluate.main(["cluster", "--model", DEBERTA, "--adapter", os.path.join(out, "adapter"), "--task", "nli",
                             "--data", os.path.join(DATA, "nli_validation.jsonl"), "--minority-label", str(MINORITY_LABEL),
                             "--projection", "pca", "--plot", os.path.join(out, "cluster.png"),
                             "--out", os.path.join(out, "cluster.json")])
    keys = ("accuracy", "global_silhouette", "minority_silhouette", "minority_recall")
    return {key: metrics[key] for key in keys}


# -----------------------------------------------------------------------------
# Tables and plot


def mean_std(values):
    """'mean ± std' (sample std over seeds; 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), std


def table(rows, columns):
    """Markdown table: rows {name: {metric: [per-seed values]}}, columns [(metric, header, scale, digits)]."""
    lines = ["| method | " + " | ".join(header for _, header, _, _ in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for name, metrics in rows.items():
        cells = []
        for key, _, scale, digits in columns:
            mean, std = mean_std([v * scale for v in metrics[key]])
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_row(rows, key, higher=True):
    means = {name: statistics.mean(metrics[key]) for name, metrics in rows.items()}
    return (max if higher else min)(means, key=means.get)


def verdict(results):
    """One plain sentence per headline metric: which row is best, and whether that is BA-LoRA."""
    checks = [("NLG toy GSM8K accuracy", results["nlg"], "gsm8k_accuracy", True),
              ("NLG ppl.txt perplexity (knowledge kept)", results["nlg"], "ppl", False),
              ("NLG share of flawed multiplication answers", results["nlg"], "flawed_multiplication", False),
              ("NLU accuracy (balanced)", results["nlu"], "accuracy", True),
              ("NLU minority recall (100:10:1)", results["nlu_imbalanced"], "minority_recall", True),
              ("NLU minority silhouette (100:10:1)", results["nlu_imbalanced"], "minority_silhouette", True)]
    lines = []
    for title, rows, key, higher in checks:
        rows = {name: m for name, m in rows.items() if name != "pretrained (no fine-tuning)"}
        best = best_row(rows, key, higher)
        best_mean = statistics.mean(rows[best][key])
        ba_lora, ba_lora_std = mean_std(rows["BA-LoRA (full)"][key])
        if best == "BA-LoRA (full)":
            outcome = "BA-LoRA (full) is best"
        elif ba_lora == best_mean:
            outcome = f"BA-LoRA (full) ties for best with {best}"
        else:
            outcome = f"BA-LoRA (full) is NOT best (best: {best}, {best_mean:.3f})"
        baseline = statistics.mean(rows["PiSSA (baseline)"][key])
        lines.append(f"- {title}: {outcome}; BA-LoRA (full) {ba_lora:.3f} ± {ba_lora_std:.3f} vs PiSSA baseline {baseline:.3f}.")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("toy GSM8K accuracy (%)", results["nlg"], "gsm8k_accuracy", 100),
              ("flawed multiplication answers (%)", results["nlg"], "flawed_multiplication", 100),
              ("NLI accuracy, balanced (%)", results["nlu"], "accuracy", 100),
              ("minority recall, 100:10:1 (%)", results["nlu_imbalanced"], "minority_recall", 100)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (title, rows, key, scale) in zip(axes, panels):
        names = list(rows)
        stats = [mean_std([v * scale for v in rows[name][key]]) for name in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
               color=["tab:red" if name == "BA-LoRA (full)" else "tab:gray" for name in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    figure.suptitle(f"toy ablation on the bundled tiny models, mean ± std over {len(results['seeds'])} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(results, out):
    nlg_columns = [("gsm8k_accuracy", "toy GSM8K acc. (%)", 100, 1), ("ppl", "ppl.txt perplexity", 1, 3),
                   ("flawed_multiplication", "flawed a·b+a answers (%)", 100, 1)]
    nlu_columns = [("accuracy", "accuracy (%)", 100, 1)]
    imbalanced_columns = [("accuracy", "accuracy (%)", 100, 1), ("global_silhouette", "global silhouette", 1, 3),
                          ("minority_silhouette", "minority silhouette", 1, 3),
                          ("minority_recall", "minority recall (%)", 100, 1)]
    seeds = ", ".join(str(s) for s in results["seeds"])
    text = f"""# Toy ablation (Table 4, Table 10's LoRA and DoRA rows, Table 12)

`{" ".join(["python tools/toy_ablation.py", *results["argv"]])}`; seeds {seeds}; mean ± std over seeds;
{results["minutes"]:.1f} minutes. Trainers at their offline defaults (train_nlg.py and train_nlu.py without
--model: the bundled tiny models, toy sizes) with the paper's regularizer weights; NLU runs capped at
{results["nlu_steps"]} steps. A "+ L_X" row is BA-LoRA with the other two lambdas set to 0.

## NLG: tiny-llama fine-tuned on metamath_train

Accuracy on the first {results["gsm8k_limit"]} questions of gsm8k_test (greedy, eval.py gsm8k);
perplexity of ppl.txt (held-out pretraining-distribution text, the C.7 probe: lower = more of the
pretrained knowledge kept); share of those questions' multiplications answered a·b + a, the flaw
injected in pretraining (lower = less of it inherited).

{table(results["nlg"], nlg_columns)}

## NLU: tiny-deberta on the toy NLI task (balanced)

Accuracy on nli_validation (600 pairs, 3 classes).

{table(results["nlu"], nlu_columns)}

## NLU with the 100:10:1 imbalance of Appendix B.3 (Table 12)

Training keeps 100% / 10% / 1% of entailment / neutral / contradiction; evaluated on the balanced
nli_validation. Silhouettes (cosine) in the logit space; minority = contradiction.

{table(results["nlu_imbalanced"], imbalanced_columns)}

## Verdict at this scale

{verdict(results)}

![ablation](ablation.png)
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output directory (default: out/ablation)")
    parser.add_argument("--update-docs", action="store_true", help="write into the tracked assets/ablation/ instead")
    parser.add_argument("--work", help="run directories (adapters, logs); default: a temporary directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--nlg-steps", type=int, default=0, help="cap on NLG steps (0: train_nlg's one offline epoch)")
    parser.add_argument("--nlu-steps", type=int, default=300, help="NLU optimizer steps per run (1.6 epochs of nli_train)")
    parser.add_argument("--gsm8k-limit", type=int, default=60, help="toy GSM8K questions scored per run")
    args = parser.parse_args(argv)
    if args.update_docs and args.out:
        parser.error("--update-docs writes assets/ablation/: give it or --out, not both")
    args.out = os.path.join(ASSETS, "ablation") if args.update_docs else args.out or os.path.join("out", "ablation")
    for path in (LLAMA, DEBERTA):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is missing: build the assets with tools/make_assets.py first")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # tiny models: a second thread only fights for the shared cores
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        results = dict(seeds=args.seeds, argv=sys.argv[1:] if argv is None else list(argv), nlu_steps=args.nlu_steps,
                       gsm8k_limit=args.gsm8k_limit, nlg={}, nlu={}, nlu_imbalanced={})
        pretrained = nlg_scores(None, os.path.join(work, "pretrained"), args.gsm8k_limit)
        results["nlg"]["pretrained (no fine-tuning)"] = {key: [value] * len(args.seeds) for key, value in pretrained.items()}
        for name, flags in METHODS.items():
            for experiment, imbalance in (("nlg", None), ("nlu", None), ("nlu_imbalanced", IMBALANCE)):
                if experiment == "nlu_imbalanced" and name not in IMBALANCED_METHODS:
                    continue
                for seed in args.seeds:
                    out = os.path.join(work, experiment, slug(name), str(seed))
                    torch.manual_seed(seed)
                    scores = (run_nlg(flags, seed, out, args) if experiment == "nlg"
                              else run_nlu(flags, seed, out, args, imbalance))
                    row = results[experiment].setdefault(name, {})
                    for key, value in scores.items():
                        row.setdefault(key, []).append(value)
                    print(f"[{time.time() - start:6.0f}s] {experiment} {name} seed {seed}: {scores}", flush=True)
    results["minutes"] = (time.time() - start) / 60
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "ablation.png"))
    write_report(results, args.out)
    print(open(os.path.join(args.out, "README.md")).read())
    return results


if __name__ == "__main__":
    main()
