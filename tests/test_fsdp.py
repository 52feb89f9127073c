"""
fsdp.py and train_nlg.py --fsdp, two gloo processes on the CPU: the same losses and adapter as one
process with the same global batch (fp32, and bf16 with gradient checkpointing and CPU offload), the
same peft export, a kill -9 then --resume bit-identical to the uninterrupted run, and each rank's peak
host memory while loading below half the model plus one Block.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_nlg
from test_train_nlg import free_port, read_log, tiny, tiny_args  # noqa: F401 (tiny is a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# balora, a micro-batch of 2 and every regularizer on from step 1 (svd_k 3 with top_k 5), 4 steps:
# each rank runs 2 micro-batches per step, so accumulation and the reduce-scatter both take part.
COMMON = ["--method", "balora", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4",
          "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5", "--lr", "1e-2"]


def torchrun(script, *args, check=True, **env):
    """Run `script` under torchrun with 2 CPU processes (gloo), `env` added; returns the CompletedProcess."""
    env = dict(os.environ, **{"OMP_NUM_THREADS": "1", **env})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", script, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-12000:]
    return result


def adapter_tensors(out, folder="adapter", name="balora_adapter.safetensors"):
    return load_file(os.path.join(out, folder, name))


def relative_difference(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def assert_same_run(single, sharded, factors=("lora_A", "lora_B", "lora_A0", "lora_B0")):
    """Per-step losses within 1e-6 relative, final adapters within 1e-6, the same token counts."""
    log_single, log_sharded = read_log(single), read_log(sharded)
    assert [r["step"] for r in log_single] == [r["step"] for r in log_sharded] == [1, 2, 3, 4]
    for a, b in zip(log_single, log_sharded):
        for key in ("total", "task", "grad_norm"):
            assert relative_difference(a[key], b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
        # Each regularizer within 1e-6 of the loss it is part of. Not of itself: the consistency KL is
        # ~5e-4 here, half the squared gap of two nearly equal logit rows (~0.03), so the 1-ulp adapter
        # differences that summing gradients in another order leaves (~3e-8) move it by ~3e-5 of itself.
        for key in ("consistency", "diversity", "svd"):
            assert (a[key] is None) == (b[key] is None), key
            assert a[key] is None or abs(a[key] - b[key]) <= 1e-6 * max(abs(a[key]), abs(a["total"])), (a["step"], key)
        assert (a["tokens"], a["task_tokens"]) == (b["tokens"], b["task_tokens"])
    assert all(log_single[-1][key] is not None for key in ("consistency", "diversity", "svd"))  # all took part
    one, two = adapter_tensors(single), adapter_tensors(sharded)
    assert one.keys() == two.keys() and len(one) == 2 * 7 * len(factors)  # 2 Blocks x 7 targets x factors
    for key in one:
        assert one[key].dtype == two[key].dtype == torch.float32
        assert (one[key] - two[key]).abs().max().item() <= 1e-6, key
    return one, two


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("echo owned",))


class CreatesFile:
    """Unpickling this opens `path` for writing: a harmless stand-in for code a crafted checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    import fsdp

    (tmp_path / ".metadata").write_bytes(pickle.dumps({"storage_data": RunsCode()}))
    with pytest.raises(ValueError, match="global posix.system is not part of a checkpoint's metadata"):
        fsdp.check_metadata(str(tmp_path))


def test_a_dotted_global_through_the_metadata_module_is_refused_before_it_runs(tmp_path):
    # pickle protocol 4's STACK_GLOBAL resolves "os.system" through the module's globals (it imports os)
    import pickle

    import fsdp

    marker = tmp_path / "marker"

    def text(value):  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(value)]) + value.encode()

    crafted = (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.system") + b"\x93"
               + text(f"touch {marker}") + b"\x85R.")  # STACK_GLOBAL, TUPLE1, REDUCE, STOP
    (tmp_path / ".metadata").write_bytes(crafted)
    with pytest.raises(ValueError, match=r"global torch\.distributed\.checkpoint\.metadata\.os\.system is not part"):
        fsdp.check_metadata(str(tmp_path))
    assert not marker.exists()
    assert pickle.loads(crafted) == 0 and marker.exists()  # what it does when unpickled unchecked


def genuine_checkpoint(folder, state=None):
    """A dcp.save of a few tensors (one process, no process group) in `folder`; returns the saved tensors."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = state or {"adapter.w": torch.randn(3, 2), "optimizer.w.step": torch.tensor(4.0)}
    dcp.save(state, checkpoint_id=str(folder))
    return state


def test_a_bytes_entry_in_the_metadata_is_refused_before_any_data_is_read(tmp_path):
    import torch.distributed.checkpoint as dcp

    import fsdp

    # a .metadata made only of DCP's own classes that marks a tensor key as bytes: dcp.load would give
    # that key's data file to torch.load(weights_only=False)
    marker = tmp_path / "marker"
    genuine_checkpoint(tmp_path / "step", {"adapter.w": CreatesFile(str(marker))})  # DCP torch.saves a non-tensor
    with pytest.raises(ValueError, match=r"BytesStorageMetadata is not part of a checkpoint's metadata"):
        fsdp.VettedReader(str(tmp_path / "step"))
    assert not marker.exists()
    dcp.load({"adapter.w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "step"))  # unchecked, it runs
    assert marker.exists()


def test_metadata_entries_must_be_tensors_stored_inside_the_checkpoint(tmp_path):
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    import fsdp

    genuine_checkpoint(tmp_path)
    metadata = fsdp.check_metadata(str(tmp_path))
    metadata.state_dict_metadata["adapter.w"] = BytesStorageMetadata()  # past the unpickler, the check holds too
    assert fsdp._metadata_problem(metadata, str(tmp_path)) == "entry 'adapter.w' is a BytesStorageMetadata, not tensor metadata"
    metadata = fsdp.check_metadata(str(tmp_path))
    next(iter(metadata.storage_data.values())).relative_path = "../outside.distcp"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"storage path '\.\./outside\.distcp' leaves the checkpoint directory"):
        fsdp.check_metadata(str(tmp_path))


def test_a_genuine_checkpoint_loads_from_the_vetted_metadata_alone(tmp_path, monkeypatch):
    import pickle

    import torch.distributed.checkpoint as dcp

    import fsdp

    saved = genuine_checkpoint(tmp_path)
    reader = fsdp.VettedReader(str(tmp_path))
    monkeypatch.setattr(pickle, "load", lambda *args, **kwargs: pytest.fail("the .metadata was unpickled again"))
    loaded = {key: torch.zeros_like(value) for key, value in saved.items()}
    dcp.load(loaded, storage_reader=reader)
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)


def test_fsdp_needs_torchrun_and_offload_needs_fsdp(tiny, tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over the processes torchrun starts"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--fsdp"))
    with pytest.raises(ValueError, match="--fsdp-cpu-offload offloads FSDP shards: give --fsdp too"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--fsdp-cpu-offload"))
    # the gathered adapter is plain LoRA and FSDP does not shard NF4 codes: refused, not silently wrong
    with pytest.raises(ValueError, match="--method dora --quantize none is not supported with it"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--fsdp", "--method", "dora"))
    with pytest.raises(ValueError, match="--method balora --quantize nf4 is not supported with it"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--fsdp", "--method", "balora", "--quantize", "nf4"))
    assert not (tmp_path / "log.jsonl").exists()  # refused before anything was written


def test_sharded_loading_names_missing_and_unexpected_weights_before_reading_any(tiny, tmp_path, monkeypatch):
    import shutil

    import torch.distributed as dist
    from safetensors.torch import save_file

    import fsdp

    bad = tmp_path / "bad"
    shutil.copytree(tiny["model"], bad)
    state = load_file(str(bad / "model.safetensors"))
    del state["model.norm.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(bad / "model.safetensors"))
    monkeypatch.setattr(fsdp, "_fill", lambda *args: pytest.fail("a tensor was read"))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"missing weights: \['model.norm.weight'\]; unexpected weights: \['extra.weight'\]"):
            fsdp.load_sharded_llama(str(bad), torch.float32, torch.device("cpu"), dict(target_modules="all-linear", r=2, alpha=4))
    finally:
        dist.destroy_process_group()


class ReducedOn(Exception):
    """Raised by the stand-in all_reduce below with the device of the tensor it was given."""


def nccl_all_reduce(tensor, op=None, group=None):
    """NCCL's all_reduce as far as devices go: a CPU tensor raises (as NCCL does), any other stops the
    test with its device."""
    if tensor.device.type == "cpu":
        raise RuntimeError("No backend type associated with device type cpu")
    raise ReducedOn(tensor.device)


def test_finiteness_flags_are_reduced_on_the_backends_device(tmp_path, monkeypatch):
    """fsdp.save_checkpoint and training.check_finite put their flag where the backend reduces: under
    a backend whose capability is GPU only (NCCL) on this process's GPU, not the CPU. A CPU-only machine
    has no GPU tensor, so the GPU is stood in for by the meta device once collective_device() has
    chosen it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    import fsdp
    import training

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        # sharded parameters as FSDP leaves them (DTensors) on a one-rank mesh
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Linear(4, 4)
        for name, parameter in list(model.named_parameters()):
            setattr(model, name, torch.nn.Parameter(distribute_tensor(parameter.detach(), mesh, [Replicate()])))
        assert training.collective_device() == torch.device("cpu")  # gloo reduces CPU tensors
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert training.collective_device() == torch.device("cuda", 3)
        monkeypatch.setitem(dist.Backend.backend_capability, "nccl", ["cpu", "cuda"])  # the capability decides
        assert training.collective_device() == torch.device("cpu")
        monkeypatch.undo()

        monkeypatch.setattr(training, "collective_device", lambda: torch.device("meta"))
        monkeypatch.setattr(dist, "all_reduce", nccl_all_reduce)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = training.lr_schedule_with_warmup(optimizer, 0, 1)
        with pytest.raises(ReducedOn) as reduced:
            fsdp.save_checkpoint(str(tmp_path / "checkpoint"), model, optimizer, scheduler, 1, {}, {}, {})
        assert reduced.value.args[0] == torch.device("meta")
        with pytest.raises(ReducedOn) as reduced:
            training.check_finite(torch.tensor(1.0), step=1)
        assert reduced.value.args[0] == torch.device("meta")
        assert not (tmp_path / "checkpoint").exists()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_matches_one_process_and_exports_the_same_peft_adapter(tiny, tmp_path):
    train_nlg.main(tiny_args(tiny, tmp_path / "single", *COMMON))
    torchrun(os.path.join(REPO, "train_nlg.py"), *tiny_args(tiny, tmp_path / "fsdp", *COMMON, "--fsdp"))
    assert_same_run(tmp_path / "single", tmp_path / "fsdp")
    peft_single, peft_fsdp = (adapter_tensors(tmp_path / run, "peft_adapter", "adapter_model.safetensors")
                              for run in ("single", "fsdp"))
    assert peft_single.keys() == peft_fsdp.keys()
    assert max((peft_single[k] - peft_fsdp[k]).abs().max().item() for k in peft_single) <= 1e-6
    configs = [json.loads((tmp_path / run / "peft_adapter" / "adapter_config.json").read_text()) for run in ("single", "fsdp")]
    assert configs[0] == configs[1]
    balora_configs = [json.loads((tmp_path / run / "adapter" / "balora_config.json").read_text()) for run in ("single", "fsdp")]
    assert balora_configs[0] == balora_configs[1]


@pytest.mark.slow
def test_fsdp_bf16_with_grad_checkpointing_and_cpu_offload_matches_one_process(tiny, tmp_path):
    bf16 = [*COMMON, "--dtype", "bf16", "--grad-checkpointing"]
    train_nlg.main(tiny_args(tiny, tmp_path / "single", *bf16))
    torchrun(os.path.join(REPO, "train_nlg.py"),
             *tiny_args(tiny, tmp_path / "fsdp", *bf16, "--fsdp", "--fsdp-cpu-offload"))
    assert_same_run(tmp_path / "single", tmp_path / "fsdp")


@pytest.mark.slow
def test_fsdp_with_tied_embeddings_and_lora_init_matches_one_process(tiny, tmp_path):
    # SmolLM2's layout: lm_head is the embedding (one parameter in the root's FSDP unit); init="lora"
    # keeps no A0 / B0, so the teacher of lora+reg is the base alone
    from safetensors.torch import save_file

    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads(open(os.path.join(tiny["model"], "config.json")).read())
    (tied / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    state = load_file(os.path.join(tiny["model"], "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tied / "model.safetensors"))
    for name in os.listdir(tiny["model"]):
        if name.startswith("tokenizer"):
            (tied / name).write_bytes(open(os.path.join(tiny["model"], name), "rb").read())
    common = [*COMMON, "--model", str(tied), "--method", "lora+reg"]
    train_nlg.main(tiny_args(tiny, tmp_path / "single", *common))
    torchrun(os.path.join(REPO, "train_nlg.py"), *tiny_args(tiny, tmp_path / "fsdp", *common, "--fsdp"))
    one, _ = assert_same_run(tmp_path / "single", tmp_path / "fsdp", factors=("lora_A", "lora_B"))
    assert not any(key.endswith(("lora_A0", "lora_B0")) for key in one)


# The resumed run dies by SIGKILL right after its checkpoint of step DIE_AT (every rank, once all of
# them have saved): no exception handler, no atexit, no flush runs, as when a node is lost.
DIE_AFTER_SAVING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import fsdp, train_nlg
real_save = fsdp.save_checkpoint
def save_then_die(directory, model, optimizer, scheduler, step, *args):
    real_save(directory, model, optimizer, scheduler, step, *args)
    if step == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
fsdp.save_checkpoint = save_then_die
train_nlg.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_fsdp_resume_after_kill_9_is_bit_identical(tiny, tmp_path):
    # 6 steps over 2 epochs, a checkpoint every 2; dropout > 0 makes the result depend on each rank's
    # restored RNG stream, not only on the weights and AdamW's state
    common = [*COMMON, "--epochs", "2", "--max-steps", "6", "--save-every", "2", "--dropout", "0.1", "--fsdp"]
    train = os.path.join(REPO, "train_nlg.py")
    torchrun(train, *tiny_args(tiny, tmp_path / "full", *common))
    dying = tmp_path / "die_after_saving.py"
    dying.write_text(DIE_AFTER_SAVING.format(repo=REPO))
    killed = torchrun(str(dying), *tiny_args(tiny, tmp_path / "resumed", *common), check=False, DIE_AT="4")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert not (tmp_path / "resumed" / "adapter").exists()  # it did die mid-run
    latest = json.loads((tmp_path / "resumed" / "checkpoint" / "latest.json").read_text())
    assert latest["step"] == 4 and sorted(os.listdir(tmp_path / "resumed" / "checkpoint")) == ["latest.json", "step-000004"]
    torchrun(train, *tiny_args(tiny, tmp_path / "resumed", *common, "--resume"))
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("total", "task", "consistency", "diversity", "svd", "grad_norm"):
        assert [r[key] for r in full] == [r[key] for r in resumed], key
    one, two = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# Loads a model (argv: mode, warm-up model dir, measured model dir) and prints how far this process's
# resident set size peaked above its size before loading the measured one (/proc/self/status). The
# warm-up load first pays the one-time costs (imports, process-group and mesh set-up: ~60 MB here)
# that would otherwise hide the loader's own memory; then the peak (VmHWM) is reset to the current
# RSS by writing 5 to /proc/self/clear_refs. init="lora": the loading alone (PiSSA's SVD adds its own
# float32 temporaries of one matrix on top: +25 MB on this model).
PEAK_WHILE_LOADING = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import balora
import fsdp
from model import Llama

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

mode, warm_up, measured, report = sys.argv[1:]
lora = dict(target_modules="all-linear", r=4, alpha=8, init="lora")

def load(path):
    if mode == "fsdp":
        return fsdp.load_sharded_llama(path, torch.float32, torch.device("cpu"), lora)[0]
    model = Llama.from_pretrained(path)
    balora.add_lora(model, **lora)
    return model

if mode == "fsdp":
    torch.distributed.init_process_group("gloo")
warm = load(warm_up)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
model = load(measured)
rank = int(os.environ.get("RANK", 0))
# each rank writes its own file: two ranks' lines on one shared stdout pipe are one failure mode too many
with open(os.path.join(report, f"peak_{{rank}}.json"), "w") as f:
    json.dump(dict(rank=rank, growth=status("VmHWM") - before), f)
if mode == "fsdp":
    torch.distributed.destroy_process_group()
"""


def write_llama(directory, layers):
    """
    A random float32 Llama of `layers` Blocks of 51 MB (hidden 1024, intermediate 2816: LLaMA-7B's
    ratio, so its largest matrix is 0.22 of a Block as there) and a 128-token vocabulary.
    Returns (bytes of the model, bytes of one Block).
    """
    from safetensors.torch import save_file

    from model import Llama, LlamaConfig

    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(LlamaConfig.from_hf(config)).state_dict().items() if not k.endswith("inv_freq")}
    state = {k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}
    save_file(state, str(directory / "model.safetensors"))
    block = sum(v.numel() * 4 for k, v in state.items() if k.startswith("model.layers.0."))
    return sum(v.numel() * 4 for v in state.values()), block


def peaks(report, run):
    """The peaks the probe's ranks wrote into the folder `report`; `run` (its CompletedProcess) explains a missing one."""
    found = [json.loads(path.read_text()) for path in sorted(report.glob("peak_*.json"))]
    assert found, run.stdout[-2000:] + run.stderr[-4000:]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_fsdp_loading_peaks_below_half_the_model_plus_one_block_per_rank(tmp_path):
    torch.manual_seed(0)
    write_llama(tmp_path / "warm_up", layers=1)
    model_bytes, block_bytes = write_llama(tmp_path / "measured", layers=3)  # 155 MB, 51 MB a Block
    probe = tmp_path / "peak_while_loading.py"
    probe.write_text(PEAK_WHILE_LOADING.format(repo=REPO))
    # Expected per rank: the shards of the first two Blocks (1 Block) and the third one whole (1 Block);
    # add_lora's NaN check (balora.all_finite, min and max) allocates nothing that size: 2 Blocks, under 2.5.
    bound = model_bytes / 2 + block_bytes
    # glibc returns a freed block to the system only when it was mmapped, which it does for blocks
    # above a threshold that it raises, after the first free, up to 32 MiB. Every weight of a 7B or 70B
    # model is larger than that, so freeing a Block after sharding it returns its memory; the 4-12 MB
    # weights here would instead stay in glibc's heap and be counted although freed (measured on a
    # smaller model: 157 MB, above the whole 134 MB model, against 75 MB held). A fixed 64 KiB
    # threshold makes them behave as full-size weights do.
    env = dict(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    # the probe sees a whole-model load: one process (Llama.from_pretrained) peaks above the model
    (tmp_path / "single").mkdir()
    (tmp_path / "fsdp").mkdir()
    run = subprocess.run([sys.executable, str(probe), "single", str(tmp_path / "warm_up"), str(tmp_path / "measured"),
                          str(tmp_path / "single")], env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = peaks(tmp_path / "single", run)
    assert single[0]["growth"] > model_bytes, (single, model_bytes)
    run = torchrun(str(probe), "fsdp", str(tmp_path / "warm_up"), str(tmp_path / "measured"), str(tmp_path / "fsdp"), **env)
    sharded = peaks(tmp_path / "fsdp", run)
    assert sorted(p["rank"] for p in sharded) == [0, 1], (sharded, run.stdout[-2000:], run.stderr[-4000:])
    for peak in sharded:
        assert peak["growth"] < bound, (peak, bound)
