"""
BA-LoRA (Bias-Alleviating Low-Rank Adaptation, ICLR 2026), the method, in the order of the paper:

  Eq. 1-3   LoRALinear: LoRA, started at W's principal singular components for PiSSA (init="pissa").
  Table 10  DoRALinear: DoRA, the third adapter the regularizers are shown on.
  Sec. 2.2  the teacher: pretrained_mode(model) makes the adapted model compute the pretrained one.
  Eq. 4-8   NLU: consistency, diversity and SVD regularizers on (N, D) logits, and their objective.
  Eq. 9-13  NLG: the same three on the (M, V) logits of the valid tokens, and their objective.
  App. B.4  scheduled_lambdas: the schedules of lambda1 (cosine) and lambda2, lambda3 (two-phase focus).

Each equation is one plain differentiable function here, and the trainers run these very functions.
The machinery lives beside the method: nf4.py (the 4-bit base of QLoRA / QBA-LoRA), chunked.py (the
memory-saving schedule of Eq. 13 that train_nlg.py runs: these functions, a chunk of rows at a time,
gradients by autograd), adapters.py (merge, save / load, peft export), training.py (what both
trainers share: methods, optimizer, checkpoints, logs, settings).

Notation. The paper writes a linear layer as Y = X (W + A B) with W in R^{m x n} (m inputs, n outputs),
A in R^{m x r} and B in R^{r x n}. PyTorch's nn.Linear stores the transpose, weight = W^T of shape
(out, in), and computes y = x @ weight.T. We keep peft's names and layout:
    lora_A = A^T  (r x in),   lora_B = B^T  (out x r),   scaling s = alpha / r,
    y = base(x) + s * lora_B @ lora_A @ x,   i.e. the effective weight is W_res + s * lora_B @ lora_A.

The teacher (our departure from the official code, llm172/BA-LoRA train.py at commit 2829797). The
consistency terms (Eq. 4, 9) need the logits of the pretrained model. The official code keeps a second
full copy of the model for that (its `pt_model`) (BA-LoRA's
overhead over PiSSA is +10.75 GB on LLaMA-2-7B, Table 5). We do not: every LoRALinear keeps its initial
factors (lora_A0, lora_B0) as buffers, and `pretrained_mode(model)` swaps them in for the trained ones.
Because PiSSA builds the frozen weight as W_res = W - s * B0 @ A0, the layer then computes
W_res + s * B0 @ A0 = W (exactly, up to float rounding): the original pretrained function. With
init="lora", B0 = 0 and the teacher simply skips the adapter, so nothing is stored. Extra memory: one
copy of the adapter factors, never of the model. Modules left fully trainable (e.g. the classification
head) are shared by teacher and student, as in the paper's NLU setup (App. B.3, B.4).

Dtypes. The frozen base keeps the model dtype (e.g. bfloat16); the adapter factors are float32 (float64
on a float64 base), like peft's `autocast_adapter_dtype`. PiSSA's SVD and every merge run in float32.
The regularizers compute in float32 when given bf16/fp16 logits.
"""

import math
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


# init -> the function giving the initial factors (lora_A0, lora_B0) of a layer from its weight W^T, its
# rank r and scaling s. "lora" is not here: it starts at B = 0 and needs no W (add an init: a function
# and a line here; LoRALinear moves s * B0 @ A0 out of W and the teacher, files and peft export follow)
INITS = {"pissa": pissa_factors}


class LoRALinear(nn.Module):
    """
    y = base(x) + scaling * lora_B @ lora_A @ dropout(x),   scaling = alpha / r.

    base: the frozen nn.Linear, holding W (init="lora") or the PiSSA residual W_res (Eq. 3).
    lora_A (r x in), lora_B (out x r): trainable. init="lora": A Kaiming-uniform (a=sqrt(5), as
    peft), B = 0. Any init of INITS (init="pissa": principal singular factors of W, Eq. 1-2, exact SVD
    or randomized with `pissa_niter` iterations) starts at its factors and keeps them as the buffers
    lora_A0, lora_B0 (None for init="lora"), which the teacher and the adapter files use.
    `init` is stored as given: it is what save_adapter records and load_adapter restores.
    """

    def __init__(self, base, r, alpha, dropout=0.0, init="lora", pissa_niter=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if init != "lora" and init not in INITS:
            raise ValueError(f"init must be one of {['lora', *INITS]}, got {init!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.init = r, alpha, alpha / r, init
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
            self.start_from(*INITS[init](weight, r, self.scaling, niter=pissa_niter))


    @property
    def dropout_p(self):
        return self.dropout.p

    @property
    def dora(self):
        return isinstance(self, DoRALinear)

    @property
    def quantize(self):
        """The base's storage: "none", or "nf4" / "nf4-dq" for an nf4.NF4Linear base (nf4.QUANTIZE's names)."""
        return getattr(self.base, "quantize", "none")

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
        if self.pretrained and getattr(self.base, "teacher_weight", None) is not None:
            # a 4-bit base that keeps its pretrained W for the teacher (nf4.py, --teacher full): the original layer
            return F.linear(x, self.base.teacher_weight, self.base.bias)
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
        """The frozen weight W_res (out x in) the base computes with (an NF4 base: dequantized)."""
        return self.base.dequantize() if hasattr(self.base, "dequantize") else self.base.weight

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
# Adapting a model: every targeted nn.Linear becomes a LoRALinear

NEVER_ADAPTED = ("lm_head", "classifier")  # output layers stay dense, as peft's "all-linear"


def _name_matches(name, patterns):
    """peft's suffix rule: 'q_proj' matches 'model.layers.0.self_attn.q_proj'."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def set_submodule(model, name, module):
    """Put `module` at the qualified `name` of `model` ('layers.0.mlp.up_proj')."""
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
    A tensor on the meta device (shapes only: a model sized before it is loaded) has no entry to check.
    """
    return tensor.numel() == 0 or tensor.is_meta or all(torch.isfinite(extreme) for extreme in torch.aminmax(tensor))


def lora_layers(model):
    """[(qualified name, LoRALinear)] of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, target_modules, r, alpha, init="pissa", dropout=0.0, pissa_niter=None, trainable=(), dora=False):
    """
    Replace every nn.Linear whose qualified name ends with one of `target_modules` ("all-linear": every
    nn.Linear) by a LoRALinear (a DoRALinear with dora=True), never lm_head / classifier or a module
    inside `trainable`. Freeze all other parameters except those of the modules named in `trainable`
    (e.g. ("classifier", "pooler")). Returns dict(trainable=#params, total=#params, replaced=[names]).
    (A 4-bit base comes after this: nf4.quantize_base, so that QPiSSA quantizes W_res.)
    """
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
        and name.rpartition(".")[2] not in NEVER_ADAPTED
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
    for name in tqdm(targets, desc=f"add_lora ({init})", disable=init == "lora"):
        set_submodule(model, name, layer_class(model.get_submodule(name), r, alpha, dropout, init, pissa_niter))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"add_lora: {len(targets)} layers, trainable {n_trainable:,} / {n_total:,} params "
          f"({100 * n_trainable / n_total:.2f}%)")
    return dict(trainable=n_trainable, total=n_total, replaced=targets)


# -----------------------------------------------------------------------------
# The teacher (Eq. 4, 9): the pretrained model, recovered from the adapted one


@contextmanager
def pretrained_mode(model):
    """
    Inside, the adapted model computes the original pretrained function (the teacher of Eq. 4, 9):
    each LoRALinear uses its initial factors (W_res + s B0 A0 = W, or base alone for init="lora"),
    and the model is in eval mode, like the official code's frozen teacher (`pt_model.eval()`, train.py at
    commit 2829797). Training flags are restored on exit. Use under torch.no_grad(). On a 4-bit base
    the teacher is the quantized model, or with --teacher full the pretrained weights the base keeps
    (nf4.py).
    """
    # every layer with a pretrained mode: the LoRALinear layers, the 4-bit layers outside them (nf4.NF4Linear),
    # and the baselines' (baselines.py: bottleneck adapters, the frozen copy of Full FT and BitFit)
    layers = [m for m in model.modules() if hasattr(m, "pretrained")]
    if not layers:
        raise ValueError("pretrained_mode: the model has no adapted layers (call add_lora first)")
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


def _as_float(logits):
    """bf16 / fp16 logits in float32 (the losses need the precision); float32 and float64 as they are."""
    return logits.to(_float32_or_wider(logits.dtype))


def _zero_loss(logits):
    """0, still connected to the graph: backward works and gives zero gradients."""
    return _as_float(logits).sum() * 0.0


def nlu_consistency_loss(teacher_logits, student_logits, temperature):
    """
    Eq. 4: L_CR = T^2 * KL(softmax(Z_P / T) || softmax(Z_F / T)), Z_P, Z_F (N, D).

    The KL is summed over the D classes and averaged over the N rows ("batchmean"). The teacher Z_P is
    a constant (detached). T^2 keeps the gradient's scale that of the task loss (Hinton et al. 2015).
    """
    _check_matrix("consistency loss", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"consistency loss: teacher logits {tuple(teacher_logits.shape)} and student "
                         f"logits {tuple(student_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.size(0) == 0:
        return _zero_loss(student_logits)
    log_p_teacher = F.log_softmax(_as_float(teacher_logits.detach()) / temperature, dim=-1)
    log_p_student = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    # kl_div(input=log q, target=log p) = sum p (log p - log q); log_target: both as log-probabilities
    return temperature**2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


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
    z = _as_float(logits)
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
    sigma = torch.linalg.svdvals(_as_float(logits))
    # share of the spectral energy in the top k; the clamp only matters for Z = 0, where the ratio is 0/0
    return -sigma[:k].sum() / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny)


# The regularizers of Eq. 8 and Eq. 13 by name, in the order of their weights lambda1, lambda2, ...
# The objectives below return each term under its name; the trainers log and plot whatever they return.
REGULARIZERS = ("consistency", "diversity", "svd")


def weighted_sum(task_loss, lambdas, terms):
    """
    task_loss + sum_i lambda_i * L_i over `terms` ({name: function computing L_i}, in REGULARIZERS'
    order). A term whose lambda is 0 is not computed. Returns (total, {"task": ..., name: L_i}), detached.
    """
    if len(lambdas) != len(terms):
        raise ValueError(f"lambdas must be {len(terms)} weights, one per term {list(terms)}, got {lambdas!r}")
    total, components = task_loss, {"task": task_loss.detach()}
    for (name, term), weight in zip(terms.items(), lambdas):
        if weight == 0:
            continue
        value = term()
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
    return weighted_sum(task_loss, lambdas, {
        "consistency": lambda: nlu_consistency_loss(teacher_logits, student_logits, temperature),
        "diversity": lambda: nlu_diversity_loss(student_logits),
        "svd": lambda: nlu_svd_loss(student_logits, svd_k),
    })


def nlu_regression_objective(task_loss, student_logits, teacher_logits, lambda1):
    """
    Eq. 8 for a regression task (STS-B, D = 1), where Eq. 4-7 degenerate: a softmax over one logit is
    constantly 1 (KL 0), the 1x1 covariance has no off-diagonal entry (Eq. 5 is 0) and top-1 over all
    singular values of an N x 1 matrix is 1 (Eq. 7 is -1). Our departure (the paper does not say):
    consistency becomes the KL between the unit-variance Gaussians centred on the teacher's and the
    student's score, 1/2 mean((z_F - z_P)^2); diversity and SVD are left out (constants, zero gradient).
    """
    return weighted_sum(task_loss, (lambda1,), {
        "consistency": lambda: 0.5 * (_as_float(student_logits) - _as_float(teacher_logits.detach())).pow(2).mean(),
    })


# -----------------------------------------------------------------------------
# Regularizers for NLG (Eq. 9-13): logits of the M valid (non-padded) tokens, (M, V)


def nlg_consistency_loss(teacher_logits, student_logits, temperature):
    """
    Eq. 9: L_CR = T^2 * (1/M) * sum_i KL(P_P(. | x, i; T) || P_F(. | x, i; T)), logits (M, V).

    This is Eq. 4 with one row per valid token and the vocabulary as classes, so it is Eq. 4's function.
    (chunked.py runs it on chunks of rows, with the teacher's rows formed from its hidden states there.)
    """
    return nlu_consistency_loss(teacher_logits, student_logits, temperature)


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
    top_logits = _as_float(logits.topk(min(top_k, vocab_size), dim=-1).values)
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
    product. Defaults (oversample 5, niter 2) are the official code's (llm172/BA-LoRA train.py at commit
    2829797, `_randomized_topk_singular_values`: q = k + 5, niter=2). `generator` seeds the sketch
    (else the global RNG). Computed in float32 (float64 for float64 input).

    Gradients flow through sigma~ = singular values of Q^T Z, with the basis Q held constant. Ky Fan:
    sum_{i<=k} sigma_i(Z) = max over orthonormal Q of sum_{i<=k} sigma_i(Q^T Z), so once Q spans the
    top-k left singular vectors the gradient through Q vanishes (envelope theorem) and this is the
    gradient of the exact top-k sum; when l >= rank(Z) it is exact. Holding Q constant also avoids
    QR's undefined gradient for rank-deficient sketches (fewer than l distinct rows) and costs one
    (M, V) product in backward instead of 2 * niter + 2. (The official code, train.py at 2829797, through
    torch.svd_lowrank, differentiates the range finder too.) When k >= min(M, V) the sum takes every
    singular value: -||Z||_* / ||Z||_F, as the official code's exact branch (train.py at 2829797) gives; 0 for M = 0 or Z = 0.
    """
    _check_matrix("nlg_svd_loss", logits)
    if k < 1:
        raise ValueError(f"svd k must be >= 1, got {k}")
    if logits.numel() == 0:
        return _zero_loss(logits)
    z = _as_float(logits)
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



def nlg_objective(task_loss, student_logits, teacher_logits, lambdas, temperature, svd_k, top_k, generator=None):
    """
    Eq. 13: L_NLG = L_task + lambda1 L_CR (Eq. 9) + lambda2 L_DR (Eq. 10) + lambda3 L_SVDR (Eq. 12).

    Logits are those of the M valid tokens, (M, V). Returns (total, components) as nlu_objective.
    train_nlg.py runs this function through chunked.nlg_objective_in_chunks, which saves memory on a
    large vocabulary and gets every value and gradient from here.
    """
    _require_teacher(teacher_logits, lambdas)
    return weighted_sum(task_loss, lambdas, {
        "consistency": lambda: nlg_consistency_loss(teacher_logits, student_logits, temperature),
        "diversity": lambda: nlg_diversity_loss(student_logits, top_k),
        "svd": lambda: nlg_svd_loss(student_logits, svd_k, generator=generator),
    })


# -----------------------------------------------------------------------------
# Schedules of the regularization weights (App. B.4)


def scheduled_lambdas(step, total_steps, lambdas, lambda1_schedule="cosine", focus_schedule="two_phase",
                      warmup_ratio=0.2, rampup_ratio=0.05):
    """
    (lambda1, lambda2, lambda3, ...) at optimizer step `step` (0 for the first update) of `total_steps`,
    as in the official code (llm172/BA-LoRA train.py at commit 2829797, BALoRATrainer.compute_loss):

      lambda1_schedule="cosine": lambda1 decays from lambda1 to 0.1 * lambda1,
          l1 = 0.1 L1 + (L1 - 0.1 L1) * 0.5 * (1 + cos(pi * step / total_steps))
      focus_schedule="two_phase": the other weights are off, then ramp up linearly, then stay,
          warmup = int(warmup_ratio * total_steps), ramp = max(int(rampup_ratio * total_steps), 1)
          f = 0 if step < warmup;  (step - warmup) / ramp if step < warmup + ramp;  else 1
          l2, l3 = f * L2, f * L3
      "constant" (or None) for either keeps the given values.
    """
    lambda1, *focused = lambdas
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
        focused = [focus * weight for weight in focused]
    elif focus_schedule not in ("constant", None):
        raise ValueError(f"focus_schedule must be 'two_phase' or 'constant', got {focus_schedule!r}")
    return (lambda1, *focused)
