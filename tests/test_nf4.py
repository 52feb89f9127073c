"""
Tests of the 4-bit base (nf4.py: NF4 levels, nf4_quantize / nf4_dequantize, NF4Linear,
quantize_base after add_lora): bit for bit against bitsandbytes' quantize_4bit /
dequantize_4bit (quant_type="nf4", blocksize=64) on random and on real matrices, double quantization,
the QPiSSA order, the teacher under quantization (the quantized model) and the full one (the
full-precision model, bit for bit), and adapters saved and merged on a 4-bit base.
bitsandbytes is a test-only oracle (requirements-dev.txt).
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import balora
import nf4
from adapters import load_adapter, merge_lora
from balora import add_lora, pretrained_mode
from nf4 import NF4Linear, nf4_dequantize, nf4_quantize
from test_balora import TARGETS, input_ids, logits_of, randn, rel_err, tiny_llama, train_a_few_steps

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional, once its CPU path has quantized a block (else skip, saying why)."""
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except Exception as error:  # not installed, or a build without a usable CPU backend
        pytest.skip(f"bitsandbytes (the NF4 oracle) is unusable on this machine: {type(error).__name__}: {error}")
    return bnb_functional


def assert_same_as_bitsandbytes(bnb, weight):
    """Our packed codes, absmax constants and dequantized weight are bitsandbytes', bit for bit."""
    codes, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4_quantize(weight)
    assert torch.equal(ours["codes"], codes.view(-1))  # the packed bytes, high nibble first
    assert torch.equal(ours["absmax"], state.absmax)
    expected = bnb.dequantize_4bit(codes, state)
    actual = nf4_dequantize(ours, weight.shape, weight.dtype)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def test_levels_are_the_bitsandbytes_tables(bnb):
    levels = nf4.normal_float_levels()
    assert torch.equal(levels, bnb.get_4bit_type("nf4", device="cpu"))
    # NormalFloat: 16 ascending levels from -1 to 1, an exact zero, 8 positive and 7 negative
    assert levels.numel() == 16 and (levels.diff() > 0).all() and levels[0] == -1 and levels[-1] == 1
    assert (levels == 0).sum() == 1 and (levels > 0).sum() == 8
    assert torch.equal(nf4.dynamic_levels(), bnb.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320), (3, 64)])
def test_nf4_is_bitsandbytes_bit_for_bit_on_random_matrices(bnb, shape, dtype):
    generator = torch.Generator().manual_seed(shape[0])
    # heavy tails and exact zeros as well as normal values: ties and the clamp get exercised
    weight = torch.randn(*shape, generator=generator) * torch.rand(*shape, generator=generator) ** 2
    weight[0, :64] = 0.0  # an all-zero block: absmax 0, every code the level of 0
    assert_same_as_bitsandbytes(bnb, weight.to(dtype))


def test_nf4_is_bitsandbytes_bit_for_bit_on_and_next_to_the_split_points(bnb):
    # Random values almost never land within an ulp of a split point (the midpoint of two levels),
    # where the rounding details decide: x * (1 / c) against x / c, and a tie's direction. Build
    # blocks whose absmax is c and whose values are each midpoint times c and its float32 neighbours.
    generator = torch.Generator().manual_seed(0)
    levels = nf4.normal_float_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2  # (15,)
    absmax = torch.rand(2048, generator=generator) * 0.1 + 0.01
    on = midpoints[None, :] * absmax[:, None]
    above, below = torch.nextafter(on, torch.full_like(on, 1.0)), torch.nextafter(on, torch.full_like(on, -1.0))
    filler = (torch.rand(2048, 18, generator=generator) * 2 - 1) * absmax[:, None]
    weight = torch.cat([absmax[:, None], on, above, below, filler], dim=1)  # 1 + 45 + 18 = 64 per block
    scaled = weight * (1 / absmax[:, None])
    assert (scaled[:, 1:16] == midpoints).any()  # exact ties occur
    assert (torch.bucketize(scaled, midpoints) != torch.bucketize(weight / absmax[:, None], midpoints)).any()
    assert_same_as_bitsandbytes(bnb, weight)


def real_matrices(directory, layer=0):
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(f"model.layers.{layer}.{name}.weight")
                for name in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]}


def test_nf4_is_bitsandbytes_bit_for_bit_on_the_bundled_tiny_llama(bnb):
    for weight in real_matrices(os.path.join(ASSETS, "tiny-llama")).values():
        assert_same_as_bitsandbytes(bnb, weight)


@pytest.mark.slow
def test_nf4_is_bitsandbytes_bit_for_bit_on_smollm2(bnb, smollm2_dir):
    for weight in real_matrices(smollm2_dir, layer=7).values():
        assert_same_as_bitsandbytes(bnb, weight)
        assert_same_as_bitsandbytes(bnb, weight.to(torch.bfloat16))


def test_double_quantization_against_bitsandbytes(bnb):
    weight = randn(576, 1536, seed=3).float() * 0.02  # 13,824 blocks: 54 second-level blocks
    codes, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4_quantize(weight, double_quant=True)
    # the 4-bit codes come from the float32 absmax, before it is compressed: equal bit for bit
    assert torch.equal(ours["codes"], codes.view(-1))
    assert torch.equal(ours["absmax_offset"], state.offset) and torch.equal(ours["absmax_scale"], state.state2.absmax)
    # 8-bit absmax codes: ours is the nearest dynamic level of (absmax - offset) / scale everywhere
    # (float64 distances). bitsandbytes' CPU binary search returns a level that is not the nearest
    # for a few (~0.2%); there, and only there, the two differ, and its level is strictly farther.
    absmax = nf4_quantize(weight)["absmax"].double()
    scaled = (absmax - absmax.mean()) / ours["absmax_scale"].double().repeat_interleave(256)[: absmax.numel()]
    levels = nf4.dynamic_levels().double()
    distance = (scaled[:, None] - levels[None, :]).abs()
    assert torch.equal(ours["absmax_codes"].long(), distance.argmin(dim=1))
    differ = ours["absmax_codes"] != state.absmax
    rows = differ.nonzero().flatten()
    assert differ.float().mean() < 0.01
    assert (distance[rows, state.absmax[rows].long()] > distance[rows, ours["absmax_codes"][rows].long()]).all()
    # with bitsandbytes' own 8-bit codes our dequantization is its dequantization, bit for bit
    expected = bnb.dequantize_4bit(codes, state)
    assert torch.equal(nf4_dequantize(dict(ours, absmax_codes=state.absmax), weight.shape, weight.dtype), expected)
    # and the quantization error of the constants is small against NF4's own
    actual = nf4_dequantize(ours, weight.shape, weight.dtype)
    single = nf4_dequantize(nf4_quantize(weight), weight.shape, weight.dtype)
    assert (actual - single).norm() < 0.05 * (single - weight).norm()


def test_nf4_rejects_a_weight_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match=r"shape \(3, 10\).*multiple of the block size 64"):
        nf4_quantize(torch.ones(3, 10))


def test_nf4_linear_forward_backward_and_memory():
    linear = nn.Linear(128, 64, dtype=torch.float32)
    layer = NF4Linear(linear, double_quant=True)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = layer.dequantize()
    x = randn(5, 3, 128, seed=1).float().requires_grad_()
    y = layer(x)
    dense = F.linear(x, weight, linear.bias)
    assert torch.equal(y.detach(), dense.detach())
    grad = randn(5, 3, 64, seed=2).float()
    (gx,) = torch.autograd.grad(y, x, grad)
    (dense_gx,) = torch.autograd.grad(dense, x, grad)
    assert rel_err(gx, dense_gx) <= 1e-6
    # nothing of the weight's size is kept for backward: the weight is dequantized again there
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x)
    assert (64, 128) not in saved and (128, 64) not in saved
    # 4 bits per weight + one uint8 absmax code per 64 + float32 per 256 blocks + the offset
    assert layer.base_bytes() == 128 * 64 // 2 + 128 * 64 // 64 + 4 * 1 + 4
    assert NF4Linear(linear).base_bytes() == 128 * 64 // 2 + 4 * 128 * 64 // 64


def test_qpissa_quantizes_the_residual_and_has_the_smaller_error():
    # a weight with a strong low-rank part (as pretrained ones): PiSSA moves it into the adapter,
    # so the quantized residual is small and so is its quantization error (Fig. 5's point)
    linear = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_((randn(128, 8, seed=1) @ randn(8, 256, seed=2) / 4 + 0.1 * randn(128, 256, seed=3)).float())
    W = linear.weight.detach().clone()
    model = nn.Sequential()
    model.add_module("proj", linear)
    add_lora(model, ["proj"], r=8, alpha=8, init="pissa")
    nf4.quantize_base(model, "nf4")
    layer = model.proj
    assert isinstance(layer.base, NF4Linear)
    residual = W - layer.scaling * layer.lora_B0 @ layer.lora_A0
    assert torch.equal(layer.base.codes, nf4_quantize(residual)["codes"])  # Q(W_res), not Q(W)
    qpissa_error = (W - layer.merged_weight()).norm()
    qlora_error = (W - nf4_dequantize(nf4_quantize(W), W.shape, W.dtype)).norm()
    assert qpissa_error < 0.5 * qlora_error


@pytest.mark.parametrize("method", [dict(init="lora"), dict(init="pissa"), dict(init="pissa", dora=True)],
                         ids=["qlora", "qpissa", "qdora-pissa"])
def test_the_teacher_under_quantization_is_the_quantized_model(method):
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, **method)
    nf4.quantize_base(model, "nf4-dq")
    assert all(layer.quantize == "nf4-dq" for _, layer in balora.lora_layers(model))
    ids = input_ids()
    at_init = logits_of(model, ids)
    with torch.no_grad(), pretrained_mode(model):
        teacher = model(ids).logits
    assert rel_err(at_init, teacher) <= 1e-5  # the student starts at the teacher
    if method["init"] == "lora":  # QLoRA's teacher: the base with every linear weight quantized
        quantized = copy.deepcopy(original).requires_grad_(False)
        nf4.quantize_base(quantized, "nf4-dq")
        assert rel_err(teacher, logits_of(quantized, ids)) <= 1e-6
    assert rel_err(teacher, logits_of(original, ids)) > 1e-3  # and not the full-precision model
    train_a_few_steps(model)
    with torch.no_grad(), pretrained_mode(model):
        assert rel_err(model(ids).logits, teacher) <= 1e-6


@pytest.mark.parametrize("method, targets", [
    (dict(init="lora"), TARGETS), (dict(init="pissa"), TARGETS), (dict(init="pissa", dora=True), TARGETS),
    (dict(init="pissa"), ["q_proj", "v_proj"]),  # the other linear layers quantized without an adapter
], ids=["qlora", "qpissa", "qdora-pissa", "qpissa-two-targets"])
def test_the_full_teacher_is_the_full_precision_model_bit_for_bit(method, targets):
    original = tiny_llama()
    model = copy.deepcopy(original)
    teacher_weights = nf4.pretrained_weights(model)  # before add_lora: PiSSA writes W_res in place
    add_lora(model, targets, r=4, alpha=8, **method)
    nf4.quantize_base(model, "nf4", teacher_weights)
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 14 and all(m.teacher_weight.dtype == torch.float32 for m in quantized)
    assert not any("teacher" in name for name in model.state_dict())  # kept for the teacher, never saved
    ids = input_ids()
    expected = logits_of(original, ids)
    with torch.no_grad(), pretrained_mode(model):
        teacher = model(ids).logits
    assert torch.equal(teacher, expected)  # KL(teacher || full-precision model) = 0
    assert rel_err(logits_of(model, ids), expected) > 1e-3  # the student computes on the 4-bit base
    train_a_few_steps(model)
    with torch.no_grad(), pretrained_mode(model):
        assert torch.equal(model(ids).logits, expected)


def test_the_trainers_keep_the_full_teacher_only_when_asked():
    import training

    for teacher, kept in (("full", True), ("quantized", False)):
        model = tiny_llama()
        training.adapt(model, "nf4", teacher, target_modules=TARGETS, r=4, alpha=8, init="pissa")
        assert all((m.teacher_weight is not None) == kept for m in model.modules() if isinstance(m, NF4Linear))
    model = tiny_llama()
    training.adapt(model, "none", "full", target_modules=TARGETS, r=4, alpha=8, init="pissa")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # a full-precision base is its own teacher


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_save_load_and_merge_on_a_4bit_base(dora, tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    add_lora(model, TARGETS, r=4, alpha=8, init="pissa", dora=dora)
    nf4.quantize_base(model, "nf4")
    train_a_few_steps(model, steps=2)
    adapters.save_adapter(model, tmp_path)
    reloaded = load_adapter(copy.deepcopy(original), tmp_path)
    for (_, layer), (_, saved) in zip(balora.lora_layers(reloaded), balora.lora_layers(model)):
        assert torch.equal(layer.base.codes, saved.base.codes)  # the same W_res, the same codes
    ids = input_ids()
    expected = logits_of(model, ids)
    assert torch.equal(logits_of(reloaded, ids), expected)
    merge_lora(model)
    assert all(type(model.get_submodule(f"model.layers.0.mlp.{n}")) is nn.Linear for n in ["up_proj", "down_proj"])
    assert rel_err(logits_of(model, ids), expected) <= 1e-5
