"""
Generation (Llama.generate, eval.generate_completions): greedy outputs token for token as
transformers' generate gives them (assets/tiny-llama, and the real SmolLM2-135M-Instruct), the LM
head applied at prefill to the last position only, stopped rows leaving the batch and the KV cache,
stop strings found as tokens arrive with the text post-hoc truncation gives, and seeded top-p sampling.
"""

import json
import os

import pytest
import torch

import eval as evaluation
from data import Tokenizer, prompt_ids
from model import Llama, nucleus_filter

transformers = pytest.importorskip("transformers")

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY = os.path.join(ASSETS, "tiny-llama")
QUESTIONS = ["Give three tips for staying healthy.", "What is the capital of France?",
             "Write a short poem about the sea and the wind over it.", "Name a prime number.",
             "Explain why the sky is blue in one sentence.", "Add 2 and 3."]


@pytest.fixture(scope="module")
def tiny():
    return Llama.from_pretrained(TINY), Tokenizer(TINY)


def left_padded(tokenizer, questions, prompt_format="alpaca"):
    return tokenizer.pad_batch([prompt_ids(tokenizer, q, prompt_format) for q in questions], padding_side="left")


def forward_calls(model):
    """Record (rows of the input, rows of the KV cache) of every Llama.forward call."""
    calls = []

    def hook(module, args):
        input_ids, cache = args[0], args[2] if len(args) > 2 else None
        calls.append((input_ids.shape[0], None if cache is None else cache.keys[0].shape[0]))

    return calls, model.register_forward_pre_hook(hook)


def head_rows(model):
    """Record the number of positions the LM head is applied to, per call."""
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[:-1].numel()))
    return rows, handle


def test_prefill_applies_the_head_to_the_last_position_only(tiny):
    model, tokenizer = tiny
    input_ids, attention_mask = left_padded(tokenizer, QUESTIONS[:3])
    rows, handle = head_rows(model)
    try:
        model.generate(input_ids, attention_mask, max_new_tokens=4)
    finally:
        handle.remove()
    assert rows == [3, 3, 3, 3]  # prefill: 3 rows x 1 position, not 3 x T; then one position per step
    # The default forward (training) still gives every position's logits.
    assert model(input_ids, attention_mask).shape == (3, input_ids.shape[1], model.config.vocab_size)


def test_greedy_equals_transformers_with_left_padding_and_rows_that_stop(tiny):
    """Prompts of different lengths, left padded; rows end at EOS at different steps and leave the
    batch: every token equals transformers' generate (which keeps finished rows, filled with EOS)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    input_ids, attention_mask = left_padded(tokenizer, QUESTIONS)
    calls, handle = forward_calls(model)
    try:
        ours = model.generate(input_ids, attention_mask, max_new_tokens=48, eos_token_id=tokenizer.eos_ids)
    finally:
        handle.remove()
    reference = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=48, eos_token_id=tokenizer.eos_ids, pad_token_id=tokenizer.eos_id)
    assert torch.equal(ours, expected)
    # Some rows stopped before others, and from then on the batch and the KV cache were smaller.
    batch_rows = [rows for rows, _ in calls]
    assert batch_rows[0] == len(QUESTIONS) and batch_rows[-1] < len(QUESTIONS)
    assert all(rows == cache_rows for rows, cache_rows in calls)
    assert batch_rows == sorted(batch_rows, reverse=True)
    generated = (ours[:, input_ids.shape[1]:] != tokenizer.eos_id).sum(1) + 1  # each row's tokens, its EOS included
    assert sum(batch_rows[1:]) == int(generated.clamp(max=48).sum()) - len(QUESTIONS)  # one step per token, none more


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2"])
def test_text_so_far_is_the_decode_of_the_tokens_so_far(name, request):
    """Token by token, the incremental text is the decode of all ids so far, once no character is incomplete
    (byte tokens of multi-byte characters, sentencepiece's dropped leading space)."""
    tokenizer = Tokenizer(TINY if name == "tiny-llama" else request.getfixturevalue("smollm2_dir"))
    ids = tokenizer.encode(" naïve café, 日本語 🙂 x\n  def f():\t«ok»", bos=False)
    text = evaluation.TextSoFar(tokenizer)
    for n, token in enumerate(ids, 1):
        text.add(token)
        whole = tokenizer.decode(ids[:n])
        assert whole.startswith(text.text)
        if not whole.endswith("\ufffd"):
            assert text.text == whole
    assert text.text == tokenizer.decode(ids)
    assert len(ids) > len(tokenizer.decode(ids).split())  # several tokens per word: the test spans tokens


def test_stop_strings_end_rows_early_with_the_post_hoc_text(tiny):
    """Stopping at stop strings as tokens arrive returns what cutting the whole completion returns, on
    stops inside one token, across tokens, at the start, absent, and on several rows; and a stopped row
    stops generating."""
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, q, "alpaca") for q in QUESTIONS]
    full = evaluation.generate_completions(model, tokenizer, prompts, max_new_tokens=40, batch_size=4)
    longest = max(full, key=len)
    assert len(longest) > 40
    cases = [(longest[20:24],), (longest[10:11], "\x00never"), (full[0][:3],), ("\n",), (" the",), ("zzzq",),
             tuple(text[len(text) // 2:len(text) // 2 + 2] for text in full if len(text) > 4)]
    stopped_early = 0
    for stops in cases:
        calls, handle = forward_calls(model)
        try:
            cut = evaluation.generate_completions(model, tokenizer, prompts, max_new_tokens=40, batch_size=4,
                                                  stop_sequences=stops)
        finally:
            handle.remove()
        assert cut == [evaluation.stop_at_stop_sequence(text, stops) for text in full], stops
        stopped_early += sum(rows for rows, _ in calls)
    calls, handle = forward_calls(model)
    try:
        evaluation.generate_completions(model, tokenizer, prompts, max_new_tokens=40, batch_size=4)
    finally:
        handle.remove()
    assert stopped_early < len(cases) * sum(rows for rows, _ in calls)  # the stop strings saved compute


def test_stop_strings_stop_generation_at_the_token_that_completes_them(tiny):
    model, tokenizer = tiny
    input_ids, attention_mask = left_padded(tokenizer, QUESTIONS[:1])
    full = model.generate(input_ids, attention_mask, max_new_tokens=30)[0, input_ids.shape[1]:].tolist()
    text = tokenizer.decode(full)
    # From the last character of token 11's text to the end of token 12's: it spans the two tokens.
    stop = text[len(tokenizer.decode(full[:11])) - 1:len(tokenizer.decode(full[:12]))]
    first = next(n for n in range(1, 31) if stop in tokenizer.decode(full[:n]))
    check = evaluation.stop_strings_reached(tokenizer, (stop,), 1)
    out = model.generate(input_ids, attention_mask, max_new_tokens=30, stop=check)
    assert out.shape[1] - input_ids.shape[1] == first and out[0, input_ids.shape[1]:].tolist() == full[:first]


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, q, "alpaca") for q in QUESTIONS[:4]]

    def sample(seed, top_p=0.95):
        return evaluation.generate_completions(model, tokenizer, prompts, max_new_tokens=12, batch_size=4,
                                               temperature=0.8, seed=seed, top_p=top_p)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_top_p_sampling_draws_only_from_the_nucleus(tiny, top_p):
    """2,000 first tokens sampled from one prompt: every one lies in the nucleus (the smallest set of most
    probable tokens whose probability reaches top_p), and without the cut some come from the tail."""
    model, tokenizer = tiny
    input_ids = torch.tensor([tokenizer.encode("The")])  # short: 2,000 copies of it prefill quickly
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = model(input_ids, attention_mask)[0, -1]
    probs = torch.softmax(logits.double(), dim=0)
    order = probs.argsort(descending=True).tolist()
    total, nucleus = 0.0, set()
    for token in order:
        nucleus.add(token)
        total += probs[token].item()
        if total >= top_p:
            break
    assert len(nucleus) > 1
    batch = (input_ids.expand(2000, -1), attention_mask.expand(2000, -1))

    def first_tokens(p):
        out = model.generate(*batch, max_new_tokens=1, temperature=1.0, top_p=p,
                             generator=torch.Generator().manual_seed(0))
        return set(out[:, -1].tolist())

    drawn = first_tokens(top_p)
    assert drawn <= nucleus and len(drawn) > 1
    assert first_tokens(1.0) - nucleus  # the tail that top-p removes is drawn without it
    assert torch.equal(nucleus_filter(logits[None], top_p)[0] > float("-inf"),
                       torch.isin(torch.arange(len(logits)), torch.tensor(sorted(nucleus))))


@pytest.mark.slow
def test_greedy_equals_transformers_on_smollm2(smollm2_dir):
    """SmolLM2-135M-Instruct, fp32: 8 GSM8K chat prompts of different lengths, left padded, 96 new tokens,
    token for token as transformers' generate."""
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer(smollm2_dir)
    with open(os.path.join(ASSETS, "data", "gsm8k", "test.jsonl")) as f:
        questions = [json.loads(line)["question"] for line in f][:40]
    questions = sorted(questions, key=len)[:8]  # short prompts: the test's time goes to the 96 steps
    input_ids, attention_mask = left_padded(tokenizer, questions, "chat")
    assert len(set(attention_mask.sum(1).tolist())) == 8  # every row a different length
    ours = Llama.from_pretrained(smollm2_dir).generate(input_ids, attention_mask, max_new_tokens=96,
                                                      eos_token_id=tokenizer.eos_ids)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=96, eos_token_id=tokenizer.eos_ids, pad_token_id=tokenizer.eos_ids[0])
    assert torch.equal(ours, expected)


def test_bench_generate_runs_both_generators_side_by_side(tmp_path):
    """tools/bench_generate.py on the tiny model: both generators' greedy tokens agree, the ratio is of their tokens/s."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(
        os.path.dirname(ASSETS), "tools", "bench_generate.py"))
    bench_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_generate)
    bench_generate.main(["--model", TINY, "--batch-sizes", "1,3", "--max-new-tokens", "6", "--repeats", "2",
                         "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompt_format"] == "alpaca" and [r["batch_size"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["same_rows"] == r["batch_size"] and r["same_positions"] == 1.0
        assert r["ours"]["tokens"] == r["transformers"]["tokens"] > 0 and len(r["ours"]["all_seconds"]) == 2
        assert r["ratio"] == pytest.approx(r["ours"]["tokens_per_s"] / r["transformers"]["tokens_per_s"])
