"""
Tests of DoRALinear (balora.py): the layer, its merged weight and its gradients against peft's
use_dora=True layer on the same weights and adapter values, gradients by finite differences, the
teacher (pretrained_mode), and adapter files loaded back by us and by peft (a test-only oracle).
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import balora
from adapters import export_peft, load_adapter, merge_lora, save_adapter
from balora import DoRALinear, add_lora, pretrained_mode
from test_balora import TARGETS, input_ids, logits_of, randn, rel_err, tiny_llama, train_a_few_steps

peft = pytest.importorskip("peft")


class OneLinear(nn.Module):
    """A model holding one nn.Linear named "proj", for peft to wrap."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def linear_with_bias(in_features=12, out_features=10, seed=0, dtype=torch.float32):
    linear = nn.Linear(in_features, out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(randn(out_features, in_features, seed=seed))
        linear.bias.copy_(randn(out_features, seed=seed + 1))
    return linear


def ours_and_peft(init="lora", dropout=0.0):
    """Our DoRALinear and peft's DoRA layer on the same W, both with the same random lora_A, lora_B and m."""
    linear = linear_with_bias()
    ours = DoRALinear(copy.deepcopy(linear), r=4, alpha=8, dropout=dropout, init=init)
    theirs = peft.get_peft_model(OneLinear(copy.deepcopy(linear)), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=True,
        init_lora_weights="pissa" if init == "pissa" else True))
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        # at init both magnitudes are ||W||_c (PiSSA: ||W_res + s B0 A0||_c = ||W||_c)
        assert rel_err(ours.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight) <= 1e-6
        assert rel_err(ours.lora_magnitude_vector, torch.linalg.vector_norm(linear.weight, dim=1)) <= 1e-6
        # move every trainable value away from init, identically in both layers
        ours.lora_A.copy_(randn(4, 12, seed=5))
        ours.lora_B.copy_(randn(10, 4, seed=6))
        ours.lora_magnitude_vector.mul_(1 + 0.3 * randn(10, seed=7).float())
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
        if init == "pissa":  # the same frozen W_res (its SVD signs may differ, W_res does not)
            assert rel_err(ours.base.weight, layer.get_base_layer().weight) <= 1e-6
            layer.get_base_layer().weight.copy_(ours.base.weight)
    return ours, theirs


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_dora_layer_forward_merged_weight_and_gradients_match_peft(init):
    ours, theirs = ours_and_peft(init)
    layer = theirs.base_model.model.proj
    x = randn(5, 3, 12, seed=3).float()
    for training in (False, True):
        ours.train(training), theirs.train(training)
        expected = theirs(x)
        actual = ours(x)
        assert rel_err(actual, expected) <= 1e-5
    # gradients of the same loss, with the norm detached in both
    (actual ** 2).sum().backward()
    (expected ** 2).sum().backward()
    for ours_param, their_param in [(ours.lora_A, layer.lora_A["default"].weight),
                                    (ours.lora_B, layer.lora_B["default"].weight),
                                    (ours.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight)]:
        assert rel_err(ours_param.grad, their_param.grad) <= 1e-5
    # merged weight: peft's merge_and_unload against ours, and the merged layer computes the DoRA layer
    with torch.no_grad():
        merged = ours.merged_weight()
    expected_weight = theirs.merge_and_unload().proj.weight
    assert rel_err(merged, expected_weight) <= 1e-5
    ours.eval()
    with torch.no_grad():
        assert rel_err(F.linear(x, merged, ours.base.bias), ours(x)) <= 1e-5


def test_dora_with_dropout_matches_peft_on_the_same_mask():
    ours, theirs = ours_and_peft(dropout=0.5)
    ours.train(), theirs.train()
    x = randn(4, 12, seed=8).float()
    torch.manual_seed(11)
    expected = theirs(x)
    torch.manual_seed(11)  # the same dropout mask: one draw of the same shape in both forwards
    actual = ours(x)
    assert rel_err(actual, expected) <= 1e-5


def test_dora_gradcheck_with_the_norm_held_constant(monkeypatch):
    # DoRA's gradient is that of y = (m / c) * (W_res x + s B A x) + b with c = ||V||_c a constant
    # (Sec. 4.3): freeze c at its current value, then finite differences must match autograd for
    # m, lora_A and lora_B (and x), in float64
    layer = DoRALinear(linear_with_bias(dtype=torch.float64), r=3, alpha=6, init="pissa")
    with torch.no_grad():
        layer.lora_A.add_(0.1 * randn(3, 12, seed=4))
        layer.lora_magnitude_vector.mul_(1.5)
    norm = layer.weight_norm()
    x = randn(4, 12, seed=9).requires_grad_()

    def forward(x, magnitude, lora_A, lora_B):
        return torch.func.functional_call(layer, {"lora_magnitude_vector": magnitude, "lora_A": lora_A,
                                                  "lora_B": lora_B}, (x,))

    monkeypatch.setattr(DoRALinear, "weight_norm", lambda self: norm)
    inputs = (x, layer.lora_magnitude_vector.detach().clone().requires_grad_(),
              layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(forward, inputs)
    # and the detach is real: with the norm's own dependence on A, B the gradients would differ
    monkeypatch.undo()
    inputs[2].grad = None
    forward(*inputs).sum().backward()
    detached_grad = inputs[2].grad.clone()
    full = torch.autograd.functional.jacobian(
        lambda A: (layer.lora_magnitude_vector / torch.linalg.vector_norm(layer.base.weight + layer.scaling * layer.lora_B @ A, dim=1)
                   * (F.linear(x, layer.base.weight) + layer.scaling * F.linear(F.linear(x, A), layer.lora_B))).sum(),
        inputs[2].detach())
    assert rel_err(detached_grad, full) > 1e-3


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_dora_model_equals_base_at_init_and_teacher_after_training(init):
    original = tiny_llama()
    model = copy.deepcopy(original)
    summary = add_lora(model, TARGETS, r=4, alpha=8, init=init, dropout=0.1, dora=True)
    layers = balora.lora_layers(model)
    magnitudes = sum(layer.base.out_features for _, layer in layers)
    factors = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in layers)
    assert all(isinstance(layer, DoRALinear) for _, layer in layers) and summary["trainable"] == factors + magnitudes
    ids = input_ids()
    expected = logits_of(original, ids)
    assert rel_err(logits_of(model, ids), expected) <= 1e-5
    initial_magnitudes = [layer.lora_magnitude_vector.detach().clone() for _, layer in layers]
    train_a_few_steps(model)
    assert all(not torch.equal(m0, layer.lora_magnitude_vector) for m0, (_, layer) in zip(initial_magnitudes, layers))
    assert rel_err(logits_of(model, ids), expected) > 1e-2  # the student moved
    with torch.no_grad(), pretrained_mode(model):
        assert rel_err(model(ids).logits, expected) <= 1e-5


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_dora_export_peft_loads_in_peft_on_the_original_model(init, tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, init=init, dora=True)
    train_a_few_steps(model, steps=2)
    export_peft(model, tmp_path, "tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    reloaded = peft.PeftModel.from_pretrained(original, tmp_path).eval()
    for name, layer in balora.lora_layers(model):  # the magnitudes peft loaded are ours
        their_layer = reloaded.base_model.model.get_submodule(name)
        assert torch.equal(their_layer.lora_magnitude_vector["default"].weight, layer.lora_magnitude_vector.detach())
    ids = input_ids()
    assert rel_err(logits_of(reloaded, ids), logits_of(model, ids)) <= 1e-5


def test_dora_save_load_adapter_and_merge(tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, init="pissa", pissa_niter=1, dora=True)
    train_a_few_steps(model, steps=2)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / adapters.CONFIG_NAME).read_text())["dora"] is True
    reloaded = load_adapter(copy.deepcopy(original), tmp_path)
    assert all(isinstance(layer, DoRALinear) for _, layer in balora.lora_layers(reloaded))
    ids = input_ids()
    expected = logits_of(model, ids)
    assert rel_err(logits_of(reloaded, ids), expected) <= 1e-5
    with torch.no_grad(), pretrained_mode(reloaded):
        assert rel_err(reloaded(ids).logits, logits_of(original, ids)) <= 1e-5
    merge_lora(model)
    assert not balora.lora_layers(model)
    assert rel_err(logits_of(model, ids), expected) <= 1e-5
