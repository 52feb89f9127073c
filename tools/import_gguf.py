"""
Convert a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model directory that
model.Llama.from_pretrained and transformers' Auto* classes both load:

    python tools/import_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf ~/.cache/balora/smollm2-135m-instruct

Writes config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json, chat_template.jinja and import_gguf.json (provenance: source and converter hashes). The directory is built next to OUT_DIR under a temporary
name and renamed into place at the end, so a killed run leaves no half-written OUT_DIR.

Weights are stored in float32: a quantized tensor dequantizes to float32 values (block scale x integer,
computed in float32); bfloat16 would round them a second time, and at 135M parameters float32 is only
~0.5 GB. Reads the file with the `gguf` package (llama.cpp's own reader); never imports transformers.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training  # noqa: E402  (atomic_directory)

# GGUF tensor name -> Hugging Face LlamaForCausalLM key, {} the layer index (torchtune's convert_weights style).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    # Qwen2's attention biases and Qwen3's per-head q/k norms (tools/export_gguf.py writes them)
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}

SUPPORTED_ARCHITECTURES = ("llama",)
# The tensor types dequantized here (gguf.quants.dequantize handles each); F32 is read as is.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# llama.cpp's tokenizer.ggml.token_type values.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's regex, as llama.cpp writes it for the byte-level pre-tokenizers (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_for(name):
    """
    The `tokenizers` pre-tokenizer of tokenizer.ggml.pre `name`, as llama.cpp's llama-vocab.cpp splits
    text for it (its regex list, applied in order) and as the model's original tokenizer.json did:
      "smollm" (also starcoder, refact, command-r, codeshell, exaone): isolate every digit (\\p{N}), then
      GPT-2's regex -- HF's SmolLM tokenizer.json is Digits(individual_digits) + ByteLevel(use_regex);
      "gpt2" / "default": GPT-2's regex alone (ByteLevel's built-in);
      "llama-bpe" / "qwen2" ...: one Split with the family's regex, then ByteLevel without its own regex.
    """
    from tokenizers import Regex, pre_tokenizers

    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level_regex])
    if name in ("gpt2", "default", "mpt", "olmo", "jais", None):
        return byte_level_regex
    splits = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
              "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
    if name not in splits:
        raise ValueError(f"tokenizer.ggml.pre={name!r} is not supported: expected one of "
                         f"{sorted(['smollm', 'gpt2', 'default'] + list(splits))}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[name]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


# -----------------------------------------------------------------------------
# Reading the GGUF


class GGUFFile:
    """The metadata and tensors of a GGUF file, with errors that name the missing key."""

    def __init__(self, path):
        import gguf

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path!r}")
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.fields = self.reader.fields
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def get(self, key, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key):
        if key not in self.fields:
            raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return self.fields[key].contents()


def dequantize(tensor):
    """A GGUF tensor as a float32 numpy array in PyTorch's (row-major, outermost first) shape order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(f"tensor {tensor.name!r} has type {kind}, which is not supported: expected one of "
                         f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
    # GGUF lists dimensions innermost first (ne0 = the contiguous row length): a linear weight
    # (out, in) is stored with shape [in, out]. The reader's array already has numpy's order, so
    # dequantize returns (out, in) -- check against the reversed GGUF shape rather than trust it.
    if tensor.tensor_type == GGMLQuantizationType.F32:
        array = np.asarray(tensor.data, dtype=np.float32)
    else:
        array = gguf_dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return array.reshape(shape)


def unpermute_qk(weight, heads):
    """
    Undo llama.cpp's convert permute of a q_proj / k_proj weight (heads * head_dim, in).

    Hugging Face's Llama rotates the two halves of each head (rotate_half: dim i pairs with
    i + head_dim / 2); llama.cpp's rope rotates adjacent pairs (2i, 2i + 1), Meta's original layout.
    convert_hf_to_gguf.py therefore reorders the rows of each head from [first half | second half] to
    interleaved: reshape(heads, 2, head_dim / 2, in).swapaxes(1, 2). The inverse reads the interleaved
    pairs back out: reshape(heads, head_dim / 2, 2, in).swapaxes(1, 2). k uses the key/value head count.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def permute_qk(weight, heads):
    """convert_hf_to_gguf.py's permute, which unpermute_qk undoes: each head's rows [first half | second half] interleaved."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def hf_key(gguf_name):
    """The Hugging Face key of a GGUF tensor name, through GGUF_TO_HF; None when it has no entry."""
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        template = ".".join([parts[0], "{}"] + parts[2:])
        if template in GGUF_TO_HF:
            return GGUF_TO_HF[template].format(parts[1])
    return None


# -----------------------------------------------------------------------------
# config.json, generation_config.json


def float32_value(value):
    """A float32 metadata value at its shortest float32 spelling (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def build_config(gguf_file):
    arch = gguf_file.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_file.path}: general.architecture={arch!r} is not supported: "
                         f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    scaling = gguf_file.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in gguf_file.tensors:
        raise ValueError(f"{gguf_file.path}: RoPE scaling ({arch}.rope.scaling.type={scaling!r} or a "
                         "rope_freqs.weight tensor) is not supported")
    hidden = int(gguf_file.require(f"{arch}.embedding_length"))
    heads = int(gguf_file.require(f"{arch}.attention.head_count"))
    kv_heads = int(gguf_file.require(f"{arch}.attention.head_count_kv"))
    head_dim = int(gguf_file.get(f"{arch}.attention.key_length") or gguf_file.get(f"{arch}.rope.dimension_count")
                   or hidden // heads)
    tokens = gguf_file.fields.get("tokenizer.ggml.tokens")
    vocab_size = gguf_file.get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        gguf_file.require(f"{arch}.vocab_size")  # raises, naming the key

    def token_id(name):
        value = gguf_file.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(gguf_file.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(gguf_file.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(gguf_file.require(f"{arch}.context_length")),
        "rms_norm_eps": float32_value(gguf_file.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float32_value(gguf_file.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        # No output.weight tensor: llama.cpp ties the LM head to token_embd.
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "torch_dtype": "float32",
    }


def build_generation_config(config):
    generation = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config[key] is not None:
            generation[key] = config[key]
    return generation


# -----------------------------------------------------------------------------
# tokenizer.json, tokenizer_config.json


def build_tokenizer(gguf_file):
    """
    (tokenizers.Tokenizer, tokenizer_config dict) of a byte-level BPE vocabulary
    (tokenizer.ggml.model == "gpt2"): the file's tokens, merges and token types, the pre-tokenizer of
    tokenizer.ggml.pre, CONTROL tokens as special added tokens and USER_DEFINED ones as plain added tokens
    (llama.cpp matches both whole in the text before BPE, as Hugging Face's added tokens do).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = gguf_file.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{gguf_file.path}: tokenizer.ggml.model={kind!r} is not supported: expected 'gpt2' "
                         "(byte-level BPE)")
    tokens = gguf_file.require("tokenizer.ggml.tokens")
    merges = gguf_file.get("tokenizer.ggml.merges") or []
    token_types = gguf_file.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)

    vocab = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"{gguf_file.path}: token {token!r} appears twice (ids {vocab[token]} and {index})")
        vocab[token] = index
    model = models.BPE(vocab=vocab, merges=[tuple(merge.split(" ", 1)) for merge in merges],
                       unk_token=None, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizer_for(gguf_file.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    # Added tokens keep their file ids: each is already in the vocabulary.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, token_type in zip(tokens, token_types) if token_type == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, token_type in zip(tokens, token_types) if token_type == TOKEN_USER_DEFINED])

    def special(name):
        index = gguf_file.get(f"tokenizer.ggml.{name}_token_id")
        return None if index is None else tokens[int(index)]

    bos, eos = special("bos"), special("eos")
    add_bos = bool(gguf_file.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(gguf_file.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        # llama.cpp prepends BOS / appends EOS on these files: the post-processor does it here.
        prefix = [f"{bos}:0"] if add_bos and bos else []
        suffix = [f"{eos}:0"] if add_eos and eos else []
        pieces = {piece.split(":")[0]: vocab[piece.split(":")[0]] for piece in prefix + suffix}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(prefix + ["$A:0"] + suffix),
            pair=" ".join(prefix + ["$A:0"] + suffix + prefix + ["$B:1"] + suffix),
            special_tokens=list(pieces.items()))
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    chat_template = gguf_file.get("tokenizer.chat_template")
    context_length = gguf_file.get(f"{gguf_file.require('general.architecture')}.context_length")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "additional_special_tokens": [token for token in (bos, eos) if token],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length) if context_length else None,
        "chat_template": chat_template,
    }
    return tokenizer, {key: value for key, value in tokenizer_config.items() if value is not None}, chat_template


# -----------------------------------------------------------------------------
# Weights


def convert_tensors(gguf_file, config, progress=True):
    """{Hugging Face key: float32 torch tensor} of every GGUF tensor, q/k un-permuted, shapes checked."""
    from tqdm import tqdm

    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    expected_shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "lm_head.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        layer = f"model.layers.{i}."
        expected_shapes.update({
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            layer + "mlp.gate_proj.weight": (config["intermediate_size"], hidden),
            layer + "mlp.up_proj.weight": (config["intermediate_size"], hidden),
            layer + "mlp.down_proj.weight": (hidden, config["intermediate_size"]),
        })

    state_dict = {}
    for name, tensor in tqdm(gguf_file.tensors.items(), desc="dequantize", unit="tensor", disable=not progress):
        key = hf_key(name)
        if key is None:
            raise ValueError(f"tensor {name!r} has no Hugging Face name in GGUF_TO_HF")
        weight = dequantize(tensor)
        if key.endswith("self_attn.q_proj.weight"):
            weight = unpermute_qk(weight, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            weight = unpermute_qk(weight, kv_heads)
        if tuple(weight.shape) != expected_shapes[key]:
            raise ValueError(f"tensor {name!r} ({key}) has shape {tuple(weight.shape)}, "
                             f"expected {expected_shapes[key]} from the metadata")
        state_dict[key] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))  # a writable copy
    missing = sorted(set(expected_shapes) - set(state_dict) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set()))
    if missing:
        raise ValueError(f"{gguf_file.path}: tensors missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state_dict


# -----------------------------------------------------------------------------
# The directory


def sha256(path):
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(src, out_dir, progress=True, overwrite=False):
    """Write the Hugging Face directory of GGUF file `src` to `out_dir` (atomically: temp dir + rename)."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    gguf_file = GGUFFile(src)
    config = build_config(gguf_file)
    tokenizer, tokenizer_config, chat_template = build_tokenizer(gguf_file)
    if tokenizer.get_vocab_size(with_added_tokens=True) != config["vocab_size"]:
        raise ValueError(f"{src}: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                         f"the model's vocab_size is {config['vocab_size']}")
    state_dict = convert_tensors(gguf_file, config, progress)

    with training.atomic_directory(out_dir, overwrite) as tmp_dir:
        def write_json(name, obj):
            with open(os.path.join(tmp_dir, name), "w") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")

        write_json("config.json", config)
        write_json("generation_config.json", build_generation_config(config))
        write_json("tokenizer_config.json", tokenizer_config)
        tokenizer.save(os.path.join(tmp_dir, "tokenizer.json"))
        if chat_template:
            with open(os.path.join(tmp_dir, "chat_template.jinja"), "w") as f:
                f.write(chat_template)
        save_file(state_dict, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        # Provenance: which file and which converter made this directory (a cache can tell it is stale).
        write_json("import_gguf.json", {"source": os.path.basename(src), "source_sha256": sha256(src),
                                        "converter_sha256": sha256(os.path.abspath(__file__))})
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a llama-architecture GGUF file into a Hugging Face directory.")
    parser.add_argument("src", help="the .gguf file")
    parser.add_argument("out_dir", help="the directory to write (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        out_dir = convert(args.src, args.out_dir, progress=not args.quiet, overwrite=args.overwrite)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"import_gguf: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
