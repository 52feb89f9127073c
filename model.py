"""
The two base models BA-LoRA is evaluated on, written from scratch in plain PyTorch:

  1. Llama: a LLaMA-style decoder (LLaMA-2/3, Mistral, Qwen2; Gemma-1/2/3 as its flags) for the NLG experiments.
  2. Deberta: a DeBERTa-v3-style encoder with a classification head for the NLU (GLUE) experiments;
     with other config flags it is RoBERTa (absolute positions, plain attention, RoBERTa's head), the
     encoder of Table 3, Table 9, Fig. 3 and Table 12.

Both load Hugging Face-format checkpoints (config.json + safetensors, sharded or not, or
pytorch_model*.bin) without the transformers library. Module names mirror the Hugging Face
parameter names, so a checkpoint key is a parameter name and LoRA target names (q_proj, ...)
are the ones users know from peft; RoBERTa's keys, named otherwise, go through one table (ROBERTA_KEYS).
"""

import json
import math
import os
import re
from dataclasses import dataclass, field, replace

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
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


# What loading a model reads from a hub repository, and nothing else: config, weights (safetensors shards
# and their index; "model*" leaves out the duplicate consolidated.safetensors some repos ship), the
# tokenizer in any of the three forms data.py reads, the chat template and the generation config.
HUB_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "spm.model", "vocab.json", "merges.txt", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json"]
HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # only for a repo without safetensors
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name", as the hub spells repository ids


def resolve_model_path(name_or_path, revision=None):
    """
    The local directory of --model: a directory as it is; otherwise a hub id ("org/name") whose files
    loading needs (HUB_FILES, or the .bin weights of a repo without safetensors) huggingface_hub's
    snapshot_download puts in its cache ($HF_HOME/hub), at --revision (a branch, tag or commit; default
    main), with $HF_TOKEN for gated repos. Offline ($HF_HUB_OFFLINE=1, or the hub unreachable) the cached
    snapshot is used without a request; a model that is not there is one line saying what to do.
    """
    if os.path.isdir(name_or_path):
        if revision is not None:
            raise ValueError(f"--revision {revision!r} selects a hub snapshot; --model {name_or_path!r} is a local directory")
        return name_or_path
    if not HUB_ID.fullmatch(name_or_path) or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(f"--model {name_or_path!r} does not exist: it is neither a directory nor a hub id (org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        path = snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_FILES)
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):
            path = snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_FILES + HUB_BIN_FILES)
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and no snapshot in the cache
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise FileNotFoundError(f"--model {name_or_path!r}{at} is not in the hub cache ({constants.HF_HUB_CACHE}) and {why}: "
                                "download it once online, or pass a local directory") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"--model {name_or_path!r}: the hub has no revision {revision!r}") from None
    except GatedRepoError:
        raise PermissionError(f"--model {name_or_path!r} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"--model {name_or_path!r}: no such hub repository, or it is private "
                                "(set HF_TOKEN to a token that may read it)") from None
    except HfHubHTTPError as error:  # the hub down, a bad token, ...
        raise ConnectionError(f"--model {name_or_path!r}{at}: the hub answered {str(error).splitlines()[0]}") from None
    return path


def config_from(config_class, path):
    """(config_class.from_hf of path/config.json, the raw dict); a missing key is named with its file."""
    config = read_config(path)
    try:
        return config_class.from_hf(config), config
    except KeyError as error:
        raise ValueError(f"{os.path.join(path, 'config.json')}: missing key {error.args[0]!r}") from None


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
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as error:  # SafetensorError: a truncated or corrupt file
                raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
            with handle as f:
                keys = list(f.keys())
            for key in keys:
                # A fresh handle per tensor: closing it unmaps the file, so the pages read so far leave
                # the resident set; one mapping held over the whole file would keep them all until the end.
                with safe_open(file, framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(key)
                yield key, tensor
        else:
            # mmap keeps the .bin on disk; weights_only refuses pickled code.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key in list(state.keys()):
                yield key, state.pop(key)


def checkpoint_keys(path):
    """The tensor names of the checkpoint at `path`, without reading the tensors."""
    from safetensors import safe_open

    keys = []
    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt", device="cpu") as f:
                keys.extend(f.keys())
        else:
            keys.extend(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())
    return keys


def load_checkpoint_into(model, path, dtype, device, ignore=lambda key: False, allow_missing=lambda key: False,
                         rename=lambda key: key, convert=lambda tensors: tensors):
    """
    Copy every tensor of the checkpoint at `path` into the parameter/buffer of the same name.

    The model is expected to be built on the meta device: each parameter is materialized only when
    its tensor arrives, directly in `dtype` on `device`, so a 7B bf16 load peaks at ~1x the model.
    Strict: missing keys, unexpected keys, shape mismatches and tensors holding NaN/inf (a corrupt
    file: PiSSA's SVD and every output would be NaN) raise one ValueError listing them.
    `ignore(key)` skips a checkpoint key; `allow_missing(key)` excuses a model key the checkpoint
    lacks (e.g. a fresh classification head, which the caller then initializes off the meta device).
    `rename(key)` is the model's name of a checkpoint key (None: no such parameter), for families
    whose Hugging Face names are not ours (RoBERTa, through ROBERTA_KEYS). `convert` maps the stream of
    (key, tensor) pairs, for a layout whose tensors hold several of ours (fused MoE experts: unfuse_experts).
    """
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    loaded, unexpected, mismatched, non_finite = set(), [], [], []
    for key, tensor in convert(iter_checkpoint_tensors(path)):
        if ignore(key):
            continue
        checkpoint_key, key = key, rename(key)
        if key not in own:
            unexpected.append(checkpoint_key)
            continue
        target = own[key]
        if tuple(target.shape) != tuple(tensor.shape):
            mismatched.append(f"{checkpoint_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            non_finite.append(checkpoint_key)
        _assign(model, key, tensor)
        loaded.add(key)
    tied = getattr(model, "tied_keys", {})  # e.g. lm_head.weight -> model.embed_tokens.weight
    missing = [key for key in own if key not in loaded and key not in tied
               and not _is_computed_buffer(model, key) and not allow_missing(key)]
    problems = []
    if missing:
        problems.append(f"missing weights: {missing}")
    if unexpected:
        problems.append(f"unexpected weights: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if non_finite:
        problems.append(f"NaN/inf in {non_finite}")
    if problems:
        raise ValueError(f"checkpoint {path!r} cannot be loaded: " + "; ".join(problems))


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
#
# Hugging Face key layout (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM);
# our module names are the same, so a checkpoint key is a parameter name:
#
#   model.embed_tokens.weight                          (vocab, hidden)
#   model.layers.{i}.input_layernorm.weight            (hidden,)
#   model.layers.{i}.self_attn.q_proj.weight / .bias   (heads * head_dim, hidden)      bias: qwen2, attention_bias
#   model.layers.{i}.self_attn.k_proj.weight / .bias   (kv_heads * head_dim, hidden)   bias: qwen2, attention_bias
#   model.layers.{i}.self_attn.v_proj.weight / .bias   (kv_heads * head_dim, hidden)   bias: qwen2, attention_bias
#   model.layers.{i}.self_attn.o_proj.weight / .bias   (hidden, heads * head_dim)      bias: attention_bias (not qwen2)
#   model.layers.{i}.self_attn.q_norm.weight           (head_dim,)                     qwen3 (qk_norm)
#   model.layers.{i}.self_attn.k_norm.weight           (head_dim,)                     qwen3 (qk_norm)
#   model.layers.{i}.post_attention_layernorm.weight   (hidden,)
#   model.layers.{i}.mlp.gate_proj.weight / .bias      (intermediate, hidden)          bias: mlp_bias
#   model.layers.{i}.mlp.up_proj.weight / .bias        (intermediate, hidden)          bias: mlp_bias
#   model.layers.{i}.mlp.down_proj.weight / .bias      (hidden, intermediate)          bias: mlp_bias
#   model.norm.weight                                  (hidden,)
#   lm_head.weight                                     (vocab, hidden)   absent when tie_word_embeddings
#
# Old checkpoints also carry `...rotary_emb.inv_freq`; we recompute it from the config instead.


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: GQA, 1: MQA
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "llama3" or "linear"
    rope_llama3: dict = field(default_factory=dict)  # factor, low/high_freq_factor, original_max_position_embeddings
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: attention span limit; inputs longer than it are refused
    #                                    Gemma-2/3 (local_layers): the local layers' span, applied by their mask
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head, before RoPE
    rope_linear_factor: float = 1.0  # rope_type "linear" (Gemma-3 4B+): positions divided by it
    # Gemma flags (gemma_config); their defaults are LLaMA's
    hidden_act: str = "silu"  # "gelu_pytorch_tanh": GeGLU with the tanh-approximated GELU (Gemma)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    norm_unit_offset: bool = False  # Gemma: every RMSNorm scales by (1 + weight), in float32
    sandwich_norm: bool = False  # Gemma-2/3: attention and MLP outputs normed too (post_*), the MLP input by its own norm
    query_pre_attn_scalar: float | None = None  # Gemma-2/3: attention scale 1/sqrt(it), not 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # Gemma-2: attention scores -> c tanh(scores / c)
    final_logit_softcapping: float | None = None  # Gemma-2: logits -> c tanh(logits / c)
    local_layers: tuple = ()  # Gemma-2/3: True where layer i attends only to its last sliding_window slots
    rope_local_theta: float | None = None  # Gemma-3: the local layers' own RoPE base (plain RoPE)

    # Sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; see SparseMoeBlock); 0 experts: dense MLPs
    num_experts: int = 0
    num_experts_per_tok: int = 0  # k of the top-k routing
    moe_intermediate_size: int = 0  # each expert's SwiGLU width
    norm_topk_prob: bool = True  # renormalize the k chosen probabilities to sum to 1 (Mixtral always does)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert behind a sigmoid gate; 0: none
    dense_layers: tuple = ()  # layers that keep the dense MLP (Qwen's mlp_only_layers, decoder_sparse_step)
    moe_module: str = "mlp"  # the MoE block's checkpoint name in a layer: mlp, or block_sparse_moe (Mixtral)
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # gate, up, down; Mixtral: w1, w3, w2
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in training (router_aux_loss)
    qk_norm_full: bool = False  # OLMoE: one RMSNorm over all heads of q (of k) together, before RoPE
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip_qkv, clip_qkv]

    @classmethod
    def from_hf(cls, config):
        """Read a Hugging Face config.json dict (model_type llama, mistral, qwen2, qwen3 or one of MOE_MODEL_TYPES;
        Gemma's: gemma_config)."""
        model_type = config.get("model_type")
        if model_type in GEMMA_TYPES:
            return gemma_config(cls, config)
        if model_type not in ("llama", "mistral", "qwen2", "qwen3", *MOE_MODEL_TYPES):
            raise ValueError(f"model_type={model_type!r} is not supported: expected llama, mistral, qwen2, qwen3, "
                             f"{', '.join(MOE_MODEL_TYPES)}, {', '.join(GEMMA_TYPES)}")
        # transformers maps "swish" and "silu" to the same function.
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported: only silu/swish (SwiGLU)")
        rope = _rope_parameters(config)
        # qwen2 has biases on q, k, v only; attention_bias (llama, qwen3) covers q, k, v and o; mistral has none.
        attention_bias = model_type in ("llama", "qwen3", "qwen3_moe", "olmoe") and config.get("attention_bias", False)
        qkv_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and config.get("qkv_bias", True)) or attention_bias
        o_bias = attention_bias
        return cls(
            **decoder_sizes(config),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            rope_llama3={key: rope[key] for key in _LLAMA3_KEYS if key in rope},
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=model_type == "llama" and config.get("mlp_bias", False),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            sliding_window=_sliding_window(config),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **_moe_fields(config),
        )


def decoder_sizes(config):
    """The sizes every decoder's config.json names alike; key/value heads default to the heads (MHA),
    head_dim to hidden / heads."""
    heads = config["num_attention_heads"]
    return dict(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // heads)


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_parameters(config, rope_types=("default", "llama3")):
    """
    One RoPE dict from either config dialect:
      classic (hub checkpoints, transformers < 5): top-level `rope_theta` and optional `rope_scaling`
        {"rope_type" or "type": ..., factor, ...};
      transformers 5: a `rope_parameters` block {"rope_type", "rope_theta", factor, ...}.
    `rope_types`: the kinds the family supports ("linear": Gemma-3).
    """
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if rope["rope_type"] not in rope_types:
        raise ValueError(f"rope_type={rope['rope_type']!r} (rope_parameters/rope_scaling) is not supported: "
                         f"expected {' or '.join(rope_types)}")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    if rope["rope_type"] == "llama3":
        # As transformers: the pretraining length falls back to max_position_embeddings.
        rope.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
        for key in _LLAMA3_KEYS:
            if rope.get(key) is None:
                raise ValueError(f"rope_type='llama3' needs {key!r} in rope_parameters/rope_scaling")
    if rope["rope_type"] == "linear" and not isinstance(rope.get("factor"), (int, float)):
        raise ValueError("rope_type='linear' needs a number 'factor' in rope_parameters/rope_scaling")
    return rope


def _sliding_window(config):
    """The attention window, or None when no layer uses one (qwen2, qwen3 switch it on with use_sliding_window)."""
    if "layer_types" in config and config["layer_types"] is not None:
        uses_window = "sliding_attention" in config["layer_types"]
    else:
        uses_window = config["model_type"] in ("mistral", "mixtral") or config.get("use_sliding_window", False)
    return config.get("sliding_window") if uses_window else None


# Gemma (Gemma-1 / Gemma-7B, Gemma-2, Gemma-3's text model) is this decoder under flags: GeGLU, embeddings
# scaled by sqrt(hidden), RMSNorm by (1 + w), a tied head; Gemma-2/3 add norms after attention and MLP,
# query_pre_attn_scalar, local (sliding-window) layers between global ones, and soft-capping (Gemma-2) or
# qk-norm and a local RoPE base (Gemma-3). Keys are LLaMA's plus pre_feedforward_layernorm and
# post_feedforward_layernorm per layer. Defaults for keys a config.json may leave out (Gemma-3's
# text_config on the hub gives only a few): transformers' GemmaConfig, Gemma2Config and Gemma3TextConfig.
GEMMA_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=True),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                   rope_theta=10000.0, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        final_logit_softcapping=None),
}
GEMMA_TYPES = (*GEMMA_DEFAULTS, "gemma3")  # gemma3: Gemma3ForConditionalGeneration, its text model's config nested


def gemma_config(cls, config):
    """LlamaConfig with Gemma's flags from a config.json dict of model_type gemma, gemma2, gemma3_text or gemma3."""
    if config["model_type"] == "gemma3":
        if not isinstance(config.get("text_config"), dict):
            raise ValueError("model_type='gemma3' needs its language model's config as a 'text_config' object")
        # the text model alone: its keys, and tied as the whole model is (transformers ties by the outer
        # config's tie_word_embeddings, whatever text_config says)
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True),
                  "model_type": "gemma3_text"}
    model_type = config["model_type"]
    config = {**GEMMA_DEFAULTS[model_type], **config}
    if config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True is not supported: a causal decoder only")
    rope, local_theta = _gemma_rope(config)
    local_layers = _gemma_local_layers(config)
    window = config.get("sliding_window")
    if any(local_layers) and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"sliding_window={window!r}: local (sliding_attention) layers need a positive integer window")
    attention_bias = config.get("attention_bias", False)
    return cls(
        **decoder_sizes(config),
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=rope["rope_theta"],
        rope_type=rope["rope_type"],
        rope_linear_factor=rope["factor"] if rope["rope_type"] == "linear" else 1.0,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        tie_word_embeddings=config["tie_word_embeddings"],
        sliding_window=config["sliding_window"] if any(local_layers) else None,
        qk_norm=model_type == "gemma3_text",
        hidden_act=_gemma_activation(config),
        scale_embeddings=True,
        norm_unit_offset=True,
        sandwich_norm=model_type != "gemma",
        query_pre_attn_scalar=config.get("query_pre_attn_scalar") if model_type != "gemma" else None,
        # transformers' Gemma3Attention never passes attn_logit_softcapping on (Gemma-3 has qk-norm instead)
        attn_logit_softcapping=config.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_logit_softcapping=config.get("final_logit_softcapping") if model_type != "gemma" else None,
        local_layers=local_layers if any(local_layers) else (),
        rope_local_theta=local_theta,
    )


def _gemma_activation(config):
    """Gemma's GELU is the tanh approximation; Gemma-1's hub configs name it hidden_act "gelu", which
    transformers reads as the tanh one (and 4.x's hidden_activation, when given, overrides hidden_act)."""
    if config["model_type"] == "gemma":
        name = config.get("hidden_activation") or config.get("hidden_act", "gelu_pytorch_tanh")
        name = "gelu_pytorch_tanh" if name == "gelu" else name
    else:
        name = config.get("hidden_activation", "gelu_pytorch_tanh")
    if name != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={name!r} is not supported: Gemma's GeGLU uses gelu_pytorch_tanh")
    return name


def _gemma_rope(config):
    """
    (RoPE dict of the global layers, RoPE base of the local layers or None when they share it), from
    either dialect. Gemma-1/2 have one RoPE. Gemma-3's local layers turn with their own plain RoPE:
    transformers 5 writes one block per layer type (rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}); 4.x writes rope_theta (+ rope_scaling) for the global layers and
    rope_local_base_freq for the local ones.
    """
    rope_types = ("default", "linear")
    if config["model_type"] != "gemma3_text":
        return _rope_parameters(config, rope_types), None
    blocks = config.get("rope_parameters") or {}
    if "full_attention" not in blocks:
        return _rope_parameters(config, rope_types), float(config["rope_local_base_freq"])
    local = dict(blocks.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is not supported: "
                         "Gemma-3's local layers use default RoPE")
    full = _rope_parameters({"rope_parameters": blocks["full_attention"], "rope_theta": config["rope_theta"]},
                            rope_types)
    return full, float(local.get("rope_theta", config["rope_local_base_freq"]))


def _gemma_local_layers(config):
    """
    One bool per layer: True for a local (sliding_attention) layer. From layer_types, or as transformers
    4.x laid them out: Gemma-2 alternates local and global from a local layer 0, Gemma-3 makes every
    sliding_window_pattern-th layer global.
    """
    n = config["num_hidden_layers"]
    if config["model_type"] == "gemma":
        return (False,) * n
    types = config.get("layer_types")
    if types is None:
        period = 2 if config["model_type"] == "gemma2" else config["sliding_window_pattern"]
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types={types!r}: expected num_hidden_layers={n} entries, each "
                         "'sliding_attention' or 'full_attention'")
    return tuple(kind == "sliding_attention" for kind in types)


MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _moe_fields(config):
    """
    The sparse-MoE fields of LlamaConfig from a config.json dict ({} for a dense model), with
    transformers' defaults for absent keys. router_aux_loss_coef is the config's value only when the
    config says output_router_logits, as transformers adds the loss only then; else 0.
    """
    model_type = config["model_type"]
    if model_type not in MOE_MODEL_TYPES:
        return {}
    aux_coef = config.get("router_aux_loss_coef", 0.001) if config.get("output_router_logits", False) else 0.0
    if model_type == "mixtral":
        if config.get("router_jitter_noise", 0.0):  # a training-time noise on the router's input
            raise ValueError(f"router_jitter_noise={config['router_jitter_noise']!r} is not supported: only 0")
        return dict(num_experts=config.get("num_local_experts", 8), num_experts_per_tok=config.get("num_experts_per_tok", 2),
                    moe_intermediate_size=config["intermediate_size"], norm_topk_prob=True,
                    moe_module="block_sparse_moe", expert_names=("w1", "w3", "w2"), router_aux_loss_coef=aux_coef)
    if model_type == "olmoe":  # every layer sparse, experts of intermediate_size; qk-norm over all heads, clip_qkv
        if config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) * config["num_attention_heads"] \
                != config["hidden_size"]:
            raise ValueError("olmoe with head_dim * num_attention_heads != hidden_size is not supported")
        return dict(num_experts=config.get("num_experts", 64), num_experts_per_tok=config.get("num_experts_per_tok", 8),
                    moe_intermediate_size=config["intermediate_size"], norm_topk_prob=config.get("norm_topk_prob", False),
                    router_aux_loss_coef=aux_coef, qk_norm_full=True, clip_qkv=config.get("clip_qkv"))
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, hub configs as num_experts
    num_experts = config["num_experts"] if "num_experts" in config else config.get("num_local_experts", 60)
    step = config.get("decoder_sparse_step", 1)
    only_dense = set(config.get("mlp_only_layers") or [])
    dense_layers = tuple(i for i in range(config["num_hidden_layers"])
                         if i in only_dense or not (num_experts > 0 and (i + 1) % step == 0))
    return dict(num_experts=num_experts, num_experts_per_tok=config.get("num_experts_per_tok", 4),
                moe_intermediate_size=config.get("moe_intermediate_size", 1408),
                norm_topk_prob=config.get("norm_topk_prob", False),
                shared_expert_intermediate_size=config.get("shared_expert_intermediate_size", 5632)
                if model_type == "qwen2_moe" else 0,
                dense_layers=dense_layers, router_aux_loss_coef=aux_coef)


def rope_inv_freq(config, device=None):
    """
    RoPE inverse frequencies theta^(-2i/d), i < d/2 (RoFormer Eq. 15), float32.
    llama3 scaling (Llama 3.1) keeps high frequencies (wavelength < L/high_freq_factor), divides low
    ones (wavelength > L/low_freq_factor) by `factor`, and interpolates smoothly in between.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    if config.rope_type == "default":
        return inv_freq
    if config.rope_type == "linear":  # position interpolation: position p turns as p / factor did
        return inv_freq / config.rope_linear_factor
    p = config.rope_llama3
    context = p["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / p["low_freq_factor"], inv_freq / p["factor"], inv_freq)
    smooth = (context / wavelength - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    is_medium = (wavelength >= context / p["high_freq_factor"]) & (wavelength <= context / p["low_freq_factor"])
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        # Recomputed from the config, never loaded: non-persistent, and float32 whatever the model dtype.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # Gemma-3's local layers turn with their own base: that table is made when used (head_dim / 2
        # numbers), so no loader has a second buffer to rebuild
        self.local_config = local_rope(config) if config.rope_local_theta is not None else None

    def forward(self, position_ids, dtype, local=False):
        """cos, sin of shape (B, T, head_dim) for integer positions (B, T); angles in float32.
        local: with the local layers' table (Gemma-3)."""
        inv_freq = rope_inv_freq(self.local_config, device=self.inv_freq.device) if local else self.inv_freq
        angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, head_dim / 2)
        # HF layout: the two halves of a head share frequencies, i pairs with i + head_dim/2
        # (not the interleaved 2i, 2i+1 of the paper), so the table is repeated, not interleaved.
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def local_rope(config):
    """The config of Gemma-3's local layers' RoPE: plain RoPE on their own base."""
    return replace(config, rope_theta=config.rope_local_theta, rope_type="default")


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, H, T, d) by its angle: the rotate-half form of RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, size, eps, unit_offset=False):
        super().__init__()
        # unit_offset (Gemma): the stored weight w scales by (1 + w), so it starts at 0
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x):
        # The mean of squares in bf16 loses too much precision: normalize in float32, cast back, then
        # scale (in that order, as the reference implementation, so bf16 results agree bit for bit).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma scales in float32 too, and casts last (as transformers' GemmaRMSNorm)
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_length`."""

    def __init__(self, config, batch_size, max_length, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0  # tokens stored; advanced by Llama.forward after all layers have written

    def update(self, layer, k, v):
        """Store k, v (B, H_kv, T, d) after the cached tokens; return all keys and values so far."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep(self, rows):
        """Keep only the batch rows `rows` (indices): rows that finished generating cost nothing further."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


class Attention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all query (key) heads
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
        self.qk_norm = config.qk_norm
        # Gemma-2/3 scale scores by query_pre_attn_scalar^-1/2 (None: SDPA's own head_dim^-1/2)
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping
        if config.qk_norm_full:  # OLMoE: one RMSNorm over the whole projection, all heads together
            self.q_norm = RMSNorm(self.n_head * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv_head * self.head_dim, config.rms_norm_eps)
        self.qk_norm_full, self.clip_qkv = config.qk_norm_full, config.clip_qkv

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # per head, before RoPE (as transformers' Qwen3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qk_norm_full:  # over (heads, head_dim): back to (B, T, H * d), normalize, split again
            q = self.q_norm(q.transpose(1, 2).reshape(B, T, -1)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).reshape(B, T, -1)).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.clip_qkv is not None:  # elementwise, so the head layout does not matter
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        # GQA/MQA: query head h reads key/value head h // (H / H_kv); scale 1/sqrt(head_dim).
        # mask None: no padding and no cache, so SDPA's own causal mask (is_causal) is exact, and on a
        # GPU it may pick FlashAttention, which an explicit mask rules out.
        if self.softcap is not None:  # Gemma-2: SDPA has no hook for a function of the scores
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def soft_cap(x, cap):
    """Gemma-2's soft-capping: cap * tanh(x / cap), smooth, about x for |x| << cap, within (-cap, cap)."""
    return cap * torch.tanh(x / cap)


def softcapped_attention(q, k, v, mask, scale, cap):
    """
    Attention whose scores q k^T * scale are soft-capped before masking and the softmax (in float32),
    written out as transformers' eager Gemma-2 attention computes it. q (B, H, T, d), k, v (B, H_kv, L, d);
    mask (B, 1, T, L) bool or None for plain causal attention (T == L).
    """
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # GQA
    scores = soft_cap(q @ k.transpose(-2, -1) * scale, cap)
    if mask is None:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.hidden_act = config.hidden_act

    def forward(self, x):
        gate = self.gate_proj(x)
        # SwiGLU; Gemma: GeGLU with the tanh-approximated GELU
        gate = F.silu(gate) if self.hidden_act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


# -----------------------------------------------------------------------------
# Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
#
# Hugging Face per-expert key layout (what save_pretrained writes and the hub holds), in place of mlp.*:
#
#   model.layers.{i}.block_sparse_moe.gate.weight              (experts, hidden)        Mixtral: the router
#   model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight    (intermediate, hidden)   gate of expert e's SwiGLU
#   model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight    (intermediate, hidden)   up
#   model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight    (hidden, intermediate)   down
#   model.layers.{i}.mlp.gate.weight                           (experts, hidden)        Qwen2-MoE / Qwen3-MoE / OLMoE
#   model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj.weight            (moe_intermediate_size)
#   model.layers.{i}.mlp.shared_expert.gate_proj / up_proj / down_proj.weight          Qwen2-MoE
#   model.layers.{i}.mlp.shared_expert_gate.weight             (1, hidden)              Qwen2-MoE
#   model.layers.{i}.self_attn.q_norm.weight                   (heads * head_dim,)      OLMoE: over all heads
#   model.layers.{i}.self_attn.k_norm.weight                   (kv_heads * head_dim,)   OLMoE
#
# transformers 5 holds the experts of a layer fused, as its state_dict (and save_pretrained with
# save_original_format=False) names them: model.layers.{i}.mlp.experts.gate_up_proj (experts,
# 2 * intermediate, hidden), the gate rows first, and .mlp.experts.down_proj (experts, hidden,
# intermediate); Mixtral's router is then model.layers.{i}.mlp.gate.weight. unfuse_experts reads them
# into the per-expert layout above, the one our modules carry, so add_lora adapts each expert's
# nn.Linear by suffix (w1, w2, w3 or gate_proj, ...), as peft targets them.


class Expert(nn.Module):
    """One SwiGLU expert, down(silu(gate(x)) * up(x)); its linears carry the checkpoint's names (`names`: gate, up, down)."""

    def __init__(self, hidden_size, intermediate_size, names):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(up, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(down, nn.Linear(intermediate_size, hidden_size, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(F.silu(gate(x)) * up(x))


def route(router_logits, top_k, norm_topk_prob):
    """
    Top-k routing: probabilities p = softmax(router logits) over the experts (float32), the k largest
    of each token, renormalized to sum to 1 when norm_topk_prob. Returns (weights, experts), both (N, k).
    """
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoeBlock(nn.Module):
    """
    y = sum over the k experts e chosen for x of w_e(x) * expert_e(x)  [+ sigmoid(shared_expert_gate(x)) * shared_expert(x)]
    Each token runs through its k experts only. The router `gate` is an nn.Linear like any other: add_lora
    freezes it unless `gate` is a target. The last forward's router logits (tokens, experts) stay in
    self.router_logits for the load-balancing loss (router_aux_loss).
    """

    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.hidden_size, config.moe_intermediate_size, config.expert_names)
                                     for _ in range(config.num_experts))
        if config.shared_expert_intermediate_size:  # Qwen2-MoE
            self.shared_expert = Expert(config.hidden_size, config.shared_expert_intermediate_size,
                                        ("gate_proj", "up_proj", "down_proj"))
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.router_logits = None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        self.router_logits = self.gate(x)  # (N, experts)
        weights, experts = route(self.router_logits, self.top_k, self.norm_topk_prob)  # (N, k)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)  # the tokens that chose e, and in which of their k slots
            if len(token) == 0:
                continue
            # weighted in float32 (the routing weights' dtype), as transformers' Mixtral
            out = expert(x[token]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(x.dtype))
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(B, T, C)


def is_sparse_layer(config, layer_index):
    return config.num_experts > 0 and layer_index not in config.dense_layers


def moe_blocks(model):
    """The SparseMoeBlocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """
    The router's load-balancing auxiliary loss (Switch Transformer, Fedus et al. 2022, Eq. 4-6, with
    top-k counting), as transformers computes it (load_balancing_loss_func):
        loss = E * sum_e f_e * P_e
    f_e: the top-k assignments to expert e per token, P_e: the mean router probability of e, both
    averaged over the real (attention_mask 1) tokens of all MoE layers at once. f_e has no gradient
    (topk); the gradient flows through P_e and pushes the router towards uniform use. router_logits:
    one (B * T, E) tensor per MoE layer; attention_mask (B, T) or None (every token real).
    """
    probs = torch.cat([F.softmax(logits.float(), dim=-1) for logits in router_logits])  # (layers * B * T, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (layers * B * T, k)
    if attention_mask is None:
        real = torch.ones(probs.size(0), device=probs.device)
    else:
        real = attention_mask.reshape(-1).float().to(probs.device).repeat(len(router_logits))
    assignments = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, chosen.reshape(-1), real.repeat_interleave(top_k))
    tokens_per_expert = assignments / real.sum()  # f_e (sums to k)
    prob_per_expert = (probs * real[:, None]).sum(0) / real.sum()  # P_e
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


def router_aux_loss(model, attention_mask=None):
    """load_balancing_loss of the model's last forward (its MoE blocks' router logits); 0 for a dense model."""
    blocks = moe_blocks(model)
    if not blocks:
        return torch.zeros(())
    return load_balancing_loss([block.router_logits for block in blocks], model.config.num_experts,
                               model.config.num_experts_per_tok, attention_mask)


def unfuse_experts(tensors, config):
    """
    (key, tensor) of a checkpoint in our per-expert layout: transformers 5's fused
    mlp.experts.gate_up_proj / down_proj are split into each expert's gate, up and down weights,
    under the layer's MoE module name (block_sparse_moe for Mixtral); other keys pass through.
    """
    gate_name, up_name, down_name = config.expert_names
    for key, tensor in tensors:
        prefix, _, leaf = key.partition(".mlp.")
        if config.num_experts == 0 or not leaf or not is_sparse_layer(config, int(prefix.rpartition(".")[2])):
            yield key, tensor
        elif leaf == "experts.gate_up_proj":  # (E, 2I, hidden): each expert's gate rows, then its up rows
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in tensor):
                yield f"{prefix}.{config.moe_module}.experts.{e}.{gate_name}.weight", gate
                yield f"{prefix}.{config.moe_module}.experts.{e}.{up_name}.weight", up
        elif leaf == "experts.down_proj":  # (E, hidden, I)
            for e, down in enumerate(tensor):
                yield f"{prefix}.{config.moe_module}.experts.{e}.{down_name}.weight", down
        else:
            yield f"{prefix}.{config.moe_module}.{leaf}", tensor


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        # the feed-forward under its checkpoint name: mlp (dense, or Qwen's MoE), block_sparse_moe (Mixtral)
        self.mlp_name = config.moe_module if is_sparse_layer(config, layer_index) else "mlp"
        self.add_module(self.mlp_name, SparseMoeBlock(config) if is_sparse_layer(config, layer_index) else MLP(config))
        if config.sandwich_norm:  # Gemma-2/3; post_attention_layernorm then norms the attention output
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.sandwich_norm = config.sandwich_norm

    def forward(self, x, cos, sin, mask, cache=None):
        if self.sandwich_norm:  # Gemma-2/3: each sublayer's output normed before it joins the residual stream
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(getattr(self, self.mlp_name)(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


def attention_mask_and_positions(attention_mask, query_length):
    """
    From the (B, L) 0/1 padding mask of all tokens (cached + new), for the last `query_length` tokens:
      - the boolean SDPA mask (B, 1, T, L): key j is visible to query i if j <= i (causal) and j is not
        padding. A query on a left-padding position would see no key at all and softmax would give
        NaN; it may always see itself (its output is never used).
      - position ids (B, T) = number of real tokens before it (cumsum - 1, 0 on padding), so a
        left-padded row gets the positions it would have unpadded, as in transformers' generate.
        (transformers' plain forward uses 0..T-1: under left padding that shifts all real positions of
        a row by the same amount, which RoPE, a function of position differences, does not see.)
    """
    L = attention_mask.size(1)
    key = torch.arange(L, device=attention_mask.device)
    query = key[L - query_length:, None]
    visible = (key <= query) & (attention_mask[:, None, :].bool() | (key == query))  # (B, T, L)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, L - query_length:]
    return visible[:, None], positions


def nucleus_filter(logits, top_p):
    """
    Nucleus (top-p) sampling's cut (Holtzman et al. 2020): of each row of logits (B, V), keep the most
    probable tokens whose probabilities first reach a total of top_p, and set the others to -inf. Put
    the other way round, as vLLM and transformers compute it: the least probable tokens are dropped
    while their total stays <= 1 - top_p, and the most probable token always stays. top_p = 1 keeps all.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    ascending, order = logits.sort(dim=-1)
    mass_at_or_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # each token's and every less probable one's
    drop = mass_at_or_below <= 1.0 - top_p
    drop[:, -1] = False  # the most probable token
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))  # back in vocabulary order


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset),
            rotary_emb=RotaryEmbedding(config),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_keys = {}
        self.tie_weights()
        self.gradient_checkpointing = False  # True: recompute each block in backward to save activations

    def tie_weights(self):
        """Share the output projection with the input embedding when the checkpoint says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def forward(self, input_ids, attention_mask=None, cache=None, output_mask=None, return_hidden=False):
        """
        Logits (B, T, V). attention_mask (B, T) 0/1 marks padding, left or right; with a cache it
        covers the cached tokens too (B, cache.length + T). None means no padding.
        output_mask (B, T) bool: return only the logits of these positions, (M, V) in row-major order.
        The LM head is the largest matmul of a small model and its (B, T, V) output the largest
        activation, so a trainer that needs M < B * T rows should not pay for the rest.
        return_hidden: return the final (normed) hidden states instead, (B, T, hidden) or (M, hidden),
        whose logits are self.logits(them): the teacher of Eq. 9 forms them chunk by chunk.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        window = self.config.sliding_window
        if window is not None and not self.config.local_layers and past + T > window:
            raise ValueError(f"input of {past + T} tokens exceeds sliding_window={window}, which is not supported")
        if attention_mask is None and cache is None:
            mask, position_ids = None, torch.arange(T, device=input_ids.device).expand(B, T)  # plain causal
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            mask, position_ids = attention_mask_and_positions(attention_mask, T)
        x = self.embed(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        local = self.local_attention_inputs(position_ids, x.dtype, mask, past, T) if self.config.local_layers else None
        for i, block in enumerate(self.model.layers):
            inputs = local if local is not None and self.config.local_layers[i] else (cos, sin, mask)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, *inputs, cache, use_reentrant=False)
            else:
                x = block(x, *inputs, cache)
        if cache is not None:
            cache.length += T
        if output_mask is not None:
            if output_mask.shape != (B, T):
                raise ValueError(f"output_mask has shape {tuple(output_mask.shape)}, expected {(B, T)}")
            x = x[output_mask]  # (M, hidden): RMSNorm and the head act on each position alone
        hidden = self.model.norm(x)
        return hidden if return_hidden else self.logits(hidden)

    def embed(self, input_ids):
        """Token embeddings (B, T, hidden); Gemma scales them by sqrt(hidden), a number rounded to the
        model's dtype first as transformers rounds it (55.5, not 55.43, for hidden 3072 in bf16)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def logits(self, hidden):
        """The LM head on final hidden states; Gemma-2 soft-caps its output (final_logit_softcapping)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else soft_cap(logits, cap)

    def local_attention_inputs(self, position_ids, dtype, mask, past, T):
        """
        (cos, sin, mask) of Gemma-2/3's local layers: a key slot j is visible to the query in slot i only
        if i - j < sliding_window as well (slots, padding included, as transformers counts them), and
        Gemma-3 turns them with the local RoPE base.
        """
        L = past + T
        if mask is None:  # plain causal: no padding, no cache
            mask = torch.ones(T, L, dtype=torch.bool, device=position_ids.device).tril()[None, None]
        key = torch.arange(L, device=position_ids.device)
        near = key[L - T:, None] - key[None, :] < self.config.sliding_window  # (T, L)
        cos, sin = self.model.rotary_emb(position_ids, dtype, local=self.config.rope_local_theta is not None)
        return cos, sin, mask & near

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=64, eos_token_id=None,
                 temperature=0.0, generator=None, top_p=1.0, stop=None):
        """
        Continue each row of `input_ids` (B, T) (batches left padded) by up to `max_new_tokens` tokens:
        greedy when temperature == 0, else sampled from softmax(nucleus_filter(logits / temperature,
        top_p)) (temperature first, then top-p, as vLLM and transformers order them). A row stops at
        its first EOS (an int or a list of ids), or when stop(row, token), called with the row's index
        in input_ids and each token it generates, returns True. A stopped row leaves the batch and the
        KV cache, so it costs no further compute; its later positions are filled with the first EOS
        id (0 without one). Generation ends when every row has stopped. Returns (B, T + generated) ids.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if max_new_tokens < 1:
            return input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                               dtype=torch.long, device=device)
        param = next(self.parameters())
        cache = KVCache(self.config, B, T + max_new_tokens, param.dtype, param.device)
        tokens = torch.full((B, T + max_new_tokens), int(eos_ids[0]) if len(eos_ids) else 0, dtype=torch.long,
                            device=device)
        tokens[:, :T] = input_ids
        rows = torch.arange(B, device=device)  # the rows still generating, as indices into input_ids
        # Prefill: only the last position's logits are used (left padding puts every row's last token
        # there), and the LM head over every prompt position would be the largest matmul of the step.
        last = torch.zeros_like(input_ids, dtype=torch.bool)
        last[:, -1] = True
        logits = self(input_ids, attention_mask, cache, output_mask=last)  # (B, V)
        for step in range(max_new_tokens):
            logits = logits.float()
            if temperature > 0:
                probs = F.softmax(nucleus_filter(logits / temperature, top_p), dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_token = logits.argmax(dim=-1)
            tokens[rows, T + step] = next_token
            done = torch.isin(next_token, eos_ids)
            if stop is not None:
                done |= torch.tensor([stop(row, token) for row, token in zip(rows.tolist(), next_token.tolist())],
                                     dtype=torch.bool, device=device)
            if done.all() or step == max_new_tokens - 1:
                break
            if done.any():
                keep = (~done).nonzero().squeeze(1)
                rows, next_token, attention_mask = rows[keep], next_token[keep], attention_mask[keep]
                cache.keep(keep)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token[:, None])], dim=1)
            logits = self(next_token[:, None], attention_mask, cache)[:, -1]
        return tokens[:, :T + step + 1]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """
        Load a Hugging Face llama/mistral/qwen2/qwen3/gemma/gemma2/gemma3_text directory, one tensor at a
        time into dtype/device; of a gemma3 (Gemma3ForConditionalGeneration) one, the language model.
        """
        config, hf_config = config_from(LlamaConfig, path)
        with torch.device("meta"):
            model = cls(config)
        rename = gemma3_text_key if hf_config.get("model_type") == "gemma3" else (lambda key: key)
        # A tied checkpoint may still store lm_head.weight (a copy of the embedding): skip it.
        load_checkpoint_into(model, path, dtype, device, rename=rename,
                             ignore=lambda key: key.endswith("rotary_emb.inv_freq") or rename(key) in model.tied_keys
                             or rename(key) is None,
                             convert=lambda tensors: unfuse_experts(tensors, config))
        model.tie_weights()
        model.model.rotary_emb.inv_freq = rope_inv_freq(config, device=device)
        return model.eval()


def gemma3_text_key(key):
    """
    Our name of a Gemma3ForConditionalGeneration checkpoint key, None for the vision tower and its
    projector. Its language model is saved as model.language_model.* + lm_head.* (transformers 5, >= 4.52)
    or as language_model.model.* + language_model.lm_head.* (the hub's checkpoints, older 4.x).
    """
    for prefix, ours in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return key if key.startswith("lm_head.") else None


# -----------------------------------------------------------------------------
# DeBERTa-v3-style encoder
#
# Hugging Face key layout (DebertaV2ForSequenceClassification); our module names are the same, so a
# checkpoint key is a parameter name:
#
#   deberta.embeddings.word_embeddings.weight                          (vocab, embedding_size)
#   deberta.embeddings.embed_proj.weight                               (hidden, embedding_size)  only when they differ
#   deberta.embeddings.LayerNorm.weight / .bias                        (hidden,)
#   deberta.encoder.layer.{i}.attention.self.query_proj.weight / .bias (hidden, hidden)   also projects positions (p2c)
#   deberta.encoder.layer.{i}.attention.self.key_proj.weight / .bias   (hidden, hidden)   also projects positions (c2p)
#   deberta.encoder.layer.{i}.attention.self.value_proj.weight / .bias (hidden, hidden)
#   deberta.encoder.layer.{i}.attention.output.dense.weight / .bias    (hidden, hidden)
#   deberta.encoder.layer.{i}.attention.output.LayerNorm.weight / .bias
#   deberta.encoder.layer.{i}.intermediate.dense.weight / .bias        (intermediate, hidden)
#   deberta.encoder.layer.{i}.output.dense.weight / .bias              (hidden, intermediate)
#   deberta.encoder.layer.{i}.output.LayerNorm.weight / .bias
#   deberta.encoder.rel_embeddings.weight                              (2 * position_buckets, hidden)
#   deberta.encoder.LayerNorm.weight / .bias                           (hidden,)  normalizes rel_embeddings
#   pooler.dense.weight / .bias                                        (hidden, hidden)
#   classifier.weight / .bias                                          (num_labels, hidden)
#
# A pretrained-only checkpoint (microsoft/deberta-v3-base) has the `deberta.` keys plus its pretraining
# heads (lm_predictions.*, mask_predictions.*), which we skip; a bare DebertaV2Model saved with
# save_pretrained has the same keys without the `deberta.` prefix. Both get a fresh pooler + classifier.

# (config key, Hugging Face's default when the key is absent, the one value DeBERTa-v3 uses).
# Every other value switches on a code path of DeBERTa v1/v2 (absolute positions, token types,
# separate position projections, the conv layer, ...) that this file does not implement.
_DEBERTA_V3_FLAGS = [
    ("relative_attention", False, True),
    ("share_att_key", False, True),
    ("norm_rel_ebd", "none", "layer_norm"),
    ("position_biased_input", True, False),
    ("type_vocab_size", 0, 0),
    ("conv_kernel_size", 0, 0),
    ("hidden_act", "gelu", "gelu"),
    ("pooler_hidden_act", "gelu", "gelu"),
]


def _is_pretraining_only(key):
    """The pretraining heads of deberta checkpoints (masked LM, replaced token detection) and the
    position-id buffer older checkpoints stored: nothing a classifier uses."""
    return key.startswith(("lm_predictions.", "mask_predictions.", "cls.")) or key.endswith("embeddings.position_ids")


@dataclass
class DebertaConfig:
    vocab_size: int = 128100
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    embedding_size: int = 768  # width of word_embeddings; embed_proj maps it to hidden_size when they differ
    position_buckets: int = 256  # relative distances are log-bucketed into 2 * position_buckets rows
    max_relative_positions: int = 512  # the distance at which the log buckets reach the last row
    pos_att_type: tuple = ("p2c", "c2p")  # which disentangled terms are added to content->content
    layer_norm_eps: float = 1e-7
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pooler_dropout: float = 0.0
    cls_dropout: float = 0.1  # dropout before the classifier
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of a freshly initialized head
    # The family flags: DeBERTa-v3's values here, RoBERTa's set by roberta_config (section below).
    model_type: str = "deberta-v2"  # the checkpoint's key layout: deberta-v2 (our names) or roberta (ROBERTA_KEYS)
    relative_attention: bool = True  # the shared relative-position table; False: none, pos_att_type is ()
    max_position_embeddings: int = 0  # > 0: learned absolute positions, ids counted from pad_token_id + 1 (RoBERTa)
    type_vocab_size: int = 0  # > 0: token-type embeddings added to the words (RoBERTa: 1)
    pooler_activation: str = "gelu"  # the head's dense layer: gelu (DeBERTa's pooler) or tanh (RoBERTa's classifier.dense)

    @classmethod
    def from_hf(cls, config):
        """Read a Hugging Face config.json dict of model_type deberta-v2 (DeBERTa-v3 settings only) or roberta."""
        if config.get("model_type") == "roberta":
            return roberta_config(cls, config)
        if config.get("model_type") != "deberta-v2":
            raise ValueError(f"model_type={config.get('model_type')!r} is not supported: expected 'deberta-v2' or 'roberta'")
        for key, hf_default, supported in _DEBERTA_V3_FLAGS:
            value = config.get(key, hf_default)
            if value != supported or type(value) is not type(supported):
                raise ValueError(f"{key}={value!r} is not supported: DeBERTa-v3 uses {key}={supported!r}")
        pos_att_type = config.get("pos_att_type") or []
        if isinstance(pos_att_type, str):
            pos_att_type = [part.strip() for part in pos_att_type.lower().split("|")]
        if not set(pos_att_type) <= {"p2c", "c2p"} or len(set(pos_att_type)) != len(pos_att_type):
            raise ValueError(f"pos_att_type={config.get('pos_att_type')!r} is not supported: expected a subset of p2c|c2p")
        position_buckets = config.get("position_buckets", -1)
        if position_buckets <= 0:
            raise ValueError(f"position_buckets={position_buckets!r} is not supported: DeBERTa-v3 log-buckets (256)")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if hidden % heads != 0:
            raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        if config.get("attention_head_size", hidden // heads) != hidden // heads:
            raise ValueError(f"attention_head_size={config['attention_head_size']} is not supported: only hidden_size / heads")
        if config.get("pooler_hidden_size", hidden) != hidden:
            raise ValueError(f"pooler_hidden_size={config['pooler_hidden_size']} is not supported: only hidden_size={hidden}")
        max_relative_positions = config.get("max_relative_positions", -1)
        if max_relative_positions < 1:  # -1: as far as the absolute positions go
            max_relative_positions = config.get("max_position_embeddings", 512)
        if max_relative_positions - 1 <= position_buckets // 2:
            raise ValueError(f"max_relative_positions={max_relative_positions} must exceed position_buckets / 2 + 1")
        hidden_dropout = config.get("hidden_dropout_prob", 0.1)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            intermediate_size=config["intermediate_size"],
            embedding_size=config.get("embedding_size") or hidden,
            position_buckets=position_buckets,
            max_relative_positions=max_relative_positions,
            pos_att_type=tuple(pos_att_type),
            layer_norm_eps=config.get("layer_norm_eps", 1e-7),
            hidden_dropout_prob=hidden_dropout,
            attention_probs_dropout_prob=config.get("attention_probs_dropout_prob", 0.1),
            pooler_dropout=config.get("pooler_dropout", 0.0),
            cls_dropout=hidden_dropout if config.get("cls_dropout") is None else config["cls_dropout"],
            pad_token_id=config.get("pad_token_id") or 0,
            initializer_range=config.get("initializer_range", 0.02),
        )


def relative_position_index(seq_len, position_buckets, max_relative_positions, device=None):
    """
    (T, T) LongTensor: the row of the relative-embedding table that query i and key j share.

    The relative distance is δ(i, j) = i - j. Within ±position_buckets/2 every distance has its own
    row; beyond it, distances share rows whose width grows geometrically, so that
    |δ| = max_relative_positions - 1 lands on the last row. The table has 2 * position_buckets rows,
    row position_buckets meaning δ = 0; farther distances are clamped to the first/last row.
    """
    position = torch.arange(seq_len, device=device)
    distance = position[:, None] - position[None, :]  # δ(i, j) = i - j
    mid = position_buckets // 2
    # Log bucket for |δ| > mid:  mid + ceil((mid - 1) * log(|δ| / mid) / log((max_relative_positions - 1) / mid)).
    # Computed in float32 like the reference; the clamp only keeps log finite where |δ| <= mid, whose
    # result is discarded by the where() below.
    magnitude = distance.abs().clamp(min=mid).float()
    log_scale = torch.log(torch.tensor((max_relative_positions - 1) / mid, dtype=torch.float32, device=device))
    log_bucket = mid + torch.ceil(torch.log(magnitude / mid) / log_scale * (mid - 1)).long()
    bucket = torch.where(distance.abs() <= mid, distance, torch.sign(distance) * log_bucket)
    # Shift to a row index: δ = -position_buckets is row 0, δ = 0 is row position_buckets.
    return (bucket + position_buckets).clamp(0, 2 * position_buckets - 1)


class DisentangledSelfAttention(nn.Module):
    """
    DeBERTa attention (He et al., 2021, Eq. 2-4): each score adds to content->content the terms of
    content->position (c2p) and position->content (p2c), with the relative embeddings P projected by
    the SAME query/key projections as the content (share_att_key), so LoRA on query_proj/key_proj
    adapts both.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.pos_att_type = config.pos_att_type
        # Each of the 1 + len(pos_att_type) summed terms is a dot product of head_dim-vectors, so the sum
        # has ~(1 + len(pos_att_type)) times the variance of one: scale by sqrt(head_dim * that).
        self.scale = math.sqrt(self.head_dim * (1 + len(config.pos_att_type)))
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def split_heads(self, x):
        """(B, T, hidden) -> (B, heads, T, head_dim)"""
        return x.view(*x.shape[:-1], self.n_head, self.head_dim).transpose(-3, -2)

    def forward(self, x, pair_mask, rel_index, rel_embeddings):
        """x (B, T, hidden), pair_mask (B, 1, T, T) bool, rel_index (T, T), rel_embeddings (2 * buckets, hidden)."""
        B, T, C = x.shape
        q = self.split_heads(self.query_proj(x))  # (B, nh, T, hd)
        k = self.split_heads(self.key_proj(x))
        v = self.split_heads(self.value_proj(x))
        # 1. content->content: Q_i · K_j
        scores = q @ k.transpose(-1, -2)  # (B, nh, T, T)
        if self.pos_att_type:  # empty for RoBERTa: plain scaled dot-product attention, softmax(QK^T / sqrt(hd))
            positions = self.pos_dropout(rel_embeddings)  # (2 * buckets, hidden): one row per bucketed distance
            index = rel_index.expand(B, self.n_head, T, T)
        if "c2p" in self.pos_att_type:
            # 2. content->position: Q_i · K^r_{δ(i,j)}. Score every query against every relative-position
            #    key, (B, nh, T, 2 * buckets), then pick for (i, j) the column of row δ(i, j).
            pos_key = self.split_heads(self.key_proj(positions))  # (nh, 2 * buckets, hd)
            c2p = q @ pos_key.transpose(-1, -2)
            scores = scores + torch.gather(c2p, -1, index)
        if "p2c" in self.pos_att_type:
            # 3. position->content: K_j · Q^r at the distance of query i from key j. The paper writes
            #    δ(j, i); the official code (whose checkpoints we load: microsoft/DeBERTa's
            #    DeBERTa/deberta/disentangled_attention.py at commit 009cc44, p2c_pos from -r_pos)
            #    negates it, so the row is again that of δ(i, j) = -δ(j, i). Score every key against
            #    every relative-position query, (B, nh, T_key, 2 * buckets), gather for key j the column
            #    rel_index[i, j] (the transposed index, as rows are keys here), then transpose back to
            #    (query, key).
            pos_query = self.split_heads(self.query_proj(positions))
            p2c = k @ pos_query.transpose(-1, -2)
            scores = scores + torch.gather(p2c, -1, index.transpose(-1, -2)).transpose(-1, -2)
        scores = scores / self.scale
        # Pairs involving a padded token get the most negative finite value, not -inf: a padded query
        # row is then uniform over all keys (finite, ignored downstream) instead of NaN.
        scores = scores.masked_fill(~pair_mask, torch.finfo(scores.dtype).min)
        attention = self.dropout(scores.softmax(dim=-1))
        return (attention @ v).transpose(1, 2).reshape(B, T, C)


class DenseResidualNorm(nn.Module):
    """Post-LayerNorm sublayer output: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, in_features, config):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class DebertaLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = nn.ModuleDict(dict(
            self=DisentangledSelfAttention(config),
            output=DenseResidualNorm(config.hidden_size, config),
        ))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(config.hidden_size, config.intermediate_size)))
        self.output = DenseResidualNorm(config.intermediate_size, config)

    def forward(self, x, pair_mask, rel_index, rel_embeddings):
        x = self.attention["output"](self.attention["self"](x, pair_mask, rel_index, rel_embeddings), x)
        return self.output(F.gelu(self.intermediate["dense"](x)), x)


class Deberta(nn.Module):
    """
    The DeBERTa-v3 encoder: input_ids (B, T) -> last hidden states (B, T, hidden). With RoBERTa's flags
    (relative_attention False, absolute positions, token types) it is the RoBERTa encoder: the same
    post-LayerNorm layers and GELU feed-forward, with plain attention.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id),
            LayerNorm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        if config.max_position_embeddings > 0:  # RoBERTa; its padding row (pad_token_id) is the pads' position
            self.embeddings["position_embeddings"] = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                                  padding_idx=config.pad_token_id)
        if config.type_vocab_size > 0:  # RoBERTa
            self.embeddings["token_type_embeddings"] = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.embedding_size != config.hidden_size:
            self.embeddings["embed_proj"] = nn.Linear(config.embedding_size, config.hidden_size, bias=False)
        self.encoder = nn.ModuleDict(dict(
            layer=nn.ModuleList(DebertaLayer(config) for _ in range(config.num_hidden_layers)),
        ))
        if config.relative_attention:
            self.encoder["rel_embeddings"] = nn.Embedding(2 * config.position_buckets, config.hidden_size)
            self.encoder["LayerNorm"] = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        T = input_ids.shape[1]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # Embeddings: words (DeBERTa-v3: no absolute positions, no token types; RoBERTa adds both),
        # projected to hidden if narrower, normalized, and zeroed at padded positions.
        x = self.embeddings["word_embeddings"](input_ids)
        if "token_type_embeddings" in self.embeddings:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.embeddings["token_type_embeddings"](token_type_ids)
        if "position_embeddings" in self.embeddings:
            x = x + self.embeddings["position_embeddings"](
                padding_offset_position_ids(input_ids, self.config.pad_token_id, self.config.max_position_embeddings))
        if "embed_proj" in self.embeddings:
            x = self.embeddings["embed_proj"](x)
        x = self.embeddings["LayerNorm"](x) * mask.unsqueeze(-1).to(x.dtype)
        x = self.dropout(x)
        # (i, j) may attend iff both tokens are real: (B, 1, T, T), broadcast over heads.
        pair_mask = (mask[:, :, None] & mask[:, None, :]).unsqueeze(1)
        rel_index = rel_embeddings = None
        if self.config.relative_attention:
            rel_index = relative_position_index(T, self.config.position_buckets, self.config.max_relative_positions,
                                                device=input_ids.device)
            # One relative-embedding table shared by all layers, layer-normed once per forward (norm_rel_ebd).
            rel_embeddings = self.encoder["LayerNorm"](self.encoder["rel_embeddings"].weight)
        for layer in self.encoder["layer"]:
            x = layer(x, pair_mask, rel_index, rel_embeddings)
        return x


class DebertaClassifier(nn.Module):
    """
    Deberta + the [CLS] pooler + a linear classifier; num_labels == 1 is regression (STS-B).
    RoBERTa's head (classifier.dense + tanh + classifier.out_proj on <s>) is the same two layers with
    tanh: ROBERTA_KEYS loads them as pooler.dense and classifier.
    """

    def __init__(self, config, num_labels):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.deberta = Deberta(config)
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(config.hidden_size, config.hidden_size)))
        self.pooler_dropout = nn.Dropout(config.pooler_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.dropout = nn.Dropout(config.cls_dropout)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_cls=False):
        """
        logits (B, num_labels), or (logits, cls (B, hidden)) with return_cls: the final layer's [CLS]
        state, the features App. B.3 projects with t-SNE. token_type_ids (default all 0) is used by
        RoBERTa and, as in DeBERTa-v3 (type_vocab_size 0), ignored by DeBERTa.
        """
        cls = self.deberta(input_ids, attention_mask, token_type_ids)[:, 0]
        # Pool the first token ([CLS], RoBERTa's <s>): dense + gelu (RoBERTa: tanh) on its last hidden state.
        activation = torch.tanh if self.config.pooler_activation == "tanh" else F.gelu
        pooled = activation(self.pooler["dense"](self.pooler_dropout(cls)))
        logits = self.classifier(self.dropout(pooled))
        return (logits, cls) if return_cls else logits

    @classmethod
    def from_pretrained(cls, path, num_labels=None, dtype=torch.float32, device="cpu", seed=0):
        """
        Load a DebertaV2ForSequenceClassification directory with its head, or a bare encoder
        (microsoft/deberta-v3-base, a saved DebertaV2Model) with a fresh pooler + classifier drawn
        from N(0, initializer_range) with `seed`. num_labels defaults to the config's
        (id2label / num_labels, else 2 as in transformers); a checkpoint's classifier of another
        size is refused as a shape mismatch.
        """
        config, hf_config = config_from(DebertaConfig, path)
        if num_labels is None:  # transformers leaves id2label out of config.json for its default of 2 labels
            num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else hf_config.get("num_labels", 2)
        with torch.device("meta"):
            model = cls(config, num_labels)
        keys = checkpoint_keys(path)
        if config.model_type == "roberta":
            return load_roberta_into(model, path, keys, dtype, device, seed).eval()
        if "classifier.weight" in keys:  # a sequence classification checkpoint: everything must be there
            load_checkpoint_into(model, path, dtype, device, ignore=_is_pretraining_only)
            return model.eval()
        if any(key.startswith("deberta.") for key in keys):
            load_checkpoint_into(model, path, dtype, device, ignore=_is_pretraining_only,
                                 allow_missing=lambda key: key.startswith(("pooler.", "classifier.")))
        else:  # DebertaV2Model.save_pretrained: the encoder's own names, no `deberta.` prefix
            load_checkpoint_into(model.deberta, path, dtype, device, ignore=_is_pretraining_only)
        model.init_head(seed, dtype, device)
        return model.eval()

    def init_head(self, seed, dtype, device):
        """Fresh pooler + classifier as Hugging Face draws them: N(0, initializer_range) weights, zero biases."""
        generator = torch.Generator().manual_seed(seed)
        for name in ("pooler.dense", "classifier"):
            linear = self.get_submodule(name)
            weight = torch.empty(linear.weight.shape).normal_(0.0, self.config.initializer_range, generator=generator)
            _assign(self, f"{name}.weight", weight.to(device=device, dtype=dtype))
            _assign(self, f"{name}.bias", torch.zeros(linear.bias.shape, device=device, dtype=dtype))


# -----------------------------------------------------------------------------
# RoBERTa: the encoder above with RoBERTa's flags
#
# RoBERTa (Liu et al., 2019) is BERT's post-LayerNorm encoder: learned absolute positions and a
# token-type table added to the words, plain scaled dot-product attention, GELU feed-forward, and a
# head of dense + tanh + out_proj on the first token <s>. That is DeBERTa-v3's layer stack without the
# disentangled terms, so it is the same modules under other flags (roberta_config), and its
# Hugging Face names (RobertaForSequenceClassification) map onto ours through this one table
# (`{}`: the layer index; the three embedding tables have .weight, every other entry .weight and .bias;
# the encoder module is named `deberta` whichever the family):

ROBERTA_KEYS = {
    "roberta.embeddings.word_embeddings":                  "deberta.embeddings.word_embeddings",
    "roberta.embeddings.position_embeddings":              "deberta.embeddings.position_embeddings",
    "roberta.embeddings.token_type_embeddings":            "deberta.embeddings.token_type_embeddings",
    "roberta.embeddings.LayerNorm":                        "deberta.embeddings.LayerNorm",
    "roberta.encoder.layer.{}.attention.self.query":       "deberta.encoder.layer.{}.attention.self.query_proj",
    "roberta.encoder.layer.{}.attention.self.key":         "deberta.encoder.layer.{}.attention.self.key_proj",
    "roberta.encoder.layer.{}.attention.self.value":       "deberta.encoder.layer.{}.attention.self.value_proj",
    "roberta.encoder.layer.{}.attention.output.dense":     "deberta.encoder.layer.{}.attention.output.dense",
    "roberta.encoder.layer.{}.attention.output.LayerNorm": "deberta.encoder.layer.{}.attention.output.LayerNorm",
    "roberta.encoder.layer.{}.intermediate.dense":         "deberta.encoder.layer.{}.intermediate.dense",
    "roberta.encoder.layer.{}.output.dense":               "deberta.encoder.layer.{}.output.dense",
    "roberta.encoder.layer.{}.output.LayerNorm":           "deberta.encoder.layer.{}.output.LayerNorm",
    "classifier.dense":                                    "pooler.dense",  # then tanh
    "classifier.out_proj":                                 "classifier",
}
# Not used by a classifier, skipped: the masked-LM head of the pretrained checkpoint (lm_head.*, as in
# FacebookAI/roberta-base), RobertaModel's tanh pooler (roberta.pooler.*, which the classification head
# does not read), and the position-id / token-type-id buffers older checkpoints stored.


def roberta_key(hf_key):
    """Our parameter name of a Hugging Face RoBERTa key, through ROBERTA_KEYS; None if it has none."""
    return _through_table(hf_key, ROBERTA_KEYS)


def roberta_hf_key(name):
    """The Hugging Face key of one of our RoBERTa parameter names: ROBERTA_KEYS read backwards (peft export)."""
    return _through_table(name, {ours: hf for hf, ours in ROBERTA_KEYS.items()})


def _through_table(key, table):
    """`key` (module.leaf) mapped by a {module template: module template} table whose `{}` is the layer index."""
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    layer = next((part for part in parts if part.isdigit()), None)
    template = ".".join("{}" if part == layer else part for part in parts)
    if template not in table:
        return None
    return f"{table[template].format(layer)}.{leaf}"


def _is_roberta_unused(hf_key):
    return hf_key.startswith(("lm_head.", "roberta.pooler.")) or hf_key.endswith(
        ("embeddings.position_ids", "embeddings.token_type_ids"))


def roberta_config(cls, config):
    """DebertaConfig with RoBERTa's flags from a config.json dict of model_type roberta (defaults: transformers')."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported: RoBERTa uses gelu")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={config['position_embedding_type']!r} is not supported: "
                         "RoBERTa uses absolute")
    for key in ("is_decoder", "add_cross_attention"):
        if config.get(key, False):
            raise ValueError(f"{key}=True is not supported: an encoder only")
    hidden, heads = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
    if hidden % heads != 0:
        raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    pad_token_id = config.get("pad_token_id", 1)
    max_positions = config.get("max_position_embeddings", 512)
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < max_positions - 1:
        raise ValueError(f"pad_token_id={pad_token_id!r} is not supported: RoBERTa's positions start after it "
                         f"and need it below max_position_embeddings - 1 = {max_positions - 1}")
    hidden_dropout = config.get("hidden_dropout_prob", 0.1)
    head_dropout = hidden_dropout if config.get("classifier_dropout") is None else config["classifier_dropout"]
    return cls(
        vocab_size=config.get("vocab_size", 50265),
        hidden_size=hidden,
        num_hidden_layers=config.get("num_hidden_layers", 12),
        num_attention_heads=heads,
        intermediate_size=config.get("intermediate_size", 3072),
        embedding_size=hidden,
        position_buckets=0, max_relative_positions=0, pos_att_type=(),  # no relative positions
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=config.get("attention_probs_dropout_prob", 0.1),
        pooler_dropout=head_dropout,  # RoBERTa's head drops out before dense and before out_proj, at one rate
        cls_dropout=head_dropout,
        pad_token_id=pad_token_id,
        initializer_range=config.get("initializer_range", 0.02),
        model_type="roberta",
        relative_attention=False,
        max_position_embeddings=max_positions,
        type_vocab_size=config.get("type_vocab_size", 2),
        pooler_activation="tanh",
    )


def padding_offset_position_ids(input_ids, pad_token_id, max_position_embeddings):
    """
    RoBERTa's position ids (fairseq's make_positions): a real token's is pad_token_id + (its rank among
    the row's non-pad tokens, from 1), a pad's is pad_token_id. With pad 1 the first token is at
    position 2: rows 0 and 1 of the table are never a real token's. (B, T) LongTensor.
    """
    is_real = input_ids.ne(pad_token_id).long()
    position_ids = torch.cumsum(is_real, dim=1) * is_real + pad_token_id
    if input_ids.shape[1] + pad_token_id >= max_position_embeddings:
        raise ValueError(f"input of {input_ids.shape[1]} tokens: RoBERTa's positions allow at most "
                         f"max_position_embeddings - pad_token_id - 1 = {max_position_embeddings - pad_token_id - 1}")
    return position_ids


def load_roberta_into(model, path, keys, dtype, device, seed):
    """
    Load a RoBERTa directory into a DebertaClassifier of RoBERTa's config: a RobertaForSequenceClassification
    with its head, or a pretrained-only checkpoint (RobertaForMaskedLM's roberta.* + lm_head.*, or a bare
    RobertaModel whose keys lack the `roberta.` prefix) with a fresh classifier.dense + out_proj.
    """
    has_head = "classifier.out_proj.weight" in keys
    bare = not any(key.startswith(("roberta.", "classifier.")) for key in keys)
    as_hf = (lambda key: "roberta." + key) if bare else (lambda key: key)
    load_checkpoint_into(model, path, dtype, device, ignore=lambda key: _is_roberta_unused(as_hf(key)),
                         rename=lambda key: roberta_key(as_hf(key)),
                         allow_missing=lambda key: not has_head and key.startswith(("pooler.", "classifier.")))
    if not has_head:
        model.init_head(seed, dtype, device)
    return model
