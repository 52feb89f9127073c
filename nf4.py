"""
The 4-bit base of QLoRA / QPiSSA / QBA-LoRA (Fig. 5 of the paper): NF4 (Dettmers et al. 2023), from scratch.

    balora.add_lora(model, ...)          # PiSSA's SVD first, on the full-precision W
    nf4.quantize_base(model, "nf4")      # then every frozen linear weight, W_res included, in 4 bits

Order matters: QPiSSA quantizes the residual W_res, so the principal part stays in the float32
adapter and the quantization error is that of W_res, smaller than that of W (assets/nf4 measures it).

The teacher on a 4-bit base (the trainers' --teacher) is one of two:
  quantized  the quantized model, as QLoRA holds it: balora.pretrained_mode computes Q(W_res) + s B0 A0
             (PiSSA init) or Q(W) (LoRA init); the full-precision W is not kept (ours: no extra memory).
  full       the full-precision pretrained model, the official QBA-LoRA's teacher (llm172/BA-LoRA train.py
             at commit 2829797 loads it as a second, unquantized model in the compute dtype): every
             quantized layer keeps its pretrained W in the model dtype beside its codes (pretrained_weights,
             taken before add_lora, then quantize_base), and pretrained_mode computes x W^T with it. The one
             extra copy is of the quantized linear weights only, on the device the model runs on, where
             the teacher pass reads it every micro-batch; embeddings, norms and the LM head are shared
             with the student, not copied as a second model copies them.
docs/dora-and-4bit.md measures both.

Levels, block size, packing and double quantization are bitsandbytes' (tests/test_nf4.py compares them
bit for bit with bitsandbytes' quantize_4bit / dequantize_4bit).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import balora

NF4_BLOCKSIZE = 64  # weights per absmax constant (QLoRA's block size)
ABSMAX_BLOCKSIZE = 256  # absmax constants per second-level constant in double quantization (QLoRA)


def normal_float_levels():
    """
    The 16 NF4 levels (float32, ascending, -1 to 1), QLoRA's NormalFloat: quantiles of N(0, 1) so that
    each level stands for an equal share of a normally distributed weight, with an exact 0 and one
    more positive level than negative (15 nonzero values). 8 positive quantiles at probabilities from
    `offset` down to 0.5 and 7 negative ones, then divided by the largest so the range is [-1, 1].
    offset = 0.9677083 (QLoRA's constant, the mean of 1 - 1/(2*15) and 1 - 1/(2*16), rounded as
    bitsandbytes rounds it) keeps the outermost quantile finite. The probabilities are float32 and the
    quantiles float64 rounded to float32, which reproduces bitsandbytes' table bit for bit.
    """
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # 7 values < 0
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return levels / levels.max()


def dynamic_levels():
    """
    The 256 levels (float32, ascending) of the signed 8-bit dynamic quantization that QLoRA's double
    quantization applies to the absmax constants (Dettmers 2015, bitsandbytes' default map): for each
    exponent e = 0..6, the 2^e midpoints of a linspace(0.1, 1, 2^e + 1) grid scaled by 10^(e - 6),
    with both signs, plus 0 and 1: 2 * 127 + 2 = 256 levels, dense near 0 and covering [-1, 1].
    """
    levels = [0.0, 1.0]
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        levels += ((10 ** (exponent - 6)) * means).tolist() + (-(10 ** (exponent - 6)) * means).tolist()
    return torch.tensor(sorted(levels), dtype=torch.float32)


def quantize_blockwise(values, levels, blocksize):
    """
    Block-wise absmax quantization of a flat float32 tensor (n,) to the nearest of `levels` (ascending,
    spanning [-1, 1]): each block of `blocksize` values is divided by its absmax c (multiplied by 1 / c,
    as bitsandbytes does; a zero block keeps c = 0 and quantizes to the level of 0) and every value gets
    the index of the nearest level (ties to the lower one: the split points are the levels' midpoints).
    n must be a multiple of blocksize. Returns (codes uint8 (n,), absmax float32 (n / blocksize,)).
    """
    blocks = values.float().view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled.view(-1), midpoints).to(torch.uint8), absmax


def dequantize_blockwise(codes, absmax, levels, blocksize):
    """levels[codes] * absmax of each code's block: the float32 values (n,) quantize_blockwise stands for."""
    return (levels[codes.long()].view(-1, blocksize) * absmax[:, None]).view(-1)


def nf4_quantize(weight, double_quant=False):
    """
    QLoRA's 4-bit NormalFloat quantization of a weight (any shape, numel a multiple of 64), as tensors:
      codes   uint8 (numel / 2,): two 4-bit level indices per byte, the first value in the high nibble
      absmax  float32 (numel / 64,): each block's scale, or with double_quant (QLoRA Sec. 3) its 8-bit
              code: absmax_codes uint8 (numel / 64,), absmax_scale float32 (one per 256 blocks) and
              absmax_offset float32 (): absmax - offset is quantized block-wise with dynamic_levels()
    Bytes per weight: 0.5 + 4/64 = 0.5625, or with double quantization 0.5 + 1/64 + 4/(64 * 256) ~ 0.516.
    """
    flat = weight.detach().reshape(-1).float()
    if flat.numel() % NF4_BLOCKSIZE:
        raise ValueError(f"nf4_quantize: a weight of shape {tuple(weight.shape)} has {flat.numel()} values, "
                         f"not a multiple of the block size {NF4_BLOCKSIZE}")
    levels = normal_float_levels().to(flat.device)
    codes, absmax = quantize_blockwise(flat, levels, NF4_BLOCKSIZE)
    state = {"codes": (codes[0::2] << 4) | codes[1::2]}
    if not double_quant:
        state["absmax"] = absmax
        return state
    # the absmax constants are positive: center them (the mean) so the signed 8-bit levels fit them
    offset = absmax.mean()
    centered = absmax - offset
    padding = -centered.numel() % ABSMAX_BLOCKSIZE  # a zero-padded last block: zeros do not change its absmax
    absmax_codes, absmax_scale = quantize_blockwise(F.pad(centered, (0, padding)), dynamic_levels().to(flat.device),
                                                    ABSMAX_BLOCKSIZE)
    state.update(absmax_codes=absmax_codes[: centered.numel()], absmax_scale=absmax_scale, absmax_offset=offset)
    return state


def nf4_dequantize(state, shape, dtype):
    """The weight (shape, dtype) that nf4_quantize's state stands for: level * absmax, in float32, then cast."""
    if "absmax" in state:
        absmax = state["absmax"]
    else:  # double quantization: first the absmax constants, level * scale + offset
        absmax_codes = state["absmax_codes"]
        padding = -absmax_codes.numel() % ABSMAX_BLOCKSIZE
        levels = dynamic_levels().to(absmax_codes.device)
        absmax = dequantize_blockwise(F.pad(absmax_codes, (0, padding)), state["absmax_scale"], levels, ABSMAX_BLOCKSIZE)
        absmax = absmax[: absmax_codes.numel()] + state["absmax_offset"]
    packed = state["codes"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)  # high nibble first
    levels = normal_float_levels().to(packed.device)
    return dequantize_blockwise(codes, absmax, levels, NF4_BLOCKSIZE).view(shape).to(dtype)


class _NF4MatMul(torch.autograd.Function):
    """
    x @ W^T for a frozen NF4 weight, dequantized in forward and again in backward: autograd would
    otherwise keep each layer's dequantized W for backward, as much memory as the unquantized model.
    Only x gets a gradient, dL/dx = dL/dy @ W.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.layer.dequantize(grad_output.dtype), None


class NF4Linear(nn.Module):
    """
    A frozen linear layer whose weight is stored in NF4 (nf4_quantize): y = x @ dequant(W)^T + bias.
    The weight is dequantized to the input's dtype (bf16 or fp32 compute, as QLoRA) in every forward
    and backward and never kept; the bias stays in full precision. Buffers: the nf4_quantize state.
    """

    def __init__(self, linear, double_quant=False, teacher_weight=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype, self.double_quant = linear.weight.dtype, double_quant
        self.quantize = "nf4-dq" if double_quant else "nf4"  # as QUANTIZE names it (LoRALinear.quantize reads it)
        for name, tensor in nf4_quantize(linear.weight, double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # --teacher full: the pretrained weight (out x in, model dtype) that balora.pretrained_mode computes
        # with, None for the quantized teacher. A plain tensor, not a buffer: never saved (a checkpoint holds
        # the trainable weights only) nor broadcast by DDP before every forward, as buffers are
        self.teacher_weight = teacher_weight
        self.pretrained = False  # set by balora.pretrained_mode: compute with teacher_weight when kept

    def dequantize(self, dtype=None):
        """The weight W (out x in) in `dtype` (default: the dtype of the weight that was quantized)."""
        state = {name: buffer for name, buffer in self.named_buffers()}
        return nf4_dequantize(state, (self.out_features, self.in_features), dtype or self.dtype)

    def forward(self, x):
        if self.pretrained and self.teacher_weight is not None:  # the full teacher, in a layer left unadapted
            return F.linear(x, self.teacher_weight, self.bias)
        y = _NF4MatMul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_linear(self):
        """An nn.Linear holding the dequantized weight (for merge_lora)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.dtype, device=self.codes.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def base_bytes(self):
        """Bytes of the quantized weight (codes + constants), the bias and a full teacher's weight left out."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())  # teacher_weight is no buffer

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, double_quant={self.double_quant}")


# --quantize -> double quantization of the absmax constants? (None: the base stays in its dtype)
QUANTIZE = {"none": None, "nf4": False, "nf4-dq": True}
TEACHERS = ("quantized", "full")  # --teacher on a 4-bit base (module docstring)


def pretrained_weights(model):
    """
    {layer: copy of its weight} for the layers quantize_base may quantize, for --teacher full: taken
    BEFORE balora.add_lora, whose PiSSA init overwrites W with W_res in place. Keyed by the nn.Linear
    itself, which add_lora keeps as its LoRALinear's `base`.
    """
    return {m: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in balora.NEVER_ADAPTED}


def quantize_base(model, quantize, teacher_weights=None):
    """
    Store every frozen nn.Linear of the model (the bases inside the LoRALinear layers included, never
    lm_head / classifier, as bitsandbytes' 4-bit loading in QLoRA) as an NF4Linear; quantize="none"
    leaves the model as it is. Call it after balora.add_lora (PiSSA's SVD): the principal part stays in
    the float32 adapter and only W_res is quantized (QPiSSA). A DoRA layer's magnitude restarts at the
    norm of the quantized V, so the adapted model still starts at its (quantized) base.
    `teacher_weights` (pretrained_weights(model) before add_lora: --teacher full) gives each NF4Linear
    its pretrained weight for the teacher. Returns the bytes of the quantized weights and the number of
    weights they hold.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize_base: quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    double_quant = QUANTIZE[quantize]
    if double_quant is None:
        return 0, 0
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not m.weight.requires_grad and name.rpartition(".")[2] not in balora.NEVER_ADAPTED]
    stored, weights = 0, 0
    for name in names:
        linear = model.get_submodule(name)
        teacher_weight = None if teacher_weights is None else teacher_weights[linear]
        quantized = NF4Linear(linear, double_quant, teacher_weight)
        balora.set_submodule(model, name, quantized)
        stored, weights = stored + quantized.base_bytes(), weights + linear.weight.numel()
    for _, layer in balora.lora_layers(model):
        if layer.dora:
            with torch.no_grad():
                layer.lora_magnitude_vector.copy_(layer.weight_norm())
    kept = "" if teacher_weights is None else f"; the full teacher keeps their pretrained weights, " \
        f"{sum(m.teacher_weight.numel() * m.teacher_weight.element_size() for m in model.modules() if isinstance(m, NF4Linear)):,} bytes"
    print(f"quantize_base: {len(names)} linear layers in {quantize}, {stored:,} bytes for {weights:,} weights "
          f"({stored / max(weights, 1):.4f} bytes per weight){kept}")
    return stored, weights

