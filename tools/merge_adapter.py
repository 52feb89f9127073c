"""
Merge a saved adapter into its base model and write a standalone Hugging Face checkpoint, which
transformers, vLLM, TGI (and tools/export_gguf.py, for llama.cpp) load with no balora and no peft:

    python tools/merge_adapter.py --model BASE_DIR --adapter out/nlg/adapter --out out/nlg/merged

Every adapted layer holds W_res + s B A (DoRA: m V / ||V||_c), a 4-bit base's W_res dequantized first
(and on a 4-bit base every other linear layer its dequantized NF4 codes, as the adapted model computes),
in --dtype: exactly the weight adapters.merge_lora gives the adapted model, because each layer is
rebuilt by adapters.apply_adapter (as load_adapter rebuilds it) and merged by adapters.merge_lora.

One tensor at a time: the base checkpoint is streamed (model.iter_checkpoint_tensors), each adapted
weight is merged alone, and each tensor is written straight into its place in the safetensors shard,
whose header is laid out first from the shapes. So memory holds a tensor or two at a time beyond the
interpreter, never a copy of the model (SmolLM2's merge: docs/export.md). The output is config.json (the base's, dtype updated), model-0000i-of-0000n.safetensors +
model.safetensors.index.json in the base checkpoint's key names, the tokenizer files, the chat
template and generation_config.json, built in a temporary directory beside --out and renamed into
place: a failed merge leaves no half checkpoint.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adapters  # noqa: E402
import balora  # noqa: E402
import model as models  # noqa: E402
import nf4  # noqa: E402
import training  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The safetensors format's names of the dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
MAX_SHARD_SIZE = 5 * 10**9  # bytes: Hugging Face's own default shard size for save_pretrained
# What a model directory holds besides its weights and config.json: copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spm.model", "vocab.json",
                   "merges.txt", "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
ENCODERS = ("deberta-v2", "roberta")  # model types loaded by model.DebertaClassifier; every other is a decoder
NOT_MERGED = ("t5", "mt5", "umt5")  # encoder-decoders (t5.py): their adapters stay adapters


def check_mergeable(model_type, where="--model"):
    """One line for a model family this tool cannot rebuild (T5): before anything is trained or written."""
    if model_type in NOT_MERGED:
        raise ValueError(f"{where}: a {model_type} model's adapter cannot be merged (merge_adapter.py rebuilds "
                         "Llama-family decoders and DeBERTa / RoBERTa encoders); keep the adapter directory")


# -----------------------------------------------------------------------------
# Key names: the base checkpoint's, our model's, and the merged checkpoint's


def key_names(config, checkpoint_keys):
    """
    (ours, hf): ours(checkpoint key) is our parameter name of a base checkpoint key (None: a tensor the
    model does not use, left out), hf(our name) is its key in the merged checkpoint -- transformers'
    names of the model as loaded: a decoder's keys are ours; DeBERTa's are ours too (a bare encoder's
    keys gain the `deberta.` prefix of the classification model); RoBERTa's go through model.ROBERTA_KEYS.
    """
    model_type = config.get("model_type")
    if model_type == "roberta":
        bare = not any(key.startswith(("roberta.", "classifier.")) for key in checkpoint_keys)
        as_hf = (lambda key: "roberta." + key) if bare else (lambda key: key)
        return (lambda key: None if models._is_roberta_unused(as_hf(key)) else models.roberta_key(as_hf(key)),
                models.roberta_hf_key)
    if model_type == "deberta-v2":
        bare = not any(key.startswith(("deberta.", "classifier.")) for key in checkpoint_keys)
        prefix = "deberta." if bare else ""
        return (lambda key: None if models._is_pretraining_only(key) else prefix + key), (lambda name: name)
    return (lambda key: None if key.endswith("rotary_emb.inv_freq") else key), (lambda name: name)


def skeleton(path, config, adapter_tensors):
    """Our model of the base, on the meta device (no memory): what the adapter is checked against."""
    with torch.device("meta"):
        if config.get("model_type") in ENCODERS:
            classifier = models.DebertaClassifier
            family_config, _ = models.config_from(models.DebertaConfig, path)
            return classifier(family_config, num_labels(config, adapter_tensors))
        family_config, _ = models.config_from(models.LlamaConfig, path)
        return models.Llama(family_config)


def num_labels(config, adapter_tensors):
    """The classifier's size: the adapter's trained head decides (train_nlu.py saves it), else the config's."""
    if "classifier.weight" in adapter_tensors:
        return adapter_tensors["classifier.weight"].shape[0]
    return len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)


# -----------------------------------------------------------------------------
# One adapted layer


def holder_of(name, weight):
    """A module holding only nn.Linear `weight` at the qualified `name` (its parents empty modules)."""
    root = parent = nn.Module()
    *parents, leaf = name.split(".")
    for part in parents:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    parent.add_module(leaf, linear)
    return root


def merged_weight(name, weight, adapter_config, adapter_tensors):
    """
    The merged weight of the adapted linear layer `name` whose base weight is `weight` (in the output
    dtype): the layer is rebuilt exactly as load_adapter rebuilds it in the whole model
    (adapters.apply_adapter: the PiSSA residual from A0, B0, an NF4 base re-quantized), then merged by
    adapters.merge_lora.
    """
    layer_config = dict(adapter_config, targets=[name], trainable=[])
    prefix = name + "."
    layer_tensors = {key: tensor for key, tensor in adapter_tensors.items()
                     if key.startswith(prefix) and "." not in key[len(prefix):]}
    holder = holder_of(name, weight)
    with contextlib.redirect_stdout(io.StringIO()):  # add_lora / quantize_base report per call: once per layer here
        adapters.apply_adapter(holder, layer_config, layer_tensors, where=f"the adapter's {name}")
    adapters.merge_lora(holder)
    return holder.get_submodule(name).weight.detach()


def quantized_weight(name, weight, quantize):
    """
    A frozen linear layer the adapter left alone, on a 4-bit base: nf4.quantize_base stores every such
    layer in NF4 too (as QLoRA does), so the adapted model computes with its dequantized codes.
    """
    holder = holder_of(name, weight)
    with contextlib.redirect_stdout(io.StringIO()):
        nf4.quantize_base(holder, quantize)
    return holder.get_submodule(name).dequantize()


def is_quantized_with_the_base(our_model, name):
    """Whether nf4.quantize_base stores parameter `name` in NF4: the weight of a linear layer other than an output layer."""
    module_name, _, leaf = name.rpartition(".")
    module = dict(our_model.named_modules()).get(module_name)
    return leaf == "weight" and isinstance(module, nn.Linear) and module_name.rpartition(".")[2] not in balora.NEVER_ADAPTED


# -----------------------------------------------------------------------------
# Safetensors shards, written one tensor at a time


def shard_plan(entries, max_shard_size):
    """[[(key, dtype, shape), ...] per shard]: entries in order, a new shard when the next would pass max_shard_size."""
    shards, size = [[]], 0
    for key, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, dtype, shape))
        size += nbytes
    return shards


def safetensors_header(entries):
    """
    The header of a safetensors file holding `entries` in order: an 8-byte little-endian length, then
    JSON {key: {dtype, shape, data_offsets}} padded with spaces to a multiple of 8 bytes (the format's
    alignment), the tensors' bytes following back to back.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class ShardWriter:
    """Writes the planned shards in order; each tensor must come in the plan's order, dtype and shape."""

    def __init__(self, directory, shards):
        self.directory, self.shards = directory, shards
        self.names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
                      if len(shards) > 1 else ["model.safetensors"])
        self.shard, self.position, self.file = -1, 0, None

    def write(self, key, tensor):
        if self.file is None or self.position == len(self.shards[self.shard]):
            self._next_shard()
        expected = self.shards[self.shard][self.position]
        if (key, tensor.dtype, tuple(tensor.shape)) != expected:
            raise RuntimeError(f"tensor {key} {tensor.dtype} {tuple(tensor.shape)} arrived where the plan has {expected}")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.position += 1

    def _next_shard(self):
        if self.file is not None:
            self.file.close()
        self.shard, self.position = self.shard + 1, 0
        self.file = open(os.path.join(self.directory, self.names[self.shard]), "wb")
        self.file.write(safetensors_header(self.shards[self.shard]))

    def close(self):
        if self.file is not None:
            self.file.close()
        written = sum(len(shard) for shard in self.shards[: self.shard]) + self.position
        if written != sum(len(shard) for shard in self.shards):
            raise RuntimeError(f"{written} tensors written, {sum(len(shard) for shard in self.shards)} planned")

    def index(self):
        """model.safetensors.index.json's content (None for a single file)."""
        if len(self.shards) == 1:
            return None
        total = sum(torch.Size(shape).numel() * dtype.itemsize for shard in self.shards for _, dtype, shape in shard)
        return {"metadata": {"total_size": total},
                "weight_map": {key: name for shard, name in zip(self.shards, self.names) for key, _, _ in shard}}


def checkpoint_entries(path):
    """[(key, dtype, shape)] of the checkpoint at `path`, in model.iter_checkpoint_tensors' order, tensors unread."""
    from safetensors import safe_open

    entries = []
    for file in models.checkpoint_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}[piece.get_dtype()]
                    entries.append((key, dtype, tuple(piece.get_shape())))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            entries += [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()]
    return entries


# -----------------------------------------------------------------------------
# The merged directory


def merged_config(config, dtype_name, our_model):
    """The base's config.json with the output dtype; an encoder given a trained head becomes a classifier."""
    config = dict(config, torch_dtype=dtype_name)
    if "dtype" in config:
        config["dtype"] = dtype_name
    if config.get("model_type") in ENCODERS:
        family = "Roberta" if config["model_type"] == "roberta" else "DebertaV2"
        config["architectures"] = [f"{family}ForSequenceClassification"]
        labels = our_model.classifier.weight.shape[0]
        if len(config.get("id2label", {})) != labels:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config


def generation_config(model_dir, config):
    """The base's generation_config.json, else one with the config's special token ids (as save_pretrained writes it)."""
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"_from_model_config": True, **{key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                                          if config.get(key) is not None}}


def merge(model_dir, adapter_dir, out_dir, dtype="float32", max_shard_size=MAX_SHARD_SIZE, overwrite=False):
    """Write the merged checkpoint of `adapter_dir` on `model_dir` to `out_dir` (module docstring); returns out_dir."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    config = models.read_config(model_dir)
    check_mergeable(config.get("model_type"), f"--model {model_dir}")
    adapter_config, adapter_tensors = adapters.read_adapter(adapter_dir)
    if "method" in adapter_config:  # adapters.save_baseline: Full FT, BitFit or bottleneck adapters
        raise ValueError(f"{adapter_dir} holds a --method {adapter_config['method']} adapter, not LoRA layers: "
                         "only LoRA-family adapters merge")
    our_model = skeleton(model_dir, config, adapter_tensors)
    problems = adapters.adapter_problems(our_model, adapter_config, adapter_tensors)
    if problems:
        raise ValueError(f"{adapter_dir} does not fit {model_dir}: " + "; ".join(problems))

    entries = checkpoint_entries(model_dir)
    ours, hf = key_names(config, [key for key, _, _ in entries])
    targets = {name + ".weight" for name in adapter_config["targets"]}
    quantize = adapter_config.get("quantize", "none")
    # The trainable modules' tensors (a classifier head) replace the checkpoint's or are added after them.
    trained = {key: tensor for key, tensor in adapter_tensors.items()
               if any(key.startswith(module + ".") for module in adapter_config["trainable"])}
    own = {name for name, _ in our_model.named_parameters()} | {
        name for name, _ in our_model.named_buffers() if not models._is_computed_buffer(our_model, name)}

    def output_dtype(dtype):
        return torch_dtype if dtype.is_floating_point else dtype

    plan, streamed = [], set()
    for key, key_dtype, shape in entries:
        name = ours(key)
        if name is None or name in trained:
            continue
        plan.append((hf(name), output_dtype(key_dtype), shape))
        streamed.add(name)
    plan += [(hf(name), output_dtype(tensor.dtype), tuple(tensor.shape)) for name, tensor in trained.items()]
    missing = sorted(own - streamed - set(trained) - set(getattr(our_model, "tied_keys", {})))
    if missing:
        raise ValueError(f"{model_dir}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         "and the adapter does not hold them")

    with training.atomic_directory(out_dir, overwrite) as tmp_dir:
        writer = ShardWriter(tmp_dir, shard_plan(plan, max_shard_size))
        for key, tensor in models.iter_checkpoint_tensors(model_dir):
            name = ours(key)
            if name is None or name in trained:
                continue
            tensor = tensor.to(output_dtype(tensor.dtype))
            if name in targets:
                tensor = merged_weight(name[: -len(".weight")], tensor, adapter_config, adapter_tensors)
            elif quantize != "none" and is_quantized_with_the_base(our_model, name):
                tensor = quantized_weight(name[: -len(".weight")], tensor, quantize)
            writer.write(hf(name), tensor)
            del tensor
        for name, tensor in trained.items():
            writer.write(hf(name), tensor.to(output_dtype(tensor.dtype)))
        writer.close()
        index = writer.index()

        def write_json(file_name, content):
            with open(os.path.join(tmp_dir, file_name), "w") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
                f.write("\n")

        if index is not None:
            write_json("model.safetensors.index.json", index)
        write_json("config.json", merged_config(config, dtype, our_model))
        write_json("generation_config.json", generation_config(model_dir, config))
        for file_name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model_dir, file_name)):
                shutil.copyfile(os.path.join(model_dir, file_name), os.path.join(tmp_dir, file_name))
    return os.path.abspath(out_dir)


def size_in_bytes(text):
    """'5GB', '200MB', '64KB' or a plain number of bytes (decimal units, as transformers' max_shard_size)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * factor
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"--max-shard-size: {text!r} is not a size such as 5GB, 200MB or 1000000")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge a balora adapter into its base: a standalone Hugging Face checkpoint.")
    parser.add_argument("--model", required=True,
                        help="the base model the adapter was trained on: a directory or a hub id (model.resolve_model_path)")
    parser.add_argument("--revision", default=None, help="with a hub id --model: a branch, tag or commit (default main)")
    parser.add_argument("--adapter", required=True, help="a saved adapter directory (balora_config.json + balora_adapter.safetensors)")
    parser.add_argument("--out", required=True, help="the directory to write (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the merged weights' dtype (default float32)")
    parser.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, type=size_in_bytes,
                        help="largest safetensors shard, e.g. 5GB (the default), 200MB")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        out_dir = merge(models.resolve_model_path(args.model, args.revision), args.adapter, args.out, args.dtype, args.max_shard_size, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as error:
        print(f"merge_adapter: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
