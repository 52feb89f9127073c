"""
Adapters as files: merge into the base, save / load balora's own format, export to peft's.

    adapters.save_adapter(model, "out/adapter")            # balora_config.json + balora_adapter.safetensors
    adapters.load_adapter(fresh_model, "out/adapter")      # the same adapted model, from the ORIGINAL weights
    adapters.export_peft(model, "out/peft_adapter", base)  # peft.PeftModel.from_pretrained loads it
    adapters.merge_lora(model)                             # plain nn.Linear layers holding W_res + s B A

balora_config.json records what rebuilds the layers: r, alpha, init, dropout, targets, the trainable
modules, dora and the 4-bit storage (quantize). The initial factors A0, B0 are saved beside A, B
whenever the init has them (PiSSA), so the residual W_res = W - s B0 A0 is rebuilt from the original
weights even when a randomized SVD made them. A baselines.py method without LoRA layers (Full FT,
BitFit, bottleneck adapters) is saved as its name, its head modules and its trainable tensors
(save_baseline / load_baseline).
"""

import json
import os

import torch
import torch.nn as nn

import baselines  # noqa: F401  (registers MiLoRA's init in INITS, rebuilds the baselines' structures)
import nf4
from baselines import CALIBRATED_INITS
from balora import INITS, add_lora, all_finite, lora_layers, set_submodule

def _require_lora(model, caller):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRALinear layers (call add_lora first)")
    return layers


def merge_lora(model):
    """
    Replace each LoRALinear by its base nn.Linear (an NF4 base: dequantized) with weight W_res + s B A
    (DoRA: m V / ||V||_c), summed in the adapter dtype and cast to the model dtype.
    """
    for name, layer in _require_lora(model, "merge_lora"):
        base = layer.base if isinstance(layer.base, nn.Linear) else layer.base.dequantized_linear()
        with torch.no_grad():
            base.weight.copy_(layer.merged_weight().to(base.weight.dtype))
        set_submodule(model, name, base)
    return model


def trainable_state_dict(model):
    """{name: tensor} of every parameter with requires_grad (adapters and `trainable` modules)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _trainable_modules(model):
    """Names of the modules owning trainable parameters other than LoRA / DoRA ones (add_lora's `trainable`)."""
    names = []
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if p.requires_grad and leaf not in ("lora_A", "lora_B", "lora_magnitude_vector") and owner not in names:
            names.append(owner)
    return names


def _uniform(layers, attribute):
    values = {getattr(layer, attribute) for _, layer in layers}
    if len(values) != 1:
        raise ValueError(f"LoRA layers differ in {attribute}: {sorted(values)}")
    return values.pop()


CONFIG_NAME, WEIGHTS_NAME = "balora_config.json", "balora_adapter.safetensors"


def save_adapter(model, directory, training=None):
    """
    Write balora_config.json (r, alpha, init, dropout, targets, trainable, dora, quantize, and `training`: a dict of
    the run's settings its users need, e.g. train_nlu.py's task and max_length) and
    balora_adapter.safetensors (lora_A, lora_B, lora_A0, lora_B0, DoRA's lora_magnitude_vector and the
    trainable modules' params).
    Keeping A0, B0 lets load_adapter rebuild W_res = W - s B0 A0 from the original weights, even when
    PiSSA used a randomized SVD that cannot be recomputed.
    """
    from safetensors.torch import save_file

    if getattr(model, "baseline_config", None) is not None:
        return save_baseline(model, directory, training)
    layers = _require_lora(model, "save_adapter")
    config = dict(
        r=_uniform(layers, "r"), alpha=_uniform(layers, "alpha"), init=_uniform(layers, "init"),
        dropout=_uniform(layers, "dropout_p"), targets=[name for name, _ in layers],
        trainable=_trainable_modules(model), dora=_uniform(layers, "dora"), quantize=_uniform(layers, "quantize"),
        **({"training": training} if training else {}),
    )
    tensors = dict(trainable_state_dict(model))
    for name, layer in layers:
        tensors[f"{name}.lora_A"] = layer.lora_A.detach()  # also when frozen (LoRA-FA)
        if layer.lora_A0 is not None:
            tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"] = layer.lora_A0, layer.lora_B0
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


_ADAPTER_CONFIG_KEYS = ("r", "alpha", "init", "dropout", "targets", "trainable")


def adapter_problems(model, config, tensors):
    """
    What keeps an adapter (its balora_config.json dict and tensors) from fitting `model`, as a list of
    strings (empty: it fits): targets that are not linear layers of the model, missing or unexpected
    tensors, shapes other than lora_A (r, in) / lora_B (out, r) / the trainable modules' own, and
    tensors holding NaN or inf. Checked before the model is touched.
    """
    problems, expected = [], {}
    # a calibrated init (LoRA-GA, CorDA) is rebuilt like PiSSA: from the saved A0, B0
    if config["init"] != "lora" and config["init"] not in (*INITS, *CALIBRATED_INITS):
        problems.append(f"init {config['init']!r} is not one of {['lora', *INITS, *CALIBRATED_INITS]}")
    modules = dict(model.named_modules())
    for name in config["targets"]:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            problems.append(f"target {name!r} is not a linear layer of the model")
            continue
        factors = ("lora_A", "lora_B") + (("lora_A0", "lora_B0") if config["init"] != "lora" else ())
        for factor in factors:
            expected[f"{name}.{factor}"] = ((config["r"], layer.in_features) if factor.startswith("lora_A")
                                            else (layer.out_features, config["r"]))
        if config.get("dora", False):  # adapters saved before DoRA existed have no "dora" key
            expected[f"{name}.lora_magnitude_vector"] = (layer.out_features,)
    for module_name in config["trainable"]:
        if module_name not in modules:
            problems.append(f"trainable module {module_name!r} is not in the model")
            continue
        for param_name, p in modules[module_name].named_parameters():
            expected[f"{module_name}.{param_name}"] = tuple(p.shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    problems += [f"{key} has shape {tuple(tensors[key].shape)}, expected {expected[key]}"
                 for key in sorted(set(expected) & set(tensors)) if tuple(tensors[key].shape) != expected[key]]
    problems += [f"{key} holds NaN/inf" for key, t in sorted(tensors.items())
                 if t.is_floating_point() and not all_finite(t)]
    return problems


def load_adapter(model, directory):
    """
    Apply a save_adapter() directory to a model holding the ORIGINAL base weights (read_adapter, then
    apply_adapter).
    """
    return apply_adapter(model, *read_adapter(directory), where=directory)


def read_adapter(directory):
    """(balora_config.json as a dict, {name: tensor}) of a save_adapter() directory; a missing file or key is named."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapter: no {os.path.basename(path)} in {directory!r} (a save_adapter directory?)")
    with open(config_path) as f:
        config = json.load(f)
    if "method" in config:  # a save_baseline directory: its keys are checked by load_baseline
        return config, load_file(weights_path)
    missing_keys = [key for key in _ADAPTER_CONFIG_KEYS if key not in config]
    if missing_keys:
        raise ValueError(f"load_adapter: {config_path} lacks the keys {missing_keys}")
    return config, load_file(weights_path)


def apply_adapter(model, config, tensors, where="the adapter"):
    """
    Check that an adapter fits `model` (adapter_problems: one ValueError listing everything wrong,
    before the model is changed), wrap its targets, rebuild PiSSA residuals from the saved A0, B0,
    re-quantize a 4-bit base, then load every saved tensor. A save_baseline adapter: load_baseline.
    """
    if "method" in config:
        return load_baseline(model, where, config, tensors)
    problems = adapter_problems(model, config, tensors)
    if problems:
        raise ValueError(f"load_adapter: {where} does not fit the model: " + "; ".join(problems))
    # init="lora" wraps the layers without an SVD; an init with initial factors then starts from the saved ones
    add_lora(model, config["targets"], config["r"], config["alpha"], init="lora",
             dropout=config["dropout"], trainable=config["trainable"], dora=config.get("dora", False))
    for name, layer in lora_layers(model):
        if config["init"] != "lora":
            layer.start_from(tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"])
        layer.init = config["init"]
    # a 4-bit adapter was trained on the NF4 codes of W_res: rebuilt from the same W_res, they are the same
    nf4.quantize_base(model, config.get("quantize", "none"))
    model.load_state_dict(tensors, strict=False)  # every key was checked by adapter_problems
    return model


def save_baseline(model, directory, training=None):
    """
    save_adapter for a baselines.py method (Full FT, BitFit, bottleneck adapters): balora_config.json
    records the method, the head modules that train with it and the bottleneck size; the weights file
    holds every trainable tensor (Full FT: the whole model).
    """
    from safetensors.torch import save_file

    config = dict(model.baseline_config, **({"training": training} if training else {}))
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_baseline(model, directory, config, tensors):
    """
    apply_adapter for a save_baseline directory: the method applied to the original model
    (baselines.adapt), then its tensors, which must be exactly its trainable ones, with their shapes.
    """
    if config["method"] not in baselines.KINDS:
        raise ValueError(f"load_adapter: {directory}: method {config['method']!r} is not one of {baselines.KINDS}")
    baselines.adapt(model, config["method"], config.get("trainable", ()), config.get("bottleneck"))
    expected = trainable_state_dict(model)
    problems = [f"missing {sorted(set(expected) - set(tensors))[:5]}"] if set(expected) - set(tensors) else []
    problems += [f"unexpected {sorted(set(tensors) - set(expected))[:5]}"] if set(tensors) - set(expected) else []
    problems += [f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(expected[key].shape)}"
                 for key in sorted(set(expected) & set(tensors)) if tensors[key].shape != expected[key].shape]
    problems += [f"{key} holds NaN/inf" for key, t in sorted(tensors.items()) if t.is_floating_point() and not all_finite(t)]
    if problems:
        raise ValueError(f"load_adapter: {directory} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)
    return model


def export_peft(model, out_dir, base_model_name_or_path, task_type=None, hf_name=None, modules_to_save=None):
    """
    Write adapter_config.json + adapter_model.safetensors in peft's LoRA format, to be applied to the
    ORIGINAL base weights with peft.PeftModel.from_pretrained, or with task_type ("CAUSAL_LM",
    "SEQ_CLS") by peft's AutoPeftModelFor... classes, which load the base from
    base_model_name_or_path (a local directory is written as its absolute path, so it resolves from
    anywhere).

    A LoRA adapter is exported as is. A PiSSA adapter changed W by
        Delta W = s (B A - B0 A0) = s [B, -B0] @ [A; A0],
    a rank-2r LoRA (peft's own PiSSA-to-LoRA conversion). It is exported with r' = 2r and
    alpha' = 2 alpha (an int when it is whole, as peft writes it), so peft's scaling alpha'/r' equals s.
    Trainable non-LoRA modules (e.g. the classifier) go to peft's modules_to_save.

    DoRA (use_dora: true) adds each layer's magnitude m as `lora_magnitude_vector`. peft normalizes
    V = W + s' B' A', which for the rank-2r PiSSA export is W + s (B A - B0 A0) = W_res + s B A, our V:
    the same m and direction, so DoRA on a PiSSA init exports the same way.

    On a 4-bit base the adapter was trained against Q(W_res), but peft applies it to the weights it
    loads: on the full-precision W it computes W + s (B A - B0 A0) = W_res + s B A, which differs from
    the trained model by the quantization error W_res - Q(W_res); merge_lora (or load_adapter, which
    re-quantizes) reproduces the trained model exactly.

    hf_name maps one of our parameter names (module.leaf) to the base checkpoint's, for a model whose
    modules carry other names than its checkpoint (RoBERTa in the encoder's: model.roberta_hf_key);
    modules_to_save replaces the list of trainable modules' names peft is given (default: their names).
    """
    from safetensors.torch import save_file

    hf_name = hf_name or (lambda name: name)

    def hf_module(module):  # the module's name in the checkpoint: map module.weight, drop .weight
        return hf_name(module + ".weight")[: -len(".weight")]

    layers = _require_lora(model, "export_peft")
    r, alpha, init = _uniform(layers, "r"), _uniform(layers, "alpha"), _uniform(layers, "init")
    tensors = {}
    for name, layer in layers:
        lora_A, lora_B = layer.lora_A.detach(), layer.lora_B.detach()
        if init != "lora":
            lora_A = torch.cat([lora_A, layer.lora_A0], dim=0)  # (2r, in)
            lora_B = torch.cat([lora_B, -layer.lora_B0], dim=1)  # (out, 2r)
        tensors[f"base_model.model.{hf_module(name)}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{hf_module(name)}.lora_B.weight"] = lora_B
        if layer.dora:
            tensors[f"base_model.model.{hf_module(name)}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    trainable_modules = _trainable_modules(model)
    for module_name in trainable_modules:
        for param_name, p in model.get_submodule(module_name).named_parameters():
            tensors[f"base_model.model.{hf_name(f'{module_name}.{param_name}')}"] = p.detach()
    modules_to_save = trainable_modules if modules_to_save is None else modules_to_save
    rank_factor = 1 if init == "lora" else 2
    lora_alpha = rank_factor * alpha
    if os.path.isdir(base_model_name_or_path):
        base_model_name_or_path = os.path.realpath(base_model_name_or_path)
    config = dict(
        peft_type="LORA", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
        r=rank_factor * r, lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
        lora_dropout=_uniform(layers, "dropout_p"),
        target_modules=[hf_module(name) for name, _ in layers], modules_to_save=modules_to_save or None,
        init_lora_weights=True, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=_uniform(layers, "dora"),
        inference_mode=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
