"""
Tests of baselines.py: each baseline against its reference (peft's optimizers, the MiLoRA equation in
float64, plain autograd, the BitFit definition, the adapter equations in float64): the same initial
factors / frozen parameters / optimizer groups and the same parameters after 3 optimizer steps; the
teacher is the pretrained function; files round-trip and LoRA-shaped ones export to peft; the
#Params of Table 2 by counting; both trainers run the new --method names.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import balora
import baselines
import eval as evaluation
import model as model_module
import train_nlg
import train_nlu
import training
import test_train_nlg
import test_train_nlu
from test_balora import TARGETS, input_ids, logits_of, rel_err, tiny_llama

TINY_LLAMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-llama")

peft = pytest.importorskip("peft")

STEPS, TOL = 3, 1e-5


def lm_loss(model, step):
    ids = input_ids(seed=100 + step)
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def train(model, optimizer, steps=STEPS, loss=lm_loss):
    model.train()
    for step in range(steps):
        loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def peft_name(name):
    """peft's parameter name -> ours: base_model.model.X.lora_A.default.weight -> X.lora_A."""
    name = name.removeprefix("base_model.model.")
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f".{factor}.default.weight", f".{factor}")
    return name.replace(".modules_to_save.default", "")


def peft_twin(original, ours, r=4, alpha=8):
    """peft's LoRA on a copy of `original` with our layers' factors and base weights, and lm_head trained."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, modules_to_save=["lm_head"],
                             init_lora_weights=False)
    twin = peft.get_peft_model(copy.deepcopy(original), config)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".lora_" in name or "modules_to_save" in name:
                p.copy_(mine[peft_name(name)])
        for name, layer in balora.lora_layers(ours):  # W_res of an init that moves s B0 A0 out of W
            twin.get_submodule(f"base_model.model.{name}").base_layer.weight.copy_(layer.base.weight)
    return twin


def assert_same_trained(ours, twin, tol=TOL):
    theirs = {peft_name(n): p for n, p in twin.named_parameters() if ".lora_" in n or "modules_to_save" in n}
    for name, p in ours.named_parameters():
        if name in theirs:
            assert rel_err(p.detach(), theirs[name].detach()) <= tol, name


def groups_by_name(model, optimizer, rename=lambda n: n):
    """{parameter name: (lr, weight decay)} of an optimizer's groups."""
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}


# -----------------------------------------------------------------------------
# LoRA+ against peft's create_loraplus_optimizer


def test_loraplus_groups_and_three_steps_match_peft():
    from peft.optimizers import create_loraplus_optimizer

    original = tiny_llama()
    ours = copy.deepcopy(original)
    balora.add_lora(ours, TARGETS, r=4, alpha=8, init="lora", trainable=("lm_head",))
    twin = peft_twin(original, ours)
    optimizer = training.build_optimizer(ours, 1e-3, 0.01, training.METHODS["loraplus"], loraplus_lr_ratio=16)
    reference = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.01)
    groups = groups_by_name(ours, optimizer)
    assert groups == groups_by_name(twin, reference, peft_name)
    assert groups["model.layers.0.self_attn.q_proj.lora_B"][0] == 16 * groups["model.layers.0.self_attn.q_proj.lora_A"][0]
    train(ours, optimizer)
    train(twin, reference)
    assert_same_trained(ours, twin)


# -----------------------------------------------------------------------------
# LoRA-FA against peft's create_lorafa_optimizer (its projected update of B)


def test_lorafa_freezes_A_and_three_steps_match_peft(monkeypatch):
    import peft.optimizers.lorafa as lorafa

    # peft forms the projected gradient under bf16 autocast when bf16 is available; in float32 here (as ours)
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    original = tiny_llama()
    ours = copy.deepcopy(original)
    balora.add_lora(ours, TARGETS, r=4, alpha=8, init="lora", trainable=("lm_head",))
    A0 = {name: layer.lora_A.detach().clone() for name, layer in balora.lora_layers(ours)}
    twin = peft_twin(original, ours)
    optimizer = training.build_optimizer(ours, 1e-3, 0.01, training.METHODS["lorafa"])
    reference = lorafa.create_lorafa_optimizer(twin, r=4, lora_alpha=8, lr=1e-3, weight_decay=0.01)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {peft_name(n) for n, p in twin.named_parameters() if p.requires_grad}
    assert not any(n.endswith("lora_A") for n in trainable) and "lm_head.weight" in trainable
    train(ours, optimizer)
    train(twin, reference)
    assert_same_trained(ours, twin)
    assert all(torch.equal(layer.lora_A, A0[name]) for name, layer in balora.lora_layers(ours))
    assert all(not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for _, layer in balora.lora_layers(ours))


def test_lorafa_optimizer_state_resumes_exactly():
    """A checkpoint's optimizer state (state_dict, as training.save_checkpoint writes it) continues the same run."""
    model = tiny_llama()
    balora.add_lora(model, TARGETS, r=4, alpha=8, init="lora")
    optimizer = training.build_optimizer(model, 1e-2, 0.01, training.METHODS["lorafa"])
    train(model, optimizer, steps=2)
    resumed_model = copy.deepcopy(model)
    resumed = training.build_optimizer(resumed_model, 1e-2, 0.01, training.METHODS["lorafa"])
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, optimizer, steps=1)
    train(resumed_model, resumed, steps=1)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_lorafa_projection_is_the_least_squares_update():
    """g_B~ = (1/s^2) g_B (A A^T)^-1 minimizes ||s g_B~ A - g_W||_F with g_W = s g_B... A's row space: a float64 check."""
    torch.manual_seed(0)
    A, g_W = torch.randn(3, 10, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    s = 2.0
    g_B = s * g_W @ A.T  # the chain rule through W = W_res + s B A
    projected = baselines.LoRAFAOptimizer.projected_gradient(g_B, A, s, delta=0.0)
    least_squares = torch.linalg.lstsq((s * A).T, g_W.T).solution.T  # argmin_X ||X (s A) - g_W||
    assert rel_err(projected, least_squares) <= 1e-10


# -----------------------------------------------------------------------------
# MiLoRA against its equation in float64


def test_milora_starts_at_the_minor_components_and_trains_as_peft_lora():
    original = tiny_llama()
    ours = copy.deepcopy(original)
    balora.add_lora(ours, TARGETS, r=4, alpha=8, init="milora", trainable=("lm_head",))
    for name, layer in balora.lora_layers(ours):
        W = original.get_submodule(name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # MiLoRA's Eq.: the r smallest components
        minor = U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]
        assert rel_err(layer.scaling * layer.lora_B0.double() @ layer.lora_A0.double(), minor) <= TOL, name
        assert rel_err(layer.base.weight.double(), W - minor) <= TOL, name
        singular = torch.linalg.svdvals(layer.lora_B0.double())  # B0 = U_m sqrt(S_m / s): its singular values
        assert rel_err(singular, torch.sqrt(S[-4:] / layer.scaling)) <= TOL, name
    ids = input_ids()
    assert rel_err(logits_of(ours, ids), logits_of(original, ids)) <= TOL
    twin = peft_twin(original, ours)
    train(ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3))
    train(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-3))
    assert_same_trained(ours, twin)


def test_milora_refuses_a_randomized_svd():
    with pytest.raises(ValueError, match="exact SVD"):
        balora.add_lora(tiny_llama(), ["q_proj"], r=2, alpha=4, init="milora", pissa_niter=2)


# -----------------------------------------------------------------------------
# Full FT against plain autograd; its teacher is the frozen pretrained copy


def test_full_finetuning_matches_plain_autograd_and_keeps_the_pretrained_teacher():
    original = tiny_llama()
    ours, reference = copy.deepcopy(original), copy.deepcopy(original).requires_grad_(True)
    summary = baselines.adapt(ours, "full")
    assert summary["trainable"] == summary["total"] == sum(p.numel() for p in original.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    assert ours.pretrained_copy.nbytes() == weight_bytes  # the weights twice: the one method that needs it

    def with_teacher(model, step):  # the student's graph must survive the teacher's forward in between
        ids = input_ids(seed=100 + step)
        student = model(ids).logits
        with torch.no_grad(), balora.pretrained_mode(model):
            teacher = model(ids).logits
        return F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + F.mse_loss(student, teacher)

    def with_separate_teacher(model, step):
        ids = input_ids(seed=100 + step)
        student = model(ids).logits
        teacher = logits_of(original, ids)
        return F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + F.mse_loss(student, teacher)

    train(ours, training.build_optimizer(ours, 1e-3, 0.0, training.METHODS["full"]), loss=with_teacher)
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0), loss=with_separate_teacher)
    reference_parameters = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.detach(), reference_parameters[name].detach()) <= TOL, name
    ids = input_ids()
    with torch.no_grad(), balora.pretrained_mode(ours):
        assert torch.equal(ours(ids).logits, logits_of(original, ids))
    assert rel_err(logits_of(ours, ids), logits_of(reference, ids)) <= TOL
    # train_nlg's chunked teacher head (on balora's Llama, the model train_nlg.py trains): the pretrained head
    trained = model_module.Llama.from_pretrained(TINY_LLAMA)
    pretrained = copy.deepcopy(trained)
    baselines.adapt(trained, "full", trainable=())
    with torch.no_grad():
        trained.lm_head.weight.add_(1.0)  # as training moves it
    head = training.teacher_head(trained, "cpu", torch.float32)
    hidden = torch.randn(3, trained.config.hidden_size)
    assert torch.equal(head(hidden), pretrained.logits(hidden))
    assert not torch.equal(trained.logits(hidden), pretrained.logits(hidden))


# -----------------------------------------------------------------------------
# BitFit and the bottleneck adapters on a tiny DeBERTa classifier (the NLU rows)


def tiny_deberta(seed=0, dtype=torch.float32):
    config = model_module.DebertaConfig.from_hf(test_train_nlu.tiny_deberta_config(vocab_size=40))
    torch.manual_seed(seed)
    classifier = model_module.DebertaClassifier(config, num_labels=3).to(dtype).eval()
    with torch.no_grad():  # nonzero biases, so that the teacher's initial biases differ from trained ones
        for name, p in classifier.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return classifier


HEAD = ("classifier", "pooler")


def nlu_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randint(4, 40, (4, 10), generator=g), torch.randint(3, (4,), generator=g)


def nlu_loss(model, step):
    ids, labels = nlu_batch(step)
    return F.cross_entropy(model(ids), labels)


def test_bitfit_trains_exactly_the_biases_and_head_and_matches_autograd():
    original = tiny_deberta()
    ours, reference = copy.deepcopy(original), copy.deepcopy(original)
    baselines.adapt(ours, "bitfit", trainable=HEAD)
    # the definition: every bias term, and the task head (Zaken et al. 2022)
    for name, p in reference.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.split(".")[0] in HEAD)
    expected = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == expected
    assert any("LayerNorm.bias" in n for n in expected) and not any(n.endswith("weight") and "deberta" in n for n in expected)
    train(ours, training.build_optimizer(ours, 1e-2, 0.0, training.METHODS["bitfit"]), loss=nlu_loss)
    train(reference, torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0), loss=nlu_loss)
    reference_parameters = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.detach(), reference_parameters[name].detach()) <= TOL, name
    # the teacher: the pretrained encoder (initial biases) under the shared, trained head
    teacher_reference = copy.deepcopy(original)
    teacher_reference.load_state_dict({n: p for n, p in ours.state_dict().items() if n.split(".")[0] in HEAD}, strict=False)
    ids, _ = nlu_batch(0)
    with torch.no_grad(), balora.pretrained_mode(ours):
        assert torch.equal(ours(ids), teacher_reference(ids))


def adapter_by_equation(h, down_w, down_b, up_w, up_b, activation):
    """Houlsby et al. / Pfeiffer et al.: h + W_up f(W_down h + b_down) + b_up."""
    return h + (activation(h @ down_w.T + down_b)) @ up_w.T + up_b


@pytest.mark.parametrize("kind, where, activation", [
    ("hadapter", ["attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"], torch.nn.functional.silu),
    ("padapter", ["layer.0.output.dense", "layer.1.output.dense"], torch.relu)])
def test_bottleneck_adapters_match_their_equation_in_float64(kind, where, activation):
    original = tiny_deberta(dtype=torch.float64)
    ours, reference = copy.deepcopy(original), copy.deepcopy(original)
    baselines.adapt(ours, kind, trainable=HEAD)
    wrapped = [name for name, _ in baselines.adapter_layers(ours)]
    assert all(any(name.endswith(w) or w in name for name in wrapped) for w in where)
    assert len(wrapped) == 2 * (2 if kind == "hadapter" else 1)  # 2 layers: after attention and FFN / after FFN
    ids, _ = nlu_batch(0)
    assert torch.equal(ours(ids), original(ids))  # zero-initialized up-projection: the pretrained function
    # the reference: the same equation as forward hooks on the unwrapped output projections, its own parameters
    reference.requires_grad_(False)
    for m in HEAD:
        reference.get_submodule(m).requires_grad_(True)
    parameters = []
    for name, layer in baselines.adapter_layers(ours):
        own = [t.detach().clone().requires_grad_(True) for t in (layer.adapter_down.weight, layer.adapter_down.bias,
                                                                  layer.adapter_up.weight, layer.adapter_up.bias)]
        parameters += own
        reference.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, own=own: adapter_by_equation(output, *own, activation))
    train(ours, training.build_optimizer(ours, 1e-2, 0.0, training.METHODS[kind]), loss=nlu_loss)
    head = [p for p in reference.parameters() if p.requires_grad]
    train(reference, torch.optim.AdamW(parameters + head, lr=1e-2, weight_decay=0.0), loss=nlu_loss)
    for (name, layer), start in zip(baselines.adapter_layers(ours), range(0, len(parameters), 4)):
        mine = (layer.adapter_down.weight, layer.adapter_down.bias, layer.adapter_up.weight, layer.adapter_up.bias)
        for a, b in zip(mine, parameters[start:start + 4]):
            assert rel_err(a.detach(), b.detach()) <= TOL, name
    assert rel_err(ours(ids), reference(ids)) <= TOL
    with torch.no_grad(), balora.pretrained_mode(ours):  # adapters off: the pretrained encoder, the shared head
        shared = copy.deepcopy(original)
        shared.load_state_dict({n: p for n, p in ours.state_dict().items() if n.split(".")[0] in HEAD}, strict=False)
        assert torch.equal(ours(ids), shared(ids))


# -----------------------------------------------------------------------------
# Files: save -> load -> the same model; LoRA-shaped ones export to peft


@pytest.mark.parametrize("method", ["loraplus", "lorafa", "milora"])
def test_lora_shaped_baselines_round_trip_and_export_to_peft(method, tmp_path, monkeypatch):
    monkeypatch.setattr("peft.optimizers.lorafa.is_bf16_available", lambda: False)
    original = tiny_llama()
    ours = copy.deepcopy(original)
    spec = training.METHODS[method]
    balora.add_lora(ours, TARGETS, r=4, alpha=8, init=spec.init, trainable=("lm_head",))
    train(ours, training.build_optimizer(ours, 1e-2, 0.0, spec))
    adapters.save_adapter(ours, tmp_path / "ours")
    reloaded = adapters.load_adapter(copy.deepcopy(original), tmp_path / "ours")
    ids = input_ids()
    assert rel_err(logits_of(reloaded, ids), logits_of(ours, ids)) <= TOL
    adapters.export_peft(ours, tmp_path / "peft", "tiny-llama")
    from_peft = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft").eval()
    assert rel_err(logits_of(from_peft, ids), logits_of(ours, ids)) <= 1e-4


@pytest.mark.parametrize("kind", ["full", "bitfit", "hadapter", "padapter"])
def test_other_baselines_round_trip(kind, tmp_path):
    original = tiny_deberta()
    ours = copy.deepcopy(original)
    baselines.adapt(ours, kind, trainable=HEAD)
    train(ours, training.build_optimizer(ours, 1e-2, 0.0, training.METHODS[kind]), loss=nlu_loss)
    adapters.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / adapters.CONFIG_NAME).read_text())
    assert config["method"] == kind and config["trainable"] == list(HEAD)
    reloaded = adapters.load_adapter(copy.deepcopy(original), tmp_path).eval()
    ids, _ = nlu_batch(9)
    with torch.no_grad():
        assert rel_err(reloaded(ids), ours(ids)) <= TOL
        with balora.pretrained_mode(reloaded), balora.pretrained_mode(ours):  # the teacher too
            assert rel_err(reloaded(ids), ours(ids)) <= TOL
    with pytest.raises(ValueError, match="does not fit the model"):
        other = model_module.DebertaConfig.from_hf(dict(test_train_nlu.tiny_deberta_config(40), hidden_size=16))
        adapters.load_adapter(model_module.DebertaClassifier(other, num_labels=3), tmp_path)


def test_only_lora_family_adapters_merge(tmp_path):
    """A Full FT adapter holds no LoRA layers to fold: tools/merge_adapter.py and --merge say so in one line."""
    from tools import merge_adapter

    ours = tiny_llama()
    baselines.adapt(ours, "full", trainable=())
    adapters.save_adapter(ours, tmp_path / "adapter")
    with pytest.raises(ValueError, match="holds a --method full adapter, not LoRA layers"):
        merge_adapter.merge(TINY_LLAMA, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="--method full has none"):
        training.check_merge("full", True)
    training.check_merge("loraplus", True)
    training.check_merge("full", False)


# -----------------------------------------------------------------------------
# #Params (Table 2, DeBERTa-v3-base; LoRA-family on LLaMA-2-7B's shapes by arithmetic)

DEBERTA_V3_BASE = dict(test_train_nlu.tiny_deberta_config(vocab_size=128100), hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                       position_buckets=256, max_relative_positions=-1)


def deberta_v3_base_on_meta():
    with torch.device("meta"):
        return model_module.DebertaClassifier(model_module.DebertaConfig.from_hf(DEBERTA_V3_BASE), num_labels=2)


def millions(count):
    return round(count / 1e6, 2)


def test_table2_params_counted_on_deberta_v3_base_shapes():
    """
    Table 2's #Params (DeBERTa-v3-base): Full FT 184M, BitFit 0.1M, HAdapter 1.22M, PAdapter 1.18M,
    LoRA / PiSSA / BA-LoRA 1.33M (r = 8 on every encoder linear layer; the head is not counted).
    Counted here on the model built on the meta device, head excluded.
    """
    def encoder_count(kind):
        model = deberta_v3_base_on_meta()
        baselines.adapt(model, kind)
        return baselines.trainable_parameter_count(model)

    full = encoder_count("full") - sum(p.numel() for n, p in deberta_v3_base_on_meta().named_parameters()
                                       if n.split(".")[0] in HEAD)
    assert round(full / 1e6) == 184
    assert round(encoder_count("bitfit") / 1e6, 1) == 0.1
    assert millions(encoder_count("hadapter")) == 1.20  # Table 2: 1.22M (Houlsby's size with m = 32; see docs)
    assert millions(encoder_count("padapter")) == 1.19  # Table 2: 1.18M
    shapes = [(m.out_features, m.in_features) for n, m in deberta_v3_base_on_meta().named_modules()
              if isinstance(m, nn.Linear) and n.startswith("deberta.")]
    assert millions(baselines.lora_parameter_count(shapes, r=8)) == 1.33


def test_lora_family_params_on_llama2_7b_shapes_by_arithmetic():
    """
    Table 1 gives no #Params column; LLaMA-2-7B's all-linear LoRA at r = 128 (Sec. 3.1's rank) is
    32 layers x 128 x (4 x 8192 + 3 x 15104) = 319,815,680 (LoRA, LoRA+, MiLoRA, PiSSA, BA-LoRA);
    LoRA-FA trains only B: 32 x 128 x (4 x 4096 + 2 x 11008 + 4096) = 174,063,616. The function is
    checked against counting on a real (tiny) model.
    """
    shapes = baselines.llama_linear_shapes()
    assert baselines.lora_parameter_count(shapes, r=128) == 32 * 128 * (4 * 8192 + 3 * 15104) == 319_815_680
    assert baselines.lora_parameter_count(shapes, r=128, train_A=False) == 32 * 128 * (4 * 4096 + 2 * 11008 + 4096)
    tiny = tiny_llama()
    tiny_shapes = baselines.llama_linear_shapes(hidden=32, intermediate=64, layers=2, kv_hidden=16)
    balora.add_lora(tiny, TARGETS, r=4, alpha=8, init="lora")
    assert baselines.trainable_parameter_count(tiny) == baselines.lora_parameter_count(tiny_shapes, r=4)
    training.build_optimizer(tiny, 1e-3, 0.0, training.METHODS["lorafa"])
    assert baselines.trainable_parameter_count(tiny) == baselines.lora_parameter_count(tiny_shapes, r=4, train_A=False)


# -----------------------------------------------------------------------------
# Both trainers take the new --method names


@pytest.fixture(scope="module")
def nlg_tiny(tmp_path_factory):
    return test_train_nlg.tiny.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def nlu_tiny(tmp_path_factory):
    return test_train_nlu.tiny.__wrapped__(tmp_path_factory)


@pytest.mark.parametrize("method", ["loraplus+reg", "full+reg"])
def test_train_nlg_runs_a_baseline(method, nlg_tiny, tmp_path):
    train_nlg.main(test_train_nlg.tiny_args(nlg_tiny, tmp_path, "--method", method, "--batch-size", "4",
                                            "--micro-batch-size", "2", "--max-steps", "2", "--max-samples", "8",
                                            "--no-progress"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == 2 and "consistency" in log[-1]
    reloaded = adapters.load_adapter(model_module.Llama.from_pretrained(nlg_tiny["model"]), tmp_path / "adapter").eval()
    assert os.path.isdir(tmp_path / "peft_adapter") == (method == "loraplus+reg")  # peft holds LoRA shapes only
    evaluated = evaluation.apply_adapter(model_module.Llama.from_pretrained(nlg_tiny["model"]), str(tmp_path / "adapter"))
    ids = torch.randint(100, (1, 8))
    with torch.no_grad():
        assert rel_err(evaluated(ids), reloaded(ids)) <= TOL  # eval.py's model (LoRA merged) is the trained one
        assert not torch.equal(evaluated(ids), model_module.Llama.from_pretrained(nlg_tiny["model"])(ids))


@pytest.mark.parametrize("method", ["bitfit+reg", "hadapter", "lorafa"])
def test_train_nlu_runs_a_baseline(method, nlu_tiny, tmp_path):
    result = train_nlu.main(test_train_nlu.tiny_flags(nlu_tiny, tmp_path, "--method", method, "--batch-size", "8",
                                                      "--max-steps", "2", "--eval-every", "2"))
    assert result["steps"] == 2
    config = json.loads((tmp_path / "adapter" / adapters.CONFIG_NAME).read_text())
    assert config.get("method", "lora") == {"bitfit+reg": "bitfit", "hadapter": "hadapter", "lorafa": "lora"}[method]


def test_a_loraplus_ratio_for_another_method_is_refused_before_the_run(nlg_tiny, nlu_tiny, tmp_path):
    """--loraplus-lr-ratio changes LoRA+'s optimizer only: given to another method, both trainers stop in one line."""
    message = r"--loraplus-lr-ratio 4 sets the lr ratio of --method loraplus \(and loraplus\+reg\); --method lora trains"
    with pytest.raises(ValueError, match=message):
        train_nlg.main(test_train_nlg.tiny_args(nlg_tiny, tmp_path / "nlg", "--method", "lora", "--loraplus-lr-ratio", "4"))
    with pytest.raises(ValueError, match=message):
        train_nlu.main(test_train_nlu.tiny_flags(nlu_tiny, tmp_path / "nlu", "--method", "lora", "--loraplus-lr-ratio", "4"))
    assert not (tmp_path / "nlg").exists() and not (tmp_path / "nlu").exists()  # nothing written
    training.check_loraplus_ratio("loraplus+reg", 4.0, 16.0)
    training.check_loraplus_ratio("lora", 16.0, 16.0)  # the default goes with every method


def test_on_a_llama_adapters_sit_after_o_proj_and_down_proj_and_bitfit_is_refused():
    original = tiny_llama()
    for kind, suffixes in (("hadapter", ("o_proj", "down_proj")), ("padapter", ("down_proj",))):
        model = copy.deepcopy(original)
        baselines.adapt(model, kind)
        wrapped = [name.rpartition(".")[2] for name, _ in baselines.adapter_layers(model)]
        assert sorted(wrapped) == sorted(suffixes * 2)  # 2 layers
        assert torch.equal(logits_of(model, input_ids()), logits_of(original, input_ids()))
    with pytest.raises(ValueError, match="BitFit: the model has no bias parameters"):
        baselines.adapt(copy.deepcopy(original), "bitfit")
