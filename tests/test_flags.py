"""
The command lines of train_nlg.py, train_nlu.py and eval.py: one flag name per shared concept, help
text on every flag (with its default, under both presets where they differ), and the settings resolved
from the presets: --model without --data means the paper's data.
"""

import os
import re
import shutil

import pytest

import eval as evaluate  # eval.py; renamed so the builtin stays visible
import training
import train_nlg
import train_nlu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets")

# The flag each shared concept goes by, and the names other tools (or older versions of these scripts)
# give it: no script may list one of those.
CONCEPTS = {
    "--model": ["--model-dir", "--model-path", "--model-name-or-path", "--base-model"],
    "--data": ["--train-file", "--data-file", "--data-path", "--dataset", "--train-data"],
    "--rank": ["--lora-r", "--lora-rank", "--r"],
    "--alpha": ["--lora-alpha"],
    "--dropout": ["--lora-dropout"],
    "--max-length": ["--max-len", "--max-seq-length", "--seq-len", "--model-max-length"],
    "--lr": ["--learning-rate"],
    "--batch-size": ["--bs", "--global-batch-size", "--train-batch-size"],
    "--micro-batch-size": ["--per-device-train-batch-size", "--micro-batch"],
    "--method": ["--variant", "--init"],
    "--lambda1": ["--lambda-1", "--lambda-cr"],
    "--lambda2": ["--lambda-2", "--lambda-dr"],
    "--lambda3": ["--lambda-3", "--lambda-svdr"],
    "--temperature": ["--distill-temp", "--temp"],
    "--svd-k": ["--svd-top-k", "--k-svd"],
    "--dtype": ["--precision", "--bf16", "--fp16"],
    "--out": ["--output-dir", "--out-dir", "--output"],
    "--seed": ["--random-seed"],
    "--resume": ["--resume-from-checkpoint", "--resume-from"],
}
# what every evaluation has, so every eval.py subcommand must name it as the trainers do
EVAL_CONCEPTS = ["--model", "--data", "--out", "--dtype", "--batch-size"]


def flags_and_help(text):
    """
    {flag: help text} of an argparse --help: an entry starts with two spaces and a dash
    ("  --rank RANK   LoRA rank r (...)"), its help goes on on deeper-indented lines.
    """
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  -\S", line):
            invocation, _, help_text = line[2:].partition("  ")
            names = [part.split()[0] for part in invocation.split(", ")]
            current = names[-1]
            entries[current] = help_text.strip()
        elif current and line.startswith("   "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    entries.pop("--help", None)
    return entries


def help_of(parse_args, argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def eval_commands(capsys, monkeypatch):
    """The subcommands eval.py's own --help lists ("{gsm8k,math,...}")."""
    text = help_of(evaluate.parse_args, [], capsys, monkeypatch)
    return re.search(r"\{([a-z0-9_,-]+)\}", text).group(1).split(",")


def test_parser_of_the_help_reads_argparse_layouts():
    text = ("usage: x\n\noptions:\n  -h, --help            show this help message and exit\n"
            "  --rank RANK           LoRA rank r (toy: 8,\n                        paper: 128)\n"
            "  --validation-file VALIDATION_FILE [VALIDATION_FILE ...]\n                        one file per split\n"
            "  --resume\n\nepilog text\n")
    assert flags_and_help(text) == {"--rank": "LoRA rank r (toy: 8, paper: 128)",
                                    "--validation-file": "one file per split", "--resume": ""}


def test_shared_concepts_have_one_flag_name_and_every_flag_has_help(capsys, monkeypatch):
    scripts = {"train_nlg.py": flags_and_help(help_of(train_nlg.parse_args, [], capsys, monkeypatch)),
               "train_nlu.py": flags_and_help(help_of(train_nlu.parse_args, [], capsys, monkeypatch))}
    commands = eval_commands(capsys, monkeypatch)
    assert {"gsm8k", "math", "humaneval", "mbpp", "ppl", "glue", "cluster"} <= set(commands)
    for command in commands:
        scripts[f"eval.py {command}"] = flags_and_help(help_of(evaluate.parse_args, [command], capsys, monkeypatch))

    for script, flags in scripts.items():
        assert len(flags) >= 10, (script, flags)  # the help was read, not an empty section
        for flag, help_text in flags.items():
            assert help_text, f"{script} {flag} has no help text"
        for concept, other_names in CONCEPTS.items():
            used = sorted(set(other_names) & set(flags))
            assert not used, f"{script} names {concept} {used}"
    for trainer in ("train_nlg.py", "train_nlu.py"):
        assert set(CONCEPTS) <= set(scripts[trainer]), (trainer, sorted(set(CONCEPTS) - set(scripts[trainer])))
        for flag, help_text in scripts[trainer].items():  # its default, or the default under both presets
            assert re.search(r"\((toy: .+, paper: .+|toy and paper: .+|default: .+)\)$", help_text), (trainer, flag, help_text)
    for command in commands:
        flags = scripts[f"eval.py {command}"]
        assert set(EVAL_CONCEPTS) <= set(flags), (command, sorted(set(EVAL_CONCEPTS) - set(flags)))
        for flag, help_text in flags.items():
            assert "default" in help_text or "required" in help_text, (command, flag, help_text)


def test_the_presets_in_the_help_are_the_presets_in_force(capsys, monkeypatch):
    """What --help says a default is, resolution gives: read --rank, --lr and --max-length back."""
    flags = flags_and_help(help_of(train_nlg.parse_args, [], capsys, monkeypatch))
    toy, _ = train_nlg.parse_args([])
    paper, _ = train_nlg.parse_args(["--model", "some/dir"])
    for flag in ("--rank", "--lr", "--max-length", "--batch-size", "--dtype"):
        key = flag[2:].replace("-", "_")
        expected = f"(toy: {training.shown(getattr(toy, key))}, paper: {training.shown(getattr(paper, key))})"
        assert flags[flag].endswith(expected), (flag, flags[flag], expected)
    assert (paper.rank, paper.lr, paper.max_length, paper.batch_size, paper.dtype) == (128, 2e-5, 512, 32, "bf16")  # B.4
    flags = flags_and_help(help_of(train_nlu.parse_args, [], capsys, monkeypatch))
    assert "rte 0.0001" in flags["--lr"] and "qnli 16" in flags["--alpha"]  # Table 8, per task


@pytest.mark.parametrize("trainer, model", [(train_nlg, "some/dir"), (train_nlu, os.path.join(ASSETS, "tiny-deberta"))])
def test_a_flag_the_presets_do_not_set_has_one_default_in_both(trainer, model, capsys, monkeypatch):
    """A flag outside the presets says "(default: X)" in --help and resolves to X under either preset."""
    flags = flags_and_help(help_of(trainer.parse_args, [], capsys, monkeypatch))
    toy, toy_defaults = trainer.parse_args([])
    paper, paper_defaults = trainer.parse_args(["--model", model])
    own = {flag: help_text for flag, help_text in flags.items() if help_text.endswith(")") and "(default: " in help_text}
    assert {"--seed", "--method", "--lambda1", "--temperature", "--resume"} <= set(own)
    for flag, help_text in own.items():
        key = flag[2:].replace("-", "_")
        assert getattr(toy, key) == getattr(paper, key) == toy_defaults[key] == paper_defaults[key], flag
        shown = training.shown(getattr(toy, key), trainer.NONE_MEANS.get(key, "none"))
        assert help_text.endswith(f"(default: {shown})"), (flag, help_text)


def test_model_without_data_trains_on_the_paper_data_set(tmp_path, capsys):
    """--model given, no --data: the paper preset, the official script's 100K MetaMathQA samples
    (fxmeng/pissa-dataset's metamath directory, fields instruction / output), and the run says so."""
    model = tmp_path / "model"
    shutil.copytree(os.path.join(ASSETS, "tiny-llama"), model)
    out = tmp_path / "run"
    settings = train_nlg.main(["--model", str(model), "--out", str(out), "--dry-run"])
    assert (settings["data"], settings["data_dir"], settings["format"]) == ("fxmeng/pissa-dataset", "metamath", "pissa")
    assert settings["max_samples"] == 100_000  # Sec. 3.1
    for key, value in train_nlg.PAPER.items():
        if key != "model":
            assert settings[key] == value, key
    printed = capsys.readouterr().out
    assert "settings: the paper preset" in printed
    assert "data: fxmeng/pissa-dataset (metamath, 100,000): the first 100,000 records" in printed
    assert "the official script's data" in printed
    assert not out.exists()  # a dry run writes nothing
    # MetaMathQA itself: another --data takes the metamath format, without a sub-directory
    settings = train_nlg.main(["--model", str(model), "--data", "meta-math/MetaMathQA", "--dry-run"])
    assert (settings["data_dir"], settings["format"]) == (None, "metamath")
    assert "data: meta-math/MetaMathQA, up to its first 100,000 records in the metamath format" in capsys.readouterr().out
    # the toy preset: its own data, said as well
    settings = train_nlg.main(["--dry-run"])
    assert settings["data"] == os.path.join(ASSETS, "data", "metamath_train.jsonl") and settings["max_samples"] == 384
    assert "settings: the toy preset" in capsys.readouterr().out


def test_nlu_model_without_data_trains_on_the_glue_task_from_the_hub(capsys):
    settings = train_nlu.main(["--model", os.path.join(ASSETS, "tiny-deberta"), "--dry-run"])
    assert settings["task"] == "mnli" and settings["data"] is None and settings["validation_file"] is None
    assert (settings["lr"], settings["epochs"], settings["batch_size"], settings["alpha"]) == (5e-4, 5, 16, 8)  # Table 8, MNLI
    printed = capsys.readouterr().out
    assert "data: task mnli, train the hub's nyu-mll/glue mnli train split" in printed
    settings = train_nlu.main(["--model", os.path.join(ASSETS, "tiny-deberta"), "--task", "rte", "--lr", "3e-4", "--dry-run"])
    assert (settings["epochs"], settings["lr"]) == (50, 3e-4)
    printed = capsys.readouterr().out
    assert "--task rte  (default: mnli)" in printed and "--lr 0.0003  (default: 0.0001)" in printed


def test_settings_block_lists_exactly_what_differs_from_the_defaults(capsys):
    train_nlg.main(["--rank", "4", "--lr", "5e-4", "--max-steps", "3", "--dry-run"])  # --lr is the toy preset's own
    block = capsys.readouterr().out.split("{")[0]
    changed = re.findall(r"^  (--\S+) (\S+)  \(default: ([^)]*)\)$", block, flags=re.M)
    assert changed == [("--rank", "4", "8"), ("--max-steps", "3", "no cap")]


def test_report_to_without_its_package_is_a_clear_error(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    for trainer in (train_nlg, train_nlu):
        with pytest.raises(ModuleNotFoundError, match=r"--report-to tensorboard needs the tensorboard package: pip install"):
            trainer.parse_args(["--report-to", "tensorboard"])
