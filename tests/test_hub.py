"""
--model as a hub id (model.resolve_model_path): a hub cache laid out on disk as huggingface_hub writes
it (models--org--name/blobs, snapshots/<commit>/, refs/main), read offline (HF_HUB_OFFLINE=1, HF_HOME
pointing at it) with no network; a model missing from the cache is one line, fast; --revision picks the
snapshot.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLAMA = os.path.join(ROOT, "assets", "tiny-llama")
TOY_DATA = os.path.join(ROOT, "assets", "data", "metamath_train.jsonl")
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAIN, OLD = "a" * 40, "b" * 40  # two commits of the repository


def add_snapshot(hub_cache, repo_id, commit, source_dir, files=None, ref=None):
    """
    One snapshot of `repo_id` in a hub cache, as huggingface_hub lays it out: each file's bytes once in
    blobs/<sha256> and a relative symlink snapshots/<commit>/<name> -> ../../blobs/<sha256>; `ref`
    (a branch name) is a text file refs/<ref> holding the commit.
    """
    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in files or sorted(os.listdir(source_dir)):
        with open(os.path.join(source_dir, name), "rb") as f:
            content = f.read()
        blob = hashlib.sha256(content).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(content)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    if ref is not None:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HOME with tiny-llama as HUB_ID at refs/main (commit MAIN), and an older commit OLD without the
    tokenizer; huggingface_hub told, in this process too, to stay offline and read it."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    hub = str(home / "hub")
    add_snapshot(hub, HUB_ID, MAIN, TINY_LLAMA, ref="main")
    add_snapshot(hub, HUB_ID, OLD, TINY_LLAMA, files=["config.json", "model.safetensors"])
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub)  # read once, when huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def run_script(args, home, timeout=300):
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_directory_is_itself_and_a_hub_id_is_its_cached_snapshot(offline_cache):
    assert model.resolve_model_path(TINY_LLAMA) == TINY_LLAMA
    main = model.resolve_model_path(HUB_ID)
    assert main == str(offline_cache / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / MAIN)
    assert sorted(os.listdir(main)) == sorted(os.listdir(TINY_LLAMA))
    assert model.Llama.from_pretrained(main).config == model.Llama.from_pretrained(TINY_LLAMA).config
    # --revision: a commit selects its own snapshot, a branch the commit its ref names
    old = model.resolve_model_path(HUB_ID, revision=OLD)
    assert old.endswith(os.path.join("snapshots", OLD)) and sorted(os.listdir(old)) == ["config.json", "model.safetensors"]
    assert model.resolve_model_path(HUB_ID, revision="main") == main


def test_what_cannot_be_resolved_is_one_line_naming_it(offline_cache):
    start = time.time()
    with pytest.raises(FileNotFoundError, match="not in the hub cache .* HF_HUB_OFFLINE is set: download it once online"):
        model.resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert time.time() - start < 5  # no request, no retries
    with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
        model.resolve_model_path(HUB_ID, revision="v2")
    with pytest.raises(FileNotFoundError, match="neither a directory nor a hub id"):
        model.resolve_model_path("/no/such/checkpoint")
    with pytest.raises(ValueError, match="--revision 'main' selects a hub snapshot"):
        model.resolve_model_path(TINY_LLAMA, revision="main")


def test_train_nlg_trains_two_steps_from_a_hub_id_offline_and_says_when_it_is_missing(offline_cache, tmp_path):
    out = tmp_path / "out"
    flags = ["--data", TOY_DATA, "--format", "metamath", "--max-samples", "8", "--max-length", "128", "--rank", "4",
             "--alpha", "8", "--lr", "1e-3", "--batch-size", "4", "--micro-batch-size", "4", "--dtype", "fp32",
             "--max-steps", "2", "--pissa-niter", "2", "--no-progress", "--out", str(out)]
    result = run_script(["train_nlg.py", "--model", HUB_ID, *flags], offline_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["model"].endswith(os.path.join("snapshots", MAIN))
    assert (out / "adapter").is_dir()

    result = run_script(["train_nlg.py", "--model", "HuggingFaceTB/SmolLM2-360M-Instruct", *flags[:-1],
                         str(tmp_path / "other")], offline_cache)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "'HuggingFaceTB/SmolLM2-360M-Instruct' is not in the hub cache" in result.stderr
    assert not (tmp_path / "other").exists()


def test_eval_reads_a_hub_id_and_names_its_results_after_it(offline_cache, tmp_path):
    result = run_script(["eval.py", "ppl", "--model", HUB_ID, "--limit", "1", "--out", str(tmp_path)], offline_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "ppl_HuggingFaceTB--SmolLM2-135M-Instruct.json").read_text())
    assert saved["args"]["model"].endswith(os.path.join("snapshots", MAIN)) and saved["metrics"]["perplexity"] > 1


def test_merge_adapter_takes_a_hub_id_as_its_base(offline_cache, tmp_path):
    """tools/merge_adapter.py --model org/name: the cached snapshot is the base, as with a directory."""
    import adapters
    import balora
    from tools import merge_adapter

    adapted = model.Llama.from_pretrained(TINY_LLAMA)
    balora.add_lora(adapted, ["q_proj", "v_proj"], r=2, alpha=4, init="pissa", pissa_niter=2)
    adapters.save_adapter(adapted, str(tmp_path / "adapter"))
    by_id, by_dir = tmp_path / "by_id", tmp_path / "by_dir"
    assert merge_adapter.main(["--model", HUB_ID, "--adapter", str(tmp_path / "adapter"), "--out", str(by_id)]) == 0
    assert merge_adapter.main(["--model", TINY_LLAMA, "--adapter", str(tmp_path / "adapter"), "--out", str(by_dir)]) == 0
    assert (by_id / "model.safetensors").read_bytes() == (by_dir / "model.safetensors").read_bytes()
    missing = merge_adapter.main(["--model", "HuggingFaceTB/SmolLM2-360M-Instruct", "--adapter",
                                  str(tmp_path / "adapter"), "--out", str(tmp_path / "none")])
    assert missing == 1 and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_real_smollm2_laid_out_as_its_hub_id_trains_two_steps_offline(smollm2_dir, tmp_path):
    home = tmp_path / "hf_home"
    add_snapshot(str(home / "hub"), HUB_ID, MAIN, smollm2_dir, ref="main")
    out = tmp_path / "out"
    result = run_script(["train_nlg.py", "--model", HUB_ID, "--data", TOY_DATA, "--format", "metamath",
                         "--max-samples", "4", "--max-length", "96", "--rank", "2", "--alpha", "4", "--batch-size", "2",
                         "--micro-batch-size", "2", "--dtype", "fp32", "--max-steps", "2", "--pissa-niter", "2",
                         "--save-every", "0", "--no-progress", "--out", str(out)], home)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [record["step"] for record in log] == [1, 2] and all(record["task_tokens"] > 0 for record in log)
