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

training.py hooks them in: Method.optimizer picks the optimizer, Method.kind what trains; adapters.py
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
