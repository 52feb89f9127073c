"""
Write a Hugging Face decoder checkpoint (a merged one from tools/merge_adapter.py, or any base balora
loads: LLaMA, Mistral, Qwen2, Qwen3) as one GGUF file for llama.cpp / Ollama:

    python tools/export_gguf.py --model out/nlg/merged --out smollm2-tuned.gguf --type q8_0

What llama.cpp's convert_hf_to_gguf.py writes for these families, with the `gguf` package's writer:
  - tensors under llama.cpp's names (tools/import_gguf.py's GGUF_TO_HF, read backwards); LLaMA / Mistral
    q_proj and k_proj rows permuted to llama.cpp's interleaved rope pairs (import_gguf.permute_qk),
    Qwen2 / Qwen3 left as they are (llama.cpp ropes them in Hugging Face's half-split "neox" order);
  - 2-D weights in --type (f16, bf16, or q8_0: blocks of 32 weights, one float16 scale absmax/127 and
    32 int8 codes), 1-D tensors (norms, biases) in float32;
  - the hyper-parameters under "{arch}.*", the tokenizer under "tokenizer.ggml.*" (byte-level BPE from
    tokenizer.json as "gpt2", with the pre-tokenizer named as llama.cpp names it; SentencePiece
    tokenizer.model as "llama"), special token ids, add_bos/add_eos and the chat template.
One tensor at a time (the tensor table is laid out from the checkpoint's shapes first), into a
temporary file beside --out that is renamed into place at the end: a failure leaves no partial file.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import import_gguf  # noqa: E402
import merge_adapter  # noqa: E402
import model as models  # noqa: E402

# model_type -> (llama.cpp architecture, whether q/k are permuted): convert_hf_to_gguf maps Mistral to "llama".
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
TYPES = ("f16", "bf16", "q8_0")
# One pre-tokenizer of each kind import_gguf.pre_tokenizer_for builds, under the name llama.cpp uses for it.
PRE_TOKENIZERS = ("smollm", "gpt2", "llama-bpe", "qwen2")
# Text that tells the pre-tokenizers apart: digit runs, contractions, case, newlines, spaces, symbols.
PRE_TOKENIZER_PROBE = ("Hello World's 12345 apples, I'M here!\n\n  \tdon't  stop\r\n1,000.5 ++x ÄÖü 日本語 "
                       "🤖 x\n y   \n")


def gguf_name(hf_key):
    """llama.cpp's name of a Hugging Face key: import_gguf.GGUF_TO_HF read backwards; None when it has no entry."""
    to_gguf = {hf: name for name, hf in import_gguf.GGUF_TO_HF.items()}
    if hf_key in to_gguf:
        return to_gguf[hf_key]
    parts = hf_key.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        template = ".".join(parts[:2] + ["{}"] + parts[3:])
        if template in to_gguf:
            return to_gguf[template].format(parts[2])
    return None


# -----------------------------------------------------------------------------
# Hyper-parameters


def architecture(config, llama_config, path):
    """(llama.cpp's architecture name, whether q/k are permuted) of a checkpoint, or a one-line refusal."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{os.path.join(path, 'config.json')}: model_type={model_type!r} cannot be exported: "
                         f"expected one of {', '.join(ARCHITECTURES)}")
    if llama_config.rope_type != "default":
        raise ValueError(f"{os.path.join(path, 'config.json')}: rope type {llama_config.rope_type!r} cannot be "
                         "exported (llama.cpp needs a rope_freqs tensor for it)")
    return ARCHITECTURES[model_type]


def add_hyperparameters(writer, config, llama_config, name, file_type):
    """The "{arch}.*" and "general.*" keys llama.cpp reads for a LLaMA-style decoder."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(llama_config.hidden_size)
    writer.add_feed_forward_length(llama_config.intermediate_size)
    writer.add_block_count(llama_config.num_hidden_layers)
    writer.add_head_count(llama_config.num_attention_heads)
    writer.add_head_count_kv(llama_config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(llama_config.rms_norm_eps)
    writer.add_rope_freq_base(llama_config.rope_theta)
    writer.add_vocab_size(llama_config.vocab_size)
    writer.add_rope_dimension_count(llama_config.head_dim)
    if config.get("head_dim") or llama_config.head_dim != llama_config.hidden_size // llama_config.num_attention_heads:
        # as convert_hf_to_gguf: whenever config.json names head_dim (a reader's default may be another, Qwen3's 128)
        writer.add_key_length(llama_config.head_dim)
        writer.add_value_length(llama_config.head_dim)


# -----------------------------------------------------------------------------
# Tokenizer


def bpe_pre_tokenizer(tokenizer_json_path):
    """The tokenizer.ggml.pre name whose pre-tokenizer (import_gguf.pre_tokenizer_for) splits a probe text as this one does."""
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(tokenizer_json_path).pre_tokenizer
    if original is None:
        raise ValueError(f"{tokenizer_json_path}: no pre_tokenizer: not a byte-level BPE tokenizer llama.cpp reads")
    pieces = [piece for piece, _ in original.pre_tokenize_str(PRE_TOKENIZER_PROBE)]
    for name in PRE_TOKENIZERS:
        if [piece for piece, _ in import_gguf.pre_tokenizer_for(name).pre_tokenize_str(PRE_TOKENIZER_PROBE)] == pieces:
            return name
    raise ValueError(f"{tokenizer_json_path}: its pre-tokenizer splits text like none of llama.cpp's {list(PRE_TOKENIZERS)}")


def bpe_vocabulary(tokenizer_json_path, vocab_size):
    """
    (tokens, token types) of a byte-level BPE tokenizer.json, as convert_hf_to_gguf lists them: every id
    below vocab_size, an added token CONTROL when special and USER_DEFINED otherwise, an id the
    tokenizer lacks (the embedding padded past the vocabulary) "[PAD{id}]" UNUSED.
    """
    with open(tokenizer_json_path, encoding="utf-8") as f:
        tokenizer = json.load(f)
    if tokenizer["model"]["type"] != "BPE" or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{tokenizer_json_path}: not a byte-level BPE tokenizer (model {tokenizer['model']['type']}, "
                         f"decoder {(tokenizer.get('decoder') or {}).get('type')})")
    by_id = {index: (token, import_gguf.TOKEN_NORMAL) for token, index in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = (added["content"],
                              import_gguf.TOKEN_CONTROL if added["special"] else import_gguf.TOKEN_USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ValueError(f"{tokenizer_json_path}: token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        token, token_type = by_id.get(index, (f"[PAD{index}]", import_gguf.TOKEN_UNUSED))
        tokens.append(token)
        types.append(token_type)
    return tokens, types


def add_tokenizer(writer, path, vocab_size):
    """tokenizer.ggml.*: the vocabulary (BPE from tokenizer.json, else SentencePiece's tokenizer.model), special ids, chat template."""
    import gguf

    tokenizer_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        tokens, types = bpe_vocabulary(tokenizer_json, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(path), load_merges=True, n_vocab=vocab_size)
    elif os.path.isfile(os.path.join(path, "tokenizer.model")):
        vocabulary = list(gguf.SentencePieceVocab(Path(path)).all_tokens())
        if len(vocabulary) > vocab_size:
            raise ValueError(f"{path}/tokenizer.model has {len(vocabulary)} tokens, the model's vocab_size is {vocab_size}")
        vocabulary += [(f"[PAD{index}]".encode(), -1000.0, gguf.TokenType.UNUSED)
                       for index in range(len(vocabulary), vocab_size)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([text for text, _, _ in vocabulary])
        writer.add_token_scores([score for _, score, _ in vocabulary])
        writer.add_token_types([int(token_type) for _, _, token_type in vocabulary])
        special = gguf.SpecialVocab(Path(path), n_vocab=vocab_size)
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path!r}: the GGUF needs the tokenizer")
    special.add_to_gguf(writer, quiet=True)  # merges, special token ids, add_bos/add_eos, chat template


# -----------------------------------------------------------------------------
# Tensors


def quantization_type(kind, shape):
    """The GGML type of a tensor of `shape`: 1-D tensors stay float32, as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2:
        return Q.F32
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[kind]


def encoded(array, qtype):
    """The bytes (as numpy) of a float32 array in GGML type `qtype` (gguf.quants: llama.cpp's own rounding)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)


def encoded_nbytes(shape, qtype):
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"a row of {shape[-1]} values is not a whole number of {qtype.name} blocks of {block}")
    return int(np.prod(shape)) // block * type_size


def gguf_tensor(key, tensor, config, permute):
    """A checkpoint tensor as the float32 numpy array llama.cpp expects under gguf_name(key)."""
    array = tensor.float().numpy()
    if permute and key.endswith("self_attn.q_proj.weight"):
        array = import_gguf.permute_qk(array, config.num_attention_heads)
    elif permute and key.endswith("self_attn.k_proj.weight"):
        array = import_gguf.permute_qk(array, config.num_key_value_heads)
    return np.ascontiguousarray(array)


def export(model_dir, out, kind="f16", overwrite=False):
    """Write the GGUF file of the checkpoint at `model_dir` to `out` (module docstring); returns out."""
    import gguf

    if kind not in TYPES:
        raise ValueError(f"--type must be one of {list(TYPES)}, got {kind!r}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    config = models.read_config(model_dir)
    llama_config, _ = models.config_from(models.LlamaConfig, model_dir)
    arch, permute = architecture(config, llama_config, model_dir)

    plan = []
    for key, _, shape in merge_adapter.checkpoint_entries(model_dir):
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and llama_config.tie_word_embeddings):
            continue  # recomputed by llama.cpp; a tied head is token_embd itself
        name = gguf_name(key)
        if name is None:
            raise ValueError(f"{model_dir}: tensor {key!r} has no llama.cpp name (import_gguf.GGUF_TO_HF)")
        plan.append((key, name, shape, quantization_type(kind, shape)))

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        add_hyperparameters(writer, config, llama_config, os.path.basename(os.path.normpath(model_dir)), file_type)
        add_tokenizer(writer, model_dir, llama_config.vocab_size)
        for _, name, shape, qtype in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), encoded_nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        planned = iter(plan)
        for key, tensor in models.iter_checkpoint_tensors(model_dir):
            if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and llama_config.tie_word_embeddings):
                continue
            planned_key, _, _, qtype = next(planned)
            assert planned_key == key, (planned_key, key)  # the plan was made from the same files in the same order
            writer.write_tensor_data(encoded(gguf_tensor(key, tensor, llama_config, permute), qtype))
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 checkpoint as a GGUF file.")
    parser.add_argument("--model", required=True, help="the model directory (e.g. tools/merge_adapter.py's --out)")
    parser.add_argument("--out", required=True, help="the .gguf file to write (must not exist unless --overwrite)")
    parser.add_argument("--type", default="f16", choices=TYPES, help="the 2-D weights' type (default f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        out = export(args.model, args.out, args.type, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"export_gguf: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
