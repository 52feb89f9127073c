"""
tools/merge_adapter.py and tools/export_gguf.py against independent readers: the merged checkpoint is
loaded by transformers' Auto* classes (not by balora) and must compute what our adapted model computes;
the GGUF file is read back by transformers' GGUF loader and by tools/import_gguf.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import adapters
import nf4
from balora import add_lora, lora_layers
from model import DebertaClassifier, Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLAMA = os.path.join(REPO, "assets", "tiny-llama")
TINY_DEBERTA = os.path.join(REPO, "assets", "tiny-deberta")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge_adapter = load_tool("merge_adapter")

# (init, dora, quantize) of each adapter kind the merge must reproduce.
KINDS = {"lora": ("lora", False, "none"), "pissa": ("pissa", False, "none"),
         "dora": ("pissa", True, "none"), "nf4": ("pissa", False, "nf4")}


def max_relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def trained_adapter(model, kind, directory, seed=0):
    """Adapt `model` as `kind`, move every adapter tensor off its start (as training would), save it."""
    init, dora, quantize = KINDS[kind]
    add_lora(model, TARGETS, r=4, alpha=8, init=init, pissa_niter=2, dora=dora)
    nf4.quantize_base(model, quantize)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
            if dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(layer.lora_magnitude_vector.shape, generator=generator))
    adapters.save_adapter(model, directory)
    return model


def prompts(vocab_size):
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_tiny_llama_loads_in_transformers_with_our_adapted_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    trained_adapter(Llama.from_pretrained(TINY_LLAMA), kind, str(tmp_path / "adapter"))
    out = merge_adapter.merge(TINY_LLAMA, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    ours = adapters.load_adapter(Llama.from_pretrained(TINY_LLAMA), str(tmp_path / "adapter")).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32).eval()
    input_ids, attention_mask = prompts(ours.config.vocab_size)
    with torch.no_grad():
        our_logits = ours(input_ids, attention_mask)
        their_logits = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert max_relative_error(our_logits[valid], their_logits[valid]) <= 1e-5
    assert max_relative_error(base_logits[valid], their_logits[valid]) > 1e-3  # the adapter changed the model
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(os.path.join(out, "tokenizer.model")) and os.path.isfile(os.path.join(out, "generation_config.json"))


def test_merged_weights_are_merge_lora_of_the_adapted_model(tmp_path):
    """Every tensor of the merged file equals adapters.merge_lora's state dict of our adapted model."""
    from safetensors.torch import load_file

    trained_adapter(Llama.from_pretrained(TINY_LLAMA), "dora", str(tmp_path / "adapter"))
    out = merge_adapter.merge(TINY_LLAMA, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    expected = adapters.merge_lora(adapters.load_adapter(Llama.from_pretrained(TINY_LLAMA), str(tmp_path / "adapter")))
    expected = {key: value for key, value in expected.state_dict().items() if not key.endswith("inv_freq")}
    merged = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(merged) == sorted(expected)
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


def test_shards_index_bf16_and_transformers_reads_them(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    trained_adapter(Llama.from_pretrained(TINY_LLAMA), "pissa", str(tmp_path / "adapter"))
    args = ["--model", TINY_LLAMA, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
            "--dtype", "bfloat16", "--max-shard-size", "1MB"]
    assert merge_adapter.main(args) == 0
    index = json.load(open(tmp_path / "merged" / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        size = os.path.getsize(tmp_path / "merged" / shard)
        with safe_open(str(tmp_path / "merged" / shard), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        assert all(tensor.dtype == torch.bfloat16 for tensor in tensors.values())
        data = sum(tensor.numel() * 2 for tensor in tensors.values())
        assert data <= 10**6 or len(tensors) == 1  # a shard passes the limit only when one tensor does
        total += data
        assert size > data  # header + data
    assert index["metadata"]["total_size"] == total
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert model.dtype == torch.bfloat16
    assert json.load(open(tmp_path / "merged" / "config.json"))["torch_dtype"] == "bfloat16"
    # an existing --out is refused without --overwrite, and replaced with it
    assert merge_adapter.main(args) == 1
    assert merge_adapter.main(args + ["--overwrite"]) == 0


def test_a_failed_merge_leaves_nothing_and_a_misfit_adapter_is_refused_first(tmp_path, monkeypatch, capsys):
    trained_adapter(Llama.from_pretrained(TINY_LLAMA), "lora", str(tmp_path / "adapter"))
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(*args)

    original = merge_adapter.merged_weight
    monkeypatch.setattr(merge_adapter, "merged_weight", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter.merge(TINY_LLAMA, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no out dir, no temp dir left
    monkeypatch.undo()

    # an adapter of another shape: one line naming the problem, nothing written
    other = tmp_path / "other"
    add_lora(Llama.from_pretrained(TINY_LLAMA), TARGETS, r=4, alpha=8, init="lora")
    model = Llama.from_pretrained(TINY_LLAMA)
    add_lora(model, ["q_proj"], r=2, alpha=4, init="lora")
    adapters.save_adapter(model, str(other))
    config = json.load(open(other / "balora_config.json"))
    config["r"] = 3
    json.dump(config, open(other / "balora_config.json", "w"))
    assert merge_adapter.main(["--model", TINY_LLAMA, "--adapter", str(other), "--out", str(tmp_path / "m")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "does not fit" in error[0] and "lora_A" in error[0]
    assert not (tmp_path / "m").exists()


def test_merged_deberta_loads_as_a_transformers_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = DebertaClassifier.from_pretrained(TINY_DEBERTA, num_labels=3)
    add_lora(model, ["query_proj", "key_proj", "value_proj", "dense"], r=4, alpha=8, init="pissa", pissa_niter=2,
             trainable=("classifier", "pooler"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    adapters.save_adapter(model, str(tmp_path / "adapter"))
    out = merge_adapter.merge(TINY_DEBERTA, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    theirs = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ours = adapters.load_adapter(DebertaClassifier.from_pretrained(TINY_DEBERTA, num_labels=3), str(tmp_path / "adapter")).eval()
    input_ids, attention_mask = prompts(1000)
    with torch.no_grad():
        assert max_relative_error(ours(input_ids, attention_mask),
                                  theirs(input_ids=input_ids, attention_mask=attention_mask).logits) <= 1e-5
