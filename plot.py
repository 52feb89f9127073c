"""
Training curves of a run, drawn from its log.jsonl. Both trainers call plot_run at the end of every run;
to redraw one (or a run still going, or one killed):

    python plot.py out/nlg                  # -> out/nlg/curves.png
    python plot.py out/nlg out/nlu          # one figure per run

Panels: one per number the log has, in the log's order, the task loss first: each BA-LoRA regularizer
as logged (before its λ: Eq. 4, 5, 7 for NLU, Eq. 9, 10, 12 for NLG), the total objective (Eq. 8 / 13),
the learning rate, the gradient norm; the λ schedules (B.4) together in one panel and, for NLU, every
validation metric. A term the log holds but a run never computed (its λ is 0: lora, pissa) gets an
empty panel that says so. A new regularizer in the objective is a new panel here, with no edit.
"""

import argparse
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

CURVES = "curves.png"
# log.jsonl fields that count things rather than measure the run: not drawn
BOOKKEEPING = ("step", "epoch", "time", "tokens", "task_tokens", "skipped_batches")
# titles of the fields the paper names; any other field's panel is titled with its name
TITLES = {"task": "task loss", "consistency": "L_CR consistency (Eq. 4 / 9)", "diversity": "L_DR diversity (Eq. 5 / 10)",
          "svd": "L_SVDR spectral (Eq. 7 / 12)", "total": "total objective (Eq. 8 / 13)", "lr": "learning rate",
          "grad_norm": "gradient norm"}
LAMBDAS = "λ schedules (B.4)"


def read_log(path):
    """The records of a log.jsonl; a broken line is an error naming the file and line."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {number}: not a JSON record") from None
    return records


def series(records, field):
    """(steps, values) of one field over the records that hold it (a term not computed at a step is None)."""
    points = [(record["step"], record[field]) for record in records if record.get(field) is not None]
    return [step for step, _ in points], [value for _, value in points]


def validation_series(records):
    """{"<split> <metric>": (steps, values)} of the NLU validation records ({"validation": {split: {metric: v}}})."""
    lines = {}
    for record in records:
        for split, metrics in record.get("validation", {}).items():
            for metric, value in metrics.items():
                steps, values = lines.setdefault(f"{split} {metric}", ([], []))
                steps.append(record["step"])
                values.append(value)
    return lines


def panels_of(records):
    """
    [(panel title, [fields])] of a run's training records: the task loss, then every other number the
    records hold (first appearance order) with the total and the learning rate last, the lambda1,
    lambda2, ... fields together in one panel at the end.
    """
    fields = []
    for record in records:
        fields += [key for key, value in record.items() if key not in fields and key not in BOOKKEEPING
                   and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool)]
    lambdas = [field for field in fields if re.fullmatch(r"lambda\d+", field)]
    ordered = sorted((field for field in fields if field not in lambdas),
                     key=lambda field: (field != "task", field in ("total", "lr", "grad_norm"), fields.index(field)))
    panels = [(TITLES.get(field, field), [field]) for field in ordered]
    return panels + ([(LAMBDAS, lambdas)] if lambdas else [])


def plot_run(out):
    """
    Draw <out>/curves.png from <out>/log.jsonl. Returns what was drawn, read back from the figure's
    lines: {panel title: {label: (steps, values)}}.
    """
    records = read_log(os.path.join(out, "log.jsonl"))
    training = [record for record in records if "validation" not in record]
    panels = [(title, {field: series(training, field) for field in fields}) for title, fields in panels_of(training)]
    validation = validation_series(records)
    if validation:
        panels.append(("validation " + next(iter(validation)) if len(validation) == 1 else "validation", validation))
    columns = 4
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    drawn = {}
    for ax, (title, lines) in zip(axes.flat, panels):
        for number, (label, (steps, values)) in enumerate(lines.items()):
            if steps:  # a line style each, so that equal series (lambda2 = lambda3) stay visible
                ax.plot(steps, values, label=label, linestyle=("-", "--", ":")[number % 3],
                        marker="." if len(steps) < 20 else None)
        if not ax.get_lines():
            ax.text(0.5, 0.5, "not computed in this run\n(its λ is 0)", ha="center", va="center", transform=ax.transAxes)
        elif len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        drawn[title] = {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
                        for line in ax.get_lines()}
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    figure.suptitle(os.path.abspath(out), fontsize=9)
    figure.tight_layout()
    figure.savefig(os.path.join(out, CURVES), dpi=90)
    plt.close(figure)
    return drawn


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="+", help="run directories (train_nlg.py / train_nlu.py --out) holding log.jsonl")
    for out in parser.parse_args().out:
        plot_run(out)
        print(os.path.join(out, CURVES))
