"""
The memory-saving schedule of BA-LoRA's objective that train_nlg.py runs: balora's own functions, called a
chunk of rows at a time, their gradients formed by autograd inside the forward.

Why. On a 32000-150000 word vocabulary the NLG step's peak is the (M, V) logit matrix of its M valid
tokens and what autograd keeps around it: cross-entropy's log-probabilities, the teacher's (M, V)
logits, each regularizer's saved softmaxes and its own (M, V) gradient, all alive next to the model's
activations. Here, instead:

  1. Terms that are not means over rows (Eq. 12's SVD ratio couples all rows) run once on the whole
     matrix, under torch.autograd.grad; their gradient becomes the one (M, V) buffer. (Autograd forms
     Eq. 12's two gradient parts, the sketch's and the Frobenius norm's, as two (M, V) tensors before
     adding them: this pass is the objective's peak, one (M, V) above a hand-written in-place gradient;
     BENCHMARKS.md, "What the numbers say", measures it.)
  2. Terms that are means over rows (the task cross-entropy, Eq. 9's KL, Eq. 10's entropy) run on
     chunks of ~CHUNK_ELEMENTS logits: the chunk's share of the plain function (rows_in_chunk / M
     times its value on the chunk) under torch.autograd.grad, one term at a time, so only one term's
     chunk-sized temporaries exist at once. The teacher's logits are formed chunk by chunk from its
     final hidden states through `teacher_head` (the LM head), so no (M, V) teacher matrix exists.
  3. Each chunk's gradient is added into that buffer's rows: it is all the autograd node keeps for backward.

Nothing here is a formula: every value and gradient comes from balora.nlg_objective (Eq. 13) and the
regularizers it calls, so an edit of any of them changes this path too (tests/test_chunked.py checks
both, for each regularizer). This is the schedule of torchtune's ForwardKLWithChunkedOutputLoss (the
plain loss per chunk) and of Liger-Kernel's fused linear distillation (the gradient formed in forward).
"""

import functools

import torch
import torch.nn.functional as F

import balora

# logits per chunk of rows: each chunk-sized temporary is 4 MiB in float32. Smaller chunks cost time:
# each one streams the whole teacher LM head weight (V x hidden) through a matmul of few rows.
CHUNK_ELEMENTS = 1 << 20

# the terms of Eq. 13 that are means over the rows (tokens): they can run a chunk of rows at a time
NLG_ROW_MEANS = ("consistency", "diversity")


def row_chunks(num_rows, num_columns, chunk_elements=None):
    """Slices of about `chunk_elements` entries of a (num_rows, num_columns) matrix, whole rows each."""
    rows_per_chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(num_columns, 1))
    return [slice(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]


def _only(lambdas, names):
    """The weights of `lambdas` (in balora.REGULARIZERS' order) for the terms in `names`, 0 for the others."""
    return tuple(weight if name in names else 0.0 for name, weight in zip(balora.REGULARIZERS, lambdas))


def _value_and_gradient(function, logits):
    """function(logits) (a scalar) and its gradient with respect to `logits`, by autograd on a detached leaf."""
    leaf = logits.detach().requires_grad_()
    with torch.enable_grad():
        value = function(leaf)
        (gradient,) = torch.autograd.grad(value, leaf)
    return value.detach(), gradient


class _GradientFromForward(torch.autograd.Function):
    """A value whose gradient with respect to the logits was formed in forward: backward scales it."""

    @staticmethod
    def forward(ctx, logits, value, gradient):
        ctx.gradient = gradient
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        if ctx.gradient is None:
            raise RuntimeError("chunked objective: backward ran twice; its gradient is used once, in place")
        gradient, ctx.gradient = ctx.gradient, None
        return gradient.mul_(grad_value), None, None  # in place: no second (M, V) tensor


def objective_in_chunks(objective, row_means, student_logits, task_loss, teacher, lambdas, teacher_head=None,
                        task_weight=1.0, chunk_elements=None):
    """
    task_weight * task_loss + objective's regularizers, with the memory of one (M, V) gradient (see the
    module docstring). objective(task_loss, logits, teacher_logits, lambdas) -> (total, components) is
    balora.nlg_objective or nlu_objective with its other arguments bound; `row_means` names its terms
    that are means over rows. task_loss(logit_rows, rows) -> the task loss's part on those rows (the
    parts add up to the task loss), or None for no task term. `teacher`: the teacher's logits, or with
    `teacher_head` its final hidden states (teacher_head maps rows of them to logits; run without
    gradient). Returns (total, components): a total whose backward gives the gradient of the objective,
    and the detached terms by name ("task": the task loss before task_weight).
    """
    logits = balora._as_float(student_logits.detach())
    num_rows = logits.size(0)
    zero = logits.new_zeros(())
    total, components, gradient = zero, {"task": zero}, None

    def add(part, value):  # a term's value, summed over the passes that compute a part of it
        components[part] = components.get(part, zero) + value

    # 1. the terms that are not row means (Eq. 12): once, on the whole matrix; their gradient is the buffer
    whole = _only(lambdas, [name for name in balora.REGULARIZERS if name not in row_means])
    if any(whole) and num_rows > 0:
        def whole_terms(z):
            weighted, parts = objective(zero, z, None, whole)
            for name, value in parts.items():
                if name != "task":
                    add(name, value)
            return weighted

        total, gradient = _value_and_gradient(whole_terms, logits)
    if gradient is None:
        gradient = torch.zeros_like(logits)
    # 2. the task term and the row means, chunk by chunk, one term at a time
    terms = [name for name, weight in zip(balora.REGULARIZERS, lambdas) if name in row_means and weight != 0]
    passes = ["task"] * (task_loss is not None) + terms
    for rows in row_chunks(num_rows, logits.size(1), chunk_elements) if passes else ():
        share = (rows.stop - rows.start) / num_rows  # this chunk's part of a mean over all M rows
        teacher_rows = None
        if teacher is not None and terms:
            with torch.no_grad():
                teacher_rows = teacher[rows] if teacher_head is None else teacher_head(teacher[rows])
        for name in passes:
            def chunk_term(z, name=name):
                if name == "task":
                    part = task_loss(z, rows)
                    add("task", part.detach())
                    return task_weight * part
                weighted, parts = objective(zero, z, teacher_rows, _only(lambdas, [name]))
                add(name, share * parts[name])
                return share * weighted

            value, chunk_gradient = _value_and_gradient(chunk_term, logits[rows])
            total = total + value
            gradient[rows] += chunk_gradient
            del chunk_gradient  # before the next pass's temporaries
    return _GradientFromForward.apply(student_logits, total, gradient), components


def nlg_objective_in_chunks(student_logits, targets, task_scale, teacher, lambdas, temperature, svd_k, top_k,
                            generator=None, teacher_head=None, chunk_elements=None):
    """
    task_scale * sum_i CE(z_i, y_i) + balora.nlg_objective's regularizers (Eq. 13), scheduled by
    objective_in_chunks. The cross-entropy sum runs over the rows whose target is not -100 (targets
    (M,), or None for no task term); components["task"] is that sum, unscaled. `teacher` and
    `teacher_head` as objective_in_chunks (the trainer gives the teacher's hidden states and
    training.teacher_head, which applies model.logits).
    """
    balora._check_matrix("nlg_objective_in_chunks", student_logits)
    if targets is not None and targets.shape != student_logits.shape[:1]:
        raise ValueError(f"nlg_objective_in_chunks: targets {tuple(targets.shape)} for {student_logits.size(0)} logit rows")
    balora._require_teacher(teacher, lambdas)
    if lambdas[0] != 0 and (teacher.size(0) != student_logits.size(0)
                            or (teacher_head is None and teacher.shape != student_logits.shape)):
        raise ValueError(f"nlg_objective_in_chunks: teacher {tuple(teacher.shape)} and student logits "
                         f"{tuple(student_logits.shape)} do not match")
    # bound here, at call time: a replaced balora.nlg_objective (an edit, a test's wrapper) is the one run
    objective = functools.partial(balora.nlg_objective, temperature=temperature, svd_k=svd_k, top_k=top_k,
                                  generator=generator)

    def cross_entropy_sum(z, rows):
        return F.cross_entropy(z, targets[rows], ignore_index=-100, reduction="sum")

    return objective_in_chunks(objective, NLG_ROW_MEANS, student_logits, None if targets is None else cross_entropy_sum,
                               teacher, lambdas, teacher_head, task_scale, chunk_elements)
