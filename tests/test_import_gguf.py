"""
tools/import_gguf.py against two independent oracles: transformers loading the GGUF file itself
(`from_pretrained(dir, gguf_file=...)`: its own dequantization, q/k un-permute and tokenizer builder)
and llama.cpp's pre-tokenization regexes for tokenizer.ggml.pre == "smollm". Then our model.py and
transformers on the converted directory: logits and greedy generation. A tiny GGUF written here with
gguf.GGUFWriter (every supported tensor type, GQA, tied and untied heads) checks the weight path in a
second; the real SmolLM2-135M-Instruct (the `smollm2_dir` / `smollm2_gguf` fixtures) checks the rest.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from model import Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("import_gguf", os.path.join(REPO, "tools", "import_gguf.py"))
import_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_gguf)

SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
]

# Unicode, digits, whitespace runs, emoji, special-token strings.
CORPUS = [
    "Hello, world! The answer is: 42.",
    "In 2024, 12345 apples cost $3.50 and 1,000,000 pears cost -7.",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤖🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "  leading spaces,\ttabs\t\tand   runs of    spaces  ",
    "new\nlines\n\n\nand\r\nwindows endings",
    "contractions: don't, I'm, we've, they'll, she'd, IT'S",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>balora<file_sep>README.md<empty_output>",
    "",
]
# Whitespace runs that end right before a digit: llama.cpp's "smollm" pre-tokenizer (and HF's
# original SmolLM2 tokenizer.json: Digits(individual_digits) then ByteLevel) isolates the digit first,
# so the run stays one piece ("ĠĠĠ"); transformers' GGUF tokenizer builder has no "smollm" entry and
# falls back to plain GPT-2 splitting ("ĠĠ", "Ġ1"). Compared against llama.cpp's regexes instead.
WHITESPACE_BEFORE_DIGIT = ["a   1", "x\t\t 42\n\n\n  7", "total:    100"]

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def max_relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def gguf_location(gguf_path):
    return {"pretrained_model_name_or_path": os.path.dirname(gguf_path), "gguf_file": os.path.basename(gguf_path)}


# -----------------------------------------------------------------------------
# A tiny llama GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes one


def permute_for_gguf(weight, heads):
    """llama.cpp's convert `permute` (HF rotate_half layout -> interleaved pairs), written independently."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_k_quant_blocks(rng, shape, kind):
    """Q4_K / Q6_K bytes of a (rows, cols) tensor: random quants and sub-scales, block scales set small."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(2e-4 if kind == Q.Q4_K else 1e-4).tobytes(), dtype=np.uint8)
    if kind == Q.Q4_K:  # d, dmin (f16) open the 144-byte block
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    else:  # d (f16) closes the 210-byte block
        data[..., 208:210] = scale
    return data.reshape(shape[0], -1)


def write_tiny_gguf(path, tied=True, architecture="llama", types=None, drop_key=None):
    """
    A 2-layer GQA llama (hidden 256, 4 heads, 2 kv heads) with a 256-byte + 1-merge + 2-control-token vocabulary.
    `types` maps a GGUF tensor name to a GGMLQuantizationType (default: one of each supported type).
    Returns the Hugging Face state dict (float32, before quantization) it was made from.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, heads, kv_heads, head_dim, ffn, layers = 256, 4, 2, 64, 256, 2  # K-quant rows are 256 long
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    rng = np.random.default_rng(0)
    types = dict({"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "blk.0.attn_q.weight": Q.F16,
                  "blk.0.attn_k.weight": Q.BF16, "blk.0.attn_v.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_1,
                  "blk.1.attn_q.weight": Q.Q4_K, "blk.1.ffn_up.weight": Q.Q8_0}, **(types or {}))

    writer = gguf.GGUFWriter(path, architecture)
    values = {
        "block_count": layers, "context_length": 128, "embedding_length": hidden, "feed_forward_length": ffn,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads,
    }
    for key, value in values.items():
        if key != drop_key:
            writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    writer.add_uint32(f"{architecture}.rope.dimension_count", head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def normal(*shape, scale=0.15):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hf = {"model.embed_tokens.weight": normal(vocab, hidden, scale=1.0), "model.norm.weight": 1 + normal(hidden)}
    if not tied:
        hf["lm_head.weight"] = normal(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": 1 + normal(hidden), p + "post_attention_layernorm.weight": 1 + normal(hidden),
                   p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": normal(ffn, hidden), p + "mlp.up_proj.weight": normal(ffn, hidden),
                   p + "mlp.down_proj.weight": normal(hidden, ffn)})
    hf_of_gguf = {}
    for gguf_name in ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"]) + [
            f"blk.{i}.{part}.weight" for i in range(layers) for part in
            ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]:
        hf_of_gguf[gguf_name] = import_gguf.hf_key(gguf_name)
    for gguf_name, key in hf_of_gguf.items():
        weight = hf[key]
        if key.endswith("q_proj.weight"):
            weight = permute_for_gguf(weight, heads)
        elif key.endswith("k_proj.weight"):
            weight = permute_for_gguf(weight, kv_heads)
        kind = types.get(gguf_name, Q.F32)
        if kind == Q.F32:
            writer.add_tensor(gguf_name, weight)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name, weight.astype(np.float16))
        elif kind in (Q.Q4_K, Q.Q6_K):  # gguf has no K-quant quantizer: random blocks with small scales
            writer.add_tensor(gguf_name, random_k_quant_blocks(rng, weight.shape, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {key: torch.from_numpy(value) for key, value in hf.items()}


def transformers_gguf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(**gguf_location(gguf_path), dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_weights_and_logits_match_transformers_gguf_loader(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    gguf_path = str(tmp_path / "tiny.gguf")
    original = write_tiny_gguf(gguf_path, tied=tied)
    out = import_gguf.convert(gguf_path, str(tmp_path / "hf"), progress=False)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2 and config["head_dim"] == 64

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = transformers_gguf_model(gguf_path)
    ours, theirs = converted.state_dict(), reference.state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key  # same dequantization, same un-permute
    # F32 tensors come back exactly; q/k of the F32 layer (blk.1.attn_k) match the unpermuted original.
    assert torch.equal(ours["model.layers.1.self_attn.k_proj.weight"], original["model.layers.1.self_attn.k_proj.weight"])
    assert torch.allclose(ours["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"],
                          atol=1e-3)  # F16

    input_ids = torch.tensor([[5, 70, 200, 33, 256, 12, 99, 140, 7, 1]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        assert torch.equal(converted(input_ids=input_ids).logits, expected)
        assert max_relative_error(Llama.from_pretrained(out)(input_ids), expected) <= 1e-4


def test_broken_unpermute_is_caught_by_the_tiny_oracle(tmp_path, monkeypatch):
    """Skipping the q/k un-permute gives other logits than transformers' GGUF loader (what the test above guards)."""
    gguf_path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(gguf_path)
    monkeypatch.setattr(import_gguf, "unpermute_qk", lambda weight, heads: weight)
    out = import_gguf.convert(gguf_path, str(tmp_path / "hf"), progress=False)
    input_ids = torch.tensor([[5, 70, 200, 33, 256, 12, 99, 140, 7, 1]])
    with torch.no_grad():
        expected = transformers_gguf_model(gguf_path)(input_ids=input_ids).logits
        assert max_relative_error(Llama.from_pretrained(out)(input_ids), expected) > 1e-2


# -----------------------------------------------------------------------------
# Errors


def run_cli(args, capsys):
    code = import_gguf.main(list(args) + ["--quiet"])
    return code, capsys.readouterr().err.strip()


def test_unsupported_architecture_tensor_type_and_missing_key_are_one_line_errors(tmp_path, capsys):
    from gguf import GGMLQuantizationType as Q

    write_tiny_gguf(str(tmp_path / "arch.gguf"), architecture="gpt2")
    code, err = run_cli([str(tmp_path / "arch.gguf"), str(tmp_path / "out1")], capsys)
    assert code == 1 and "general.architecture='gpt2' is not supported" in err and len(err.splitlines()) == 1

    write_tiny_gguf(str(tmp_path / "q5.gguf"), types={"blk.1.ffn_down.weight": Q.Q5_0})
    code, err = run_cli([str(tmp_path / "q5.gguf"), str(tmp_path / "out2")], capsys)
    assert code == 1 and "'blk.1.ffn_down.weight' has type Q5_0, which is not supported" in err
    assert len(err.splitlines()) == 1

    write_tiny_gguf(str(tmp_path / "nokey.gguf"), drop_key="feed_forward_length")
    code, err = run_cli([str(tmp_path / "nokey.gguf"), str(tmp_path / "out3")], capsys)
    assert code == 1 and "'llama.feed_forward_length' is missing" in err and len(err.splitlines()) == 1

    for name in ("out1", "out2", "out3"):  # nothing left behind, not even the temporary directory
        assert not os.path.exists(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["arch.gguf", "nokey.gguf", "q5.gguf"]


def test_a_failed_write_leaves_no_output_directory(tmp_path, monkeypatch):
    import safetensors.torch

    gguf_path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(gguf_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        import_gguf.convert(gguf_path, str(tmp_path / "hf"), progress=False)
    assert os.listdir(tmp_path) == ["tiny.gguf"]
    monkeypatch.undo()
    import_gguf.convert(gguf_path, str(tmp_path / "hf"), progress=False)
    with pytest.raises(FileExistsError):
        import_gguf.convert(gguf_path, str(tmp_path / "hf"), progress=False)


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def test_smollm2_config_from_metadata(smollm2_dir):
    config = json.load(open(os.path.join(smollm2_dir, "config.json")))
    expected = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert {key: config[key] for key in expected} == expected
    tokenizer_config = json.load(open(os.path.join(smollm2_dir, "tokenizer_config.json")))
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer_config["add_bos_token"] is False
    with open(os.path.join(smollm2_dir, "chat_template.jinja")) as f:
        assert f.read() == tokenizer_config["chat_template"]


def test_smollm2_our_logits_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True, padding_side="right")
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(smollm2_dir)
    with torch.no_grad():
        expected = reference(**batch).logits
        logits = ours(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert max_relative_error(logits[mask], expected[mask]) <= 1e-4
    # The model is a working one: next-token loss on real English is far below uniform (ln 49152 = 10.8).
    valid = mask[0, 1:]
    loss = torch.nn.functional.cross_entropy(expected[0, :-1][valid], batch["input_ids"][0, 1:][valid])
    assert loss < 4.0


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2_dir, smollm2_gguf):
    """Same weights after dequantization and un-permute, hence the same logits (~20 s: transformers' loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True, padding_side="right")
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference = transformers_gguf_model(smollm2_gguf)
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, reference(**batch).logits)


def llama_cpp_smollm_ids(tokenizer, text):
    """
    llama.cpp's tokenization for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): special tokens matched
    whole first, then its two regexes in order -- "\\p{N}" (every digit alone), then GPT-2's -- each
    keeping the text between matches as pieces, then byte-level BPE on each piece (the vocabulary's own
    merges, through the `tokenizers` BPE model alone: no pre-tokenizer involved).
    """
    import regex

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = sorted((token.content for token in tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
    byte_spelling = bytes_to_unicode()
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")

    def split(pattern, pieces):
        out = []
        for piece in pieces:
            start = 0
            for match in pattern.finditer(piece):
                if match.start() > start:
                    out.append(piece[start:match.start()])
                out.append(match.group())
                start = match.end()
            if start < len(piece):
                out.append(piece[start:])
        return out

    ids = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(tokenizer.token_to_id(chunk))
            continue
        for piece in split(gpt2, split(regex.compile(r"\p{N}"), [chunk] if chunk else [])):
            spelled = "".join(byte_spelling[b] for b in piece.encode("utf-8"))
            ids.extend(token.id for token in tokenizer.model.tokenize(spelled))
    return ids


def test_smollm2_pre_tokenizer_is_llama_cpp_smollm(smollm2_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(smollm2_dir, "tokenizer.json"))
    for text in CORPUS + WHITESPACE_BEFORE_DIGIT:
        assert tokenizer.encode(text).ids == llama_cpp_smollm_ids(tokenizer, text), text
    assert tokenizer.encode("a   1").tokens == ["a", "ĠĠĠ", "1"]
    assert tokenizer.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir, smollm2_gguf):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_dir)
    theirs = AutoTokenizer.from_pretrained(**gguf_location(smollm2_gguf))
    for text in CORPUS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    for generation_prompt in (True, False):
        rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        assert rendered == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
    system = [{"role": "system", "content": "Be terse."}] + CHAT + [{"role": "assistant", "content": "Paris."}]
    assert ours.apply_chat_template(system, tokenize=False) == theirs.apply_chat_template(system, tokenize=False)


def test_smollm2_greedy_chat_answer_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24,
                                      do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
        ours = Llama.from_pretrained(smollm2_dir).generate(input_ids, max_new_tokens=24,
                                                           eos_token_id=tokenizer.eos_token_id)
    assert ours.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(expected[0, input_ids.shape[1]:])
