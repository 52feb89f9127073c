"""
The two base models BA-LoRA is evaluated on, written from scratch in plain PyTorch:

  1. Llama: a LLaMA-style decoder (LLaMA-2/3, Mistral, Qwen2) for the NLG experiments.
  2. Deberta: a DeBERTa-v3-style encoder with a classification head for the NLU (GLUE) experiments.

Both load Hugging Face-format checkpoints (config.json + safetensors, sharded or not, or
pytorch_model*.bin) without the transformers library. Module names mirror the Hugging Face
parameter names, so a checkpoint key is a parameter name and LoRA target names (q_proj, ...)
are the ones users know from peft.
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Checkpoint reading, shared by both model families


def read_config(path):
    """config.json of a Hugging Face model directory, as a dict."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face model directory")
    with open(config_path) as f:
        return json.load(f)


def checkpoint_files(path):
    """The weight files of a model directory, in the order Hugging Face would read them."""
    candidates = [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]
    for index_name, single_name in candidates:
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, name) for name in shard_names]
        if os.path.isfile(os.path.join(path, single_name)):
            return [os.path.join(path, single_name)]
    raise FileNotFoundError(
        f"no weights in {path!r}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def iter_checkpoint_tensors(path):
    """Yield (key, tensor) one tensor at a time, so peak host memory stays about one tensor."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            # mmap keeps the .bin on disk; weights_only refuses pickled code.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key in list(state.keys()):
                yield key, state.pop(key)


def load_checkpoint_into(model, path, dtype, device, ignore=lambda key: False):
    """
    Copy every tensor of the checkpoint at `path` into the parameter/buffer of the same name.

    The model is expected to be built on the meta device: each parameter is materialized only when
    its tensor arrives, directly in `dtype` on `device`, so a 7B bf16 load peaks at ~1x the model.
    Strict: missing keys, unexpected keys and shape mismatches raise one ValueError listing them.
    """
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    loaded, unexpected, mismatched = set(), [], []
    for key, tensor in iter_checkpoint_tensors(path):
        if ignore(key):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key]
        if tuple(target.shape) != tuple(tensor.shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        _assign(model, key, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype))
        loaded.add(key)
    tied = getattr(model, "tied_keys", {})  # e.g. lm_head.weight -> model.embed_tokens.weight
    missing = [key for key in own if key not in loaded and key not in tied and not _is_computed_buffer(model, key)]
    problems = []
    if missing:
        problems.append(f"missing weights: {missing}")
    if unexpected:
        problems.append(f"unexpected weights: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise ValueError(f"checkpoint {path!r} does not match the model: " + "; ".join(problems))


def _assign(model, key, tensor):
    """Replace the parameter/buffer `key` (a dotted name) by `tensor`, keeping its kind."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        requires_grad = module._parameters[leaf].requires_grad
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        module._buffers[leaf] = tensor


def _is_computed_buffer(model, key):
    """Buffers a model recomputes itself (RoPE tables, position ids) are not expected in checkpoints."""
    module_name, _, leaf = key.rpartition(".")
    return leaf in model.get_submodule(module_name)._non_persistent_buffers_set


# -----------------------------------------------------------------------------
# LLaMA-style decoder

# (Llama section: LlamaConfig, RMSNorm, RoPE, attention, MLP, blocks, Llama, generate, Tokenizer)

# -----------------------------------------------------------------------------
# DeBERTa-v3-style encoder

# (DeBERTa section: DebertaConfig, embeddings, disentangled attention, encoder, Deberta,
#  DebertaClassifier, DebertaTokenizer)
