"""
Tests of balora.py: each regularizer against a naive float64 transcription of its equation, gradients
by finite differences, the objectives and schedules, PiSSA against peft, and the teacher mode.
transformers / peft are used here only as numeric oracles.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import balora
from balora import (
    LoRALinear, add_lora, nlg_consistency_loss, nlg_diversity_loss, nlg_objective, nlg_svd_loss, nlu_consistency_loss,
    nlu_diversity_loss, nlu_objective, nlu_svd_loss, pretrained_mode, scheduled_lambdas,
)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|"""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -----------------------------------------------------------------------------
# naive float64 transcriptions of the equations: Python loops over rows and classes


def naive_softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive_consistency(teacher, student, T):
    """Eq. 4 / 9: T^2 * mean over rows of sum_c p_P(c) * log(p_P(c) / p_F(c))."""
    total = 0.0
    for z_p, z_f in zip(teacher.tolist(), student.tolist()):
        p = naive_softmax([v / T for v in z_p])
        q = naive_softmax([v / T for v in z_f])
        total += sum(p_c * math.log(p_c / q_c) for p_c, q_c in zip(p, q))
    return T * T * total / len(teacher)


def naive_nlu_diversity(logits):
    """Eq. 5-6: (1/D) sum_{i != j} C_ij^2 with C the unbiased covariance of the columns."""
    Z = logits.tolist()
    N, D = len(Z), len(Z[0])
    mean = [sum(Z[n][c] for n in range(N)) / N for c in range(D)]
    total = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                C_ij = sum((Z[n][i] - mean[i]) * (Z[n][j] - mean[j]) for n in range(N)) / (N - 1)
                total += C_ij**2
    return total / D


def naive_nlu_svd(logits, k):
    """Eq. 7 with numpy's exact float64 SVD."""
    sigma = np.linalg.svd(logits.numpy(), compute_uv=False)
    return -sigma[:k].sum() / sigma.sum()


def naive_nlg_diversity(logits, K):
    """Eq. 10-11: mean over rows of sum P' log P', P' renormalized over the K largest probabilities."""
    total = 0.0
    for row in logits.tolist():
        p = naive_softmax(row)
        top = sorted(p, reverse=True)[:K]
        total += sum(v / sum(top) * math.log(v / sum(top)) for v in top)
    return total / len(logits)


def naive_nlg_svd(logits, k):
    """Eq. 12 with numpy's exact float64 SVD and a looped Frobenius norm."""
    sigma = np.linalg.svd(logits.numpy(), compute_uv=False)
    frobenius = math.sqrt(sum(v * v for row in logits.tolist() for v in row))
    return -sigma[:k].sum() / frobenius


# (balora function, naive reference, input builder); the inputs are float64 and tie-free
REGULARIZER_CASES = {
    "nlu_consistency": (lambda t, s: nlu_consistency_loss(t, s, 2.0), lambda t, s: naive_consistency(t, s, 2.0),
                        lambda: (randn(6, 5, seed=1), randn(6, 5, seed=2))),
    "nlg_consistency": (lambda t, s: nlg_consistency_loss(t, s, 2.0), lambda t, s: naive_consistency(t, s, 2.0),
                        lambda: (3 * randn(7, 11, seed=1), 3 * randn(7, 11, seed=2))),
    "nlu_diversity": (lambda s: nlu_diversity_loss(s), naive_nlu_diversity, lambda: (randn(8, 4),)),
    "nlu_svd": (lambda s: nlu_svd_loss(s, 2), lambda s: naive_nlu_svd(s, 2), lambda: (randn(8, 5),)),
    "nlg_diversity": (lambda s: nlg_diversity_loss(s, 5), lambda s: naive_nlg_diversity(s, 5),
                      lambda: (3 * randn(6, 30),)),
    # sketch size k + oversample = 6 = M: the range finder spans all of Z, so sigma~ is exact
    "nlg_svd": (lambda s: nlg_svd_loss(s, 3, oversample=3, niter=1, generator=torch.Generator().manual_seed(0)),
                lambda s: naive_nlg_svd(s, 3), lambda: (randn(6, 20),)),
}


@pytest.mark.parametrize("case", REGULARIZER_CASES)
def test_regularizer_matches_naive_float64(case):
    fn, naive, make_inputs = REGULARIZER_CASES[case]
    inputs = make_inputs()
    value = fn(*inputs)
    assert value.dim() == 0 and value.dtype == torch.float64
    assert rel_err(value, naive(*inputs)) <= 1e-8


@pytest.mark.parametrize("case", REGULARIZER_CASES)
def test_regularizer_gradcheck(case):
    fn, _, make_inputs = REGULARIZER_CASES[case]
    inputs = [x.requires_grad_() for x in make_inputs()]
    if case.endswith("consistency"):
        # the teacher is a constant: only the student gets gradients
        teacher, student = inputs
        assert torch.autograd.gradcheck(lambda s: fn(teacher, s), (student,))
        fn(teacher, student).backward()
        assert teacher.grad is None
    else:
        assert torch.autograd.gradcheck(fn, inputs)


def exact_svd_loss(z, k):
    """Eq. 12 with the exact singular values, differentiable (torch, float64)."""
    return -torch.linalg.svdvals(z)[:k].sum() / torch.linalg.vector_norm(z)


def low_rank_plus_noise(M, V, rank=20, noise=0.01, seed=4):
    """float64 logits with a decaying spectrum 100 * 0.8^i on `rank` directions, plus dense noise."""
    U = torch.linalg.qr(randn(M, rank, seed=seed)).Q
    W = torch.linalg.qr(randn(V, rank, seed=seed + 1)).Q
    spectrum = 100 * 0.8 ** torch.arange(rank, dtype=torch.float64)
    return U @ torch.diag(spectrum) @ W.T + noise * randn(M, V, seed=seed + 2)


def test_nlg_svd_gradient_is_the_exact_top_k_gradient():
    # sketch l = 15 < M = 300: the basis Q is held constant; by Ky Fan's maximum principle the
    # gradient then matches the gradient of the exact top-k sum up to the sketch error
    Z = low_rank_plus_noise(300, 2000)
    grads = []
    for fn in (lambda z: nlg_svd_loss(z, 10, generator=torch.Generator().manual_seed(0)),
               lambda z: exact_svd_loss(z, 10)):
        z = Z.clone().requires_grad_()
        fn(z).backward()
        grads.append(z.grad)
    assert (torch.linalg.norm(grads[0] - grads[1]) / torch.linalg.norm(grads[1])).item() <= 1e-2
    # rank-deficient logits (3 distinct rows, sketch of 15): finite gradients
    z = randn(3, 50, seed=8).repeat(10, 1).requires_grad_()
    nlg_svd_loss(z, 10).backward()
    assert torch.isfinite(z.grad).all()


def test_randomized_svd_close_to_exact_on_low_rank_plus_noise():
    Z = low_rank_plus_noise(300, 2000)
    exact = naive_nlg_svd(Z, 10)
    approx = nlg_svd_loss(Z.float(), 10, generator=torch.Generator().manual_seed(0))  # default oversample, niter
    assert approx.dtype == torch.float32
    assert rel_err(approx, exact) <= 1e-3
    # bf16 logits are computed in float32
    assert nlg_svd_loss(Z.bfloat16(), 10, generator=torch.Generator().manual_seed(0)).dtype == torch.float32


DEGENERATE_CASES = {
    "nlg_consistency, M=0": (lambda z: nlg_consistency_loss(z.detach() + 1, z, 2.0), (0, 50)),
    "nlg_diversity, M=0": (lambda z: nlg_diversity_loss(z, 5), (0, 50)),
    "nlg_svd, M=0": (lambda z: nlg_svd_loss(z, 10), (0, 50)),
    "nlg_svd, M=1": (lambda z: nlg_svd_loss(z, 10), (1, 50)),
    "nlg_diversity, V<K": (lambda z: nlg_diversity_loss(z, 20), (4, 3)),
    "nlu_consistency, N=1": (lambda z: nlu_consistency_loss(z.detach() + 1, z, 2.0), (1, 3)),
    "nlu_diversity, N=1": (lambda z: nlu_diversity_loss(z), (1, 3)),
    "nlu_svd, N=1": (lambda z: nlu_svd_loss(z, 5), (1, 3)),
    "nlu_consistency, D=1": (lambda z: nlu_consistency_loss(z.detach() + 1, z, 2.0), (8, 1)),
    "nlu_diversity, D=1": (lambda z: nlu_diversity_loss(z), (8, 1)),
    "nlu_svd, D=1": (lambda z: nlu_svd_loss(z, 5), (8, 1)),
    "nlu_diversity, N=0": (lambda z: nlu_diversity_loss(z), (0, 3)),
    "nlu_svd, N=0": (lambda z: nlu_svd_loss(z, 5), (0, 3)),
}


@pytest.mark.parametrize("case", DEGENERATE_CASES)
@pytest.mark.parametrize("scale", [1.0, 0.0], ids=["random", "zeros"])
def test_degenerate_inputs_are_finite_with_usable_grads(case, scale):
    fn, shape = DEGENERATE_CASES[case]
    z = (scale * randn(*shape, dtype=torch.float32)).requires_grad_()
    value = fn(z)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert z.grad is not None and z.grad.shape == z.shape and torch.isfinite(z.grad).all()


def test_undefined_terms_are_zero():
    assert nlg_diversity_loss(torch.zeros(0, 50), 5).item() == 0.0
    assert nlu_diversity_loss(randn(1, 3)).item() == 0.0  # covariance undefined for one example
    assert nlu_diversity_loss(randn(8, 1)).item() == 0.0  # no off-diagonal for one output (STS-B)
    assert nlu_svd_loss(torch.zeros(4, 3), 2).item() == 0.0  # 0 / 0 energy ratio
    assert nlg_svd_loss(torch.zeros(4, 30), 2).item() == 0.0


def test_bad_regularizer_arguments_raise():
    with pytest.raises(ValueError, match="temperature"):
        nlg_consistency_loss(randn(2, 3), randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        nlg_consistency_loss(randn(2, 3), randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        nlg_svd_loss(randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="top_k"):
        nlg_diversity_loss(randn(2, 3), 0)


# -----------------------------------------------------------------------------
# objectives (Eq. 8, 13) and schedules (App. B.4)


@pytest.mark.parametrize("task", ["nlu", "nlg"])
def test_objective_is_the_weighted_sum(task):
    student, teacher = randn(6, 40, seed=1).requires_grad_(), randn(6, 40, seed=2)
    task_loss = F.cross_entropy(student, torch.arange(6))
    if task == "nlu":
        objective = lambda lambdas, teacher: nlu_objective(task_loss, student, teacher, lambdas, 2.0, 3)  # noqa: E731
        terms = [nlu_consistency_loss(teacher, student, 2.0), nlu_diversity_loss(student), nlu_svd_loss(student, 3)]
    else:
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        objective = lambda lambdas, teacher: nlg_objective(  # noqa: E731
            task_loss, student, teacher, lambdas, 2.0, 3, 5, generator=gen())
        terms = [nlg_consistency_loss(teacher, student, 2.0), nlg_diversity_loss(student, 5),
                 nlg_svd_loss(student, 3, generator=gen())]
    lambdas = (0.15, 0.03, 0.05)
    total, components = objective(lambdas, teacher)
    expected = task_loss + sum(w * t for w, t in zip(lambdas, terms))
    assert rel_err(total, expected) <= 1e-12
    assert set(components) == {"task", "consistency", "diversity", "svd"}
    for name, term in zip(["consistency", "diversity", "svd"], terms):
        assert rel_err(components[name], term) <= 1e-12 and not components[name].requires_grad
    total.backward()
    assert torch.isfinite(student.grad).all()
    # a zero lambda skips its term: no teacher is needed without the consistency term
    total, components = objective((0.0, 0.03, 0.0), None)
    assert set(components) == {"task", "diversity"}
    assert rel_err(total, task_loss + 0.03 * terms[1]) <= 1e-12
    with pytest.raises(ValueError, match="teacher_logits"):
        objective((0.1, 0.0, 0.0), None)


def test_scheduled_lambdas_match_the_official_formula():
    lambdas = (0.025, 0.005, 0.005)  # the paper's NLG weights
    # T = 100: warmup = int(0.2 * 100) = 20 steps at 0, ramp = int(0.05 * 100) = 5 steps, then full.
    # lambda1 = 0.0025 + 0.0225 * 0.5 * (1 + cos(pi * step / 100)).
    expected = {
        0: (0.025, 0.0, 0.0),  # cos 0 = 1: lambda1 starts at its full value; focus off
        19: (None, 0.0, 0.0),  # last warmup step
        20: (None, 0.0, 0.0),  # ramp starts at 0 / 5
        22: (None, 0.002, 0.002),  # (22 - 20) / 5 = 0.4 of 0.005
        25: (0.0025 + 0.01125 * (1 + math.sqrt(0.5)), 0.005, 0.005),  # cos(pi / 4); ramp done
        50: (0.0025 + 0.01125, 0.005, 0.005),  # cos(pi / 2) = 0: halfway
        100: (0.0025, 0.005, 0.005),  # cos(pi) = -1: lambda1 ends at 0.1 of its value
    }
    for step, (l1, l2, l3) in expected.items():
        got = scheduled_lambdas(step, 100, lambdas)
        if l1 is not None:
            assert got[0] == pytest.approx(l1, rel=1e-12)
        assert got[1:] == pytest.approx((l2, l3), rel=1e-12, abs=1e-15)
    # T = 7: warmup = int(1.4) = 1 and the ramp rounds down to 0, clamped to 1 step: 0, 0, then full
    assert [scheduled_lambdas(s, 7, (1.0, 1.0, 1.0))[1] for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert scheduled_lambdas(30, 100, lambdas, "constant", "constant") == lambdas
    with pytest.raises(ValueError, match="focus_schedule"):
        scheduled_lambdas(0, 100, lambdas, focus_schedule="linear")


# -----------------------------------------------------------------------------
# LoRA and PiSSA layers (Eq. 1-3)


def dense_linear(in_features, out_features, seed=0, bias=True):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight)  # O(1) entries, a full spectrum
    return linear


def test_pissa_reconstructs_the_weight_and_keeps_the_principal_part():
    base = dense_linear(64, 48)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, r=8, alpha=16, init="pissa")
    effective = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    assert (torch.linalg.norm(effective - W) / torch.linalg.norm(W)).item() <= 1e-6
    # the adapter holds the best rank-8 approximation, the residual the rest (Eq. 1-3)
    U, S, Vh = torch.linalg.svd(W.double())
    principal = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    assert rel_err(layer.scaling * layer.lora_B @ layer.lora_A, principal) <= 1e-5
    assert torch.equal(layer.lora_A0, layer.lora_A.detach()) and torch.equal(layer.lora_B0, layer.lora_B.detach())
    # randomized SVD: the residual is W - s B A, so the reconstruction stays exact
    base = dense_linear(64, 48)
    layer = LoRALinear(base, r=8, alpha=16, init="pissa", pissa_niter=2)
    effective = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    assert (torch.linalg.norm(effective - W) / torch.linalg.norm(W)).item() <= 1e-6


def test_lora_init_is_a_zero_update_without_a_copy():
    layer = LoRALinear(dense_linear(16, 8), r=4, alpha=8)
    assert layer.init == "lora" and layer.lora_A0 is None and layer.lora_B0 is None
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4) and layer.scaling == 2.0
    assert not any(p.requires_grad for p in layer.base.parameters())


def test_bf16_base_with_float32_adapter():
    base = dense_linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, init="pissa")
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()


# -----------------------------------------------------------------------------
# whole models: a tiny transformers Llama as the oracle

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # rescale the 0.02-std init to O(1) activations and logits
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
    return model


def input_ids(seed=0):
    return torch.randint(96, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def train_a_few_steps(model, steps=3):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = input_ids(seed=100 + step)
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_adapted_model_equals_base_at_init_and_teacher_after_training(init):
    original = tiny_llama()
    model = copy.deepcopy(original)
    summary = add_lora(model, TARGETS, r=4, alpha=8, init=init, dropout=0.1)
    ids = input_ids()
    expected = logits_of(original, ids)
    assert rel_err(logits_of(model, ids), expected) <= 1e-5
    train_a_few_steps(model)
    assert rel_err(logits_of(model, ids), expected) > 1e-2  # the student moved
    model.train()
    with torch.no_grad(), pretrained_mode(model):
        assert not model.training  # the teacher runs in eval mode
        teacher = model(ids).logits
    assert model.training and all(m.training for m in model.modules())
    assert rel_err(teacher, expected) <= 1e-5
    # the teacher's extra memory is one copy of the adapter factors (none for init="lora")
    buffers = sum(b.numel() for b in model.buffers()) - sum(b.numel() for b in original.buffers())
    adapter = summary["trainable"]
    assert buffers == (adapter if init == "pissa" else 0)


def test_add_lora_targets_and_counts():
    model = tiny_llama()
    n_total = sum(p.numel() for p in model.parameters())
    summary = add_lora(model, "all-linear", r=2, alpha=4, init="lora", trainable=("lm_head",))
    assert "lm_head" not in summary["replaced"] and len(summary["replaced"]) == 2 * 7
    adapter = sum(2 * (m.base.in_features + m.base.out_features) for _, m in balora.lora_layers(model))
    assert summary["trainable"] == adapter + 96 * 32 and summary["total"] == n_total + adapter
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" not in trainable
    assert not any(name.endswith("base.weight") for name in trainable)
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        add_lora(tiny_llama(), ["query_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="classifier"):
        add_lora(tiny_llama(), ["q_proj"], r=2, alpha=4, trainable=("classifier",))
    with pytest.raises(ValueError, match="already"):
        add_lora(model, ["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("niter", [None, 4], ids=["exact", "randomized"])
def test_pissa_matches_peft(niter, monkeypatch):
    # svd_lowrank draws its sketch from the global RNG, which peft also uses to build its layers:
    # reseed it on every call so both draw the same sketch for the same matrix
    svd_lowrank = torch.svd_lowrank

    def seeded_svd_lowrank(*args, **kwargs):
        torch.manual_seed(7)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd_lowrank)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded_svd_lowrank)
    original = tiny_llama()
    ours, theirs = copy.deepcopy(original), copy.deepcopy(original)
    add_lora(ours, TARGETS, r=4, alpha=8, init="pissa", pissa_niter=niter)
    init = "pissa" if niter is None else f"pissa_niter_{niter}"
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         init_lora_weights=init))
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in balora.lora_layers(ours):
        reference = peft_layers[name]
        # SVD factors are defined up to signs: compare the product B A and the residual W_res
        BA = reference.lora_B["default"].weight @ reference.lora_A["default"].weight
        assert rel_err(layer.lora_B @ layer.lora_A, BA) <= 1e-5
        assert rel_err(layer.base.weight, reference.get_base_layer().weight) <= 1e-6
    ids = input_ids()
    assert rel_err(logits_of(ours, ids), logits_of(theirs, ids)) <= 1e-5


# -----------------------------------------------------------------------------
# tools/bench_regularizers.py


@pytest.mark.slow
def test_bench_regularizers_smoke():
    import tools.bench_regularizers as bench

    M, V = 512, 4096  # an 8 MiB logit copy: enough for RSS to resolve; the full-size table is in the report
    result = bench.main(["--M", str(M), "--V", str(V), "--reps", "1"])
    names = ["cross_entropy", "nlg_consistency_loss", "nlg_diversity_loss", "nlg_svd_loss"]
    assert list(result["time_s"]) == names and all(t > 0 for t in result["time_s"].values())
    copies = {name: peak / (M * V * 4) for name, peak in result["peak_bytes"].items()}
    # cross-entropy holds the log-probabilities, their gradient and the logits' gradient: ~3 copies
    assert 2.5 < copies["cross_entropy"] < 3.5, copies
    # top-K entropy keeps (M, K) tensors only: the logits' gradient is its one full copy
    assert copies["nlg_diversity_loss"] < 2, copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_finds_one_bad_entry_anywhere(dtype):
    """balora.all_finite (add_lora's, adapter_problems' and the FSDP loader's check) against isfinite().all()."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        for position in (0, 517, 999):
            tensor = torch.randn(10, 100, dtype=dtype)
            tensor.view(-1)[position] = bad
            assert not balora.all_finite(tensor), (bad, position)
    assert balora.all_finite(torch.randn(10, 100, dtype=dtype)) and balora.all_finite(torch.empty(0, 3, dtype=dtype))
