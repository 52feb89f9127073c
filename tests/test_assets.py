"""
The bundled assets (built by tools/make_assets.py): they load through model.py (and, as a check of
the Hugging Face layout, through transformers), the data files have the expected fields, the tiny
LLaMA answers its toy test set well above chance before any fine-tuning, and the tiny encoder beats
a random encoder of the same shape after the same short fine-tuning.
"""

import os
import re

import pytest
import torch

from data import DebertaTokenizer, Tokenizer
import model
from tools import make_assets

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
LLAMA = os.path.join(ASSETS, "tiny-llama")
DEBERTA = os.path.join(ASSETS, "tiny-deberta")


def data(name):
    return make_assets.read_jsonl(os.path.join(ASSETS, "data", name))


def test_total_size_is_small():
    total = sum(os.path.getsize(os.path.join(ASSETS, p)) for p in make_assets.asset_files(ASSETS))
    assert total < 30 * 2**20


def test_tiny_llama_loads():
    config = model.read_config(LLAMA)
    assert config["model_type"] == "llama" and "rope_theta" in config
    net = model.Llama.from_pretrained(LLAMA)
    tokenizer = Tokenizer(LLAMA)
    assert 1_000_000 <= sum(p.numel() for p in net.parameters()) <= 5_000_000
    assert net.config.num_key_value_heads < net.config.num_attention_heads  # GQA
    assert net.model.embed_tokens.num_embeddings == tokenizer.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    text = "Alice has 3 bags with 4 cards in each bag.\nThe answer is: 12"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tiny_llama_matches_transformers():
    """The directory is a real Hugging Face checkpoint: transformers loads it and computes the same logits."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaForCausalLM.from_pretrained(LLAMA).eval()
    net = model.Llama.from_pretrained(LLAMA)
    tokenizer = Tokenizer(LLAMA)
    input_ids = torch.tensor([tokenizer.encode(data("gsm8k_test.jsonl")[0]["question"])])
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids), reference(input_ids).logits, rtol=1e-4, atol=1e-4)


def test_tiny_deberta_loads():
    config = model.read_config(DEBERTA)
    assert config["model_type"] == "deberta-v2" and config["relative_attention"] and config["share_att_key"]
    from safetensors import safe_open

    with safe_open(os.path.join(DEBERTA, "model.safetensors"), framework="pt") as f:
        assert all(key.startswith("deberta.") for key in f.keys())  # a bare encoder, as deberta-v3-base
    net = model.DebertaClassifier.from_pretrained(DEBERTA, num_labels=3)
    assert 900_000 <= sum(p.numel() for p in net.deberta.parameters()) <= 5_000_000
    tokenizer = DebertaTokenizer(DEBERTA)
    assert [tokenizer.sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    ids = tokenizer.encode("The cup is red.", "The cup is blue.")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(2) == 2 and 3 not in ids


def test_tiny_deberta_matches_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.DebertaV2Model.from_pretrained(DEBERTA).eval()
    net = model.DebertaClassifier.from_pretrained(DEBERTA, num_labels=3)
    row = data("nli_validation.jsonl")[0]
    input_ids, attention_mask = DebertaTokenizer(DEBERTA).encode_batch([row["premise"]], [row["hypothesis"]])
    with torch.no_grad():
        torch.testing.assert_close(net.deberta(input_ids, attention_mask),
                                   reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_data_files_parse():
    metamath = data("metamath_train.jsonl")
    assert len(metamath) >= 1000
    assert all(set(r) == {"query", "response"} and re.search(r"\nThe answer is: \d+$", r["response"]) for r in metamath)
    gsm8k = data("gsm8k_test.jsonl")
    assert len(gsm8k) >= 100
    assert all(set(r) == {"question", "answer"} and re.search(r"\n#### \d+$", r["answer"]) for r in gsm8k)
    assert not {r["query"] for r in metamath} & {r["question"] for r in gsm8k}  # test questions held out
    for name in ("nli_train.jsonl", "nli_validation.jsonl"):
        rows = data(name)
        assert all(set(r) == {"premise", "hypothesis", "label"} for r in rows)
        counts = [sum(r["label"] == label for r in rows) for label in range(3)]
        assert min(counts) >= 0.3 * len(rows), counts  # balanced 0 / 1 / 2
    with open(os.path.join(ASSETS, "data", "ppl.txt")) as f:
        lines = f.read().splitlines()
    assert len(lines) >= 100 and all(lines)


def test_tiny_llama_answers_above_chance_before_fine_tuning():
    """Greedy answers to 40 toy GSM8K questions; chance = always giving the most common reference answer."""
    net = model.Llama.from_pretrained(LLAMA)
    tokenizer = Tokenizer(LLAMA)
    accuracy, chance = make_assets.greedy_accuracy(net, tokenizer, data("gsm8k_test.jsonl")[:40])
    # Built: 70% on all 300 questions, chance 7.7%.
    assert chance < 0.15
    assert accuracy >= max(0.5, 4 * chance), (accuracy, chance)


def test_tiny_deberta_beats_random_encoder():
    """Same short fine-tuning (make_assets.NLI_CHECK) of the bundled and of a random encoder."""
    validation = data("nli_validation.jsonl")[: make_assets.NLI_CHECK["validation"]]
    pretrained, random_encoder = make_assets.encoder_vs_random(DEBERTA, data("nli_train.jsonl"), validation)
    # Built: 53.7% vs 35.0% (chance 33.3%).
    assert pretrained >= random_encoder + 0.1, (pretrained, random_encoder)
    assert pretrained >= 0.45, pretrained


def test_mt_bench_files_are_fastchats_as_documented():
    """assets/mt_bench/ holds the files assets/README.md names, with the sizes and sha256 it states,
    and they have MT-Bench's shape: 80 two-turn questions, 10 per category, GPT-4 reference answers
    for the 30 math / reasoning / coding questions, FastChat's single-grading prompts."""
    import hashlib
    import json

    rows = re.findall(r"^\| `(mt_bench/[^`]+)` \| .* \| ([\d,]+) \| `([0-9a-f]{64})` \|$", make_assets.MT_BENCH_README, re.M)
    assert len(rows) == 4
    for path, size, sha256 in rows:
        with open(os.path.join(ASSETS, path), "rb") as f:
            content = f.read()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (int(size.replace(",", "")), sha256), path
    assert make_assets.MT_BENCH_README in open(os.path.join(ASSETS, "README.md")).read()

    def jsonl(path):
        return [json.loads(line) for line in open(os.path.join(ASSETS, "mt_bench", path))]

    questions = jsonl("question.jsonl")
    categories = [q["category"] for q in questions]
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert {c: categories.count(c) for c in set(categories)} == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    with_reference = {q["question_id"] for q in questions if q["category"] in ("math", "reasoning", "coding")}
    assert {r["question_id"] for r in jsonl("reference_answer/gpt-4.jsonl")} == with_reference
    prompts = {p["name"]: p for p in jsonl("judge_prompts.jsonl")}
    for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"):
        assert prompts[name]["type"] == "single" and prompts[name]["output_format"] == "[[rating]]"
    assert "{ref_answer_1}" in prompts["single-math-v1"]["prompt_template"]
