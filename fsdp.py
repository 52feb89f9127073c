"""
Past one GPU: train_nlg.py --fsdp shards the model over the ranks with PyTorch's FSDP2
(torch.distributed.fsdp.fully_shard) and saves sharded checkpoints with torch.distributed.checkpoint.

DDP keeps a full copy of the model on every GPU; a 70B bf16 base is 140 GB, more than any one GPU
holds. FSDP2 splits every parameter into world_size pieces (dim 0) and all-gathers one decoder Block
just before its forward (and again before its backward), so a rank holds 1/world_size of the model
plus one or two unsharded Blocks at a time. Gradients are reduce-scattered, so each rank keeps, and
the optimizer updates, only its shard of the adapter.

  load_sharded_llama   build on the meta device; then, Block by Block, read its tensors from the
                       safetensors files, add LoRA / PiSSA to it, and shard it (a rank never holds
                       more than its shards plus one full Block); then the root (embeddings, norm, head)
  gathered_adapter     the full adapter, all-gathered, in a small module tree that adapters.save_adapter
                       and adapters.export_peft write
  save_checkpoint      adapter and AdamW state as sharded tensors (torch.distributed.checkpoint), the
  load_checkpoint      rest (step, data position, RNG of every rank, scheduler) in one JSON file

The teacher stays free under FSDP: the initial factors lora_A0, lora_B0 become frozen parameters, so
they are sharded and gathered with their Block like the base weight (as buffers FSDP would replicate
them on every GPU: several GB at 70B with r = 128 on seven targets), and balora.pretrained_mode works
unchanged, because a Block's forward sees its gathered parameters under their usual names.
"""

import contextlib
import io
import json
import os
import pickle
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import balora
import training
from model import Llama, LlamaConfig, _assign, checkpoint_files, config_from, rope_inv_freq

# -----------------------------------------------------------------------------
# Sharding


def mixed_precision():
    """
    Each parameter computes in the dtype it is stored in: the frozen base in --dtype (bf16), the LoRA
    factors in float32 (balora keeps them so on a bf16 base), so FSDP casts nothing (param_dtype None)
    and a sharded run computes exactly what one process computes. Gradients (the adapter's only) are
    reduce-scattered in float32.
    """
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def initial_factors_as_parameters(module):
    """
    Turn each LoRALinear's lora_A0 / lora_B0 buffers into frozen parameters, which fully_shard shards
    (it leaves buffers whole on every rank). Names, values and pretrained_mode stay the same.
    """
    for _, layer in balora.lora_layers(module):
        for name in ("lora_A0", "lora_B0"):
            tensor = layer._buffers.pop(name)
            if tensor is None:  # init="lora": B0 = 0, nothing is kept
                layer.register_buffer(name, None)
            else:
                layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def shard(module, mesh, cpu_offload):
    """
    fully_shard `module`, whose own parameters (those not in a nested FSDP unit yet) hold full tensors,
    keeping one full tensor beyond the shards at a time. (fully_shard on the full tensors would make
    every shard before freeing any full tensor: half a Block more at the peak.) So the parameters go
    to the meta device, fully_shard makes meta shards (no memory), and each full tensor is then cut
    into this rank's shard, which replaces its meta shard (FSDP picks it up at its first forward).

    With `cpu_offload`, the frozen nn.Linear weights inside its LoRALinear layers get their own units
    whose shards live in host memory (copied to the GPU for each forward), as does `module` itself
    when every parameter it manages is frozen: the base is offloaded, the adapter and its optimizer
    step stay on the GPU.
    """
    full = {name: p.detach() for name, p in module.named_parameters() if not isinstance(p, DTensor)}
    frozen = not any(p.requires_grad for p in module.parameters() if not isinstance(p, DTensor))
    for name, tensor in full.items():
        _assign(module, name, torch.empty_like(tensor, device="meta"))
    tie = getattr(module, "tie_weights", lambda: None)  # the root: lm_head shares the new embedding
    tie()
    offload = dict(offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())) if cpu_offload else {}
    if cpu_offload:
        for _, layer in balora.lora_layers(module):
            if not isinstance(layer.base, FSDPModule):  # the root's call finds its Blocks' done
                fully_shard(layer.base, mesh=mesh, mp_policy=mixed_precision(), **offload)
    fully_shard(module, mesh=mesh, mp_policy=mixed_precision(), **(offload if frozen else {}))
    for name, meta_shard in list(module.named_parameters()):
        if name not in full:
            continue
        # src_data_rank=None: every rank cuts its own shard out of its own full tensor, no communication
        piece = distribute_tensor(full.pop(name), mesh, meta_shard.placements, src_data_rank=None)
        local = piece.to_local().clone()  # its own memory, so the full tensor is freed here
        _assign(module, name, DTensor.from_local(local, mesh, meta_shard.placements, shape=piece.shape,
                                                 stride=piece.stride()))
    tie()


# -----------------------------------------------------------------------------
# Loading: one Block at a time


def _checkpoint_index(path):
    """{tensor name: safetensors file} of a model directory (sharded loading reads safetensors only)."""
    from safetensors import safe_open

    index = {}
    for file in checkpoint_files(path):
        if not file.endswith(".safetensors"):
            raise ValueError(f"--fsdp loads safetensors checkpoints only, got {file} (convert it with safetensors first)")
        with safe_open(file, framework="pt", device="cpu") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


def _fill(module, prefix, names, index, dtype, device, problems):
    """
    Materialize the parameters `names` of `module` (on the meta device) from the checkpoint tensors
    prefix + name, in `dtype` on `device`, one tensor at a time. Appends to `problems` a shape that
    differs and a tensor holding NaN/inf.
    """
    from safetensors import safe_open

    for name in names:
        key = prefix + name
        with safe_open(index[key], framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        expected = tuple(module.get_parameter(name).shape)
        if tuple(tensor.shape) != expected:
            problems.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {expected}")
            continue
        # in the checkpoint's dtype on the CPU, the tensor is a view of the file's memory map: no copy
        tensor = tensor.to(device=device, dtype=dtype)
        if not balora.all_finite(tensor):
            problems.append(f"NaN/inf in {key}")
        _assign(module, name, tensor)


def _raise_problems(path, problems):
    if problems:
        raise ValueError(f"checkpoint {path!r} cannot be loaded: " + "; ".join(problems))


def load_sharded_llama(path, dtype, device, lora, cpu_offload=False):
    """
    A Llama from the Hugging Face directory `path`, with LoRA added and sharded over the ranks.

    `lora`: balora.add_lora's keyword arguments (target_modules, r, alpha, init, dropout, pissa_niter).
    Built on the meta device (no memory), then Block by Block: its tensors are read from the
    safetensors files, add_lora wraps its targets (PiSSA runs its SVD here, on the full weight, on
    every rank: the same result everywhere, as the same seed gives the same LoRA init), its A0 / B0
    become parameters, and fully_shard keeps this rank's shard and frees the rest. The Blocks are
    adapted in the order add_lora adapts a whole model, so the random inits match a one-process run.
    Then the root's own tensors (embeddings, final norm, LM head) are read and the root is sharded.
    Peak host memory per rank: its shards, one full Block (the root's tensors at the end) and the
    temporaries of one matrix (with PiSSA, its float32 SVD). Names that do not
    match the model are refused before any tensor is read.
    Returns (model, dict(trainable=#params, total=#params)) as add_lora counts them.
    """
    config, _ = config_from(LlamaConfig, path)
    index = _checkpoint_index(path)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.device("meta"):
        model = Llama(config)
    model.requires_grad_(False)
    # names first, before anything is read: a tied lm_head is the embedding, RoPE's table is recomputed
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - set(index))
    unexpected = sorted(key for key in index if key not in expected | set(model.tied_keys)
                        and not key.endswith("rotary_emb.inv_freq"))
    _raise_problems(path, ([f"missing weights: {missing}"] if missing else []) +
                    ([f"unexpected weights: {unexpected}"] if unexpected else []))
    problems, counts = [], dict(trainable=0, total=0)
    for i, block in enumerate(model.model.layers):
        _fill(block, f"model.layers.{i}.", [name for name, _ in block.named_parameters()], index, dtype, device, problems)
        _raise_problems(path, problems)  # a Block that did not load must not reach add_lora
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            adapted = balora.add_lora(block, **lora)  # quiet: one line per Block, on every rank, says little
        counts["trainable"] += adapted["trainable"]
        counts["total"] += adapted["total"]
        initial_factors_as_parameters(block)
        shard(block, mesh, cpu_offload)
    root = [name for name, _ in model.named_parameters() if not name.startswith("model.layers.")]
    _fill(model, "", root, index, dtype, device, problems)
    model.tie_weights()
    _raise_problems(path, problems)
    counts["total"] += sum(p.numel() for name, p in model.named_parameters() if name in root)
    model.model.rotary_emb.inv_freq = rope_inv_freq(config, device=device)
    shard(model, mesh, cpu_offload)
    return model.eval(), counts


# -----------------------------------------------------------------------------
# The final adapter: gathered once, written as today


def _full(tensor):
    """The whole tensor of a DTensor shard (a collective: every rank calls it), on the CPU."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def gathered_adapter(model):
    """
    A module tree with the names of `model` holding only its LoRA layers, each with the full lora_A,
    lora_B (and lora_A0, lora_B0) on the CPU and a base nn.Linear on the meta device (no memory):
    what adapters.save_adapter and adapters.export_peft read, so the files are the ones a one-process
    run writes. Collective (one all-gather per tensor); every rank gets the tree, rank 0 writes it.
    """
    tree = nn.Module()
    for name, layer in balora.lora_layers(model):
        base = layer.base
        full = _full_lora_layer(base.in_features, base.out_features, layer)
        parent = tree
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rpartition(".")[2], full)
    return tree


def _full_lora_layer(in_features, out_features, layer):
    """A LoRALinear like `layer` (same r, alpha, dropout) on a meta base, holding `layer`'s full factors."""
    copy = balora.LoRALinear(nn.Linear(in_features, out_features, bias=False, device="meta"),
                             layer.r, layer.alpha, layer.dropout_p, init="lora")
    copy.init = layer.init  # the factors below are the layer's own, whatever its init
    copy.lora_A = nn.Parameter(_full(layer.lora_A))
    copy.lora_B = nn.Parameter(_full(layer.lora_B))
    if layer.lora_A0 is not None:
        copy.lora_A0, copy.lora_B0 = _full(layer.lora_A0), _full(layer.lora_B0)
    return copy


# -----------------------------------------------------------------------------
# Sharded checkpoints
#
# <out>/checkpoint/step-<N>/   torch.distributed.checkpoint files: every rank writes its shards of the
#                              adapter and of AdamW's exp_avg / exp_avg_sq (tensors only, so reading
#                              them back runs torch.load(weights_only=True))
# <out>/checkpoint/latest.json the step, world size, data position, scheduler and optimizer settings,
#                              every rank's RNG state; written atomically by rank 0 after all shards
#                              are on disk, so it only ever names a complete step-<N>/

LATEST = "latest.json"


def _tensors(model, optimizer):
    """
    The checkpoint's tensors by name: each trainable parameter (this rank's shard) and its AdamW
    state (step, exp_avg, exp_avg_sq). Before the first optimizer step the state does not exist yet,
    so it is created here as zeros of the right shard shapes for load_checkpoint to fill in place.
    """
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state[p]
        if not state:
            state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                         exp_avg_sq=torch.zeros_like(p))
        tensors[f"adapter.{name}"] = p.detach()
        tensors.update({f"optimizer.{name}.{key}": value for key, value in state.items()})
    return tensors


def _rng_as_json(state):
    """train_nlg.rng_state()'s tensors as lists (JSON), and back with _rng_from_json."""
    return {key: (value.tolist() if torch.is_tensor(value) else [v.tolist() for v in value] if key == "cuda" else value)
            for key, value in state.items()}


def _rng_from_json(state):
    restored = dict(state, python=torch.tensor(state["python"], dtype=torch.int64),
                    torch=torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        restored["cuda"] = [torch.tensor(v, dtype=torch.uint8) for v in state["cuda"]]
    return restored


def _write_json_atomically(record, path):
    directory = os.path.dirname(path)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def remove_unfinished(directory, keep):
    """Delete the step-<N>/ folders of `directory` other than `keep` (older ones, or one a kill cut short)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(("step-", ".tmp-")) and name != keep:
                path = os.path.join(directory, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_checkpoint(directory, model, optimizer, scheduler, step, rng, data_state, config):
    """
    Write step `step` of a sharded run to `directory` (collective: every rank calls it). `rng` is this
    rank's train_nlg.rng_state(). Refuses (on every rank at once) to save a non-finite adapter.
    """
    finite = all(torch.isfinite(p.to_local()).all() for p in model.parameters() if p.requires_grad)
    if training.min_over_ranks(finite) < 1:  # every rank's shards finite
        raise FloatingPointError(f"not writing {directory}: trainable tensors are non-finite")
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_as_json(rng))
    folder = f"step-{step:06d}"
    dcp.save(_tensors(model, optimizer), checkpoint_id=os.path.join(directory, folder))
    if dist.get_rank() == 0:  # dcp.save returns on rank 0 once every rank's shards and the metadata are written
        record = {"step": step, "folder": folder, "world_size": dist.get_world_size(), "data_state": data_state,
                  "config": config, "scheduler": scheduler.state_dict(), "rng": rngs,
                  "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]}
        _write_json_atomically(record, os.path.join(directory, LATEST))
        remove_unfinished(directory, keep=folder)
    dist.barrier()  # no rank runs ahead (or is killed) before latest.json names the new folder


def load_checkpoint(directory, model, optimizer, scheduler):
    """
    Restore save_checkpoint's latest step into `model`'s shards, `optimizer` and `scheduler`, and this
    rank's RNG state. Same world size only (each rank's shard and RNG stream are its own). Returns
    latest.json's record (step, data_state, config, ...).
    """
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no sharded checkpoint at {path!r}")
    with open(path) as f:
        record = json.load(f)
    if record["world_size"] != dist.get_world_size():
        raise ValueError(f"{path} was written by {record['world_size']} processes, this run has "
                         f"{dist.get_world_size()}: resume with the same world size to continue exactly")
    folder = os.path.join(directory, record["folder"])
    reader = VettedReader(folder)  # before any tensor is touched: a refused checkpoint changes nothing
    tensors = _tensors(model, optimizer)
    dcp.load(tensors, storage_reader=reader)  # fills every tensor in place: the shards and AdamW's state
    for group, saved in zip(optimizer.param_groups, record["param_groups"]):
        group.update(saved, betas=tuple(saved["betas"]))
    scheduler.load_state_dict(record["scheduler"])
    return dict(record, rng=_rng_from_json(record["rng"][dist.get_rank()]))


# Every global a genuine .metadata names, by exact (module, name): DCP's metadata classes, the
# filesystem writer's _StorageInfo, torch.Size, the layout and dtype objects, and the PosixPath of the
# checkpoint's id. No dotted name (pickle protocol 4 would resolve "os.system" through a module's
# globals) and no whole module is allowed.
_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = {(_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                                   "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "MetadataIndex",
                                                   "StorageMeta")}
METADATA_GLOBALS |= {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
METADATA_GLOBALS |= {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's .metadata, refusing every global not in METADATA_GLOBALS."""

    def find_class(self, module, name):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a checkpoint's metadata")


def _metadata_problem(metadata, folder):
    """Why the unpickled `metadata` is not a sharded checkpoint's of tensors in `folder` (None when it is)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    if type(metadata) is not Metadata:
        return f"it holds a {type(metadata).__name__}, not a Metadata"
    if type(metadata.state_dict_metadata) is not dict or type(metadata.storage_data) is not dict:
        return "its state_dict_metadata and storage_data are not dicts"
    for key, entry in metadata.state_dict_metadata.items():
        # Anything but tensor metadata would make dcp.load read that entry with torch.load(weights_only=False)
        if type(key) is not str or type(entry) is not TensorStorageMetadata:
            return f"entry {key!r} is a {type(entry).__name__}, not tensor metadata"
        if (type(entry.properties) is not TensorProperties or not isinstance(entry.properties.dtype, torch.dtype)
                or type(entry.size) is not torch.Size or type(entry.chunks) is not list
                or any(type(chunk) is not ChunkStorageMetadata for chunk in entry.chunks)):
            return f"entry {key!r} is not well-formed tensor metadata"
    root = os.path.realpath(folder)
    for index, info in metadata.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo or type(info.relative_path) is not str:
            return "its storage_data is not a map of MetadataIndex to _StorageInfo"
        if not os.path.realpath(os.path.join(root, info.relative_path)).startswith(root + os.sep):
            return f"storage path {info.relative_path!r} leaves the checkpoint directory"
        if info.transform_descriptors:
            return f"storage of {index.fqn!r} names transforms {info.transform_descriptors!r}"
    if metadata.storage_meta is not None and type(metadata.storage_meta) is not StorageMeta:
        return f"its storage_meta is a {type(metadata.storage_meta).__name__}"
    return None


def check_metadata(folder):
    """
    torch.distributed.checkpoint's .metadata of `folder`, vetted: DCP itself reads the file with pickle,
    which would run any code a crafted file names, and reads a bytes entry with torch.load(weights_only=
    False). Here it is unpickled once, knowing only METADATA_GLOBALS, and must describe tensors stored
    in files inside `folder`; VettedReader hands this object to dcp.load, which never opens the file.
    """
    path = os.path.join(folder, ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {folder} has no .metadata (not a complete sharded checkpoint)")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"--resume: {path} was not read: {error}") from None
    problem = _metadata_problem(metadata, folder)
    if problem is not None:
        raise ValueError(f"--resume: {path} is not a checkpoint of tensors: {problem}")
    return metadata


class VettedReader(FileSystemReader):
    """A FileSystemReader whose metadata is check_metadata's object, not a second unpickling of the file."""

    def __init__(self, folder):
        super().__init__(folder)
        self.vetted = check_metadata(folder)

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if self.vetted.storage_meta is None:
            self.vetted.storage_meta = StorageMeta()
        self.vetted.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata sets it
        return self.vetted
