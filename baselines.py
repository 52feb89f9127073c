"""
The baselines of Tables 1 and 2, each written from its paper beside BA-LoRA (balora.py), for running
them under one recipe (tools/baselines.py). Every method here is a variant of balora.LoRALinear
(a different start, a different layer or a different optimizer), so the teacher of BA-LoRA's
regularizers (balora.pretrained_mode), the adapter files and the peft export carry over.
"""

# --- i31a's sections above ---


import torch
import torch.nn as nn
import torch.nn.functional as F

import balora

# -----------------------------------------------------------------------------
# Inits from calibration data (LoRA-GA, CorDA): the layers are added with init="lora" (B = 0, the
# pretrained function), a few batches are run, and each layer then starts from its factors with
# LoRALinear.start_from, which moves s * B0 @ A0 out of W as PiSSA does (W_res + s B0 A0 = W): the
# teacher is the pretrained function, exactly, and the files keep A0, B0.

CALIBRATED_INITS = ("loraga", "corda-ipm", "corda-kpm")


def loraga_factors(gradient, r, stable_gamma=16):
    """
    LoRA-GA's start (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"),
    as peft 0.21.2's `lora_ga_init` computes it with its defaults (direction "ArB2r", scale "stable").

    gradient G = dL/dW (out x in), averaged over the calibration batches. With a randomized SVD
    G ~= U S V^T (torch.svd_lowrank, q = min(4r, min(out, in)), niter = 4) truncated to 2r components:
        lora_A = V[:, :r]^T                                   (r x in)
        lora_B = U[:, r:2r] diag(S[r:2r]) * out^(1/4) / sqrt(gamma)   (out x r)
    chosen (the paper's Sec. 3) so that the first update of the product B A follows the leading
    singular directions of the full fine-tuning gradient. B carries the singular values S[r:2r], as
    peft's does; the "stable" scale out^(1/4) / sqrt(gamma) does not depend on alpha / r. The caller moves s B0 A0 out of W. Returns (lora_A, lora_B) in float32.
    """
    gradient = gradient.detach().float()
    U, S, V = torch.svd_lowrank(gradient, q=min(4 * r, min(gradient.shape)), niter=4)
    lora_A = V[:, :r].T
    lora_B = U[:, r:2 * r] * S[r:2 * r]
    return lora_A.contiguous(), (lora_B * gradient.shape[0] ** 0.25 / stable_gamma ** 0.5).contiguous()


def corda_factors(weight, covariance, r, scaling, mode):
    """
    CorDA's start (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
    Models"), as peft 0.21.2's `collect_eigens_for_layer` and `corda_init` compute it.

    C (in x in) is the covariance of the layer's inputs on calibration data, damped to C' = C + d
    mean(diag C) I (d = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05). The context-oriented SVD
        W C' = U S V^T,    W = U S (C'^-1 V)^T  exactly,
    orders the directions of W (out x in) by how much they act on the inputs actually seen. The adapter
    takes r of them: mode "ipm" (instruction-previewed) the r largest, adapted to the task; "kpm"
    (knowledge-preserved) the r smallest, keeping the directions the context uses in the frozen W_res:
        lora_A = sqrt(S_r / s) (C'^-1 V_r)^T   (r x in),   lora_B = U_r sqrt(S_r / s)   (out x r),
    so s B A = U_r S_r (C'^-1 V_r)^T. Returns (lora_A, lora_B) in float32.
    """
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"corda_factors: mode must be 'ipm' or 'kpm', got {mode!r}")
    weight, covariance = weight.detach().float(), covariance.float()
    identity = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    damp = 0.01
    while True:  # the damping that makes C' safely invertible
        damped = covariance + identity * torch.diag(covariance).mean() * damp
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, identity).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = (Vh @ inverse).T  # (in x min(out, in)): W = U S V^T
    keep = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S, V = U[:, keep], S[keep] / scaling, V[:, keep]
    return (V.T * S.sqrt()[:, None]).contiguous(), (U * S.sqrt()).contiguous()


def gradient_estimate(model, losses):
    """
    dL/dW of every LoRALinear's frozen weight W (out x in), averaged over the calibration batches:
    `losses` is an iterable of zero-argument functions, each returning one batch's scalar loss (the
    trainer's task loss). The adapters start at B = 0, so the model computes the pretrained function
    and these are the full fine-tuning gradients at the start. Only the weights W get gradients.
    """
    layers = [layer for _, layer in balora.lora_layers(model)]
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for layer in layers:
        layer.base.weight.requires_grad_(True)
    count, training = 0, model.training
    model.train()  # as peft estimates them: the training-mode forward
    try:
        with torch.enable_grad():
            for loss in losses:
                loss().backward()
                count += 1
        if count == 0:
            raise ValueError("gradient_estimate: no calibration batches")
        gradients = [layer.base.weight.grad.detach() / count for layer in layers]
    finally:
        for layer in layers:
            layer.base.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    return gradients


@torch.no_grad()
def input_covariances(model, run):
    """
    C = mean over calibration calls of X^T X / max(X)^2 (in x in) for every LoRALinear, X the (tokens x
    in) input of the layer in one call and max(X) its largest (signed) entry, the scale peft's CorDA
    divides by (so that long inputs cannot overflow). `run` runs the model on the calibration data (in eval mode); a call with a
    batch of one sequence is one sample, as in peft.
    """
    layers = [layer for _, layer in balora.lora_layers(model)]
    sums, counts = [0.0] * len(layers), [0] * len(layers)

    def hook(index):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            x = x / x.max().abs()
            sums[index] = sums[index] + x.T @ x
            counts[index] += 1
        return accumulate

    handles = [layer.base.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    training = model.training
    model.eval()
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if min(counts) == 0:
        raise ValueError("input_covariances: a layer saw no calibration input")
    return [total / count for total, count in zip(sums, counts)]


def calibrate(model, init, losses):
    """
    Start every LoRALinear of `model` (added with init="lora") at the data-dependent init `init`:
    "loraga" from gradient_estimate(model, losses), "corda-ipm" / "corda-kpm" from input_covariances
    of the same batches (the forward passes alone). Each layer records `init`, so the adapter files
    say which start it took.
    """
    layers = [layer for _, layer in balora.lora_layers(model)]
    if any(layer.quantize != "none" for layer in layers):
        raise ValueError(f"calibrate: {init} takes the gradient / SVD of the full-precision W, not of a 4-bit base: "
                         "use --quantize none")
    if any(layer.lora_A0 is not None for layer in layers):
        raise ValueError(f"calibrate: the adapters already have a start ({layers[0].init}); add them with init='lora'")
    losses = list(losses)
    if init == "loraga":
        factors = [loraga_factors(g, layer.r) for g, layer in zip(gradient_estimate(model, losses), layers)]
    elif init in ("corda-ipm", "corda-kpm"):
        def run():
            for loss in losses:
                loss()
        covariances = input_covariances(model, run)
        factors = [corda_factors(layer.base.weight, c, layer.r, layer.scaling, init.split("-")[1])
                   for c, layer in zip(covariances, layers)]
    else:
        raise ValueError(f"calibrate: init must be one of {CALIBRATED_INITS}, got {init!r}")
    for layer, (lora_A, lora_B) in zip(layers, factors):
        layer.start_from(lora_A.to(layer.lora_A.dtype), lora_B.to(layer.lora_B.dtype))
        layer.init = init


# -----------------------------------------------------------------------------
# AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
# the update in SVD form P Lambda Q, kept near-orthogonal by a regularizer, and a rank budget that a
# cubic schedule lowers by zeroing the least important singular values. peft 0.21.2's SVDLinear,
# AdaLoraModel.forward (the regularizer) and RankAllocator are the reference.


class AdaLoRALinear(balora.LoRALinear):
    """
    y = base(x) + s * lora_B @ diag(lora_E) @ lora_A @ dropout(x),   s = alpha / (r + 1e-5)

    lora_A = Q (r x in, right singular vectors), lora_E = Lambda (r x 1, singular values), lora_B = P
    (out x r, left singular vectors), as peft names them. P, Q start N(0, 0.02), Lambda = 0, so the
    layer starts as the pretrained one (the teacher: base alone, as for init="lora"). peft divides
    alpha by the number of ranks it started with (its `ranknum`, + 1e-5), never by the ranks left:
    masking a singular value leaves the others' scale alone. The rank budget (RankAllocator) zeroes
    entries of lora_E; P and Q keep all r rows.
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout, init="lora")
        self.scaling = alpha / (r + 1e-5)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=self.lora_A.dtype, device=self.lora_A.device))

    def delta_weight(self):
        """s * P diag(Lambda) Q (out x in)."""
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))

    def forward(self, x):
        if self.pretrained:  # Lambda starts at 0: the pretrained layer, as LoRALinear's with B0 = 0
            return super().forward(x)
        result = self.base(x)
        x = self.dropout(x.to(self.lora_A.dtype))
        return result + (self.scaling * F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B)).to(result.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, adalora"


def add_adalora(model, target_modules, r, alpha, dropout=0.0, trainable=(), init="lora", pissa_niter=None, dora=False):
    """balora.add_lora's layers, as AdaLoRALinear (rank r = AdaLoRA's init_r). Returns add_lora's summary."""
    if init != "lora" or dora:
        raise ValueError(f"add_adalora: AdaLoRA starts at Lambda = 0 on plain layers, not init={init!r}, dora={dora}")
    summary = balora.add_lora(model, target_modules, r, alpha, init="lora", dropout=dropout, trainable=trainable)
    for name, layer in balora.lora_layers(model):
        balora.set_submodule(model, name, AdaLoRALinear(layer.base, r, alpha, dropout))
    summary["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return summary


def adalora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)]


def orthogonality_regularizer(model):
    """
    R(P, Q) = mean over the AdaLoRA matrices of ||Q Q^T - I||_F (each lora_A, r x r) and ||P^T P - I||_F
    (each lora_B), AdaLoRA's Eq. 4 with the Frobenius norm as peft computes it; the trainer adds
    orth_reg_weight * R to the loss of every forward.
    """
    terms = []
    for _, layer in adalora_layers(model):
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(layer.r, dtype=gram.dtype, device=gram.device)))
    return torch.stack(terms).mean()


class RankAllocator:
    """
    AdaLoRA's importance-driven rank budget (Sec. 3.2-3.3), as peft's RankAllocator and
    AdaLoraModel.update_and_allocate. Call update_and_allocate(model, step) after optimizer.step()
    and before zero_grad() (it reads the gradients), with step = 0, 1, ..., total_step - 1.

    For each entry w of P, Lambda, Q with gradient g: sensitivity I = |w g|, its EMA
    Ibar <- beta1 Ibar + (1 - beta1) I, the uncertainty U <- beta2 U + (1 - beta2) |I - Ibar|, and the
    score s = Ibar U. The importance of singular triplet i is s(Lambda_i) + mean_j s(Q_ij) + mean_j
    s(P_ji). The budget b(t) (total kept ranks over all layers) is init_r * layers until step tinit,
    then falls cubically, b = (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT, to target_r *
    layers, reached for the last tfinal steps. Every deltaT steps the triplets at or below the
    (b0 - b)-th smallest importance get Lambda_i = 0. At step T - tfinal the final mask is fixed; it is
    reapplied after every later step (masked Lambda_i still get gradients, as in peft).
    """

    def __init__(self, model, target_r, total_step, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85):
        if not 0 < beta1 < 1 or not 0 < beta2 < 1:
            raise ValueError(f"RankAllocator: beta1, beta2 must be in (0, 1), got {beta1}, {beta2}")
        if tinit >= total_step - tfinal:
            raise ValueError(f"RankAllocator: tinit {tinit} must be below total_step - tfinal = {total_step - tfinal}")
        self.target_r, self.total_step, self.tinit, self.tfinal, self.deltaT = target_r, total_step, tinit, tfinal, deltaT
        self.beta1, self.beta2 = beta1, beta2
        layers = adalora_layers(model)
        if not layers:
            raise ValueError("RankAllocator: the model has no AdaLoRA layers (add_adalora first)")
        self.init_budget = sum(layer.r for _, layer in layers)
        self.target_budget = target_r * len(layers)
        self.masks = None  # {layer name: (r, 1) bool, kept triplets}, set at every allocation
        self.reset_importance()

    def reset_importance(self):
        self.sensitivity, self.uncertainty = {}, {}  # Ibar, U per parameter

    def budget(self, step):
        """(b(t), whether to mask at this step)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % self.deltaT == 0

    @torch.no_grad()
    def update_importance(self, model):
        for _, layer in adalora_layers(model):
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                importance = (p * p.grad).abs()
                previous = self.sensitivity.get(p, torch.zeros_like(p))
                self.sensitivity[p] = self.beta1 * previous + (1 - self.beta1) * importance
                previous_uncertainty = self.uncertainty.get(p, torch.zeros_like(p))
                self.uncertainty[p] = (self.beta2 * previous_uncertainty
                                       + (1 - self.beta2) * (importance - self.sensitivity[p]).abs())

    def triplet_importance(self, layer):
        """(r,) importance of each singular triplet of one layer."""
        score = {p: self.sensitivity[p] * self.uncertainty[p] for p in (layer.lora_A, layer.lora_E, layer.lora_B)}
        return score[layer.lora_E].view(-1) + score[layer.lora_A].mean(dim=1) + score[layer.lora_B].mean(dim=0)

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Zero lambda_i of every triplet at or below the (b0 - budget)-th smallest importance."""
        layers = adalora_layers(model)
        importance = {name: self.triplet_importance(layer) for name, layer in layers}
        threshold = torch.kthvalue(torch.cat(list(importance.values())), k=self.init_budget - budget).values
        self.masks = {name: (importance[name] > threshold).view(-1, 1) for name, _ in layers}
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model):
        for name, layer in adalora_layers(model):
            layer.lora_E.masked_fill_(~self.masks[name], 0.0)

    def update_and_allocate(self, model, step):
        final = self.total_step - self.tfinal
        if step < final:
            self.update_importance(model)
            budget, mask = self.budget(step)
            if mask:
                self.mask_to_budget(model, budget)
        elif step == final:  # fix the final allocation
            self.mask_to_budget(model, self.budget(step)[0])
            self.reset_importance()
        elif self.masks is not None:
            self.apply_masks(model)

    def ranks(self):
        """{layer name: kept ranks} after the last allocation (None before the first)."""
        return None if self.masks is None else {name: int(mask.sum()) for name, mask in self.masks.items()}


# The recipe's AdaLoRA settings: the budget falls from init_r = --rank to 2/3 of it (peft's defaults
# 12 -> 8; AdaLoRA's experiments start at 1.5 x the final budget), warm up for the first 10% of the
# steps, hold the final allocation for the last 20%, reallocate every 1% of the run, orthogonality
# weight 0.1 (AdaLoRA's gamma; peft's default is 0.5).
ADALORA_TARGET_FRACTION, ADALORA_TINIT, ADALORA_TFINAL, ADALORA_DELTA_T = 2 / 3, 0.1, 0.2, 0.01
ORTH_REG_WEIGHT = 0.1


def adalora_allocator(model, total_steps):
    """A RankAllocator for a run of total_steps steps with the recipe's settings above."""
    r = adalora_layers(model)[0][1].r
    return RankAllocator(model, target_r=max(1, round(ADALORA_TARGET_FRACTION * r)), total_step=total_steps,
                         tinit=int(ADALORA_TINIT * total_steps), tfinal=int(ADALORA_TFINAL * total_steps),
                         deltaT=max(1, int(ADALORA_DELTA_T * total_steps)))


def adalora_to_lora(model):
    """
    Replace each AdaLoRALinear by the balora.LoRALinear computing the same function (init="lora", the
    same r and alpha): lora_A = (s_AdaLoRA / s_LoRA) diag(Lambda) Q, lora_B = P, so that alpha / r * B A
    = s_AdaLoRA P diag(Lambda) Q. A trained AdaLoRA adapter is then saved, loaded and exported to peft
    as a LoRA one (masked triplets are zero rows of lora_A). Returns the model.
    """
    for name, layer in adalora_layers(model):
        lora = balora.LoRALinear(layer.base, layer.r, layer.alpha, layer.dropout_p, init="lora")
        with torch.no_grad():
            lora.lora_A.copy_(layer.scaling / lora.scaling * layer.lora_A * layer.lora_E)
            lora.lora_B.copy_(layer.lora_B)
        lora.train(layer.training)
        balora.set_submodule(model, name, lora)
    return model
