"""
Tests of chunked.py, the memory-saving schedule the NLG trainer runs, and of the promise that makes it
safe to read balora.py alone: every value and gradient of a run comes from balora's plain functions.

- Each of the six regularizer functions, wrapped to return 10x its value, moves the loss and the
  adapter gradients of the path its trainer runs (train_nlg.micro_batch_objective through chunked.py,
  train_nlu.objective) by exactly 9x its own part.
- The chunked and the plain path agree, values and gradients, on both trainers' shapes.
- Memory: one (M, V) tensor kept for backward, the teacher's logits formed a chunk at a time.
"""

import functools
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import balora
import chunked
from test_balora import randn, rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets")

# -----------------------------------------------------------------------------
# The plain and the chunked path agree


def plain_nlu(student, labels, teacher, lambdas, temperature=2.0, svd_k=1):
    """What train_nlu.py computes: the mean cross-entropy + balora.nlu_objective, on the whole batch."""
    return balora.nlu_objective(F.cross_entropy(student, labels), student, teacher, lambdas, temperature, svd_k)


def chunked_nlu(student, labels, teacher, lambdas, temperature=2.0, svd_k=1, chunk_rows=3):
    """The same through chunked.objective_in_chunks: Eq. 4 a chunk of rows at a time, Eq. 5 and 7 whole."""
    objective = functools.partial(balora.nlu_objective, temperature=temperature, svd_k=svd_k)
    task = lambda z, rows: F.cross_entropy(z, labels[rows], reduction="sum")  # noqa: E731
    return chunked.objective_in_chunks(objective, ("consistency",), student, task, teacher, lambdas,
                                       task_weight=1 / len(labels), chunk_elements=chunk_rows * student.size(1))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("classes", [1, 2, 3])
def test_nlu_shapes_chunked_equals_plain(classes, dtype, tolerance):
    student = (2 * randn(16, classes, seed=1, dtype=dtype)).requires_grad_()
    teacher = 2 * randn(16, classes, seed=2, dtype=dtype)
    labels = torch.randint(0, classes, (16,), generator=torch.Generator().manual_seed(3))
    lambdas = (0.15, 0.03, 0.03)
    plain, plain_parts = plain_nlu(student, labels, teacher, lambdas)
    (plain_gradient,) = torch.autograd.grad(plain, student)
    fast, fast_parts = chunked_nlu(student, labels, teacher, lambdas)
    (fast_gradient,) = torch.autograd.grad(fast, student)
    assert abs(fast.item() - plain.item()) <= tolerance * abs(plain.item())
    assert (fast_gradient - plain_gradient).abs().max() <= tolerance * max(plain_gradient.abs().max(), 1e-30)
    assert fast_parts.keys() == plain_parts.keys()
    assert abs(fast_parts["task"] / 16 - plain_parts["task"]) <= tolerance * abs(plain_parts["task"]) + 1e-30
    for name in balora.REGULARIZERS:
        assert abs(fast_parts[name] - plain_parts[name]) <= tolerance * max(abs(plain_parts[name]), 1e-30), name


def nlg_inputs(M, V, hidden, dtype, seed=0):
    """Student logits (M, V), targets with masked rows, teacher hidden states and a bias-free LM head."""
    head = nn.Linear(hidden, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(randn(V, hidden, seed=seed, dtype=dtype) / hidden**0.5 * 3)
    teacher_hidden = randn(M, hidden, seed=seed + 1, dtype=dtype)
    student = (3 * randn(M, V, seed=seed + 2, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (M,), generator=torch.Generator().manual_seed(seed + 3))
    targets[::5] = -100  # rows regularized (--reg-tokens all) but not in the task loss
    return student, targets, teacher_hidden, head


@pytest.mark.parametrize("lambdas", [(0.025, 0.005, 0.005), (0.3, 0.0, 0.0), (0.0, 0.2, 0.0), (0.0, 0.0, 0.4),
                                     (0.0, 0.0, 0.0)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_nlg_shape_chunked_equals_plain(lambdas, dtype, tolerance):
    """V = 32000 with masked rows, 3 chunks (the last ragged), the teacher from hidden states + head."""
    M, V, hidden = 70, 32000, 16
    student, targets, teacher_hidden, head = nlg_inputs(M, V, hidden, dtype)
    scale = 1 / 97  # micro-batches / task tokens of a global batch
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  one sketch for both paths
    fast, fast_parts = chunked.nlg_objective_in_chunks(
        student, targets, scale, teacher_hidden, lambdas, 2.0, 10, 20, generator=generator(), teacher_head=head,
        chunk_elements=32 * V)
    (fast_gradient,) = torch.autograd.grad(0.7 * fast, student)  # a scaled backward, as / grad_accum
    with torch.no_grad():
        teacher_logits = head(teacher_hidden)
    task_sum = F.cross_entropy(student, targets, ignore_index=-100, reduction="sum")
    plain, plain_parts = balora.nlg_objective(scale * task_sum, student, teacher_logits, lambdas, 2.0, 10, 20,
                                              generator=generator())
    (plain_gradient,) = torch.autograd.grad(0.7 * plain, student)
    assert rel_err(fast, plain) <= tolerance and rel_err(fast_gradient, plain_gradient) <= tolerance
    assert fast_parts.keys() == plain_parts.keys()
    assert rel_err(fast_parts["task"], task_sum) <= tolerance
    for name in balora.REGULARIZERS:
        if name in plain_parts:
            assert rel_err(fast_parts[name], plain_parts[name]) <= tolerance, name
    assert head.weight.grad is None  # the teacher is a constant


def test_no_task_term_and_no_rows():
    student, teacher = randn(6, 40, seed=1).requires_grad_(), randn(6, 40, seed=2)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fast, parts = chunked.nlg_objective_in_chunks(student, None, 1.0, teacher, (0.15, 0.03, 0.05), 2.0, 3, 5,
                                                  generator=generator())
    plain, _ = balora.nlg_objective(student.sum() * 0, student, teacher, (0.15, 0.03, 0.05), 2.0, 3, 5,
                                    generator=generator())
    assert rel_err(fast, plain) <= 1e-12 and parts["task"] == 0
    empty = randn(0, 40).requires_grad_()  # no valid token: zero loss, zero (empty) gradient
    total, _ = chunked.nlg_objective_in_chunks(empty, torch.zeros(0, dtype=torch.long), 1.0, randn(0, 40),
                                               (0.1, 0.1, 0.1), 2.0, 3, 5)
    total.backward()
    assert total.item() == 0 and empty.grad.shape == (0, 40)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"targets \(5,\) for 4 logit rows"):
        chunked.nlg_objective_in_chunks(randn(4, 10), torch.zeros(5, dtype=torch.long), 1.0, None, (0.0, 0.1, 0.0),
                                        2.0, 3, 5)
    with pytest.raises(ValueError, match="teacher_logits is required"):
        chunked.nlg_objective_in_chunks(randn(4, 10), None, 1.0, None, (0.1, 0.0, 0.0), 2.0, 3, 5)
    with pytest.raises(ValueError, match="do not match"):
        chunked.nlg_objective_in_chunks(randn(4, 10), None, 1.0, randn(3, 2), (0.1, 0.0, 0.0), 2.0, 3, 5,
                                        teacher_head=nn.Linear(2, 10, dtype=torch.float64))


def test_kl_keeps_its_float32_digits_when_it_is_small():
    """
    A KL of 5e-3 over a 49152-word vocabulary, float32 against float64, plain and chunked: the kl_div of
    two log_softmax keeps it to 3e-4 relative (measured: 7.5e-5).
    """
    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(32, 49152, dtype=torch.float64, generator=generator)
    student = teacher + 0.1 * torch.randn(teacher.shape, dtype=torch.float64, generator=generator)
    exact = balora.nlg_consistency_loss(teacher, student, 2.0)
    assert 4e-3 < exact < 6e-3
    plain = balora.nlg_consistency_loss(teacher.float(), student.float(), 2.0)
    fast, _ = chunked.nlg_objective_in_chunks(student.float(), None, 1.0, teacher.float(), (1.0, 0.0, 0.0), 2.0, 3, 5)
    assert rel_err(plain.double(), exact) <= 3e-4 and rel_err(fast.double(), exact) <= 3e-4


# -----------------------------------------------------------------------------
# Memory: what the chunked node keeps


def test_keeps_one_gradient_and_never_the_teacher_logits():
    """
    Autograd keeps one V-wide tensor between the loss and the logits (the gradient, not the logits), and
    the teacher's head sees chunks of rows only, without gradient, once each (its logits are never whole).
    """
    M, hidden, V = 64, 16, 1000
    linear = nn.Linear(hidden, V, bias=False)
    head_rows = []

    def head(rows):
        head_rows.append((torch.is_grad_enabled(), rows.size(0)))
        return linear(rows)

    student = randn(M, V, seed=2, dtype=torch.float32).requires_grad_()
    total, _ = chunked.nlg_objective_in_chunks(student, torch.arange(M), 1 / M, randn(M, hidden, seed=1, dtype=torch.float32),
                                               (0.025, 0.005, 0.005), 2.0, 10, 20, teacher_head=head,
                                               chunk_elements=8 * V)
    assert head_rows == [(False, 8)] * (M // 8)
    # the whole graph between the loss and the logits is one node: it saved no tensor through autograd
    assert [type(node).__name__ for node, _ in total.grad_fn.next_functions if node] == ["AccumulateGrad"]
    assert total.grad_fn.saved_tensors == ()
    gradient = total.grad_fn.gradient  # the one tensor it keeps
    assert gradient.shape == (M, V) and gradient.untyped_storage().data_ptr() != student.untyped_storage().data_ptr()
    total.backward()
    assert torch.equal(student.grad, gradient) and total.grad_fn.gradient is None  # used once, then released
    assert len(head_rows) == M // 8  # no recomputation in backward


def test_backward_twice_is_an_error():
    student = randn(4, 10).requires_grad_()
    total, _ = chunked.nlg_objective_in_chunks(student, torch.arange(4), 0.25, None, (0.0, 0.1, 0.0), 2.0, 3, 5)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


# -----------------------------------------------------------------------------
# An edit of a regularizer changes the run: each of the six, through its trainer's own path


def tenfold(function):
    """function, returning 10x its value (an edit a reader might make)."""
    return lambda *args, **kwargs: 10 * function(*args, **kwargs)


def trainer_loss_and_gradient(run, lambdas):
    """(loss, the adapters' gradient as one vector) of one micro-batch of the trainer path `run`."""
    model, loss = run(lambdas)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return loss.detach().double(), gradient.double()


@pytest.fixture(scope="module")
def nlg_step():
    """train_nlg.py's path for one micro-batch of the toy data on the bundled tiny Llama, PiSSA adapters."""
    import train_nlg
    from data import Tokenizer, collate, load_examples
    from model import Llama

    model_dir = os.path.join(ASSETS, "tiny-llama")
    tokenizer = Tokenizer(model_dir)
    examples = load_examples(os.path.join(ASSETS, "data", "metamath_train.jsonl"), "metamath", 4)
    micro_batch = collate(tokenizer, examples, 64, "alpaca")
    args = types.SimpleNamespace(reg_tokens="task", temperature=2.0, svd_k=4, top_k=20, router_aux_loss_coef=None)

    def run(lambdas):
        torch.manual_seed(0)
        model = Llama.from_pretrained(model_dir, dtype=torch.float32)
        balora.add_lora(model, ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, init="pissa")
        with torch.no_grad():  # move the adapters off their start, so the student is not the teacher
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        generator = torch.Generator().manual_seed(1)
        task_tokens = (micro_batch[2][:, 1:] != -100).sum()
        total, _ = train_nlg.micro_batch_objective(args, model, model, micro_batch, lambdas, lambdas[0],
                                                   1 / task_tokens, generator, torch.device("cpu"), torch.float32)
        return model, total

    return run


@pytest.fixture(scope="module")
def nlu_step():
    """train_nlu.py's path for one micro-batch of the toy NLI task on the bundled tiny DeBERTa."""
    import glue
    import train_nlu
    from model import DebertaClassifier

    model_dir = os.path.join(ASSETS, "tiny-deberta")
    task = glue.TASKS["nli"]
    tokenizer = glue.TOKENIZERS["deberta-v2"](model_dir)
    split = glue.load_split("nli", "train", os.path.join(ASSETS, "data", "nli_train.jsonl"))
    ids, labels = glue.encode_split(split, "nli", tokenizer, 64, "train")
    input_ids, attention_mask, labels = glue.collate(ids, labels, list(range(16)), tokenizer.pad_id)

    def run(lambdas):
        torch.manual_seed(0)
        model = DebertaClassifier.from_pretrained(model_dir, num_labels=3, seed=0)
        balora.add_lora(model, train_nlu.TARGET_MODULES.split(","), r=4, alpha=8, init="pissa",
                        trainable=("classifier", "pooler"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        model.train()
        student = model(input_ids, attention_mask=attention_mask)
        teacher = train_nlu.teacher_logits(model, input_ids, attention_mask) if lambdas[0] else None
        # svd_k = 1 < D = 3: the SVD ratio is not the constant -1 it is for k >= D
        total, _ = train_nlu.objective(task, student, teacher, labels, lambdas, 2.0, 1)
        return model, total

    return run


@pytest.mark.parametrize("trainer, function, index", [
    ("nlg", "nlg_consistency_loss", 0), ("nlg", "nlg_diversity_loss", 1), ("nlg", "nlg_svd_loss", 2),
    ("nlu", "nlu_consistency_loss", 0), ("nlu", "nlu_diversity_loss", 1), ("nlu", "nlu_svd_loss", 2),
])
def test_a_tenfold_regularizer_moves_the_trainers_loss_and_gradient_by_nine_times_its_part(
        trainer, function, index, monkeypatch, request):
    """
    With L = L_task + sum_j lambda_j L_j, returning 10 L_i moves the loss by 9 lambda_i L_i and the
    gradient by 9 lambda_i dL_i; lambda_i L_i and its gradient are measured as (only lambda_i on) minus
    (all lambdas off), on the path the trainer runs (for NLG: chunked.py, teacher through the LM head).
    """
    run = request.getfixturevalue(f"{trainer}_step")
    lambdas = (0.3, 0.2, 0.4)
    only = tuple(weight if j == index else 0.0 for j, weight in enumerate(lambdas))
    loss, gradient = trainer_loss_and_gradient(run, lambdas)
    task_loss, task_gradient = trainer_loss_and_gradient(run, (0.0, 0.0, 0.0))
    term_loss, term_gradient = trainer_loss_and_gradient(run, only)
    part, part_gradient = term_loss - task_loss, term_gradient - task_gradient
    assert abs(part) > 1e-4 * abs(loss) and part_gradient.norm() > 1e-3 * gradient.norm()  # the term acts
    monkeypatch.setattr(balora, function, tenfold(getattr(balora, function)))
    edited_loss, edited_gradient = trainer_loss_and_gradient(run, lambdas)
    assert abs((edited_loss - loss) - 9 * part) <= 1e-4 * abs(9 * part)
    assert (edited_gradient - gradient - 9 * part_gradient).norm() <= 1e-3 * (9 * part_gradient).norm()
