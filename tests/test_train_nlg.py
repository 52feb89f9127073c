"""
train_nlg.py: data formats, the loss it logs against independent computations, DDP == single process,
resume == uninterrupted, NaN and all-masked batches, and the offline default run.

The parity tests run on a tiny random Llama (2 layers, hidden 32) with a sentencepiece model trained
here, so they do not depend on the bundled assets; the default-run test uses the assets.
"""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adapters
import balora
import chunked
import train_nlg
import training
from data import PROMPT_TEMPLATE, load_examples, query_and_response, tokenize_example
from data import Tokenizer
from model import Llama, LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_examples(count, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"query": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                     "response": f"Tom has {a} + {b} = {a + b} apples. The answer is: {a + b}"})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama checkpoint + tokenizer (model dir) and a 32-example metamath jsonl."""
    import sentencepiece
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_nlg")
    rows = make_examples(32)
    text = root / "corpus.txt"
    text.write_text("\n".join(PROMPT_TEMPLATE.format(query=r["query"]) + " " + r["response"] for r in rows))
    model_dir = root / "model"
    model_dir.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(model_dir / "tokenizer"), vocab_size=120, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    vocab_size = Tokenizer(str(model_dir)).vocab_size
    config = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (model_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    save_file(state, str(model_dir / "model.safetensors"))
    data = write_jsonl(root / "train.jsonl", rows)
    return {"model": str(model_dir), "data": data, "rows": rows}


def tiny_args(tiny, out, *extra):
    """Flags for a small, fast run on the tiny model (everything explicit, no offline defaults)."""
    return ["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), "--rank", "4", "--alpha", "8",
            "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu", "--max-length", "96", "--save-every", "0",
            *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def trainable_after(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["trainable"]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -----------------------------------------------------------------------------
# Data formats


@pytest.mark.parametrize("data_format, record, expected", [
    ("metamath", {"query": "Q", "response": "R", "type": "x"}, ("Q", "R")),
    ("codefeedback", {"query": "Q", "answer": "A"}, ("Q", "A")),
    ("wizardlm", {"instruction": "I", "output": "O"}, ("I", "O")),
    ("wizardlm", {"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"},
                                    {"from": "human", "value": "H2"}, {"from": "gpt", "value": "G2"}]}, ("H", "G")),
    ("alpaca", {"instruction": "I", "input": "X", "output": "O"}, ("I\nX", "O")),
    ("alpaca", {"instruction": "I", "input": "", "output": "O"}, ("I", "O")),
])
def test_formats_map_to_query_and_response(data_format, record, expected):
    assert query_and_response(record, data_format) == expected


@pytest.mark.parametrize("data_format, record, missing", [
    ("metamath", {"query": "Q"}, "'response'"),
    ("codefeedback", {"query": "Q", "response": "R"}, "'answer'"),
    ("wizardlm", {"instruction": "I"}, "'output'"),
    ("alpaca", {"input": "X", "output": "O"}, "'instruction'"),
])
def test_missing_fields_raise_naming_them(data_format, record, missing):
    with pytest.raises(ValueError, match=missing):
        query_and_response(record, data_format)


def test_json_and_parquet_files_load_the_first_max_samples(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"instruction": f"I{i}", "input": "", "output": f"O{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    expected = [("I0", "O0"), ("I1", "O1"), ("I2", "O2")]
    for name in ("d.json", "d.parquet"):
        assert load_examples(str(tmp_path / name), "alpaca", max_samples=3) == expected
    (tmp_path / "d.txt").write_text("not a table")
    with pytest.raises(ValueError, match="expected a .jsonl"):
        load_examples(str(tmp_path / "d.txt"), "alpaca", 3)


def pissa_dataset_copy(root, rows):
    """A local directory laid out as the hub's fxmeng/pissa-dataset: one sub-directory per task, each
    with its train / test files; `rows` in metamath/, other rows beside them in python/."""
    import pyarrow
    import pyarrow.parquet

    for task, task_rows in (("metamath", rows), ("python", [{"instruction": "def f", "output": "pass", "type": "x"}])):
        (root / task).mkdir(parents=True)
        for split, split_rows in (("train", task_rows), ("test", task_rows[:1])):
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(split_rows), root / task / f"{split}-00000-of-00001.parquet")
    return str(root)


def test_paper_preset_reads_the_metamath_directory_of_pissa_dataset(tiny, tmp_path, monkeypatch):
    import datasets

    rows = [{"instruction": row["query"], "output": row["response"], "type": "GSM_Rephrased"} for row in tiny["rows"]]
    root = pissa_dataset_copy(tmp_path / "pissa-dataset", rows)
    calls, real_load_dataset = [], datasets.load_dataset

    def hub_from_local_copy(name, *args, **kwargs):  # the hub is out of reach here: its layout is read from disk
        calls.append((name, kwargs))
        return real_load_dataset(root if name == "fxmeng/pissa-dataset" else name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_from_local_copy)
    expected = [(row["instruction"], row["output"]) for row in rows[:8]]
    assert load_examples("fxmeng/pissa-dataset", "pissa", 8, data_dir="metamath") == expected
    out = tmp_path / "out"
    train_nlg.main(["--model", tiny["model"], "--max-samples", "8", "--batch-size", "4", "--micro-batch-size", "2",
                    "--rank", "4", "--alpha", "8", "--dtype", "fp32", "--device", "cpu", "--max-length", "96",
                    "--save-every", "0", "--out", str(out), "--no-progress"])
    assert calls[-1] == ("fxmeng/pissa-dataset", {"data_dir": "metamath", "split": "train[:8]"})
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["format"] == "pissa" and config["derived"]["examples"] == 8
    # a local file cannot have a sub-directory: the flag is named before anything runs
    with pytest.raises(ValueError, match="--data-dir 'metamath' names a sub-directory"):
        load_examples(tiny["data"], "metamath", 8, data_dir="metamath")


def test_missing_field_stops_the_run_before_training(tiny, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(ValueError, match="'query', 'response'"):
        train_nlg.main(tiny_args(tiny, tmp_path / "out", "--data", data))


def test_empty_dataset_raises(tiny, tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no examples"):
        train_nlg.main(tiny_args(tiny, tmp_path / "out", "--data", data))


def test_batch_size_must_split_into_micro_batches(tiny, tmp_path):
    with pytest.raises(ValueError, match="--batch-size 10 is not divisible"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--batch-size", "10", "--micro-batch-size", "4"))


def test_prompt_is_masked_and_response_ends_with_eos(tiny):
    tokenizer = Tokenizer(tiny["model"])
    query, response = "Tom has 3 apples.", "The answer is: 3"
    input_ids, labels = tokenize_example(tokenizer, query, response, max_len=512)
    prompt = PROMPT_TEMPLATE.format(query=query)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    assert input_ids == tokenizer.encode(prompt + response, bos=True) + [tokenizer.eos_id] and input_ids[0] == tokenizer.bos_id
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == input_ids[len(prompt_ids):] and labels[-1] == tokenizer.eos_id
    short_ids, short_labels = tokenize_example(tokenizer, query, response, max_len=len(prompt_ids) + 2)
    assert len(short_ids) == len(short_labels) == len(prompt_ids) + 2


def test_samples_are_shuffled_deterministically_and_cover_each_epoch():
    first = [train_nlg.global_batch_indices(10, 4, step, seed=1) for step in range(2)]
    assert first == [train_nlg.global_batch_indices(10, 4, step, seed=1) for step in range(2)]
    assert len(set(first[0] + first[1])) == 8 and first[0] != [0, 1, 2, 3]
    assert train_nlg.global_batch_indices(10, 4, 2, seed=1) != first[0]  # next epoch, new order


# -----------------------------------------------------------------------------
# The logged losses against independent computations


def response_token_batch(tiny, rows):
    """Inputs and the (row, position) mask of response tokens, built without train_nlg's collate."""
    tokenizer = Tokenizer(tiny["model"] if isinstance(tiny, dict) else tiny)
    sequences, prompt_lengths = [], []
    for row in rows:
        # one string, the prompt's own token count masked (the official preprocess)
        prompt = PROMPT_TEMPLATE.format(query=row["query"])
        sequences.append(tokenizer.encode(prompt + row["response"], bos=True) + [tokenizer.eos_id])
        prompt_lengths.append(len(tokenizer.encode(prompt, bos=True)))
    input_ids, attention_mask = tokenizer.pad_batch(sequences)
    # logits at position t predict token t + 1: response tokens are predicted from prompt_len - 1 on
    positions = torch.arange(input_ids.shape[1] - 1)
    valid = torch.stack([(positions >= p - 1) & (positions < len(s) - 1) for p, s in zip(prompt_lengths, sequences)])
    return input_ids, attention_mask, valid


def test_task_loss_is_plain_cross_entropy_on_response_tokens(tiny, tmp_path):
    rows = tiny["rows"][:8]
    train_nlg.main(tiny_args(tiny, tmp_path, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--method", "lora",
                             "--batch-size", "8", "--micro-batch-size", "2", "--max-length", "512"))
    logged = read_log(tmp_path)[0]
    model = Llama.from_pretrained(tiny["model"])
    input_ids, attention_mask, valid = response_token_batch(tiny, rows)
    with torch.no_grad():
        logits = model(input_ids, attention_mask)[:, :-1]
    expected = F.cross_entropy(logits[valid], input_ids[:, 1:][valid])
    assert logged["consistency"] is None and logged["diversity"] is None and logged["svd"] is None
    assert logged["task_tokens"] == int(valid.sum())
    assert abs(logged["task"] - expected.item()) < 1e-5
    assert abs(logged["total"] - expected.item()) < 1e-5


@pytest.mark.parametrize("loss_normalization", ["tokens", "micro-batch"])
def test_task_loss_over_an_uneven_accumulation_is_its_naive_mean(tiny, tmp_path, monkeypatch, loss_normalization):
    # responses of very different lengths: the 4 micro-batches of 2 hold different numbers of response tokens
    rows = [dict(row, response=row["response"] + " Check: 2 + 2 = 4." * (3 * i % 7)) for i, row in enumerate(tiny["rows"][:8])]
    args = tiny_args(tiny, tmp_path, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--method", "pissa",
                     "--batch-size", "8", "--micro-batch-size", "2", "--max-length", "512", "--max-steps", "1",
                     "--loss-normalization", loss_normalization)
    gradients, real_clip = {}, torch.nn.utils.clip_grad_norm_

    def record_then_clip(parameters, max_norm):  # the step's gradient, before clipping
        parameters = list(parameters)
        gradients.update({id(p): p.grad.clone() for p in parameters})
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    train_nlg.main(args)
    logged = read_log(tmp_path)[0]

    # naive: the step's micro-batches in order, each one's CE summed over its response tokens
    model = Llama.from_pretrained(tiny["model"])
    balora.add_lora(model, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(","), r=4, alpha=8, init="pissa")
    order = train_nlg.global_batch_indices(len(rows), 8, step=0, seed=42)
    sums, counts = [], []
    for start in range(0, 8, 2):
        input_ids, attention_mask, valid = response_token_batch(tiny, [rows[i] for i in order[start:start + 2]])
        logits = model(input_ids, attention_mask)[:, :-1]
        sums.append(F.cross_entropy(logits[valid], input_ids[:, 1:][valid], reduction="sum"))
        counts.append(int(valid.sum()))
    assert len(set(counts)) > 1, counts  # uneven
    if loss_normalization == "tokens":
        expected = sum(sums) / sum(counts)
    else:  # transformers 4.45.1: each micro-batch's mean, averaged over the accumulation steps
        expected = sum(total / count for total, count in zip(sums, counts)) / len(counts)
    expected.backward()
    assert abs(logged["task"] - expected.item()) < 1e-5 and abs(logged["total"] - expected.item()) < 1e-5
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours = list(gradients.values())
    assert len(ours) == len(trainable)
    for theirs, mine in zip(trainable, ours):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-4, atol=1e-7)
    other = sum(sums) / sum(counts) if loss_normalization != "tokens" else \
        sum(total / count for total, count in zip(sums, counts)) / len(counts)
    assert abs(other.item() - expected.item()) > 1e-3  # the two normalizations differ on this batch


def crash_after_saving(monkeypatch, at_step):
    """Make the run die right after it writes the checkpoint of `at_step` (a simulated preemption)."""
    real_save = training.save_checkpoint

    def save_then_crash(path, model, optimizer, scheduler, step, **kwargs):
        real_save(path, model, optimizer, scheduler, step, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt(f"simulated crash after step {step}")

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)


def test_logged_regularizers_equal_balora_functions_on_the_batch(tiny, tmp_path, monkeypatch):
    # 4 examples, batch 4, 2 epochs: step 2 sees the same 4 examples with the adapter of step 1,
    # and by then the two_phase focus schedule has switched lambda2 and lambda3 on.
    # svd_k + oversample >= vocab size makes the randomized sketch span all of Z: exact singular
    # values whatever the random draw, so the SVD term can be recomputed here.
    rows, svd_k = tiny["rows"][:4], Tokenizer(tiny["model"]).vocab_size - 2
    args = tiny_args(tiny, tmp_path, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--method", "balora",
                     "--batch-size", "4", "--micro-batch-size", "4", "--epochs", "2", "--save-every", "1",
                     "--lambda-warmup-ratio", "0", "--svd-k", str(svd_k), "--top-k", "5", "--lr", "5e-2", "--max-length", "512", "--warmup-ratio", "0")
    crash_after_saving(monkeypatch, at_step=1)
    with pytest.raises(KeyboardInterrupt):
        train_nlg.main(args)
    torch.manual_seed(42)
    model = Llama.from_pretrained(tiny["model"])
    balora.add_lora(model, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(","), r=4, alpha=8, init="pissa")
    state = trainable_after(tmp_path)
    model.load_state_dict(state, strict=False)
    monkeypatch.undo()
    train_nlg.main(args + ["--resume"])
    logged = read_log(tmp_path)[1]
    assert all(logged[f"lambda{i}"] > 0 for i in (1, 2, 3))

    input_ids, attention_mask, valid = response_token_batch(tiny, rows)
    with torch.no_grad():
        student = model(input_ids, attention_mask)[:, :-1][valid]
        with balora.pretrained_mode(model):
            teacher = model(input_ids, attention_mask)[:, :-1][valid]
    task = F.cross_entropy(student, input_ids[:, 1:][valid])
    consistency = balora.nlg_consistency_loss(teacher, student, 2.0)
    diversity = balora.nlg_diversity_loss(student, 5)
    svd = balora.nlg_svd_loss(student, svd_k)
    assert consistency.item() > 1e-6  # the adapter moved: student and teacher differ
    for name, expected in [("task", task), ("consistency", consistency), ("diversity", diversity), ("svd", svd)]:
        assert abs(logged[name] - expected.item()) < 1e-4 * max(1.0, abs(expected.item())), name
    expected_total = task + logged["lambda1"] * consistency + logged["lambda2"] * diversity + logged["lambda3"] * svd
    assert abs(logged["total"] - expected_total.item()) < 1e-4


# -----------------------------------------------------------------------------
# Exactness of DDP and resume


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny, tmp_path):
    common = ["--method", "balora", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
              "--save-every", "3", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5", "--lr", "1e-2"]
    train_nlg.main(tiny_args(tiny, tmp_path / "single", *common))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.join(REPO, "train_nlg.py"),
               *tiny_args(tiny, tmp_path / "ddp", *common)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = trainable_after(tmp_path / "single"), trainable_after(tmp_path / "ddp")
    assert max_abs_diff(single, ddp) <= 1e-5
    log_single, log_ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for a, b in zip(log_single, log_ddp):
        for key in ("task", "consistency", "diversity", "svd", "total"):
            assert (a[key] is None) == (b[key] is None), key
            assert a[key] is None or abs(a[key] - b[key]) < 1e-5, key
        assert a["tokens"] == b["tokens"] and a["task_tokens"] == b["task_tokens"]
    assert log_single[-1]["svd"] is not None  # every regularizer took part


@pytest.mark.slow
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    # dropout > 0 makes the result depend on the restored RNG state, not only on the weights
    common = ["--method", "balora", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6",
              "--save-every", "2", "--dropout", "0.1", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5"]
    full, resumed = run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step=4)
    assert [r["step"] for r in resumed] == list(range(1, 7))


def run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step):
    """
    Train `common` uninterrupted (tmp_path/full) and again killed right after the checkpoint of
    `at_step`, then --resume'd (tmp_path/resumed); assert both end with bit-identical adapters and
    logged totals. Returns the two logs.
    """
    train_nlg.main(tiny_args(tiny, tmp_path / "full", *common))
    crash_after_saving(monkeypatch, at_step=at_step)
    with pytest.raises(KeyboardInterrupt):
        train_nlg.main(tiny_args(tiny, tmp_path / "resumed", *common))
    monkeypatch.undo()
    train_nlg.main(tiny_args(tiny, tmp_path / "resumed", *common, "--resume"))
    assert max_abs_diff(trainable_after(tmp_path / "full"), trainable_after(tmp_path / "resumed")) == 0.0
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["total"] for r in full] == [r["total"] for r in resumed]
    return full, resumed


def test_resume_drops_a_torn_last_log_line_and_stale_temp_files(tiny, tmp_path, capsys, monkeypatch):
    common = ["--method", "lora", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3"]
    train_nlg.main(tiny_args(tiny, tmp_path / "full", *common))
    run = tmp_path / "killed"
    crash_after_saving(monkeypatch, at_step=2)
    with pytest.raises(KeyboardInterrupt):
        train_nlg.main(tiny_args(tiny, run, *common, "--save-every", "2"))
    monkeypatch.undo()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lr": 0.0')  # killed while writing step 3's line
    (run / ".tmp-checkpoint.pt_crash").write_bytes(b"half a checkpoint")
    train_nlg.main(tiny_args(tiny, run, *common, "--save-every", "2", "--resume"))
    assert "dropped the torn last line 3" in capsys.readouterr().out
    assert not (run / ".tmp-checkpoint.pt_crash").exists()
    assert [r["total"] for r in read_log(run)] == [r["total"] for r in read_log(tmp_path / "full")]
    with open(run / "log.jsonl") as f:
        lines = f.readlines()
    (run / "log.jsonl").write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record"):
        train_nlg.main(tiny_args(tiny, run, *common, "--save-every", "2", "--resume"))


def test_resume_refuses_changed_flags(tiny, tmp_path):
    args = tiny_args(tiny, tmp_path, "--method", "lora", "--batch-size", "8", "--micro-batch-size", "8",
                     "--max-steps", "1", "--save-every", "1")
    train_nlg.main(args)
    with pytest.raises(ValueError, match=r"other flags \(--lr 0.001 -> 0.5; --seed 42 -> 7\)"):
        train_nlg.main(args + ["--resume", "--lr", "0.5", "--seed", "7"])
    # paths are compared resolved, and --out may be spelled differently (or moved)
    same = [value + "/" if value == tiny["model"] else value for value in args]
    train_nlg.main(same + ["--resume", "--out", str(tmp_path) + "/"])


class WritesMarkerWhenUnpickled:
    """An object whose unpickling calls open(path, "w"): what a crafted checkpoint.pt could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny, tmp_path):
    args = tiny_args(tiny, tmp_path, "--method", "lora", "--batch-size", "8", "--micro-batch-size", "8",
                     "--max-steps", "1", "--save-every", "1")
    train_nlg.main(args)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # a real one loads safely
    marker = tmp_path / "marker"
    checkpoint["rng"] = [WritesMarkerWhenUnpickled(str(marker))]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt holds more than tensors and plain data"):
        train_nlg.main(args + ["--resume"])
    assert not marker.exists()


def test_bf16_with_grad_checkpointing_and_all_token_regularizers(tiny, tmp_path, monkeypatch):
    real_objective, rows_seen = chunked.nlg_objective_in_chunks, []

    def recording_objective(student_logits, *args, **kwargs):
        rows_seen.append(student_logits.shape[0])
        return real_objective(student_logits, *args, **kwargs)

    monkeypatch.setattr(chunked, "nlg_objective_in_chunks", recording_objective)
    train_nlg.main(tiny_args(tiny, tmp_path, "--dtype", "bf16", "--grad-checkpointing", "--reg-tokens", "all",
                             "--method", "balora", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2",
                             "--save-every", "2", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5"))
    log = read_log(tmp_path)
    assert all(r[key] is not None and abs(r[key]) < 1e3 for r in log[1:] for key in ("consistency", "diversity", "svd"))
    assert all(t.dtype == torch.float32 for t in trainable_after(tmp_path).values())  # adapter stays fp32
    # --reg-tokens all: every non-padded position that has a next token (len - 1 per example) is
    # regularized; only the response tokens enter the task loss
    assert sum(rows_seen[:2]) == log[0]["tokens"] - 4 > log[0]["task_tokens"]


# -----------------------------------------------------------------------------
# Failures


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    real_objective = chunked.nlg_objective_in_chunks
    calls = []

    def nan_on_third_step(*args, **kwargs):
        total, components = real_objective(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), components

    monkeypatch.setattr(chunked, "nlg_objective_in_chunks", nan_on_third_step)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--method", "lora", "--batch-size", "8", "--micro-batch-size", "8",
                                 "--save-every", "1"))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_huge_learning_rate_stops_before_any_non_finite_value_is_saved(tiny, tmp_path, non_finite_tensors):
    """lr 1e6: step 1 is finite, later a finite loss comes with a NaN gradient norm (or a NaN loss);
    the run stops before applying it, and no file under --out holds a NaN."""
    args = tiny_args(tiny, tmp_path, "--method", "balora", "--lr", "1e6", "--warmup-ratio", "0", "--batch-size", "4",
                     "--micro-batch-size", "4", "--max-steps", "6", "--save-every", "1", "--lambda-warmup-ratio", "0")
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient norm).* at step \d+; .*checkpoint\.pt, holds only finite"):
        train_nlg.main(args)
    found, files = non_finite_tensors(tmp_path)
    assert files >= 1 and found == []
    assert not (tmp_path / "adapter").exists()


def test_micro_batch_with_every_label_masked_is_skipped_and_counted(tiny, tmp_path):
    rows = tiny["rows"][:3] + [{"query": "apples " * 200, "response": "The answer is: 1"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match="every label masked"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--data", data, "--method", "lora",
                                 "--batch-size", "4", "--micro-batch-size", "1"))
    logged = read_log(tmp_path)[0]
    assert logged["skipped_batches"] == 1
    assert logged["task_tokens"] > 0 and torch.isfinite(torch.tensor(logged["total"]))


def test_run_with_every_label_masked_fails_and_writes_no_adapter(tiny, tmp_path):
    """--max-length 8 cuts every example inside its prompt: no response token is left to train on."""
    with pytest.warns(UserWarning, match="every label masked"), pytest.raises(RuntimeError, match="nothing was trained: 4 of 4"):
        train_nlg.main(tiny_args(tiny, tmp_path, "--method", "lora", "--max-length", "8", "--batch-size", "4",
                                 "--micro-batch-size", "2", "--max-steps", "2"))
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "peft_adapter").exists()


# -----------------------------------------------------------------------------
# What a run reports: curves.png, TensorBoard, W&B


def test_report_to_tensorboard_logs_every_number_of_the_log(tiny, tmp_path, tensorboard_scalars):
    pytest.importorskip("tensorboard")
    train_nlg.main(tiny_args(tiny, tmp_path, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3",
                             "--lambda-warmup-ratio", "0", "--report-to", "tensorboard", "--no-progress"))
    log = read_log(tmp_path)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    numbers = {key for record in log for key, value in record.items() if key != "step" and value is not None}
    assert set(scalars) == numbers and {"task", "consistency", "diversity", "svd", "total", "lr", "lambda1"} <= numbers
    for tag, points in scalars.items():
        expected = [(r["step"], r[tag]) for r in log if r.get(tag) is not None]
        assert [step for step, _ in points] == [step for step, _ in expected], tag
        assert [value for _, value in points] == pytest.approx([value for _, value in expected], rel=1e-6), tag  # float32 events


def test_report_to_wandb_sends_the_log_records(tiny, tmp_path, monkeypatch):
    """A stand-in wandb module records what the Reporter sends: the log's numbers, at the log's steps."""
    import importlib.machinery
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda scalars, step: calls.append((step, scalars)), finish=lambda: calls.append("finish"))
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kwargs: calls.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train_nlg.main(tiny_args(tiny, tmp_path, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                             "--report-to", "wandb", "--no-progress"))
    init, *logged, finish = calls
    assert init["project"] == "balora" and init["dir"] == str(tmp_path) and init["config"]["rank"] == 4
    assert finish == "finish"
    assert logged == [(r["step"], {k: v for k, v in r.items() if k != "step" and v is not None}) for r in read_log(tmp_path)]


@pytest.mark.slow
def test_report_to_wandb_offline_writes_a_local_run(tiny, tmp_path, monkeypatch):
    """The real wandb, WANDB_MODE=offline: no account or network, a run directory to `wandb sync` later."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_nlg.main(tiny_args(tiny, tmp_path, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                             "--report-to", "wandb", "--no-progress"))
    (run_file,) = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "wandb") for name in names
                   if name.endswith(".wandb")]
    assert os.path.getsize(run_file) > 0


# -----------------------------------------------------------------------------
# The offline default run


@pytest.mark.slow
def test_default_run_learns_and_writes_adapter_and_log(tmp_path, check_curves):
    model_dir = os.path.join(REPO, "assets", "tiny-llama")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        pytest.fail("assets/tiny-llama is missing: run tools/make_assets.py")
    # the defaults of `python train_nlg.py`, with half the steps to keep CI short
    argv = ["--out", str(tmp_path), "--max-steps", "12"]
    train_nlg.main(argv)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(r[k] is not None for r in log[-1:] for k in ("consistency", "diversity", "svd"))
    assert os.path.isfile(tmp_path / "adapter" / "balora_config.json")
    assert os.path.isfile(tmp_path / "peft_adapter" / "adapter_config.json")
    check_curves(tmp_path, log)

    # config.json: the toy preset with the two flags given, every setting, and the checkpoint's resume
    # config is its share of them (one rule)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preset"] == "toy" and config["changed"] == {"out": str(tmp_path), "max_steps": 12}
    expected = {key: training.normalized(value) for key, value in train_nlg.parse_args([])[1].items()}
    expected.update(config["changed"], preset="toy")
    assert config["settings"] == expected
    # trainable_parameters: the factors that train (lora_A, lora_B), not the initial ones the adapter file keeps
    from safetensors.torch import load_file
    factors = load_file(tmp_path / "adapter" / "balora_adapter.safetensors")
    assert config["derived"].pop("trainable_parameters") == sum(
        t.numel() for key, t in factors.items() if key.endswith(("lora_A", "lora_B")))
    assert config["derived"] == {"prompt_format": "alpaca", "examples": 384, "total_steps": 12, "world_size": 1,
                                 "gradient_accumulation": 2}  # batch 16 = 1 process x 2 x micro-batch 8
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert saved == {key: value for key, value in config["settings"].items() if key not in training.RESUME_MAY_CHANGE}

    # The task loss falls: response-token CE on the first 64 training examples (tokenized as the official
    # preprocess: no space after "### Response:", unlike the tiny model's pretraining text), pretrained
    # model vs the same model with the saved adapter.
    with open(os.path.join(REPO, "assets", "data", "metamath_train.jsonl")) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(64))]
    input_ids, attention_mask, valid = response_token_batch(model_dir, rows)

    def response_loss(model):
        with torch.no_grad():
            logits = model(input_ids, attention_mask)[:, :-1]
        return F.cross_entropy(logits[valid], input_ids[:, 1:][valid]).item()

    before = response_loss(Llama.from_pretrained(model_dir))
    after = response_loss(adapters.load_adapter(Llama.from_pretrained(model_dir), str(tmp_path / "adapter")))
    assert after < 0.95 * before, (before, after)  # measured: 1.024 -> 0.547 after 12 steps


# -----------------------------------------------------------------------------
# The peft export, loaded the way peft users load an adapter


def test_peft_export_loads_with_auto_peft_model_for_causal_lm(tiny, tmp_path, monkeypatch):
    """<out>/peft_adapter names its task (CAUSAL_LM) and its base model's absolute path, so
    AutoPeftModelForCausalLM builds base + adapter from that directory alone, giving our logits."""
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(os.path.dirname(tiny["model"]))  # trained with a relative --model
    relative = dict(tiny, model=os.path.basename(tiny["model"]))
    train_nlg.main(tiny_args(relative, tmp_path / "out", "--method", "balora", "--max-steps", "2", "--batch-size", "4",
                             "--micro-batch-size", "2", "--max-samples", "8"))
    config = json.loads((tmp_path / "out" / "peft_adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == os.path.realpath(tiny["model"])
    assert type(config["lora_alpha"]) is int and config["lora_alpha"] == 16  # PiSSA: alpha' = 2 * 8
    monkeypatch.chdir(tmp_path)  # ... and loaded from another working directory
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out" / "peft_adapter")).eval()
    ours = adapters.load_adapter(Llama.from_pretrained(tiny["model"]), str(tmp_path / "out" / "adapter")).eval()
    tokenizer = Tokenizer(tiny["model"])
    input_ids, attention_mask = tokenizer.pad_batch([tokenizer.encode(row["query"]) for row in tiny["rows"][:3]])
    with torch.no_grad():
        expected = ours(input_ids, attention_mask)
        logits = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        base = Llama.from_pretrained(tiny["model"])(input_ids, attention_mask)
    valid = attention_mask.bool()
    scale = expected[valid].abs().max()
    assert (logits - expected)[valid].abs().max() <= 1e-5 * scale
    assert (base - expected)[valid].abs().max() > 1e-3 * scale  # the adapter changed the model: the match means something
