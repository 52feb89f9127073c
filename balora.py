"""
BA-LoRA (Bias-Alleviating Low-Rank Adaptation, ICLR 2026) from scratch, in the order of the paper:

  Eq. 1-3   PiSSA: LoRA whose adapter starts at the principal singular components of W.
  Eq. 4-8   NLU regularizers on the (N, D) batch logits: consistency (KL to the pretrained
            model), diversity (decorrelated class logits), SVD (energy in the top-k singular
            values), and the weighted objective.
  Eq. 9-13  NLG regularizers on the (M, V) logits of the valid (non-padded) tokens: consistency,
            focused top-K entropy, randomized-SVD energy ratio, and the weighted objective.
  App. B.4  the schedules of lambda1 (cosine) and lambda2/lambda3 ("two_phase" focus).
  Table 10  DoRA (DoRALinear), the third adapter the regularizers are shown on.
  Fig. 5    the 4-bit base of QLoRA / QPiSSA / QBA-LoRA: NF4 weights (NF4Linear), quantized after
            PiSSA's SVD, so that QPiSSA quantizes the residual W_res.
  Then adapters as files: merge, save/load, and export to the peft format.

Notation. The paper writes a linear layer as Y = X (W + A B) with W in R^{m x n} (m inputs, n outputs),
A in R^{m x r} and B in R^{r x n}. PyTorch's nn.Linear stores the transpose, weight = W^T of shape
(out, in), and computes y = x @ weight.T. We keep peft's names and layout:
    lora_A = A^T  (r x in),   lora_B = B^T  (out x r),   scaling s = alpha / r,
    y = base(x) + s * lora_B @ lora_A @ x,   i.e. the effective weight is W_res + s * lora_B @ lora_A.

The teacher (our departure from the paper's setup). The consistency terms (Eq. 4, 9) need the logits
of the pretrained model. The official code keeps a second full copy of the model for that (BA-LoRA's
overhead over PiSSA is +10.75 GB on LLaMA-2-7B, Table 5). We do not: every LoRALinear keeps its initial factors (lora_A0, lora_B0) as
buffers, and `pretrained_mode(model)` swaps them in for the trained factors. Because PiSSA builds the
frozen weight as W_res = W - s * B0 @ A0, the layer then computes W_res + s * B0 @ A0 = W (exactly, up
to float rounding), so the adapted model computes the original pretrained function. With init="lora", B0 = 0 and the teacher
simply skips the adapter, so no copy is stored. Extra memory: one copy of the adapter factors, never
of the model. Modules left fully trainable (e.g. the classification head) are shared by teacher and
student, as in the paper's NLU setup (App. B.3, B.4). `pretrained_mode` also puts the model in eval
mode, like the official frozen teacher.

The teacher on a 4-bit base is the quantized model, as QLoRA holds it: pretrained_mode computes
Q(W_res) + s B0 A0 (init="pissa") or Q(W) (init="lora"), never the full-precision W, which is not
kept. For QPiSSA that teacher is nearer to W than QLoRA's, by the smaller quantization error of W_res.

Dtypes. The frozen base weight keeps the model dtype (e.g. bfloat16); the adapter factors are float32
(float64 if the base is float64), like peft's `autocast_adapter_dtype`. The adapter casts its input to
its own dtype and its output back to the base output's dtype, so a bf16 model runs with or without
autocast. PiSSA's SVD and every weight merge are computed in float32 and cast back. In bf16 the
teacher equals the original model up to the bf16 rounding of W_res (as for PiSSA in peft); in float32
it is exact to float32 rounding. The regularizers compute in float32 when given bf16/fp16 logits.

One more departure: nlg_svd_loss (Eq. 12) differentiates the approximate singular values with the
randomized basis held constant, where the official code also differentiates through the range finder;
see its docstring for why this is the exact top-k gradient once the sketch has converged.
"""

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
# LoRA and PiSSA (Eq. 1-3)


def _float32_or_wider(dtype):
    """float32 for bf16/fp16 (adapters and losses need the precision), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def pissa_factors(weight, r, scaling, niter=None):
    """
    Principal factors of W for PiSSA (Eq. 1-2), in our (out x in) layout.

    weight = W^T (out x in) = U S Vh. Eq. 1-2 in the paper's layout become
        lora_B = U[:, :r] sqrt(S_r / s)   (out x r)
        lora_A = sqrt(S_r / s) Vh[:r]     (r x in)
    so that s * lora_B @ lora_A = U_r S_r Vh_r, the best rank-r approximation of W^T. Dividing S by the
    scaling s (as peft does) keeps the product exact for any alpha. The SVD is exact
    (torch.linalg.svd) or, with `niter`, randomized (torch.svd_lowrank with q = r, like peft's
    "pissa_niter_<niter>"). Computed in float32; returns (lora_A, lora_B) in float32.
    """
    weight = weight.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


class LoRALinear(nn.Module):
    """
    y = base(x) + scaling * lora_B @ lora_A @ dropout(x),   scaling = alpha / r.

    base: the frozen nn.Linear, holding W (init="lora") or the PiSSA residual W_res (Eq. 3).
    lora_A (r x in), lora_B (out x r): trainable. init="lora": A Kaiming-uniform (a=sqrt(5), as
    peft), B = 0. init="pissa": principal singular factors of W (Eq. 1-2), exact SVD or randomized
    with `pissa_niter` iterations. lora_A0, lora_B0: the initial factors (None for init="lora").
    """

    def __init__(self, base, r, alpha, dropout=0.0, init="lora", pissa_niter=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if init not in ("lora", "pissa"):
            raise ValueError(f"init must be 'lora' or 'pissa', got {init!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)  # p = 0 returns its input as is
        self.pretrained = False  # set by pretrained_mode(): compute with the initial factors
        self.train(base.training)  # a layer swapped into an eval-mode model stays in eval mode
        weight = base.weight
        dtype = _float32_or_wider(weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=weight.device))
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.start_from(*pissa_factors(weight, r, self.scaling, pissa_niter))

    @property
    def dropout_p(self):
        return self.dropout.p

    @property
    def init(self):
        return "lora" if self.lora_A0 is None else "pissa"

    @property
    def dora(self):
        return isinstance(self, DoRALinear)

    @property
    def quantize(self):
        """The base's storage: "none", "nf4" or "nf4-dq" (NF4 with double quantization), as QUANTIZE names it."""
        if isinstance(self.base, nn.Linear):
            return "none"
        return "nf4-dq" if self.base.double_quant else "nf4"

    @torch.no_grad()
    def start_from(self, lora_A0, lora_B0):
        """
        Start the adapter at (A0, B0) and move s * B0 @ A0 out of the frozen weight (Eq. 3):
        W_res = W - s * B0 @ A0, so W_res + s * lora_B @ lora_A = W right now. Computed in float32.
        """
        weight = self.base.weight
        residual = weight.float() - self.scaling * (lora_B0.float() @ lora_A0.float())
        weight.copy_(residual.to(weight.dtype))
        self.lora_A.copy_(lora_A0)
        self.lora_B.copy_(lora_B0)
        self.lora_A0 = self.lora_A.detach().clone()
        self.lora_B0 = self.lora_B.detach().clone()

    def delta_weight(self):
        """s * lora_B @ lora_A (out x in), the adapter's weight update, in the adapter dtype."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x):
        result = self.base(x)
        if self.pretrained and self.lora_A0 is None:  # init="lora": B0 = 0, the pretrained layer is base
            return result
        x = x.to(self.lora_A.dtype)  # bf16 activations into the float32 adapter
        if self.pretrained:
            lora_A, lora_B = self.lora_A0, self.lora_B0  # W_res + s B0 A0 = W: the original layer
        else:
            lora_A, lora_B, x = self.lora_A, self.lora_B, self.dropout(x)
        return result + (self.scaling * F.linear(F.linear(x, lora_A), lora_B)).to(result.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"

    def base_weight(self):
        """The frozen weight W_res (out x in) the base layer computes with (dequantized for an NF4 base)."""
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()

    def merged_weight(self):
        """The effective weight W_res + s * lora_B @ lora_A (out x in), summed in the adapter dtype (float32 or float64)."""
        return self.base_weight().to(self.lora_A.dtype) + self.delta_weight()


class DoRALinear(LoRALinear):
    """
    DoRA (Liu et al. 2024): LoRA with the weight split into a magnitude and a direction,

        W' = m * V / ||V||_c,   V = W_res + s * lora_B @ lora_A   (out x in),   y = W' x + bias,

    where ||V||_c is the L2 norm of each output row of V (the paper's column norm, in its in x out
    layout): a vector of length out, like the trainable magnitude m (`lora_magnitude_vector`).
    m starts at ||V||_c of the initial adapter, which is ||W||_c for init="lora" (B = 0) and for
    init="pissa" too (W_res + s B0 A0 = W, peft's order: PiSSA first, then the magnitude), so
    W' = W at the start. The norm is detached, a constant in backward (DoRA Sec. 4.3, as peft):
    m and the factors get their gradients through the numerator only.

    The forward is peft's: it reuses base(x) = W_res x + bias instead of forming W' x,
        y = base(x) + (m / ||V||_c - 1) * W_res x~ + (m / ||V||_c) * s * lora_B lora_A x~,
    with x~ = dropout(x) (= x without dropout, where this is exactly W' x + bias). The teacher
    (pretrained_mode) is the LoRA layer with the initial factors, W_res + s B0 A0 = W: the initial
    magnitude ||W||_c over the norm ||W||_c is 1, so the DoRA rescaling is skipped, not recomputed.
    """

    def __init__(self, base, r, alpha, dropout=0.0, init="lora", pissa_niter=None):
        super().__init__(base, r, alpha, dropout, init, pissa_niter)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self):
        """||V||_c = ||W_res + s * lora_B @ lora_A||_c: the L2 norm of each output row (out,), adapter dtype, no gradient."""
        return torch.linalg.vector_norm(super().merged_weight(), dim=1)

    def magnitude_scale(self):
        """m / ||V||_c (out,): the factor that rescales each output row of V to the magnitude m."""
        return self.lora_magnitude_vector / self.weight_norm()

    def merged_weight(self):
        """W' = m * V / ||V||_c (out x in), in the adapter dtype (delta_weight stays s * lora_B @ lora_A, as in peft)."""
        return self.magnitude_scale()[:, None] * super().merged_weight()

    def forward(self, x):
        if self.pretrained:  # the initial layer: W_res + s B0 A0 = W, the magnitude scale is 1
            return super().forward(x)
        result = self.base(x)
        x = x.to(self.lora_A.dtype)
        scale = self.magnitude_scale()  # (out,), broadcast over the last dim of the outputs
        base_result = result
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
            base_result = self.base(x.to(result.dtype))  # W_res x~ + bias (an NF4 base keeps no weight for backward)
        base_result = base_result.to(x.dtype)
        if self.base.bias is not None:
            base_result = base_result - self.base.bias.to(x.dtype)  # W_res x~ alone
        lora_result = self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return result + ((scale - 1) * base_result + scale * lora_result).to(result.dtype)

    def extra_repr(self):
        return super().extra_repr() + ", dora=True"


# -----------------------------------------------------------------------------
# The 4-bit base of QLoRA / QPiSSA / QBA-LoRA (Fig. 5): NF4 (Dettmers et al. 2023)

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

    def __init__(self, linear, double_quant=False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype, self.double_quant = linear.weight.dtype, double_quant
        for name, tensor in nf4_quantize(linear.weight, double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype=None):
        """The weight W (out x in) in `dtype` (default: the dtype of the weight that was quantized)."""
        state = {name: buffer for name, buffer in self.named_buffers()}
        return nf4_dequantize(state, (self.out_features, self.in_features), dtype or self.dtype)

    def forward(self, x):
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
        """Bytes of the quantized weight (codes + constants), the bias left out."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, double_quant={self.double_quant}")


_NEVER_ADAPTED = ("lm_head", "classifier")  # output layers stay dense, as peft's "all-linear"


def _name_matches(name, patterns):
    """peft's suffix rule: 'q_proj' matches 'model.layers.0.self_attn.q_proj'."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _prefixes(name):
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: the module and all its parents."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def all_finite(tensor):
    """
    No entry is NaN or +-inf. Through min and max (NaN when any entry is, +-inf when one is) rather than
    isfinite(tensor).all(), so that checking a 7B checkpoint's matrices allocates no mask as large as one.
    """
    return tensor.numel() == 0 or all(torch.isfinite(extreme) for extreme in torch.aminmax(tensor))


def lora_layers(model):
    """[(qualified name, LoRALinear)] of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, target_modules, r, alpha, init="pissa", dropout=0.0, pissa_niter=None, trainable=(), dora=False,
             quantize="none"):
    """
    Replace every nn.Linear whose qualified name ends with one of `target_modules` ("all-linear": every
    nn.Linear) by a LoRALinear (a DoRALinear with dora=True), never lm_head / classifier or a module
    inside `trainable`. Freeze all other parameters except those of the modules named in `trainable`
    (e.g. ("classifier", "pooler")).
    quantize="nf4" / "nf4-dq" then stores every frozen linear weight in NF4 (quantize_base), after the
    PiSSA SVD: QPiSSA quantizes the residual W_res, not W. Returns dict(trainable=#params,
    total=#params, replaced=[names]).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"add_lora: quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    trainable = [trainable] if isinstance(trainable, str) else list(trainable)
    targets = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (target_modules == "all-linear" or _name_matches(name, target_modules))
        and name.rpartition(".")[2] not in _NEVER_ADAPTED
        and not any(_name_matches(prefix, trainable) for prefix in _prefixes(name))
    ]
    if not targets:
        raise ValueError(f"add_lora: no nn.Linear matches target_modules={target_modules!r}")
    for name in targets:  # checked before the model changes
        linear = model.get_submodule(name)
        if r > min(linear.in_features, linear.out_features):
            raise ValueError(f"add_lora: rank r={r} (--rank) exceeds the dimensions of {name!r} "
                             f"({linear.out_features} x {linear.in_features})")
        if not all_finite(linear.weight):  # the SVD of PiSSA, and any output, would be NaN
            raise ValueError(f"add_lora: the base weight {name}.weight holds NaN/inf (a broken checkpoint?)")
    model.requires_grad_(False)
    for name in trainable:
        modules = [m for n, m in model.named_modules() if _name_matches(n, [name])]
        if not modules:
            raise ValueError(f"add_lora: no module matches trainable={name!r}")
        for m in modules:
            m.requires_grad_(True)
    # PiSSA runs one SVD per matrix: minutes for a 7B model, so show progress
    layer_class = DoRALinear if dora else LoRALinear
    for name in tqdm(targets, desc=f"add_lora ({init})", disable=init != "pissa"):
        layer = layer_class(model.get_submodule(name), r, alpha, dropout, init, pissa_niter)
        _set_submodule(model, name, layer)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())  # counted before the base weights become NF4 buffers
    quantize_base(model, quantize)
    print(f"add_lora: {len(targets)} layers, trainable {n_trainable:,} / {n_total:,} params "
          f"({100 * n_trainable / n_total:.2f}%)")
    return dict(trainable=n_trainable, total=n_total, replaced=targets)


# --quantize -> double quantization of the absmax constants? (None: the base stays in its dtype)
QUANTIZE = {"none": None, "nf4": False, "nf4-dq": True}


def quantize_base(model, quantize):
    """
    Store every frozen nn.Linear of the model (the bases inside the LoRALinear layers included, never
    lm_head / classifier, as bitsandbytes' 4-bit loading in QLoRA) as an NF4Linear; quantize="none"
    leaves the model as it is. Call it after PiSSA's SVD (add_lora does): the principal part stays in
    the float32 adapter and only W_res is quantized (QPiSSA). A DoRA layer's magnitude restarts at the
    norm of the quantized V, so the adapted model still starts at its (quantized) base.
    Returns the bytes of the quantized weights and the number of weights they hold.
    """
    double_quant = QUANTIZE[quantize]
    if double_quant is None:
        return 0, 0
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not m.weight.requires_grad and name.rpartition(".")[2] not in _NEVER_ADAPTED]
    stored, weights = 0, 0
    for name in names:
        linear = model.get_submodule(name)
        quantized = NF4Linear(linear, double_quant)
        _set_submodule(model, name, quantized)
        stored, weights = stored + quantized.base_bytes(), weights + linear.weight.numel()
    for _, layer in lora_layers(model):
        if layer.dora:
            with torch.no_grad():
                layer.lora_magnitude_vector.copy_(layer.weight_norm())
    print(f"quantize_base: {len(names)} linear layers in {quantize}, {stored:,} bytes for {weights:,} weights "
          f"({stored / max(weights, 1):.4f} bytes per weight)")
    return stored, weights


@contextmanager
def pretrained_mode(model):
    """
    Inside, the adapted model computes the original pretrained function (the teacher of Eq. 4, 9):
    each LoRALinear uses its initial factors (W_res + s B0 A0 = W, or base alone for init="lora"),
    and the model is in eval mode. Training flags are restored on exit. Use under torch.no_grad().
    """
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("pretrained_mode: the model has no LoRALinear layers (call add_lora first)")
    training = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer.pretrained = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.pretrained = False
        for m, flag in training.items():
            m.training = flag


# -----------------------------------------------------------------------------
# Regularizers for NLU (Eq. 4-8): Z_P, Z_F are (N, D) logits, N examples, D classes


def _check_matrix(name, logits):
    if logits.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, classes) logit matrix, got shape {tuple(logits.shape)}")


def _zero_loss(logits):
    """0, still connected to the graph: backward works and gives zero gradients."""
    return logits.sum().to(_float32_or_wider(logits.dtype)) * 0.0


# logits per chunk of rows in the KL: each temporary of a chunk is 8 MiB in float32
_CHUNK_ELEMENTS = 1 << 21


# logits per chunk of rows in NLGObjectiveFused, whose chunk holds several temporaries at once next to
# all of the step's activations (the step's peak): 4 MiB each in float32. Smaller chunks cost time: each
# one streams the whole teacher LM head weight (V x hidden) through a matmul of few rows.
_FUSED_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(*matrices, chunk_elements=None):
    """Matching chunks of rows of (rows, columns) matrices, ~_CHUNK_ELEMENTS entries of the widest each."""
    chunk_elements = _CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    rows_per_chunk = max(1, chunk_elements // max(max(matrix.size(1) for matrix in matrices), 1))
    return zip(*(matrix.split(rows_per_chunk) for matrix in matrices))


def _teacher_rows(teacher, teacher_head):
    """A chunk of the teacher's logits: the rows themselves, or teacher_head(rows) of its hidden states."""
    return teacher if teacher_head is None else teacher_head(teacher)


def _tempered_kl_rows(teacher, teacher_head, student_rows, temperature, dtype):
    """
    One chunk of rows of the KL of Eq. 4 / 9: (sum_i KL(P_i || F_i), P, Z_F / T), P = softmax(Z_P / T),
    F = softmax(Z_F / T), in `dtype`; Z_P from `teacher` as _teacher_rows. At most four chunk-sized
    temporaries at a time: P, log P - log F, Z_F / T and log F while it is subtracted.

    Why P comes from softmax itself, never as exp(log_softmax): torch's elementwise exp is 25-100x
    slower on inputs below about -87 (float32 underflow and denormals; measured on AVX-512), and a
    peaked distribution (one whose largest logit leads by hundreds) puts nearly every log-probability
    there; the softmax kernels do not slow down. (Summing P log P and P log F apart would save a
    temporary but lose float32 digits to cancellation: 2e-3 relative error for a KL of 5e-3 at V = 49152.)
    """
    scaled = _teacher_rows(teacher, teacher_head).to(dtype) / temperature  # the head's chunk is freed at once
    p_teacher = F.softmax(scaled, dim=-1)
    log_ratio = F.log_softmax(scaled, dim=-1)
    scaled = student_rows.to(dtype) / temperature
    log_ratio -= F.log_softmax(scaled, dim=-1)
    return torch.dot(p_teacher.view(-1), log_ratio.view(-1)), p_teacher, scaled


class TemperedKL(torch.autograd.Function):
    """
    sum_i KL(softmax(Z_P[i] / T) || softmax(Z_F[i] / T)) over the rows i, with a hand-written backward.

    Why not plain autograd: it would keep softmax(Z_P / T) and log_softmax(Z_F / T) for backward, two
    float32 copies of the (M, V) logits (2 x 47 MiB for M = 384 tokens of a 32000 vocabulary), alive
    from the loss until the backward reaches it. This function keeps only its two inputs, which the
    caller holds anyway, and recomputes both softmaxes chunk by chunk in backward, where

        d KL_i / d Z_F[i, v] = (1 / T) * (softmax(Z_F[i] / T)[v] - softmax(Z_P[i] / T)[v])

    (the derivative of -sum_v p_v log softmax(z / T)_v, with sum_v p_v = 1). The teacher Z_P is a
    constant and gets no gradient. Computed in float32 (float64 for float64 input).

    With `teacher_head`, `teacher` is not Z_P but the teacher's final hidden states H_P (M, hidden),
    and Z_P = teacher_head(H_P) is computed a chunk of rows at a time, in forward and again in
    backward (the fused linear + loss pattern of Liger-Kernel's fused linear cross-entropy): no
    (M, V) teacher matrix ever exists, for the price of the teacher's LM head run twice.
    """

    @staticmethod
    def forward(ctx, teacher, student_logits, temperature, teacher_head=None):
        ctx.save_for_backward(teacher, student_logits)
        ctx.temperature, ctx.teacher_head = temperature, teacher_head
        dtype = _float32_or_wider(student_logits.dtype)
        kl_sum = torch.zeros((), dtype=dtype, device=student_logits.device)
        for teacher_rows, student in _row_chunks(teacher, student_logits):
            kl_sum += _tempered_kl_rows(teacher_rows, teacher_head, student, temperature, dtype)[0]
        return kl_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl_sum):
        teacher, student_logits = ctx.saved_tensors
        temperature, dtype = ctx.temperature, _float32_or_wider(student_logits.dtype)
        grad_student = torch.empty_like(student_logits)
        for teacher_rows, student, grad in _row_chunks(teacher, student_logits, grad_student):
            teacher_rows = _teacher_rows(teacher_rows, ctx.teacher_head)  # recomputed: nothing (M, V) was kept
            difference = F.softmax(student.to(dtype) / temperature, dim=-1)
            difference -= F.softmax(teacher_rows.to(dtype) / temperature, dim=-1)  # in place: one chunk of temporaries
            grad.copy_(difference.mul_(grad_kl_sum / temperature))
        return None, grad_student, None, None


def nlu_consistency_loss(teacher_logits, student_logits, temperature, teacher_head=None):
    """
    Eq. 4: L_CR = T^2 * KL(softmax(Z_P / T) || softmax(Z_F / T)), Z_P, Z_F (N, D).

    KL is summed over the D classes and averaged over the N rows. The teacher is a constant (detached).
    TemperedKL works through the rows in chunks and keeps nothing but its inputs for backward, so
    the cost in memory is one chunk's temporaries however large the vocabulary.
    With `teacher_head` (a function of a chunk of rows, run without gradient), `teacher_logits` holds
    the teacher's final hidden states (N, hidden) and Z_P = teacher_head(them), formed chunk by chunk.
    """
    _check_matrix("consistency loss", student_logits)
    if teacher_head is not None:
        _check_matrix("consistency loss (teacher hidden states)", teacher_logits)
        if teacher_logits.size(0) != student_logits.size(0):
            raise ValueError(f"consistency loss: {teacher_logits.size(0)} teacher hidden states for "
                             f"{student_logits.size(0)} student logit rows")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f"consistency loss: teacher logits {tuple(teacher_logits.shape)} and student "
                         f"logits {tuple(student_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_rows = student_logits.size(0)
    if num_rows == 0:
        return _zero_loss(student_logits)
    kl_sum = TemperedKL.apply(teacher_logits.detach(), student_logits, temperature, teacher_head)
    # mean over rows, times T^2 to keep gradient magnitudes comparable to cross-entropy (Hinton et al.)
    return temperature**2 * kl_sum / num_rows


def nlu_diversity_loss(logits):
    """
    Eq. 5-6: L_DR = (1/D) * sum_{i != j} C_ij^2,  C = Z_c^T Z_c / (N - 1),  Z_c = Z - mean_batch(Z).

    logits Z (N, D). Penalizes correlation between the logits of distinct classes across the batch.
    Zero (with zero gradients) when the covariance is undefined (N < 2); zero for D = 1.
    """
    _check_matrix("nlu_diversity_loss", logits)
    num_rows, num_classes = logits.shape
    if num_rows < 2:
        return _zero_loss(logits)
    z = logits.to(_float32_or_wider(logits.dtype))
    # center the logits over the batch
    centered = z - z.mean(dim=0, keepdim=True)
    # covariance is D x D (unbiased, N - 1)
    covariance = centered.T @ centered / (num_rows - 1)
    # drop the diagonal: only correlations between different classes are penalized
    off_diagonal = covariance[~torch.eye(num_classes, dtype=torch.bool, device=logits.device)]
    return off_diagonal.pow(2).sum() / num_classes


def nlu_svd_loss(logits, k):
    """
    Eq. 7: L_SVDR = - sum_{i<=k} sigma_i / sum_{j<=min(N,D)} sigma_j, singular values of Z (N, D).

    Exact SVD: D is small for classification. -1 when k >= min(N, D); 0 for an empty batch or Z = 0.
    """
    _check_matrix("nlu_svd_loss", logits)
    if k < 1:
        raise ValueError(f"svd k must be >= 1, got {k}")
    if logits.numel() == 0:
        return _zero_loss(logits)
    # singular values, sorted in descending order
    sigma = torch.linalg.svdvals(logits.to(_float32_or_wider(logits.dtype)))
    # share of the spectral energy in the top k; the clamp only matters for Z = 0, where the ratio is 0/0
    return -sigma[:k].sum() / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny)


def _objective(task_loss, lambdas, regularizers):
    """task_loss + sum_i lambda_i * L_i; a term whose lambda is 0 is not computed."""
    if len(lambdas) != 3:
        raise ValueError(f"lambdas must be (lambda1, lambda2, lambda3), got {lambdas!r}")
    total, components = task_loss, {"task": task_loss.detach()}
    for (name, regularizer), weight in zip(regularizers.items(), lambdas):
        if weight == 0:
            continue
        value = regularizer()
        total = total + weight * value
        components[name] = value.detach()
    return total, components


def _require_teacher(teacher_logits, lambdas):
    if teacher_logits is None and lambdas[0] != 0:
        raise ValueError("teacher_logits is required when lambda1 != 0 (consistency term)")


def nlu_objective(task_loss, student_logits, teacher_logits, lambdas, temperature, svd_k):
    """
    Eq. 8: L_NLU = L_task + lambda1 L_CR (Eq. 4) + lambda2 L_DR (Eq. 5) + lambda3 L_SVDR (Eq. 7).

    Logits (N, D). Returns (total, components) with components the detached terms by name
    ("task", "consistency", "diversity", "svd"), only those computed.
    """
    _require_teacher(teacher_logits, lambdas)
    return _objective(task_loss, lambdas, {
        "consistency": lambda: nlu_consistency_loss(teacher_logits, student_logits, temperature),
        "diversity": lambda: nlu_diversity_loss(student_logits),
        "svd": lambda: nlu_svd_loss(student_logits, svd_k),
    })


# -----------------------------------------------------------------------------
# Regularizers for NLG (Eq. 9-13): logits of the M valid (non-padded) tokens, (M, V)


def nlg_consistency_loss(teacher_logits, student_logits, temperature, teacher_head=None):
    """
    Eq. 9: L_CR = T^2 * (1/M) * sum_i KL(P_P(. | x, i; T) || P_F(. | x, i; T)), logits (M, V).

    This is Eq. 4 with one row per valid token and the vocabulary as classes, so it is computed by the
    same chunked KL, which keeps no (M, V) copy of its own for backward. With `teacher_head` (e.g. the
    model's lm_head), `teacher_logits` is the teacher's final hidden states (M, hidden), and the (M, V)
    teacher logits are never held whole: (M, hidden) instead of (M, V), V / hidden = 85x less for
    SmolLM2-135M (49152 / 576), 7.8x for Llama-2-7B (32000 / 4096).
    """
    return nlu_consistency_loss(teacher_logits, student_logits, temperature, teacher_head)


def nlg_diversity_loss(logits, top_k):
    """
    Eq. 10-11: L_DR = (1/M) * sum_i sum_{v in top-K(i)} P'(v) log P'(v), logits (M, V),

    with P'(v) = P(v) / sum_{v' in top-K(i)} P(v'), the distribution renormalized over the K most
    likely tokens of row i: minus the mean entropy within the top-K set. The top-K set is piecewise
    constant in the logits; gradients flow through the K selected logits.
    """
    _check_matrix("nlg_diversity_loss", logits)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    num_tokens, vocab_size = logits.shape
    if num_tokens == 0:
        return _zero_loss(logits)
    # the K largest logits of each row (M, K); softmax is monotone, so these are the top-K tokens
    top_logits = logits.topk(min(top_k, vocab_size), dim=-1).values.to(_float32_or_wider(logits.dtype))
    # Eq. 11: renormalizing P over the set is a softmax over the selected logits alone
    log_p = F.log_softmax(top_logits, dim=-1)
    # Eq. 10: sum P' log P' (negative entropy), averaged over the M tokens
    return (log_p.exp() * log_p).sum() / num_tokens


def nlg_svd_loss(logits, k, oversample=5, niter=2, generator=None):
    """
    Eq. 12: L_SVDR = - sum_{i<=k} sigma~_i / ||Z||_F, Z (M, V) the valid-token logits,

    sigma~ the singular values from a randomized range finder (Halko et al. 2011, Alg. 4.4):
    a Gaussian sketch of l = k + oversample columns and `niter` power iterations, re-orthonormalized
    by QR, give an orthonormal basis Q (M, l) of the dominant column space; the exact singular values
    of the small (l, V) projection Q^T Z approximate the top singular values of Z. Cost O(M V l) per
    product. Defaults (oversample 5, niter 2) are the official code's. `generator` seeds the sketch
    (else the global RNG). Computed in float32 (float64 for float64 input).

    Gradients flow through sigma~ = singular values of Q^T Z, with the basis Q held constant. Ky Fan:
    sum_{i<=k} sigma_i(Z) = max over orthonormal Q of sum_{i<=k} sigma_i(Q^T Z), so once Q spans the
    top-k left singular vectors the gradient through Q vanishes (envelope theorem) and this is the
    gradient of the exact top-k sum; when l >= rank(Z) it is exact. Holding Q constant also avoids
    QR's undefined gradient for rank-deficient sketches (fewer than l distinct rows) and costs one
    (M, V) product in backward instead of 2 * niter + 2. (The official code, through torch.svd_lowrank,
    differentiates the range finder too.) -1 when k >= min(M, V); 0 for M = 0 or Z = 0.
    """
    _check_matrix("nlg_svd_loss", logits)
    if k < 1:
        raise ValueError(f"svd k must be >= 1, got {k}")
    if logits.numel() == 0:
        return _zero_loss(logits)
    z = logits.to(_float32_or_wider(logits.dtype))
    k = min(k, *z.shape)
    Q = _range_basis(z, k, oversample, niter, generator)
    # singular values of the (l, V) projection B = Q^T Z approximate the top singular values of Z
    sigma_sum = _top_singular_sum((Q.T @ z).to(torch.float64), k)
    # normalize by the Frobenius norm (= sqrt of the sum of all sigma^2) instead of the full spectrum;
    # the clamp only matters for Z = 0, where the ratio is 0 / 0
    frobenius = torch.linalg.vector_norm(z).clamp_min(torch.finfo(z.dtype).tiny)
    return -sigma_sum.to(z.dtype) / frobenius


@torch.no_grad()
def _range_basis(z, k, oversample, niter, generator):
    """Halko et al. Alg. 4.4: an orthonormal basis Q (M, l), l = k + oversample, of Z's dominant range."""
    num_tokens, vocab_size = z.shape
    sketch_size = min(k + oversample, num_tokens, vocab_size)
    # Gaussian test matrix (V, l); Y = Z Omega samples the range of Z
    omega = torch.randn(vocab_size, sketch_size, generator=generator, device=z.device, dtype=z.dtype)
    Q = torch.linalg.qr(z @ omega).Q  # (M, l) orthonormal basis of the sampled range
    # power iterations (Z Z^T)^q Z Omega sharpen the basis towards the top singular vectors;
    # QR after every product keeps it well conditioned in floating point
    for _ in range(niter):
        Q = torch.linalg.qr(z.T @ Q).Q  # (V, l)
        Q = torch.linalg.qr(z @ Q).Q  # (M, l)
    return Q


def _top_singular_sum(projection, k):
    """
    Sum of the k largest singular values of the (l, V) float64 projection B = Q^T Z, as the square
    roots of the eigenvalues of the l x l Gram matrix B B^T: an eigensolve of a 15 x 15 matrix instead
    of an SVD of a 15 x 32000 one (~10x faster forward + backward), and eigvalsh's gradient
    U diag(g) U^T has no 1 / (sigma_i - sigma_j) terms. float64 so that squaring costs no precision
    on the smaller sigma.
    """
    eigenvalues = torch.linalg.eigvalsh(projection @ projection.T).flip(-1)[:k]  # descending
    # sigma = sqrt(lambda) for lambda > 0, else 0 with a zero (not infinite) gradient: rank(Z) < k
    positive = eigenvalues > 0
    return (torch.where(positive, eigenvalues, 1.0).sqrt() * positive).sum()


def nlg_objective(task_loss, student_logits, teacher_logits, lambdas, temperature, svd_k, top_k, generator=None,
                  teacher_head=None):
    """
    Eq. 13: L_NLG = L_task + lambda1 L_CR (Eq. 9) + lambda2 L_DR (Eq. 10) + lambda3 L_SVDR (Eq. 12).

    Logits are those of the M valid tokens, (M, V). Returns (total, components) as nlu_objective.
    With `teacher_head`, `teacher_logits` is the teacher's (M, hidden) final hidden states (see
    nlg_consistency_loss).
    """
    _require_teacher(teacher_logits, lambdas)
    return _objective(task_loss, lambdas, {
        "consistency": lambda: nlg_consistency_loss(teacher_logits, student_logits, temperature, teacher_head),
        "diversity": lambda: nlg_diversity_loss(student_logits, top_k),
        "svd": lambda: nlg_svd_loss(student_logits, svd_k, generator=generator),
    })


class NLGObjectiveFused(torch.autograd.Function):
    """
    Eq. 13 with the task cross-entropy on the (M, V) logits, whose gradient is computed in forward
    into ONE (M, V) tensor: that tensor is all that is kept for backward.

    Why: as separate autograd terms, the backward of Eq. 13 holds at once the cross-entropy's saved
    log-probabilities and its two (M, V) gradients, each regularizer's (M, V) gradient before autograd
    adds it to the others, and the logits the regularizers saved, while all of the model's activations
    are alive: the peak of the step. Here the buffer is filled term by term, in place:
      - Eq. 12 (not a sum over rows), with B = Q^T Z and Q constant as in nlg_svd_loss:
        d/dZ [-S(B) / ||Z||_F] = -Q (dS/dB) / ||Z||_F + S Z / ||Z||_F^3, one matmul into the buffer
        and one in-place multiply-add (autograd would hold both (M, V) terms before summing them);
      - the task term, Eq. 9 and Eq. 10 are sums over rows, so they run a chunk of rows at a time
        (temporaries are chunk sized) and add the chunk's gradient into the buffer's rows: the task
        cross-entropy and Eq. 10 by the very functions of the unfused path under autograd; Eq. 9 by
        TemperedKL's two formulas at once (its forward's _tempered_kl_rows, then P_F - P_P), so that each
        chunk of teacher logits (from the teacher's hidden states through `teacher_head`, or given) is
        formed once, not once per direction.
    Outputs (total, values), values = (task cross-entropy sum, L_CR, L_DR, L_SVDR), 0 where not computed.
    """

    @staticmethod
    def forward(ctx, student_logits, targets, task_scale, teacher, teacher_head, lambdas, temperature, svd_k,
                top_k, generator):
        z = student_logits.to(_float32_or_wider(student_logits.dtype))
        num_rows = z.size(0)
        values = torch.zeros(4, dtype=z.dtype, device=z.device)  # task sum, consistency, diversity, svd
        grad = None
        if lambdas[2] != 0 and z.numel() > 0:
            k = min(svd_k, *z.shape)
            Q = _range_basis(z, k, 5, 2, generator)  # nlg_svd_loss's oversample and niter
            projection = (Q.T @ z).to(torch.float64).requires_grad_()
            with torch.enable_grad():
                sigma_sum = _top_singular_sum(projection, k)
                (d_sigma_sum,) = torch.autograd.grad(sigma_sum, projection)
            sigma_sum, projection = sigma_sum.detach().to(z.dtype), None  # (l, V) float64: free it now
            frobenius = torch.linalg.vector_norm(z).clamp_min(torch.finfo(z.dtype).tiny)
            values[3] = -sigma_sum / frobenius
            grad = Q @ d_sigma_sum.to(z.dtype)  # (M, V): the buffer itself
            del d_sigma_sum  # (l, V) float64 too: gone before the chunk loop's temporaries come
            grad.mul_(-lambdas[2] / frobenius).addcmul_(z, lambdas[2] * sigma_sum / frobenius**3)
        if grad is None:
            grad = torch.zeros_like(z)
        rows_terms = targets is not None or lambdas[0] != 0 or lambdas[1] != 0
        offset = 0
        for z_rows, grad_rows in (_row_chunks(z, grad, chunk_elements=_FUSED_CHUNK_ELEMENTS)
                                  if rows_terms and num_rows > 0 else ()):
            chunk = slice(offset, offset + z_rows.size(0))
            offset = chunk.stop
            if lambdas[0] != 0:  # Eq. 9: T^2 / M * sum of the rows' KL, gradient T / M * (P_F - P_P)
                kl_sum, p_teacher, scaled_student = _tempered_kl_rows(teacher[chunk], teacher_head, z_rows,
                                                                      temperature, z.dtype)
                values[1] += temperature**2 / num_rows * kl_sum
                p_student = F.softmax(scaled_student, dim=-1)
                del scaled_student
                grad_rows += p_student.sub_(p_teacher).mul_(lambdas[0] * temperature / num_rows)
                del p_student, p_teacher  # free the chunk's temporaries before the next term's
            # the task term and Eq. 10, one autograd pass each, so that their temporaries never coexist
            for term in ("task", "diversity"):
                if (term == "task" and targets is None) or (term == "diversity" and lambdas[1] == 0):
                    continue
                leaf = z_rows.detach().requires_grad_()
                with torch.enable_grad():
                    if term == "task":
                        task_sum = F.cross_entropy(leaf, targets[chunk], ignore_index=-100, reduction="sum")
                        values[0] += task_sum.detach()
                        weighted = task_scale * task_sum
                    else:
                        diversity = leaf.size(0) / num_rows * nlg_diversity_loss(leaf, top_k)  # its part of the mean
                        values[2] += diversity.detach()
                        weighted = lambdas[1] * diversity
                    (grad_chunk,) = torch.autograd.grad(weighted, leaf)
                grad_rows += grad_chunk
                del grad_chunk
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(values)
        total = values[1:] @ torch.tensor(lambdas, dtype=z.dtype, device=z.device)
        if targets is not None:
            total = total + task_scale * values[0]
        return total, values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total,) + (None,) * 9


def nlg_objective_fused(student_logits, targets, task_scale, teacher_logits, lambdas, temperature, svd_k, top_k,
                        generator=None, teacher_head=None):
    """
    Eq. 13 as nlg_objective, with the task term computed here too: L_task = task_scale * sum_i CE(z_i, y_i)
    over the rows whose target y_i is not -100 (targets (M,), or None for no task term). Values and
    gradients are those of F.cross_entropy(reduction="sum") + nlg_objective (tests pin them), at the
    memory of one (M, V) gradient (NLGObjectiveFused). teacher_logits / teacher_head as nlg_objective.
    Returns (total, components): "task_sum" (the cross-entropy sum), "task" (scaled) and each
    regularizer computed, detached.
    """
    _check_matrix("nlg_objective_fused", student_logits)
    if len(lambdas) != 3:
        raise ValueError(f"lambdas must be (lambda1, lambda2, lambda3), got {lambdas!r}")
    _require_teacher(teacher_logits, lambdas)
    if targets is not None and targets.shape != student_logits.shape[:1]:
        raise ValueError(f"nlg_objective_fused: targets {tuple(targets.shape)} for {student_logits.size(0)} logit rows")
    if lambdas[0] != 0:
        if (teacher_head is None and teacher_logits.shape != student_logits.shape) or (
                teacher_head is not None and teacher_logits.size(0) != student_logits.size(0)):
            raise ValueError(f"nlg_objective_fused: teacher {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} do not match")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        teacher_logits = teacher_logits.detach()
    if lambdas[1] != 0 and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if lambdas[2] != 0 and svd_k < 1:
        raise ValueError(f"svd k must be >= 1, got {svd_k}")
    total, values = NLGObjectiveFused.apply(student_logits, targets, task_scale, teacher_logits, teacher_head,
                                            tuple(float(w) for w in lambdas), temperature, svd_k, top_k, generator)
    components = {}
    if targets is not None:
        components.update(task_sum=values[0], task=task_scale * values[0])
    for index, (name, weight) in enumerate(zip(("consistency", "diversity", "svd"), lambdas)):
        if weight != 0:
            components[name] = values[index + 1]
    return total, components


# -----------------------------------------------------------------------------
# Schedules of the regularization weights (App. B.4)


def scheduled_lambdas(step, total_steps, lambdas, lambda1_schedule="cosine", focus_schedule="two_phase",
                      warmup_ratio=0.2, rampup_ratio=0.05):
    """
    (lambda1, lambda2, lambda3) at optimizer step `step` (0 for the first update) of `total_steps`,
    as in the official code:

      lambda1_schedule="cosine": lambda1 decays from lambda1 to 0.1 * lambda1,
          l1 = 0.1 L1 + (L1 - 0.1 L1) * 0.5 * (1 + cos(pi * step / total_steps))
      focus_schedule="two_phase": lambda2, lambda3 are off, then ramp up linearly, then stay,
          warmup = int(warmup_ratio * total_steps), ramp = max(int(rampup_ratio * total_steps), 1)
          f = 0 if step < warmup;  (step - warmup) / ramp if step < warmup + ramp;  else 1
          l2, l3 = f * L2, f * L3
      "constant" (or None) for either keeps the given values.
    """
    lambda1, lambda2, lambda3 = lambdas
    total_steps = max(total_steps, 1)
    if lambda1_schedule == "cosine":
        final = 0.1 * lambda1
        lambda1 = final + (lambda1 - final) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    elif lambda1_schedule not in ("constant", None):
        raise ValueError(f"lambda1_schedule must be 'cosine' or 'constant', got {lambda1_schedule!r}")
    if focus_schedule == "two_phase":
        warmup = int(warmup_ratio * total_steps)
        ramp = max(int(rampup_ratio * total_steps), 1)
        if step < warmup:
            focus = 0.0
        elif step < warmup + ramp:
            focus = (step - warmup) / ramp
        else:
            focus = 1.0
        lambda2, lambda3 = focus * lambda2, focus * lambda3
    elif focus_schedule not in ("constant", None):
        raise ValueError(f"focus_schedule must be 'two_phase' or 'constant', got {focus_schedule!r}")
    return lambda1, lambda2, lambda3


# -----------------------------------------------------------------------------
# Adapters as files: merge, save / load, export to peft


def _require_lora(model, caller):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRALinear layers (call add_lora first)")
    return layers


def merge_lora(model):
    """
    Replace each LoRALinear by its base nn.Linear (an NF4 base: dequantized) with weight W_res + s B A
    (DoRA: m V / ||V||_c), summed in the adapter dtype and cast to the model dtype.
    """
    for name, layer in _require_lora(model, "merge_lora"):
        base = layer.base if isinstance(layer.base, nn.Linear) else layer.base.dequantized_linear()
        with torch.no_grad():
            base.weight.copy_(layer.merged_weight().to(base.weight.dtype))
        _set_submodule(model, name, base)
    return model


def trainable_state_dict(model):
    """{name: tensor} of every parameter with requires_grad (adapters and `trainable` modules)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _trainable_modules(model):
    """Names of the modules owning trainable parameters other than LoRA / DoRA ones (add_lora's `trainable`)."""
    names = []
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if p.requires_grad and leaf not in ("lora_A", "lora_B", "lora_magnitude_vector") and owner not in names:
            names.append(owner)
    return names


def _uniform(layers, attribute):
    values = {getattr(layer, attribute) for _, layer in layers}
    if len(values) != 1:
        raise ValueError(f"LoRA layers differ in {attribute}: {sorted(values)}")
    return values.pop()


CONFIG_NAME, WEIGHTS_NAME = "balora_config.json", "balora_adapter.safetensors"


def save_adapter(model, directory, training=None):
    """
    Write balora_config.json (r, alpha, init, dropout, targets, trainable, dora, quantize, and `training`: a dict of
    the run's settings its users need, e.g. train_nlu.py's task and max_length) and
    balora_adapter.safetensors (lora_A, lora_B, lora_A0, lora_B0, DoRA's lora_magnitude_vector and the
    trainable modules' params).
    Keeping A0, B0 lets load_adapter rebuild W_res = W - s B0 A0 from the original weights, even when
    PiSSA used a randomized SVD that cannot be recomputed.
    """
    from safetensors.torch import save_file

    layers = _require_lora(model, "save_adapter")
    config = dict(
        r=_uniform(layers, "r"), alpha=_uniform(layers, "alpha"), init=_uniform(layers, "init"),
        dropout=_uniform(layers, "dropout_p"), targets=[name for name, _ in layers],
        trainable=_trainable_modules(model), dora=_uniform(layers, "dora"), quantize=_uniform(layers, "quantize"),
        **({"training": training} if training else {}),
    )
    tensors = dict(trainable_state_dict(model))
    for name, layer in layers:
        if layer.lora_A0 is not None:
            tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"] = layer.lora_A0, layer.lora_B0
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


_ADAPTER_CONFIG_KEYS = ("r", "alpha", "init", "dropout", "targets", "trainable")


def adapter_problems(model, config, tensors):
    """
    What keeps an adapter (its balora_config.json dict and tensors) from fitting `model`, as a list of
    strings (empty: it fits): targets that are not linear layers of the model, missing or unexpected
    tensors, shapes other than lora_A (r, in) / lora_B (out, r) / the trainable modules' own, and
    tensors holding NaN or inf. Checked before the model is touched.
    """
    problems, expected = [], {}
    modules = dict(model.named_modules())
    for name in config["targets"]:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            problems.append(f"target {name!r} is not a linear layer of the model")
            continue
        factors = ("lora_A", "lora_B") + (("lora_A0", "lora_B0") if config["init"] == "pissa" else ())
        for factor in factors:
            expected[f"{name}.{factor}"] = ((config["r"], layer.in_features) if factor.startswith("lora_A")
                                            else (layer.out_features, config["r"]))
        if config.get("dora", False):  # adapters saved before DoRA existed have no "dora" key
            expected[f"{name}.lora_magnitude_vector"] = (layer.out_features,)
    for module_name in config["trainable"]:
        if module_name not in modules:
            problems.append(f"trainable module {module_name!r} is not in the model")
            continue
        for param_name, p in modules[module_name].named_parameters():
            expected[f"{module_name}.{param_name}"] = tuple(p.shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    problems += [f"{key} has shape {tuple(tensors[key].shape)}, expected {expected[key]}"
                 for key in sorted(set(expected) & set(tensors)) if tuple(tensors[key].shape) != expected[key]]
    problems += [f"{key} holds NaN/inf" for key, t in sorted(tensors.items())
                 if t.is_floating_point() and not all_finite(t)]
    return problems


def load_adapter(model, directory):
    """
    Apply a save_adapter() directory to a model holding the ORIGINAL base weights: check that it fits
    (adapter_problems: one ValueError listing everything wrong, before the model is changed), wrap the
    saved targets, rebuild PiSSA residuals from the saved A0, B0, then load every saved tensor.
    """
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapter: no {os.path.basename(path)} in {directory!r} (a save_adapter directory?)")
    with open(config_path) as f:
        config = json.load(f)
    missing_keys = [key for key in _ADAPTER_CONFIG_KEYS if key not in config]
    if missing_keys:
        raise ValueError(f"load_adapter: {config_path} lacks the keys {missing_keys}")
    tensors = load_file(weights_path)
    problems = adapter_problems(model, config, tensors)
    if problems:
        raise ValueError(f"load_adapter: {directory} does not fit the model: " + "; ".join(problems))
    # init="lora" wraps the layers without an SVD; PiSSA layers then start from their saved factors
    add_lora(model, config["targets"], config["r"], config["alpha"], init="lora",
             dropout=config["dropout"], trainable=config["trainable"], dora=config.get("dora", False))
    if config["init"] == "pissa":
        for name, layer in lora_layers(model):
            layer.start_from(tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"])
    # a 4-bit adapter was trained on the NF4 codes of W_res: rebuilt from the same W_res, they are the same
    quantize_base(model, config.get("quantize", "none"))
    model.load_state_dict(tensors, strict=False)  # every key was checked by adapter_problems
    return model


def export_peft(model, out_dir, base_model_name_or_path, task_type=None, hf_name=None, modules_to_save=None):
    """
    Write adapter_config.json + adapter_model.safetensors in peft's LoRA format, to be applied to the
    ORIGINAL base weights with peft.PeftModel.from_pretrained, or with task_type ("CAUSAL_LM",
    "SEQ_CLS") by peft's AutoPeftModelFor... classes, which load the base from
    base_model_name_or_path (a local directory is written as its absolute path, so it resolves from
    anywhere).

    A LoRA adapter is exported as is. A PiSSA adapter changed W by
        Delta W = s (B A - B0 A0) = s [B, -B0] @ [A; A0],
    a rank-2r LoRA (peft's own PiSSA-to-LoRA conversion). It is exported with r' = 2r and
    alpha' = 2 alpha (an int when it is whole, as peft writes it), so peft's scaling alpha'/r' equals s.
    Trainable non-LoRA modules (e.g. the classifier) go to peft's modules_to_save.

    DoRA (use_dora: true) adds each layer's magnitude m as `lora_magnitude_vector`. peft normalizes
    V = W + s' B' A', which for the rank-2r PiSSA export is W + s (B A - B0 A0) = W_res + s B A, our V:
    the same m and direction, so DoRA on a PiSSA init exports the same way.

    On a 4-bit base the adapter was trained against Q(W_res), but peft applies it to the weights it
    loads: on the full-precision W it computes W + s (B A - B0 A0) = W_res + s B A, which differs from
    the trained model by the quantization error W_res - Q(W_res); merge_lora (or load_adapter, which
    re-quantizes) reproduces the trained model exactly.

    hf_name maps one of our parameter names (module.leaf) to the base checkpoint's, for a model whose
    modules carry other names than its checkpoint (RoBERTa in the encoder's: model.roberta_hf_key);
    modules_to_save replaces the list of trainable modules' names peft is given (default: their names).
    """
    from safetensors.torch import save_file

    hf_name = hf_name or (lambda name: name)

    def hf_module(module):  # the module's name in the checkpoint: map module.weight, drop .weight
        return hf_name(module + ".weight")[: -len(".weight")]

    layers = _require_lora(model, "export_peft")
    r, alpha, init = _uniform(layers, "r"), _uniform(layers, "alpha"), _uniform(layers, "init")
    tensors = {}
    for name, layer in layers:
        lora_A, lora_B = layer.lora_A.detach(), layer.lora_B.detach()
        if init == "pissa":
            lora_A = torch.cat([lora_A, layer.lora_A0], dim=0)  # (2r, in)
            lora_B = torch.cat([lora_B, -layer.lora_B0], dim=1)  # (out, 2r)
        tensors[f"base_model.model.{hf_module(name)}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{hf_module(name)}.lora_B.weight"] = lora_B
        if layer.dora:
            tensors[f"base_model.model.{hf_module(name)}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    trainable_modules = _trainable_modules(model)
    for module_name in trainable_modules:
        for param_name, p in model.get_submodule(module_name).named_parameters():
            tensors[f"base_model.model.{hf_name(f'{module_name}.{param_name}')}"] = p.detach()
    modules_to_save = trainable_modules if modules_to_save is None else modules_to_save
    rank_factor = 2 if init == "pissa" else 1
    lora_alpha = rank_factor * alpha
    if os.path.isdir(base_model_name_or_path):
        base_model_name_or_path = os.path.realpath(base_model_name_or_path)
    config = dict(
        peft_type="LORA", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
        r=rank_factor * r, lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
        lora_dropout=_uniform(layers, "dropout_p"),
        target_modules=[hf_module(name) for name, _ in layers], modules_to_save=modules_to_save or None,
        init_lora_weights=True, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=_uniform(layers, "dora"),
        inference_mode=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
