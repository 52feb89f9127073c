"""
The baselines of the paper's Tables 1 and 2 that balora.py does not hold, each with the reference its
test matches. Every one keeps the pretrained function reachable as the teacher (balora.pretrained_mode),
so each can take BA-LoRA's regularizers on top (`<method>+reg` in training.METHODS).

  LoRA+     loraplus_parameter_groups: lora_B learns `ratio` times faster than lora_A.
  LoRA-FA   LoRAFAOptimizer: lora_A frozen at its init, lora_B updated with a projected gradient.
  MiLoRA    milora_factors: PiSSA on the r minor singular components (an init of balora.INITS).
  Full FT   full_finetuning: every weight trains; the teacher is a frozen copy (PretrainedCopy).
  BitFit    bitfit: only the biases (and the head) train; the teacher keeps the initial biases.
  HAdapter  add_bottleneck_adapters(kind="hadapter"): Houlsby's adapters after attention and FFN.
  PAdapter  add_bottleneck_adapters(kind="padapter"): Pfeiffer's adapter after the FFN.
  LoRA-GA   loraga_factors: the start from the SVD of a gradient estimated on calibration batches.
  CorDA     corda_factors: the context-oriented SVD of W C (C the input covariance), IPM and KPM.
  AdaLoRA   AdaLoRALinear (P Lambda Q) and RankAllocator: an importance-driven rank budget.

training.py hooks them in: Method.optimizer picks the optimizer, Method.kind what trains,
Method.calibration and Method.adalora the data-driven starts and the rank budget; adapters.py
writes and reads their files. Notation as balora.py: lora_A (r x in), lora_B (out x r), s = alpha / r.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import balora

# -----------------------------------------------------------------------------
# LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models")


def loraplus_parameter_groups(model, lr, ratio, weight_decay):
    """
    LoRA+ sets eta_B = ratio * eta_A (the paper's lambda = eta_B / eta_A, default 16): with B = 0 at the
    start, B must move faster than A for the feature update to be efficient at large width.

    The groups are peft's create_loraplus_optimizer's: lora_B and every other 1-D trainable parameter
    (biases, DoRA magnitudes) get lr * ratio; lora_A and every other matrix (a head's weight) get lr.
    Weight decay applies to all of them except, among the fast group, biases and LayerNorm parameters.
    Returns the non-empty groups, each with its "lr" (an LR schedule scales them alike).
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    slow, fast, fast_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (fast_no_decay if "bias" in name or id(p) in no_decay else fast).append(p)
        else:
            slow.append(p)
    groups = [dict(params=slow, lr=lr, weight_decay=weight_decay),
              dict(params=fast, lr=lr * ratio, weight_decay=weight_decay),
              dict(params=fast_no_decay, lr=lr * ratio, weight_decay=0.0)]
    return [group for group in groups if group["params"]]


# -----------------------------------------------------------------------------
# LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"), peft's optimizer


class LoRAFAOptimizer(torch.optim.Optimizer):
    """
    LoRA-FA: lora_A stays at its (Kaiming) init, only lora_B trains. Its gradient is projected first,

        g_B~ = (1 / s^2) g_B (A A^T + delta I)^+,   delta = 1e-8,   g_B (out x r), A A^T (r x r),

    the g_B~ minimizing ||s B~ A - (full-weight gradient)||_F, i.e. the update of B that best
    reproduces full fine-tuning's step on W = W_res + s B A. Then an Adam step as transformers' old
    AdamW (eps 1e-6, bias correction folded into the step size, weight decay applied after the step:
    p <- p - lr * wd * p). Other trainable parameters (a head) take that Adam step on their raw gradient.

    Reference: peft's create_lorafa_optimizer / LoraFAOptimizer (peft 0.21.2). Departure: peft forms
    g_B~ under bf16 autocast whenever bf16 is available (also on CPU), rounding it to bf16; here it is
    computed in the adapter dtype (float32), as peft does where bf16 is not available.
    """

    def __init__(self, model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6):
        layers = balora.lora_layers(model)
        if not layers:
            raise ValueError("LoRA-FA: the model has no LoRA layers")
        for _, layer in layers:
            layer.lora_A.requires_grad_(False)  # A is frozen after its init
        self.projected = {layer.lora_B: layer for _, layer in layers}  # B -> its layer (A, s)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def projected_gradient(grad_B, lora_A, scaling, delta=1e-8):
        """g_B~ = (1 / s^2) g_B (A A^T + delta I)^+ (out x r)."""
        gram = lora_A @ lora_A.T
        inverse = torch.linalg.pinv(gram + delta * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
        return (grad_B @ inverse) / scaling**2

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p in self.projected:
                    layer = self.projected[p]
                    grad = self.projected_gradient(grad, layer.lora_A, layer.scaling)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


# -----------------------------------------------------------------------------
# MiLoRA (Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning")


def milora_factors(weight, r, scaling, niter=None):
    """
    MiLoRA's Eq.: W = U S V^T split into its principal part and its r MINOR components,
        W_m = U[:, -r:] S[-r:] Vh[-r:],   lora_B = U[:, -r:] sqrt(S_m / s),   lora_A = sqrt(S_m / s) Vh[-r:],
    so that s * lora_B @ lora_A = W_m, and LoRALinear keeps W_res = W - W_m frozen (the principal part):
    PiSSA's construction (balora.pissa_factors) on the other end of the spectrum. Dividing S by s keeps
    the product exact for any alpha, as PiSSA's. Exact SVD in float32; returns (lora_A, lora_B).
    """
    if niter is not None:  # a randomized SVD finds the top of the spectrum, never its minor end
        raise ValueError("MiLoRA needs the exact SVD: --pissa-niter applies to PiSSA only")
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = torch.sqrt(S[-r:] / scaling)
    return root[:, None] * Vh[-r:], U[:, -r:] * root[None, :]


balora.INITS["milora"] = milora_factors  # LoRALinear(init="milora"): the teacher, files and peft export follow


# -----------------------------------------------------------------------------
# Full FT and BitFit (Zaken et al. 2022): the teacher from a copy of the parameters that train


class PretrainedCopy(nn.Module):
    """
    A frozen copy of some parameters of `model` (their values now), swapped in while
    balora.pretrained_mode is on: `pretrained = True` puts each copy in its owners' place (every module
    holding the Parameter, tied weights too), `False` puts the Parameters back. The swap replaces the
    module attribute, not the Parameter's storage, so an autograd graph built on the trained values
    stays intact. Registered in the model as `pretrained_copy`. The copies are plain tensors, not
    buffers: out of state_dict, and not broadcast by DDP at every forward; they stay on the device the
    model had when they were made (adapt the model where it trains).
    """

    def __init__(self, model, names):
        super().__init__()
        parameters = dict(model.named_parameters())
        self.copies = [parameters[name].detach().clone() for name in names]
        self.owners = []  # [(module, attribute, index into copies)] for every holder of a copied Parameter
        for index, name in enumerate(names):
            for full_name, p in model.named_parameters(remove_duplicate=False):
                if p is parameters[name]:
                    owner, _, attribute = full_name.rpartition(".")
                    self.owners.append((model.get_submodule(owner), attribute, index))
        self.saved, self._pretrained = {}, False

    @property
    def pretrained(self):
        return self._pretrained

    @pretrained.setter
    def pretrained(self, on):
        if on == self._pretrained:
            return
        for module, attribute, index in self.owners:
            if on:
                self.saved[(module, attribute)] = module._parameters[attribute]
                module._parameters[attribute] = self.copies[index]
            else:
                module._parameters[attribute] = self.saved.pop((module, attribute))
        self._pretrained = on

    def nbytes(self):
        """Bytes the copy holds (Full FT: one more copy of the model's weights)."""
        return sum(t.numel() * t.element_size() for t in self.copies)


def _unfreeze(model, names, trainable):
    """requires_grad on exactly `names` and the modules of `trainable` (the NLU head); the rest frozen."""
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name in names:
        parameters[name].requires_grad_(True)
    for module in trainable:
        matched = [m for n, m in model.named_modules() if balora._name_matches(n, [module])]
        if not matched:
            raise ValueError(f"no module matches trainable={module!r}")
        for m in matched:
            m.requires_grad_(True)


def _in_modules(name, modules):
    return any(balora._name_matches(prefix, modules) for prefix in balora._prefixes(name))


def full_finetuning(model, trainable=()):
    """
    Full FT: every parameter trains. The teacher is the pretrained model, so every pretrained
    parameter is copied first (PretrainedCopy): the one method that holds the weights twice. The
    modules of `trainable` (the NLU head, freshly initialized) are shared by teacher and student, as
    for every other method. Reference: plain autograd over all parameters.
    """
    names = [name for name, _ in model.named_parameters() if not _in_modules(name, trainable)]
    _unfreeze(model, names, trainable)
    model.pretrained_copy = PretrainedCopy(model, names)
    return names


def bitfit(model, trainable=()):
    """
    BitFit (Zaken et al. 2022): only the bias terms train, every `.bias` of the model (the linear
    layers' and the LayerNorms'), and the task head (`trainable`). The teacher keeps the initial
    biases (PretrainedCopy of them alone).
    """
    names = [name for name, _ in model.named_parameters()
             if name.rpartition(".")[2] == "bias" and not _in_modules(name, trainable)]
    if not names:
        raise ValueError("BitFit: the model has no bias parameters to train")
    _unfreeze(model, names, trainable)
    model.pretrained_copy = PretrainedCopy(model, names)
    return names


# -----------------------------------------------------------------------------
# Bottleneck adapters: HAdapter (Houlsby et al. 2019), PAdapter (Pfeiffer et al. 2021)


class BottleneckAdapter(nn.Module):
    """
    A sublayer's output projection followed by a bottleneck adapter with a skip connection:

        h = base(x)   (..., d),   y = h + W_up f(W_down h + b_down) + b_up,

    W_down (m x d), W_up (d x m), m the bottleneck size, f the nonlinearity. W_up and b_up start at 0
    (Houlsby et al.'s near-identity init), so y = h: the adapted model is the pretrained one at the
    start, and with the adapter skipped (pretrained_mode) it is the pretrained one always, the base
    being frozen. The adapter sits where Houlsby et al. put it: on the sublayer's output, before the
    residual sum and LayerNorm (wrapping DeBERTa's attention.output.dense / output.dense, or Llama's
    o_proj / down_proj). Down-projection: nn.Linear's default init.
    """

    def __init__(self, base, bottleneck, activation):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.bottleneck, self.activation = bottleneck, activation
        d = base.out_features
        self.adapter_down = nn.Linear(d, bottleneck, dtype=base.weight.dtype, device=base.weight.device)
        self.adapter_up = nn.Linear(bottleneck, d, dtype=base.weight.dtype, device=base.weight.device)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.pretrained = False  # set by balora.pretrained_mode: the adapter is skipped
        self.train(base.training)

    def forward(self, x):
        h = self.base(x)
        if self.pretrained:
            return h
        return h + self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(h)))

    def extra_repr(self):
        return f"bottleneck={self.bottleneck}, activation={self.activation!r}"


ACTIVATIONS = {"relu": F.relu, "swish": F.silu}


def _is_attention_output(name):
    return name.endswith("attention.output.dense") or name.endswith("o_proj")


def _is_ffn_output(name):
    return (name.endswith(".output.dense") and not _is_attention_output(name)) or name.endswith("down_proj")


# kind -> (which output projections get an adapter, bottleneck m, nonlinearity). m gives Table 2's
# #Params on DeBERTa-v3-base (12 layers, d = 768, adapters with biases): HAdapter 24 adapters x
# (2 * 768 * 32 + 32 + 768) = 1.20M (Table 2: 1.22M); PAdapter 12 x (2 * 768 * 64 + 64 + 768) = 1.19M
# (Table 2: 1.18M). The nonlinearities are AdapterHub's defaults for the two configurations.
ADAPTER_KINDS = {
    "hadapter": (lambda name: _is_attention_output(name) or _is_ffn_output(name), 32, "swish"),
    "padapter": (_is_ffn_output, 64, "relu"),
}


def add_bottleneck_adapters(model, kind, trainable=(), bottleneck=None):
    """
    Wrap the output projections `kind` names (ADAPTER_KINDS) in BottleneckAdapter layers and freeze the
    rest of the model but the modules of `trainable` (the NLU head). Returns the wrapped names.
    """
    where, default_bottleneck, activation = ADAPTER_KINDS[kind]
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and where(name)]
    if not targets:
        raise ValueError(f"{kind}: the model has no attention / FFN output projection to put an adapter after")
    _unfreeze(model, [], trainable)
    for name in targets:
        balora.set_submodule(model, name, BottleneckAdapter(model.get_submodule(name), bottleneck or default_bottleneck,
                                                            activation))
    return targets


def adapter_layers(model):
    """[(qualified name, BottleneckAdapter)] of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


# -----------------------------------------------------------------------------
# What trains, and how many parameters that is


KINDS = ("full", "bitfit", "hadapter", "padapter")  # Method.kind beside "lora" (balora.add_lora)


def adapt(model, kind, trainable=(), bottleneck=None):
    """
    Apply a KINDS method to `model` and record what rebuilds it as `model.baseline_config` (what
    adapters.save_adapter writes). Returns add_lora's summary: dict(trainable, total, replaced).
    """
    if getattr(model, "baseline_config", None) is not None or balora.lora_layers(model):
        raise ValueError(f"{kind}: the model is adapted already")
    trainable = [trainable] if isinstance(trainable, str) else list(trainable)
    config = dict(method=kind, trainable=trainable)
    if kind == "full":
        replaced = full_finetuning(model, trainable)
    elif kind == "bitfit":
        replaced = bitfit(model, trainable)
    elif kind in ADAPTER_KINDS:
        replaced = add_bottleneck_adapters(model, kind, trainable, bottleneck)
        config["bottleneck"] = adapter_layers(model)[0][1].bottleneck
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model.baseline_config = config
    summary = dict(trainable=trainable_parameter_count(model),
                   total=sum(p.numel() for p in model.parameters()), replaced=replaced)
    print(f"{kind}: trainable {summary['trainable']:,} / {summary['total']:,} params "
          f"({100 * summary['trainable'] / summary['total']:.2f}%)")
    return summary


def trainable_parameter_count(model):
    """Parameters that train (requires_grad), each counted once: Table 1 / 2's #Params."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(shapes, r, train_A=True):
    """
    #Params of a LoRA-shaped adapter by arithmetic: sum over the adapted (out, in) matrices of
    r * (in + out), or r * out when lora_A is frozen (LoRA-FA). `shapes`: [(out, in)] per matrix.
    """
    return sum(r * (fan_in * train_A + fan_out) for fan_out, fan_in in shapes)


def llama_linear_shapes(hidden=4096, intermediate=11008, layers=32, kv_hidden=None):
    """(out, in) of every linear layer an all-linear adapter targets in a LLaMA (default: LLaMA-2-7B)."""
    kv_hidden = kv_hidden or hidden
    per_layer = [(hidden, hidden), (kv_hidden, hidden), (kv_hidden, hidden), (hidden, hidden),
                 (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return per_layer * layers


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

    def state_dict(self, model):
        """The averages Ibar, U (by parameter name) and the masks: what a checkpoint needs to continue exactly."""
        names = {p: name for name, p in model.named_parameters()}
        return {"sensitivity": {names[p]: t.clone() for p, t in self.sensitivity.items()},
                "uncertainty": {names[p]: t.clone() for p, t in self.uncertainty.items()},
                "masks": None if self.masks is None else dict(self.masks)}

    def load_state_dict(self, model, state):
        """Restore state_dict(model) of the same layers, onto this model's parameters."""
        parameters = dict(model.named_parameters())
        self.sensitivity = {parameters[name]: t.to(parameters[name].device) for name, t in state["sensitivity"].items()}
        self.uncertainty = {parameters[name]: t.to(parameters[name].device) for name, t in state["uncertainty"].items()}
        self.masks = None if state["masks"] is None else {name: m.to(parameters[name + ".lora_E"].device)
                                                          for name, m in state["masks"].items()}

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
