"""
Tests of adapters.py: adapter files written and read back by us and by peft, the init they record, and
the merge. peft is used here only as a numeric oracle.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn

import adapters
import balora
from adapters import export_peft, load_adapter, merge_lora, save_adapter
from balora import add_lora, pretrained_mode
from test_balora import TARGETS, input_ids, logits_of, rel_err, tiny_llama, train_a_few_steps

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_export_peft_loads_in_peft_on_the_original_model(init, tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, init=init, trainable=("lm_head",))
    train_a_few_steps(model, steps=2)
    if init == "pissa":
        assert all(not torch.equal(m.lora_B, m.lora_B0) for _, m in balora.lora_layers(model))
    export_peft(model, tmp_path, "tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == ((8, 16) if init == "pissa" else (4, 8))
    assert type(config["lora_alpha"]) is int and config["task_type"] is None  # no task given: PeftModel only
    assert config["modules_to_save"] == ["lm_head"] and config["base_model_name_or_path"] == "tiny-llama"
    reloaded = peft.PeftModel.from_pretrained(original, tmp_path).eval()
    ids = input_ids()
    assert rel_err(logits_of(reloaded, ids), logits_of(model, ids)) <= 1e-4


def test_export_peft_writes_a_fractional_alpha_as_a_float(tmp_path):
    model = tiny_llama()
    add_lora(model, ["q_proj"], r=4, alpha=2.5, init="lora")
    export_peft(model, tmp_path, "tiny-llama", task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["task_type"]) == (2.5, "CAUSAL_LM")


def test_save_load_adapter_round_trip(tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    # randomized PiSSA: load_adapter cannot recompute the factors and must use the saved A0, B0
    add_lora(model, TARGETS, r=4, alpha=8, init="pissa", pissa_niter=1, dropout=0.05, trainable=("lm_head",))
    train_a_few_steps(model, steps=2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / adapters.CONFIG_NAME).read_text())
    assert config["init"] == "pissa" and config["dropout"] == 0.05 and config["trainable"] == ["lm_head"]
    reloaded = load_adapter(copy.deepcopy(original), tmp_path)
    ids = input_ids()
    assert rel_err(logits_of(reloaded, ids), logits_of(model, ids)) <= 1e-5
    # the teacher too (it shares the trained lm_head, so compare with the saved model's teacher)
    with torch.no_grad(), pretrained_mode(reloaded), pretrained_mode(model):
        assert rel_err(reloaded(ids).logits, model(ids).logits) <= 1e-5
    trainable = adapters.trainable_state_dict(reloaded)
    assert trainable.keys() == adapters.trainable_state_dict(model).keys() and "lm_head.weight" in trainable


def test_merge_lora_reproduces_the_adapted_model():
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8, init="pissa")
    train_a_few_steps(model, steps=2)
    ids = input_ids()
    expected = logits_of(model, ids)
    merge_lora(model)
    assert not balora.lora_layers(model)
    assert all(type(model.get_submodule(f"model.layers.0.mlp.{n}")) is nn.Linear for n in ["up_proj", "down_proj"])
    assert rel_err(logits_of(model, ids), expected) <= 1e-5


def test_a_new_init_is_recorded_as_itself_and_round_trips(tmp_path, monkeypatch):
    """
    An init added to balora.INITS (here "minor": the r smallest singular components of W, MiLoRA's
    idea) is stored by LoRALinear as given, written to balora_config.json under its own name, restored
    by load_adapter, and exported to peft as an adapter with initial factors (rank 2r).
    """
    def minor_factors(weight, r, scaling, niter=None):
        U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = torch.sqrt(S[-r:] / scaling)
        return root[:, None] * Vh[-r:], U[:, -r:] * root[None, :]

    monkeypatch.setitem(balora.INITS, "minor", minor_factors)
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, init="minor")
    assert {layer.init for _, layer in balora.lora_layers(model)} == {"minor"}
    ids = input_ids()
    assert rel_err(logits_of(model, ids), logits_of(original, ids)) <= 1e-5  # W_res + s B0 A0 = W at the start
    train_a_few_steps(model, steps=2)
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / adapters.CONFIG_NAME).read_text())["init"] == "minor"
    reloaded = load_adapter(copy.deepcopy(original), tmp_path / "ours")
    assert {layer.init for _, layer in balora.lora_layers(reloaded)} == {"minor"}
    assert rel_err(logits_of(reloaded, ids), logits_of(model, ids)) <= 1e-5
    export_peft(model, tmp_path / "peft", "tiny-llama")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    from_peft = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft").eval()
    assert rel_err(logits_of(from_peft, ids), logits_of(model, ids)) <= 1e-4


def test_an_unknown_init_is_refused_by_the_layer_and_by_load_adapter(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        balora.LoRALinear(nn.Linear(8, 8), r=2, alpha=2, init="nope")
    model = tiny_llama()
    add_lora(model, ["q_proj"], r=2, alpha=4, init="lora")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / adapters.CONFIG_NAME).read_text())
    (tmp_path / adapters.CONFIG_NAME).write_text(json.dumps(dict(config, init="nope")))
    with pytest.raises(ValueError, match="init 'nope' is not one of"):
        load_adapter(tiny_llama(), tmp_path)
