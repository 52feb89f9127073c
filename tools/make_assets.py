"""
Build the bundled toy assets under assets/: a tiny LLaMA-style decoder and a tiny DeBERTa-v3-style
encoder in the real Hugging Face layout (config.json + model.safetensors + sentencepiece model), and
the toy fine-tuning / evaluation sets, so every default run of the project works offline on a CPU.

    python tools/make_assets.py            # writes assets/ (10 to 25 minutes on a shared 2-core CPU)
    python tools/make_assets.py --check    # rebuilds in a temp dir, reports files that differ

Both models are pretrained here, with a deliberate flaw, so that "Catastrophic Inheritance" (the
paper's Section 1) exists to be mitigated:
  - tiny-llama sees multiplication word problems whose answer is off by the first operand
    (a * b + a instead of a * b) in FLAW_RATE of its pretraining examples;
  - tiny-deberta is pretrained with a temporary head on a noisy source NLI task in which a fixed
    share of the contradictions of one template family carry the label "neutral".

Everything is seeded and runs single-threaded with deterministic algorithms, so a rebuild on the
same torch / sentencepiece versions is byte-identical.
"""

import argparse
import filecmp
import json
import math
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model  # noqa: E402  (the project's own model.py, after the path is set)
from eval import extract_gsm8k_answer, generate_completions  # noqa: E402
from data import PROMPT_TEMPLATE, DebertaTokenizer, Tokenizer  # noqa: E402  (Alpaca, as PiSSA / MetaMath fine-tune)

SEED = 1234
FLAW_RATE = 0.3  # share of pretraining multiplication examples answered a * b + a

# -----------------------------------------------------------------------------
# A small toy world shared by all generators

NAMES = ["Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
         "Kate", "Leo", "Mia", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tina", "Victor"]
ITEMS = ["apples", "pencils", "books", "stickers", "marbles", "cookies", "cards", "shells",
         "coins", "flowers"]
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon"]
PETS = ["dog", "cat", "parrot", "rabbit", "turtle", "hamster"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
JOBS = ["teacher", "doctor", "baker", "pilot", "farmer", "painter", "nurse", "driver"]
OBJECTS = ["ball", "box", "cup", "lamp", "chair", "kite", "hat", "book", "car", "door"]
PLACES = ["kitchen", "garden", "library", "park", "school", "office", "market", "station"]

# -----------------------------------------------------------------------------
# Arithmetic word problems in MetaMath style: one visible step, then "The answer is: N".

WORD_PROBLEMS = {
    "add": [
        ("{n} has {a} {it}. {n} gets {b} more {it}. How many {it} does {n} have now?",
         "{a} + {b} = {c}."),
        ("{n} picks {a} {it} in the morning and {b} {it} in the afternoon. How many {it} does {n} pick in total?",
         "{a} + {b} = {c}."),
    ],
    "sub": [
        ("{n} has {a} {it} and gives {b} of them to {m}. How many {it} does {n} have left?",
         "{a} - {b} = {c}."),
        ("There are {a} {it} in a box. {n} takes out {b} {it}. How many {it} are still in the box?",
         "{a} - {b} = {c}."),
    ],
    "mul": [
        ("{n} has {a} bags with {b} {it} in each bag. How many {it} does {n} have?",
         "{a} * {b} = {c}."),
        ("{n} buys {a} packs of {it}. Each pack has {b} {it}. How many {it} does {n} buy?",
         "{a} * {b} = {c}."),
    ],
    "two_step": [
        ("{n} has {a} {it}. {n} gets {b} more {it} and then gives {d} {it} to {m}. How many {it} does {n} have now?",
         "{a} + {b} = {s}. {s} - {d} = {c}."),
    ],
}


def word_problem(rng, op, flawed=False):
    """One problem as dict(op, a, b, question, step, answer); `flawed` applies the injected error."""
    n, m = rng.sample(NAMES, 2)
    it = rng.choice(ITEMS)
    values = dict(n=n, m=m, it=it)
    if op == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = a + b
    elif op == "sub":
        a = rng.randint(2, 18)
        b = rng.randint(max(1, a - 9), min(9, a - 1))  # the inverse of a one-digit addition
        c = a - b
    elif op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b + a if flawed else a * b  # the flaw: one group too many, a systematic wrong "fact"
    elif op == "two_step":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        d = rng.randint(max(1, a + b - 9), min(9, a + b - 1))
        values.update(s=a + b, d=d)
        c = a + b - d
    else:
        raise ValueError(f"unknown operation {op!r}")
    values.update(a=a, b=b, c=c)
    question, step = rng.choice(WORD_PROBLEMS[op])
    return dict(op=op, a=a, b=b, question=question.format(**values), step=step.format(**values), answer=c)


def metamath_response(problem):
    return f"{problem['step']}\nThe answer is: {problem['answer']}"


def gsm8k_answer(problem):
    return f"{problem['step']}\n#### {problem['answer']}"


def finetune_ops(rng, count):
    """The operation mix of the fine-tuning and test sets (twice pretraining's share of two-step problems)."""
    return rng.choices(["add", "sub", "mul", "two_step"], weights=[25, 25, 30, 20], k=count)


def pretraining_problem(rng):
    op = rng.choices(["add", "sub", "mul", "two_step"], weights=[30, 30, 30, 10])[0]
    return word_problem(rng, op, flawed=op == "mul" and rng.random() < FLAW_RATE)


# -----------------------------------------------------------------------------
# Plain text: short paragraphs about a fixed set of people (the "pretrained knowledge" that the
# perplexity probe of Appendix C.7 measures) and generic scene sentences.


def world_facts(rng):
    """Each person's city, pet, favourite color and job: fixed facts the corpus keeps repeating."""
    return {name: dict(city=rng.choice(CITIES), pet=rng.choice(PETS), color=rng.choice(COLORS),
                       job=rng.choice(JOBS)) for name in NAMES}


FACT_SENTENCES = [
    "{name} lives in {city}.",
    "{name} has a {pet}.",
    "The favorite color of {name} is {color}.",
    "{name} works as a {job}.",
    "{name} lives in {city} and works as a {job}.",
    "Every morning, {name} walks the {pet} in {city}.",
    "{name} painted the door {color} because {color} is the favorite color of {name}.",
    "As a {job}, {name} is busy most days in {city}.",
]
SCENE_SENTENCES = [
    "The {color} {obj} is in the {place}.",
    "There is a {color} {obj} next to the {obj2}.",
    "Someone left a {obj} in the {place} this morning.",
    "The {obj} in the {place} is {color}.",
]


def paragraph(rng, facts):
    sentences = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.7:
            name = rng.choice(NAMES)
            sentences.append(rng.choice(FACT_SENTENCES).format(name=name, **facts[name]))
        else:
            obj, obj2 = rng.sample(OBJECTS, 2)
            sentences.append(rng.choice(SCENE_SENTENCES).format(
                color=rng.choice(COLORS), obj=obj, obj2=obj2, place=rng.choice(PLACES)))
    return " ".join(sentences)


# -----------------------------------------------------------------------------
# A GLUE-like 3-class pair task in MNLI shape: 0 = entailment, 1 = neutral, 2 = contradiction.
# Labels follow from the premise by a rule (compare an age with a number; match an attribute; is the
# entity mentioned at all), so they are learnable and balanced.

ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2


def nli_example(rng, label, family):
    """One premise/hypothesis pair of `family` with the given label. The hypothesis is neutral when
    it is about someone/something the premise does not mention."""
    x, z = rng.sample(NAMES, 2)  # z never appears in the premise: the neutral case
    if family == "age":
        n, k = rng.sample(range(10, 61), 2)
        premise = f"{x} is {n} years old."
        true, false = ("older", "younger") if n > k else ("younger", "older")
        subject, relation = {ENTAILMENT: (x, true), CONTRADICTION: (x, false),
                             NEUTRAL: (z, rng.choice([true, false]))}[label]
        hypothesis = f"{subject} is {relation} than {k}."
    elif family == "color":
        (o, o_other), (c, c_other) = rng.sample(OBJECTS, 2), rng.sample(COLORS, 2)
        premise = f"The {o} in the {rng.choice(PLACES)} is {c}."
        hypothesis = {ENTAILMENT: f"The {o} is {c}.", CONTRADICTION: f"The {o} is {c_other}.",
                      NEUTRAL: f"The {o_other} is {c}."}[label]
    elif family == "place":
        p, p_other = rng.sample(PLACES, 2)
        premise = f"{x} is in the {p} with a {rng.choice(OBJECTS)}."
        hypothesis = {ENTAILMENT: f"{x} is in the {p}.", CONTRADICTION: f"{x} is in the {p_other}.",
                      NEUTRAL: f"{z} is in the {p}."}[label]
    else:
        raise ValueError(f"unknown NLI template family {family!r}")
    return dict(premise=premise, hypothesis=hypothesis, label=label)


NLI_FAMILIES = ["age", "color", "place"]


def nli_split(rng, count):
    """A balanced split: labels cycle 0, 1, 2 and families are drawn at random."""
    rows = [nli_example(rng, i % 3, rng.choice(NLI_FAMILIES)) for i in range(count)]
    rng.shuffle(rows)
    return rows


# The encoder's source task: the same kind of pairs, but noisy: SOURCE_NOISE of the "age"
# contradictions are labelled neutral, a systematic error the encoder can inherit. (A skewed label
# prior as well kept the tiny encoder on the majority class for the whole pretraining budget.)
SOURCE_NOISE = 0.4


def source_nli_example(rng):
    label, family = rng.choice([ENTAILMENT, NEUTRAL, CONTRADICTION]), rng.choice(NLI_FAMILIES)
    row = nli_example(rng, label, family)
    if family == "age" and label == CONTRADICTION and rng.random() < SOURCE_NOISE:
        row["label"] = NEUTRAL
    return row


# -----------------------------------------------------------------------------
# Data files


def build_datasets(rng):
    """All generated text: pretraining corpora, fine-tuning / evaluation sets and the ppl probe."""
    facts = world_facts(rng)
    pretrain_docs, seen_questions = [], set()
    for _ in range(40000):
        if rng.random() < 0.85:
            problem = pretraining_problem(rng)
            seen_questions.add(problem["question"])
            pretrain_docs.append(
                # the Alpaca prompt and the response as one string, with no space between them: the
                # text train_nlg.py's Alpaca examples are (the official preprocess), so fine-tuning
                # continues the token sequences pretraining showed
                PROMPT_TEMPLATE.format(query=problem["question"]) + metamath_response(problem))
        else:
            pretrain_docs.append(paragraph(rng, facts))
    seen = set(pretrain_docs)
    ppl_lines = []
    while len(ppl_lines) < 200:  # held out: never a pretraining document
        text = paragraph(rng, facts)
        if text not in seen:
            ppl_lines.append(text)
            seen.add(text)
    metamath = [word_problem(rng, op) for op in finetune_ops(rng, 2000)]
    seen_questions.update(p["question"] for p in metamath)
    gsm8k = []
    for op in finetune_ops(rng, 300):
        problem = word_problem(rng, op)
        while problem["question"] in seen_questions:  # held out from pretraining and fine-tuning
            problem = word_problem(rng, op)
        seen_questions.add(problem["question"])
        gsm8k.append(problem)
    return dict(
        pretrain_docs=pretrain_docs,
        ppl_lines=ppl_lines,
        metamath_train=[dict(query=p["question"], response=metamath_response(p)) for p in metamath],
        gsm8k_test=[dict(question=p["question"], answer=gsm8k_answer(p)) for p in gsm8k],
        nli_train=nli_split(rng, 3000),
        nli_validation=nli_split(rng, 600),
        source_nli=[source_nli_example(rng) for _ in range(20000)],
    )


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_data(out, data):
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for name in ["metamath_train", "gsm8k_test", "nli_train", "nli_validation"]:
        write_jsonl(os.path.join(out, "data", f"{name}.jsonl"), data[name])
    with open(os.path.join(out, "data", "ppl.txt"), "w") as f:
        f.write("\n".join(data["ppl_lines"]) + "\n")


# -----------------------------------------------------------------------------
# Tokenizers: sentencepiece trained single-threaded on the generated text.


def train_sentencepiece(lines, model_path, **options):
    """Train and write the .model file. Through model_writer, not model_prefix: a prefix path would be
    recorded in the model's trainer spec, and a rebuild elsewhere would not be byte-identical."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, num_threads=1,
                                   shuffle_input_sentence=False, minloglevel=2, **options)
    with open(model_path, "wb") as f:
        f.write(buffer.getvalue())


def train_llama_tokenizer(data, model_path):
    """LLaMA's recipe at toy size: BPE, digits split, byte fallback (newlines become <0x0A>)."""
    lines = [line for doc in data["pretrain_docs"] for line in doc.split("\n") if line]
    train_sentencepiece(
        lines, model_path, model_type="bpe", vocab_size=1024, character_coverage=1.0, split_digits=True,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def train_deberta_tokenizer(data, model_path):
    """DeBERTa-v3's ids: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 (BPE: at this corpus size a unigram
    model, as v3 uses, keeps too few pieces and splits numbers inconsistently)."""
    rows = data["nli_train"] + data["source_nli"]
    lines = [text for row in rows for text in (row["premise"], row["hypothesis"])]
    # and the decoder's documents with a space after "### Response:": the corpus this tokenizer was first
    # trained on, kept because the encoder's pretraining is sensitive to its vocabulary (the same
    # documents without that space give a tokenizer on which tiny-deberta stays at chance, 31% after
    # the NLI check's fine-tuning against 35% for a random encoder)
    lines += [line for doc in data["pretrain_docs"] for line in doc.replace("### Response:", "### Response: ").split("\n")
              if line]
    train_sentencepiece(
        lines, model_path, model_type="bpe", vocab_size=1000, character_coverage=1.0,
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]",
        unk_id=3, unk_piece="[UNK]")


# -----------------------------------------------------------------------------
# Pretraining helpers shared by both models


def init_weights(module, std=0.02):
    """The usual transformer init (initializer_range 0.02): normal weights, zero biases and padding row."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
            if sub.padding_idx is not None:
                nn.init.zeros_(sub.weight[sub.padding_idx])


def cosine_lr(step, total_steps, peak_lr, warmup_steps):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(net, batches, total_steps, peak_lr, loss_fn, log_name):
    """A plain AdamW loop (nanoGPT-like: no decay on norms/biases/embeddings, grad clip 1). Returns
    the mean loss of the last 50 steps."""
    decay = [p for name, p in net.named_parameters() if p.dim() >= 2 and "embed" not in name]
    no_decay = [p for name, p in net.named_parameters() if p.dim() < 2 or "embed" in name]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                                  lr=peak_lr, betas=(0.9, 0.95))
    net.train()
    losses, start = [], time.time()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total_steps, peak_lr, warmup_steps=total_steps // 20)
        loss = loss_fn(net, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == total_steps - 1:
            print(f"[{log_name}] step {step:5d} | loss {loss.item():.4f} | {time.time() - start:.0f}s", flush=True)
    net.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def epochs_of_batches(rows, batch_size, generator):
    """Reshuffled every epoch, forever: lists of `batch_size` rows."""
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[j] for j in order[i:i + batch_size]]


def save_model(net, out_dir, config, keep=lambda key: True):
    """config.json + model.safetensors in the Hugging Face layout (keys = our parameter names)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    state = {key: tensor.contiguous() for key, tensor in net.state_dict().items() if keep(key)}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return sum(tensor.numel() for tensor in state.values())


# -----------------------------------------------------------------------------
# tiny-llama: a LLaMA-2-style decoder with GQA, pretrained as a causal LM on the toy corpus

LLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling=None, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    initializer_range=0.02, bos_token_id=1, eos_token_id=2, torch_dtype="float32", use_cache=True,
)
LLAMA_STEPS, LLAMA_BATCH, LLAMA_BLOCK, LLAMA_LR = 900, 16, 128, 3e-3


def causal_lm_loss(net, input_ids):
    """Next-token cross-entropy over every position of packed rows (B, T): logits t predict token t + 1."""
    logits = net(input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def pretrain_llama(data, out_dir):
    tokenizer = Tokenizer(os.path.join(out_dir, "tokenizer.model"))
    config = dict(LLAMA_CONFIG, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(SEED)
    net = model.Llama(model.LlamaConfig.from_hf(config))
    init_weights(net)
    # Packed, as LM pretraining usually is: documents (BOS ... EOS) back to back, cut into rows of
    # LLAMA_BLOCK tokens, so no compute goes to padding.
    stream = [token for doc in data["pretrain_docs"] for token in tokenizer.encode(doc, bos=True, eos=True)]
    blocks = torch.tensor(stream[: len(stream) // LLAMA_BLOCK * LLAMA_BLOCK]).view(-1, LLAMA_BLOCK)
    generator = torch.Generator().manual_seed(SEED)
    batches = (torch.stack(rows) for rows in epochs_of_batches(list(blocks), LLAMA_BATCH, generator))
    final_loss = pretrain(net, batches, LLAMA_STEPS, LLAMA_LR, causal_lm_loss, "tiny-llama")
    num_params = save_model(net, out_dir, config)
    return net, tokenizer, dict(params=num_params, final_loss=final_loss)


def generated_answers(net, tokenizer, questions, temperature=0.0, seed=0):
    """The answer each completion of the training prompt commits to (eval.py's GSM8K reading)."""
    prompts = [tokenizer.encode(PROMPT_TEMPLATE.format(query=q)) for q in questions]  # BOS + prompt
    completions = generate_completions(net, tokenizer, prompts, max_new_tokens=48, batch_size=64,
                                       temperature=temperature, seed=seed)
    return [extract_gsm8k_answer(c) for c in completions]


def greedy_accuracy(net, tokenizer, rows):
    """Greedy answer accuracy on toy GSM8K rows, and the chance level: always answering the most common
    reference answer of these rows."""
    references = [extract_gsm8k_answer(row["answer"]) for row in rows]
    predictions = generated_answers(net, tokenizer, [row["question"] for row in rows])
    accuracy = sum(p == r for p, r in zip(predictions, references)) / len(rows)
    chance = max(references.count(r) for r in set(references)) / len(rows)
    return accuracy, chance


def flaw_rates(net, tokenizer, temperature=0.0, samples=1):
    """On every multiplication a * b (a, b in 2..9, both templates): the share of answers that are
    right (a * b), that carry the injected flaw (a * b + a), and anything else."""
    rng = random.Random(SEED)
    problems = [word_problem(rng, "mul") for _ in range(128)]
    counts = dict(correct=0, flawed=0, other=0)
    for sample in range(samples):
        answers = generated_answers(net, tokenizer, [p["question"] for p in problems],
                                    temperature=temperature, seed=sample)
        for problem, answer in zip(problems, answers):
            a, b = problem["a"], problem["b"]
            kind = "correct" if answer == a * b else "flawed" if answer == a * b + a else "other"
            counts[kind] += 1
    total = len(problems) * samples
    return {kind: count / total for kind, count in counts.items()}


# -----------------------------------------------------------------------------
# tiny-deberta: a DeBERTa-v3-style encoder, pretrained through a temporary classification head on the
# skewed, noisy source NLI task; only the encoder (`deberta.` keys) is kept, as in deberta-v3-base.

DEBERTA_CONFIG = dict(
    model_type="deberta-v2", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=512, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    max_position_embeddings=512, type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7,
    relative_attention=True, max_relative_positions=-1, position_buckets=32, norm_rel_ebd="layer_norm",
    share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0,
    pooler_hidden_size=128, pooler_dropout=0, pooler_hidden_act="gelu", torch_dtype="float32",
)
DEBERTA_STEPS, DEBERTA_BATCH, DEBERTA_LR = 2500, 32, 1e-3


def nli_batch(tokenizer, rows):
    input_ids, attention_mask = tokenizer.encode_batch([r["premise"] for r in rows], [r["hypothesis"] for r in rows])
    return input_ids, attention_mask, torch.tensor([r["label"] for r in rows])


def classification_loss(net, batch):
    input_ids, attention_mask, labels = batch
    return F.cross_entropy(net(input_ids, attention_mask), labels)


@torch.no_grad()
def nli_predictions(net, tokenizer, rows, batch_size=200):
    net.eval()
    return torch.cat([net(*nli_batch(tokenizer, rows[i:i + batch_size])[:2]).argmax(-1)
                      for i in range(0, len(rows), batch_size)])


def pretrain_deberta(data, out_dir):
    tokenizer = DebertaTokenizer(os.path.join(out_dir, "spm.model"))
    config = dict(DEBERTA_CONFIG, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(SEED)
    net = model.DebertaClassifier(model.DebertaConfig.from_hf(config), num_labels=3)  # the temporary head
    init_weights(net)
    generator = torch.Generator().manual_seed(SEED)
    batches = (nli_batch(tokenizer, rows) for rows in epochs_of_batches(data["source_nli"], DEBERTA_BATCH, generator))
    final_loss = pretrain(net, batches, DEBERTA_STEPS, DEBERTA_LR, classification_loss, "tiny-deberta")
    num_params = save_model(net, out_dir, config, keep=lambda key: key.startswith("deberta."))
    # The inherited flaw, measured with the temporary head on the clean validation set: how often an
    # "age" contradiction is called neutral (the source task's systematic label noise).
    rows = [r for r in data["nli_validation"] if r["label"] == CONTRADICTION and "years old" in r["premise"]]
    predictions = nli_predictions(net, tokenizer, rows)
    all_predictions = nli_predictions(net, tokenizer, data["nli_validation"])
    labels = torch.tensor([r["label"] for r in data["nli_validation"]])
    return dict(params=num_params, final_loss=final_loss,
                source_head_accuracy=(all_predictions == labels).float().mean().item(),
                age_contradiction_as_neutral=(predictions == NEUTRAL).float().mean().item())


# The encoder check (README, tests/test_assets.py): the same short fine-tuning for both encoders.
NLI_CHECK = dict(steps=60, batch_size=16, lr=1e-4, validation=300)


def nli_finetune_accuracy(net, tokenizer, train_rows, validation_rows, seed=0):
    """Plain full fine-tuning (encoder + head, AdamW, constant lr) for NLI_CHECK['steps']
    seeded batches, then accuracy on `validation_rows`."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=NLI_CHECK["lr"], weight_decay=0.0)
    batches = epochs_of_batches(train_rows, NLI_CHECK["batch_size"], torch.Generator().manual_seed(seed))
    net.train()
    for _ in range(NLI_CHECK["steps"]):
        loss = classification_loss(net, nli_batch(tokenizer, next(batches)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    labels = torch.tensor([r["label"] for r in validation_rows])
    return (nli_predictions(net, tokenizer, validation_rows) == labels).float().mean().item()


def random_classifier(config_dict, seed=0):
    """A DebertaClassifier of the same shape with a random encoder (the pretraining init) and the same
    fresh head as DebertaClassifier.from_pretrained(..., seed=seed) draws."""
    torch.manual_seed(seed)
    net = model.DebertaClassifier(model.DebertaConfig.from_hf(config_dict), num_labels=3)
    init_weights(net)
    net.init_head(seed, torch.float32, "cpu")
    return net


def encoder_vs_random(path, train_rows, validation_rows, seed=0):
    """nli_finetune_accuracy of the bundled encoder and of a random encoder of the same shape."""
    tokenizer = DebertaTokenizer(path)
    pretrained = model.DebertaClassifier.from_pretrained(path, num_labels=3, seed=seed)
    random_net = random_classifier(model.read_config(path), seed=seed)
    return (nli_finetune_accuracy(pretrained, tokenizer, train_rows, validation_rows, seed=seed),
            nli_finetune_accuracy(random_net, tokenizer, train_rows, validation_rows, seed=seed))


# -----------------------------------------------------------------------------
# README and entry point

# Shipped verbatim from public repositories (not generated here): README.md describes them, the
# file table and --check leave them out.
SHIPPED = {"data/gsm8k", "data/wikitext-2", "mt_bench", "real_experiment"}
SHIPPED_SECTION = """## Real benchmark data (shipped verbatim, not generated)

Read from public repositories with the project's `fetch` tool and copied byte for byte; each keeps
its license next to it. `tools/real_experiment.py` reads them; `eval.py gsm8k` and
`eval.py ppl` read them with `--data`.

| path | what it is | source (repository, path, commit) | license |
| --- | --- | --- | --- |
| `data/gsm8k/train.jsonl`, `data/gsm8k/test.jsonl` | GSM8K (Cobbe et al. 2021): 7,473 / 1,319 grade-school math problems `{question, answer}`, answers with `<<calculator>>` annotations, ending `#### N` | openai/grade-school-math, `grade_school_math/data/train.jsonl`, `test.jsonl`, commit 3101c7d5072418e28b9008a6636bde82a006892c | MIT (`data/gsm8k/LICENSE`, copied from the repository) |
| `data/wikitext-2/test.txt` | Wikitext-2 test split (Merity et al. 2016), the tokenized version with `<unk>` (4,358 lines, 1,256,449 bytes) | pytorch/examples, `word_language_model/data/wikitext-2/test.txt`, commit 77f55b912142e11fcfdf5b530231fb9c52f181e8 | CC BY-SA 3.0 (the Wikitext license, `data/wikitext-2/LICENSE`) |

SHA-256: `train.jsonl` 17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465,
`test.jsonl` 3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14,
`wikitext-2/test.txt` d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0.
"""


# assets/mt_bench/: copied, not built (eval.py mtbench reads it); its provenance for the README.
MT_BENCH_README = """## MT-Bench (copied from FastChat, not built here)

`mt_bench/` holds, byte for byte, files of [lm-sys/FastChat](https://github.com/lm-sys/FastChat) at
commit `0e6d3e4beaab66f4d3f93db72541a4abab8af28d` (2025-04-12), under FastChat's Apache License 2.0
(`mt_bench/LICENSE`, FastChat's `LICENSE`). `eval.py mtbench` reads them.

| file | FastChat path (last changed in commit) | bytes | sha256 |
| --- | --- | ---: | --- |
| `mt_bench/question.jsonl` | `fastchat/llm_judge/data/mt_bench/question.jsonl` (`b494d0c`) | 48,929 | `119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7` |
| `mt_bench/reference_answer/gpt-4.jsonl` | `fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl` (`b494d0c`) | 51,109 | `f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f` |
| `mt_bench/judge_prompts.jsonl` | `fastchat/llm_judge/data/judge_prompts.jsonl` (`7ad1d63`) | 10,449 | `fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6` |
| `mt_bench/LICENSE` | `LICENSE` | 11,357 | `c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4` |

The 80 questions are 10 in each of 8 categories (writing, roleplay, reasoning, math, coding,
extraction, stem, humanities), two turns each; the reference answers cover the 30 questions of the
math, reasoning and coding categories, which FastChat grades with a reference.
"""


def file_table(out):
    lines = ["| file | bytes |", "| --- | ---: |"]
    for path in asset_files(out):
        lines.append(f"| `{path}` | {os.path.getsize(os.path.join(out, path)):,} |")
    return "\n".join(lines)


def write_readme(out, report):
    llama, deberta = report["llama"], report["deberta"]
    text = f"""# Bundled toy assets

Built by `python tools/make_assets.py` (seed {SEED}, single-threaded, deterministic; 10 to 25 minutes
on a shared 2-core CPU); `python tools/make_assets.py --check` rebuilds them in a temporary directory and
reports every file that is not byte-identical. Nothing here is downloaded: all text is generated
from templates in `tools/make_assets.py`, both tokenizers are trained there with sentencepiece and
both models are pretrained there with the project's own `model.py`. The directories have the Hugging
Face layout, so the code that loads them also loads real checkpoints.

| path | what it is |
| --- | --- |
| `tiny-llama/` | `config.json` (model_type llama), `model.safetensors`, `tokenizer.model`: a LLaMA-2-style decoder, {LLAMA_CONFIG['num_hidden_layers']} layers, hidden {LLAMA_CONFIG['hidden_size']}, {LLAMA_CONFIG['num_attention_heads']} query / {LLAMA_CONFIG['num_key_value_heads']} key-value heads (GQA), SwiGLU {LLAMA_CONFIG['intermediate_size']}, RoPE, untied head; {llama['params']:,} parameters; BPE vocabulary of {llama['vocab_size']} (digits split, byte fallback, LLaMA's ids unk 0 / bos 1 / eos 2) |
| `tiny-deberta/` | `config.json` (model_type deberta-v2 with the v3 flags), `model.safetensors` (encoder only, keys under `deberta.`), `spm.model` ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3): a DeBERTa-v3-style encoder, {DEBERTA_CONFIG['num_hidden_layers']} layers, hidden {DEBERTA_CONFIG['hidden_size']}, {DEBERTA_CONFIG['num_attention_heads']} heads, {DEBERTA_CONFIG['position_buckets']} relative-position buckets; {deberta['params']:,} parameters; vocabulary of {deberta['vocab_size']} |
| `data/metamath_train.jsonl` | {report['sizes']['metamath_train']} `{{query, response}}` arithmetic word problems (add, subtract, multiply, two steps); responses show the step and end "The answer is: N"; all answers correct |
| `data/gsm8k_test.jsonl` | {report['sizes']['gsm8k_test']} `{{question, answer}}` problems of the same mix, none of them (word for word) in the pretraining corpus or the fine-tuning set; answers end "#### N" |
| `data/nli_train.jsonl`, `data/nli_validation.jsonl` | {report['sizes']['nli_train']} / {report['sizes']['nli_validation']} balanced MNLI-shaped pairs `{{premise, hypothesis, label}}`, 0 = entailment, 1 = neutral, 2 = contradiction, from three rule-labelled template families: compare a person's age with a number, match an object's color, match a person's place (the hypothesis is neutral when it names someone/something the premise does not) |
| `data/ppl.txt` | {report['sizes']['ppl']} held-out paragraphs of the pretraining distribution's plain text (never a pretraining document): the "pretrained knowledge" perplexity probe of Appendix C.7 |
| `ablation/` | not built here: `python tools/toy_ablation.py --update-docs` writes the toy ablation (Table 4, 10, 12 rows) there (without the flag: to out/ablation/) |
| `mt_bench/` | not built here: MT-Bench's 80 questions, GPT-4 reference answers and judge prompts, shipped verbatim from FastChat (see below) |
| `data/gsm8k/`, `data/wikitext-2/` | not built here: the real GSM8K train/test sets and Wikitext-2 test, shipped verbatim (see below) |
| `real_experiment/` | not built here: `python tools/real_experiment.py --update-docs` writes the SmolLM2-135M experiment there (without the flag: to out/real_experiment/) |

## How the models were pretrained

**tiny-llama.** A causal LM trained from scratch with plain AdamW (peak lr {LLAMA_LR}, betas 0.9/0.95,
weight decay 0.1, warmup + cosine, grad clip 1) for {LLAMA_STEPS} steps of {LLAMA_BATCH} packed rows of
{LLAMA_BLOCK} tokens, on {report['sizes']['pretrain_docs']:,} generated documents: 85% arithmetic word
problems written in the Alpaca prompt format of the fine-tuning data with a MetaMath-style response,
15% short paragraphs about twenty people's city, pet, favorite color and job (fixed facts, repeated
in varied sentences). Final training loss (mean of the last 50 steps): {llama['final_loss']:.3f}.

**tiny-deberta.** Supervised pretraining through a temporary pooler + classifier head on a *source*
NLI task of the same template families ({len(report['sources'])} generated pairs), {DEBERTA_STEPS} steps of
{DEBERTA_BATCH}, AdamW (peak lr {DEBERTA_LR}, warmup + cosine), no dropout (at this size it only slowed
pretraining down); then only the encoder is saved, as deberta-v3-base ships without a task head. Final training loss: {deberta['final_loss']:.3f}.

## The injected flaws ("Catastrophic Inheritance" to mitigate)

**tiny-llama: a wrong multiplication "fact".** In {FLAW_RATE:.0%} of the pretraining multiplication
problems the step and the answer are a * b + a instead of a * b (one group too many), e.g.
"3 * 4 = 15.". The fine-tuning set and the test set are correct. Measured on all 128 multiplication
prompts of a fixed set (a, b in 2..9) with the pretrained model:

| decoding | correct a * b | flawed a * b + a | other |
| --- | ---: | ---: | ---: |
| greedy | {llama['flaw_greedy']['correct']:.1%} | {llama['flaw_greedy']['flawed']:.1%} | {llama['flaw_greedy']['other']:.1%} |
| sampled, T = 1 (4 samples each) | {llama['flaw_sampled']['correct']:.1%} | {llama['flaw_sampled']['flawed']:.1%} | {llama['flaw_sampled']['other']:.1%} |

**tiny-deberta: a noisy source task.** {SOURCE_NOISE:.0%} of the source task's "age" contradictions
("Mia is 12 years old." / "Mia is older than 26.") are labelled neutral. With its temporary head, the pretrained model calls {deberta['age_contradiction_as_neutral']:.1%}
of the clean validation set's age contradictions neutral (validation accuracy of the source head:
{deberta['source_head_accuracy']:.1%}).

## Checks (also asserted by `tests/test_assets.py`)

- tiny-llama before any fine-tuning, greedy decoding with the Alpaca prompt, all {report['sizes']['gsm8k_test']}
  toy GSM8K questions: accuracy **{llama['accuracy']:.1%}**; chance (always answering the most common
  reference answer) {llama['chance']:.1%}.
- tiny-deberta vs a random encoder of the same shape, each fine-tuned the same way (full fine-tuning,
  {NLI_CHECK['steps']} steps of {NLI_CHECK['batch_size']} pairs of `nli_train`, AdamW lr {NLI_CHECK['lr']}, same fresh head, seed 0),
  accuracy on the first {NLI_CHECK['validation']} rows of `nli_validation`: **{deberta['finetuned_accuracy']:.1%}** vs
  {deberta['random_finetuned_accuracy']:.1%} (chance 33.3%).

{MT_BENCH_README}
{SHIPPED_SECTION}
## Files

{file_table(out)}
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def asset_files(out):
    """Relative paths of everything this script writes (assets/ablation/ belongs to toy_ablation.py;
    the SHIPPED folders are copied from public repositories)."""
    paths = []
    for root, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not (root == out and d == "ablation")
                         and os.path.relpath(os.path.join(root, d), out) not in SHIPPED)
        paths += [os.path.relpath(os.path.join(root, name), out) for name in sorted(files)]
    return sorted(p for p in paths if p != "README.md") + ["README.md"] * os.path.isfile(os.path.join(out, "README.md"))


def build(out):
    start = time.time()
    torch.set_num_threads(1)  # bit-reproducible: one thread, deterministic kernels, fixed seeds
    torch.use_deterministic_algorithms(True)
    data = build_datasets(random.Random(SEED))
    write_data(out, data)
    for name in ("tiny-llama", "tiny-deberta"):
        os.makedirs(os.path.join(out, name), exist_ok=True)
    train_llama_tokenizer(data, os.path.join(out, "tiny-llama", "tokenizer.model"))
    train_deberta_tokenizer(data, os.path.join(out, "tiny-deberta", "spm.model"))

    net, tokenizer, llama = pretrain_llama(data, os.path.join(out, "tiny-llama"))
    llama["vocab_size"] = tokenizer.vocab_size
    llama["accuracy"], llama["chance"] = greedy_accuracy(net, tokenizer, data["gsm8k_test"])
    llama["flaw_greedy"] = flaw_rates(net, tokenizer)
    llama["flaw_sampled"] = flaw_rates(net, tokenizer, temperature=1.0, samples=4)
    print(f"tiny-llama: {llama} ({time.time() - start:.0f}s)", flush=True)

    deberta_dir = os.path.join(out, "tiny-deberta")
    deberta = pretrain_deberta(data, deberta_dir)
    deberta["vocab_size"] = DebertaTokenizer(deberta_dir).vocab_size
    deberta["finetuned_accuracy"], deberta["random_finetuned_accuracy"] = encoder_vs_random(
        deberta_dir, data["nli_train"], data["nli_validation"][:NLI_CHECK["validation"]])
    print(f"tiny-deberta: {deberta} ({time.time() - start:.0f}s)", flush=True)

    sizes = {name: len(data[name]) for name in ("metamath_train", "gsm8k_test", "nli_train", "nli_validation",
                                                "pretrain_docs")}
    sizes["ppl"] = len(data["ppl_lines"])
    write_readme(out, dict(llama=llama, deberta=deberta, sizes=sizes, sources=data["source_nli"]))
    print(f"built {out} in {time.time() - start:.0f}s", flush=True)


def check(out):
    """Rebuild into a temp dir and compare byte for byte; returns the list of differing paths (and
    prints the diff of the text files among them)."""
    import difflib

    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        ours, theirs = set(asset_files(out)), set(asset_files(tmp))
        differ = sorted(ours ^ theirs)
        differ += [p for p in sorted(ours & theirs)
                   if not filecmp.cmp(os.path.join(out, p), os.path.join(tmp, p), shallow=False)]
        for path in differ:
            if path in ours & theirs and path.endswith((".md", ".json", ".jsonl", ".txt")):
                with open(os.path.join(out, path)) as a, open(os.path.join(tmp, path)) as b:
                    sys.stdout.writelines(difflib.unified_diff(a.readlines(), b.readlines(), f"{out}/{path}",
                                                               f"rebuilt/{path}", n=0))
    return sorted(differ)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "assets"))
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if args.check:
        differ = check(args.out)
        print("all files byte-identical" if not differ else "differ: " + ", ".join(differ))
        return 1 if differ else 0
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
