"""
Every bad input a user is likely to hand the trainers gets a one-line error that names the file and
the offending key, line or row, raised before anything on disk changes: the --out directory of an
earlier good run is byte-identical afterwards.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_nlg
import train_nlu

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
LLAMA, DEBERTA = os.path.join(ASSETS, "tiny-llama"), os.path.join(ASSETS, "tiny-deberta")
NLG_DATA = os.path.join(ASSETS, "data", "metamath_train.jsonl")
NLI_TRAIN, NLI_VALIDATION = (os.path.join(ASSETS, "data", f"nli_{split}.jsonl") for split in ("train", "validation"))


def snapshot(directory):
    """{relative path: bytes} of every file below `directory`."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def nlg_flags(out, model=LLAMA, data=NLG_DATA, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--method", "lora", "--rank", "4", "--alpha", "8",
            "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu", "--batch-size", "4", "--micro-batch-size", "4",
            "--max-steps", "1", "--max-samples", "8", "--save-every", "1", *extra]


def nlu_flags(out, train=NLI_TRAIN, *extra):
    return ["--model", DEBERTA, "--task", "nli", "--data", train, "--validation-file", NLI_VALIDATION, "--out", str(out),
            "--max-length", "32", "--batch-size", "8", "--max-steps", "1", "--no-progress", *extra]


def copy_model(source, tmp_path, edit):
    """A copy of a model directory with one file edited by `edit(directory)`."""
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    edit(directory)
    return str(directory)


def edit_config(change):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
    return edit


def nan_in_a_weight(directory):
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, directory / "model.safetensors")


def write_lines(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return str(path)


GOOD = json.dumps({"query": "What is 1 + 1?", "response": "The answer is: 2"})


def nlg_case(name, tmp_path):
    """(model dir, data file, extra flags, expected message regex) of one bad NLG input."""
    if name == "config key missing":
        return copy_model(LLAMA, tmp_path, edit_config(lambda c: c.pop("hidden_size"))), NLG_DATA, [], \
            r"model/config.json: missing key 'hidden_size'"
    if name == "config not JSON":
        return copy_model(LLAMA, tmp_path, lambda d: (d / "config.json").write_text("{'model_type': llama")), NLG_DATA, [], \
            r"model/config.json: not valid JSON"
    if name == "truncated safetensors":
        def truncate(directory):
            data = (directory / "model.safetensors").read_bytes()
            (directory / "model.safetensors").write_bytes(data[:len(data) // 3])
        return copy_model(LLAMA, tmp_path, truncate), NLG_DATA, [], r"model/model.safetensors: not a readable safetensors file"
    if name == "NaN in a base weight":
        return copy_model(LLAMA, tmp_path, nan_in_a_weight), NLG_DATA, [], \
            r"checkpoint '.*/model' cannot be loaded: NaN/inf in \['model\.layers\.0\.self_attn\.q_proj\.weight'\]"
    if name == "model does not exist":
        return str(tmp_path / "no-such-model"), NLG_DATA, [], r"--model '.*no-such-model' does not exist"
    if name == "rank larger than the layer":
        return LLAMA, NLG_DATA, ["--rank", "1000"], r"rank r=1000 \(--rank\) exceeds the dimensions of 'model\.layers\.0\.self_attn\.q_proj'"
    if name == "non-UTF-8 line":
        return LLAMA, write_lines(tmp_path, "d.jsonl", [GOOD, GOOD, b'{"query": "caf\xe9", "response": "x"}\n']), [], \
            r"d\.jsonl, line 3: not UTF-8 text"
    if name == "broken line after blank lines":
        return LLAMA, write_lines(tmp_path, "d.jsonl", [GOOD, "", "", GOOD, "", GOOD, "", '{"query": "unterminated'] + [GOOD] * 6), [], \
            r"d\.jsonl, line 8: not valid JSON"
    if name == "null response":
        rows = [GOOD, json.dumps({"query": "Q", "response": None})] + [GOOD] * 6
        return LLAMA, write_lines(tmp_path, "d.jsonl", rows), [], r"d\.jsonl: record 1: field 'response' is None, expected a string"
    if name == "integer response":
        rows = [GOOD] * 5 + [json.dumps({"query": "Q", "response": 5})] + [GOOD] * 2
        return LLAMA, write_lines(tmp_path, "d.jsonl", rows), [], r"d\.jsonl: record 5: field 'response' is 5, expected a string"
    raise KeyError(name)


NLG_CASES = ["config key missing", "config not JSON", "truncated safetensors", "NaN in a base weight",
             "model does not exist", "rank larger than the layer", "non-UTF-8 line", "broken line after blank lines",
             "null response", "integer response"]


@pytest.fixture(scope="module")
def good_nlg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good_nlg")
    train_nlg.main(nlg_flags(out))
    return out, snapshot(out)


@pytest.mark.parametrize("case", NLG_CASES)
def test_bad_nlg_input_is_named_and_changes_nothing(case, good_nlg_run, tmp_path):
    out, before = good_nlg_run
    model, data, extra, message = nlg_case(case, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        train_nlg.main(nlg_flags(out, model, data, *extra, "--overwrite"))  # even --overwrite keeps the run on bad input
    assert "\n" not in str(error.value)  # one line
    assert snapshot(out) == before


def nli_rows(labels):
    return [json.dumps({"premise": f"Tom has {i} apples", "hypothesis": "he has apples", "label": label})
            for i, label in enumerate(labels)]


NLU_CASES = {
    "empty train file": ([], r"nli_bad\.jsonl: no examples"),
    "string labels": (["entailment", "neutral"] * 8, r"nli_bad\.jsonl: column 'label' has 'entailment' at row 0, expected an integer"),
    "fractional label": ([0, 1, 2, 1.5] * 4, r"nli_bad\.jsonl: column 'label' has 1\.5 at row 3, expected an integer"),
}


@pytest.fixture(scope="module")
def good_nlu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good_nlu")
    train_nlu.main(nlu_flags(out))
    return out, snapshot(out)


@pytest.mark.parametrize("case", sorted(NLU_CASES))
def test_bad_nlu_input_is_named_and_changes_nothing(case, good_nlu_run, tmp_path):
    out, before = good_nlu_run
    labels, message = NLU_CASES[case]
    train = write_lines(tmp_path, "nli_bad.jsonl", nli_rows(labels))
    with pytest.raises(ValueError, match=message):
        train_nlu.main(nlu_flags(out, train) + ["--overwrite"])  # even --overwrite keeps the run on bad input
    assert snapshot(out) == before


def test_swish_is_silu(tmp_path):
    """transformers accepts hidden_act "swish" as silu: so do we, with the same logits."""
    from model import Llama

    swish = copy_model(LLAMA, tmp_path, edit_config(lambda c: c.update(hidden_act="swish")))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(swish)(ids), Llama.from_pretrained(LLAMA)(ids))


def test_add_lora_refuses_a_nan_weight_made_in_memory():
    """The backstop for models not read from a file (load_checkpoint_into already refuses NaN files)."""
    import balora
    from model import Llama

    net = Llama.from_pretrained(LLAMA)
    with torch.no_grad():
        net.model.layers[1].mlp.up_proj.weight[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"base weight model\.layers\.1\.mlp\.up_proj\.weight holds NaN/inf"):
        balora.add_lora(net, "all-linear", r=4, alpha=8)
    assert not any(isinstance(m, balora.LoRALinear) for m in net.modules())  # refused before any change
