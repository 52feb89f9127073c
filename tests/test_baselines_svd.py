"""
Tests of the SVD-family baselines of baselines.py against peft (a test-only oracle) on a tiny
LlamaForCausalLM: LoRA-GA (preprocess_loraga), CorDA in both modes (preprocess_corda) and AdaLoRA
(AdaLoraModel and its RankAllocator). Each: the same initial factors, the same parameters (and for
AdaLoRA the same masks and budget) after training steps, a save -> load round trip, and a peft export
whose logits are ours.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import baselines
import training
from adapters import export_peft, load_adapter, save_adapter
from balora import add_lora, lora_layers, pretrained_mode
from test_balora import TARGETS, input_ids, logits_of, rel_err, tiny_llama, train_a_few_steps
from test_train_nlg import run_killed_and_resumed, tiny  # noqa: F401  (the tiny checkpoint fixture)

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

R, ALPHA = 4, 8


def causal_lm_loss(model, ids):
    """Mean next-token cross-entropy, as transformers' loss with labels = ids."""
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def calibration_ids():
    """Four calibration sequences, one per batch (peft's CorDA hook reads one sequence per call)."""
    return [input_ids(seed=10 + i)[:1] for i in range(4)]


def peft_layers(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    # svd_lowrank draws its sketch from the global RNG, which peft also uses to build its layers:
    # reseed it on every call so both draw the same sketch for the same matrix
    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(7)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def calibrated_pair(init):
    """(original, ours, theirs): ours calibrated by baselines.calibrate, theirs by peft's preprocessing."""
    original = tiny_llama()
    ours, theirs = copy.deepcopy(original), copy.deepcopy(original)
    batches = calibration_ids()
    add_lora(ours, TARGETS, r=R, alpha=ALPHA, init="lora")
    baselines.calibrate(ours, init, [lambda ids=ids: causal_lm_loss(ours, ids) for ids in batches])
    if init == "loraga":
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                                 lora_ga_config=peft.LoraGAConfig())
        peft.preprocess_loraga(theirs, config, lambda: [causal_lm_loss(theirs, ids).backward() for ids in batches])
    else:
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="corda",
                                 corda_config=CordaConfig(corda_method=init.split("-")[1]))
        preprocess_corda(theirs, config, run_model=lambda: [theirs(ids) for ids in batches])
    return original, ours, peft.get_peft_model(theirs, config)


CALIBRATED = ["loraga", "corda-ipm", "corda-kpm"]


@pytest.mark.parametrize("init", CALIBRATED)
def test_calibrated_init_matches_peft_at_start_and_after_three_steps(init, seeded_svd_lowrank):
    original, ours, theirs = calibrated_pair(init)
    reference = peft_layers(theirs)
    ids = input_ids()
    for stage in ("start", "after 3 steps"):
        for name, layer in lora_layers(ours):
            assert layer.init == init
            assert rel_err(layer.lora_A, reference[name].lora_A["default"].weight) <= 1e-5, (stage, name)
            assert rel_err(layer.lora_B, reference[name].lora_B["default"].weight) <= 1e-5, (stage, name)
            assert rel_err(layer.base.weight, reference[name].get_base_layer().weight) <= 1e-5, (stage, name)
        assert rel_err(logits_of(ours, ids), logits_of(theirs, ids)) <= 1e-5, stage
        if stage == "start":  # the start is the pretrained function, and so is the teacher
            assert rel_err(logits_of(ours, ids), logits_of(original, ids)) <= 1e-5
            assert any(layer.lora_B.abs().max() > 0 for _, layer in lora_layers(ours))
            train_a_few_steps(ours), train_a_few_steps(theirs)
    with pretrained_mode(ours):
        assert rel_err(logits_of(ours, ids), logits_of(original, ids)) <= 1e-5


def naive_corda(weight, covariance, r, mode):
    """CorDA's factors in float64 from the definition: W = U S (C'^-1 V)^T with a fixed damping."""
    weight, covariance = weight.double(), covariance.double()
    damped = covariance + torch.eye(len(covariance), dtype=torch.float64) * torch.diag(covariance).mean() * 0.01
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = torch.linalg.solve(damped, Vh.T)  # C'^-1 V (C' is symmetric)
    keep = slice(None, r) if mode == "ipm" else slice(len(S) - r, len(S))
    return (U[:, keep] * S[keep]) @ V[:, keep].T  # the product s B A, in float64


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_factors_reconstruct_the_context_oriented_svd(mode):
    torch.manual_seed(0)
    weight, inputs = torch.randn(12, 10), torch.randn(50, 10) @ torch.randn(10, 10)
    covariance = inputs.T @ inputs / 50
    lora_A, lora_B = baselines.corda_factors(weight, covariance, r=3, scaling=2.0, mode=mode)
    assert rel_err(2.0 * lora_B.double() @ lora_A.double(), naive_corda(weight, covariance, 3, mode)) <= 1e-4
    # all directions together give back W exactly
    lora_A, lora_B = baselines.corda_factors(weight, covariance, r=10, scaling=2.0, mode=mode)
    assert rel_err(2.0 * lora_B @ lora_A, weight) <= 1e-4


@pytest.mark.parametrize("init", CALIBRATED)
def test_calibrated_adapter_round_trips_and_exports_to_peft(init, seeded_svd_lowrank, tmp_path):
    original, ours, _ = calibrated_pair(init)
    train_a_few_steps(ours)
    ids = input_ids()
    save_adapter(ours, tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(original), tmp_path / "adapter")
    assert all(layer.init == init for _, layer in lora_layers(loaded))
    assert rel_err(logits_of(loaded, ids), logits_of(ours, ids)) <= 1e-5
    export_peft(ours, tmp_path / "peft", "tiny-llama")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft").eval()
    assert rel_err(logits_of(reloaded, ids), logits_of(ours, ids)) <= 1e-4


def test_calibrate_refuses_an_adapter_that_already_has_a_start():
    model = tiny_llama()
    add_lora(model, TARGETS, r=R, alpha=ALPHA, init="pissa")
    with pytest.raises(ValueError, match="init='lora'"):
        baselines.calibrate(model, "loraga", [])
    with pytest.raises(ValueError, match="init must be one of"):
        baselines.calibrate(tiny_llama_with_lora(), "corda", [])


def tiny_llama_with_lora():
    model = tiny_llama()
    add_lora(model, TARGETS, r=R, alpha=ALPHA, init="lora")
    return model


# -----------------------------------------------------------------------------
# AdaLoRA

INIT_R, TARGET_R, TOTAL_STEP, TINIT, TFINAL = 6, 3, 6, 1, 2  # steps 0-1 warm up, 2-3 cubic, 4 final, 5 fixed
ORTH_REG_WEIGHT = 0.5


def adalora_pair():
    original = tiny_llama()
    ours, theirs = copy.deepcopy(original), copy.deepcopy(original)
    baselines.add_adalora(ours, TARGETS, r=INIT_R, alpha=ALPHA)
    theirs = peft.get_peft_model(theirs, peft.AdaLoraConfig(
        # CAUSAL_LM: its forward runs AdaLoraModel.forward, which adds the orthogonality regularizer to .loss
        task_type="CAUSAL_LM", init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, target_modules=TARGETS,
        total_step=TOTAL_STEP, tinit=TINIT, tfinal=TFINAL, deltaT=1, orth_reg_weight=ORTH_REG_WEIGHT))
    reference = peft_layers(theirs)
    with torch.no_grad():  # the same random P, Q (peft draws them in another order from the RNG)
        for name, layer in baselines.adalora_layers(ours):
            for factor in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, factor).copy_(getattr(reference[name], factor)["default"])
    return original, ours, theirs


def train_adalora(model, step_hook, loss_of, steps=TOTAL_STEP):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss_of(model, input_ids(seed=100 + step)).backward()
        optimizer.step()
        step_hook(step)  # after the step, before zero_grad: it reads the gradients
        optimizer.zero_grad()
    model.eval()


def test_adalora_matches_peft_masks_budget_and_parameters():
    original, ours, theirs = adalora_pair()
    reference = peft_layers(theirs)
    ids = input_ids()
    assert rel_err(logits_of(ours, ids), logits_of(original, ids)) <= 1e-6  # Lambda = 0 at the start
    allocator = baselines.RankAllocator(ours, TARGET_R, TOTAL_STEP, tinit=TINIT, tfinal=TFINAL)
    assert (allocator.init_budget, allocator.target_budget) == (theirs.base_model.rankallocator.init_bgt,
                                                                theirs.base_model.rankallocator.target_bgt)
    budgets = [allocator.budget(step) for step in range(TOTAL_STEP)]
    assert budgets == [theirs.base_model.rankallocator.budget_schedule(step) for step in range(TOTAL_STEP)]
    masks = {}

    def our_hook(step):
        allocator.update_and_allocate(ours, step)
        masks.setdefault("ours", []).append(allocator.ranks())

    def their_hook(step):
        theirs.base_model.update_and_allocate(step)
        pattern = theirs.peft_config["default"].rank_pattern
        masks.setdefault("theirs", []).append(None if pattern is None else {
            name.removeprefix("base_model.model.").removesuffix(".lora_E.default"): sum(kept)
            for name, kept in pattern.items()})

    train_adalora(ours, our_hook, lambda model, ids: causal_lm_loss(model, ids)
                  + ORTH_REG_WEIGHT * baselines.orthogonality_regularizer(model))
    train_adalora(theirs, their_hook, lambda model, ids: model(input_ids=ids, labels=ids).loss)
    assert masks["ours"] == masks["theirs"]
    assert sum(masks["ours"][-1].values()) == TARGET_R * len(TARGETS) * 2  # the final budget, 2 layers
    assert masks["ours"][2] != masks["ours"][-1]  # the budget fell in steps
    for name, layer in baselines.adalora_layers(ours):
        for factor in ("lora_A", "lora_E", "lora_B"):
            assert rel_err(getattr(layer, factor), getattr(reference[name], factor)["default"]) <= 1e-5, (name, factor)
    assert rel_err(logits_of(ours, ids), logits_of(theirs, ids)) <= 1e-5


def test_orthogonality_regularizer_is_the_mean_frobenius_distance():
    _, ours, _ = adalora_pair()
    layers = [layer for _, layer in baselines.adalora_layers(ours)]
    naive = [torch.linalg.norm(m.double() - torch.eye(INIT_R, dtype=torch.float64))
             for layer in layers for m in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B)]
    assert rel_err(baselines.orthogonality_regularizer(ours), torch.stack(naive).mean()) <= 1e-6


def test_the_trainers_get_the_recipes_allocator_for_adalora_only():
    model = tiny_llama()
    baselines.add_adalora(model, TARGETS, r=INIT_R, alpha=ALPHA)
    allocator = training.rank_allocator(model, training.METHODS["adalora"], 100)
    assert (allocator.target_r, allocator.tinit, allocator.tfinal, allocator.deltaT) == (4, 10, 20, 1)
    assert training.rank_allocator(model, training.METHODS["lora"], 100) is None


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [8, 14])
def test_adalora_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch, at_step):  # noqa: F811
    """
    16 steps: warm-up to step 1, the cubic budget to step 13, then the final mask (t_init 10%, t_final 20%).
    Killed at 8 the importance averages and the masks must come back from the checkpoint; killed at 14 the
    fixed final mask must. Without them the resumed run allocates other ranks.
    """
    common = ["--method", "adalora+reg", "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "16",
              "--save-every", "2", "--lr", "1e-2", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5"]
    run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step=at_step)


def test_adalora_exports_as_lora_and_round_trips(tmp_path):
    original, ours, _ = adalora_pair()
    allocator = baselines.RankAllocator(ours, TARGET_R, TOTAL_STEP, tinit=TINIT, tfinal=TFINAL)
    train_adalora(ours, lambda step: allocator.update_and_allocate(ours, step), causal_lm_loss)
    ids = input_ids()
    trained = logits_of(ours, ids)
    with pretrained_mode(ours):
        assert rel_err(logits_of(ours, ids), logits_of(original, ids)) <= 1e-6
    baselines.adalora_to_lora(ours)
    assert rel_err(logits_of(ours, ids), trained) <= 1e-5
    save_adapter(ours, tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(original), tmp_path / "adapter")
    assert rel_err(logits_of(loaded, ids), trained) <= 1e-5
    export_peft(ours, tmp_path / "peft", "tiny-llama")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft").eval()
    assert rel_err(logits_of(reloaded, ids), trained) <= 1e-4


# -----------------------------------------------------------------------------
# tools/baselines.py


@pytest.mark.slow
def test_baselines_tool_smoke_runs_every_kind_of_method_into_one_table(tmp_path):
    import tools.baselines as tool

    methods = ["loraga+reg", "adalora"]  # a calibrated init with the regularizers; AdaLoRA's layers and allocator
    results = tool.main(["--budget", "smoke", "--methods", ",".join(methods), "--threads", "1",
                         "--out", str(tmp_path / "runs"), "--table-dir", str(tmp_path / "table")])
    rows = {row["method"]: row for row in results["summary"]}
    assert list(rows) == ["lora", *methods]  # LoRA, the reference of the relative columns, always runs
    assert rows["lora"]["step_seconds"]["mean"] == 1.0
    assert rows["adalora"]["trainable_parameters"]["mean"] > rows["lora"]["trainable_parameters"]["mean"]  # + Lambda
    assert rows["loraga+reg"]["trainable_parameters"]["mean"] == rows["lora"]["trainable_parameters"]["mean"]
    for row in rows.values():
        assert row["gsm8k_ce"]["mean"] > 0
    # the NLU runs are Table 2's rows: LoRA and AdaLoRA, not LoRA-GA
    assert all(0 <= rows[method]["nlu_score"]["mean"] <= 1 for method in ("lora", "adalora"))
    assert "nlu_score" not in rows["loraga+reg"] and not (tmp_path / "runs" / "nlu" / "nli" / "loraga+reg").exists()
    table = (tmp_path / "table" / "table.md").read_text()
    assert all(f"| {method} |" in table for method in rows)
    assert json.loads((tmp_path / "table" / "results.json").read_text())["budget"] == "smoke"
    # run again: every finished run is reused, not trained again
    log = tmp_path / "runs" / "nlg" / "adalora" / "seed42" / "log.jsonl"
    written = log.stat().st_mtime_ns
    again = tool.main(["--budget", "smoke", "--methods", ",".join(methods), "--threads", "1",
                       "--out", str(tmp_path / "runs"), "--table-dir", str(tmp_path / "table")])
    assert again["runs"] == results["runs"] and log.stat().st_mtime_ns == written


def rte_files(tmp_path):
    """RTE-shaped files (sentence1, sentence2; 0 = entailment, 1 = not) made from the toy NLI task's rows."""
    paths = []
    for split in ("train", "validation"):
        with open(os.path.join(training.ASSETS, "data", f"nli_{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f][:200]
        path = tmp_path / f"rte_{split}.jsonl"
        path.write_text("".join(json.dumps({"sentence1": r["premise"], "sentence2": r["hypothesis"],
                                            "label": int(r["label"] != 0)}) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def test_baselines_nlu_rows_run_on_a_glue_task_file(tmp_path):
    """--nlu-task rte with its files: train_nlu.py reads them, and the score is RTE's validation accuracy in its log."""
    import tools.baselines as tool

    train, validation = rte_files(tmp_path)
    args = tool.parse_args(["--budget", "smoke", "--nlu-task", "rte", "--nlu-data", train, "--nlu-validation-file",
                            validation, "--out", str(tmp_path / "runs"), "--device", "cpu"])
    result = tool.nlu_run(args, "lora", 42)
    run_dir = tmp_path / "runs" / "nlu" / "rte" / "lora" / "seed42"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["settings"]["task"], config["settings"]["data"]) == ("rte", train)
    assert config["settings"]["validation_file"] == [str(tmp_path / "runs" / "validation0_64.jsonl")]  # smoke: first 64
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert result["nlu_score"] == max(r["validation"]["validation"]["accuracy"] for r in log if "validation" in r)
    assert tool.nlu_title("rte") == "RTE accuracy ×100" and tool.nlu_title("cola") == "COLA matthews_corrcoef ×100"
    with pytest.raises(FileNotFoundError, match="--nlu-data 'missing.jsonl': no such file"):
        tool.parse_args(["--budget", "smoke", "--nlu-task", "rte", "--nlu-data", "missing.jsonl"])
    with pytest.raises(ValueError, match=r"--nlu-validation-file: task 'mnli' has the validation split\(s\) "
                                         r"\['validation_matched', 'validation_mismatched'\], got 1 file"):
        tool.parse_args(["--budget", "smoke", "--nlu-task", "mnli", "--nlu-validation-file", validation])


def test_a_finished_run_is_reused_unless_its_peak_memory_is_not_its_own(tmp_path):
    import tools.baselines as tool

    argv = ["--method", "lora"]
    for result, reused in [({"peak_memory_bytes": 5, "peak_memory_source": "own"}, True),
                           ({"peak_memory_bytes": None, "peak_memory_source": None}, True),  # not measured (in process)
                           ({"nlu_peak_memory_bytes": 5}, False)]:  # measured before the source was recorded
        tool.keep(str(tmp_path), argv, result)
        assert tool.reused(str(tmp_path), argv) == (result if reused else None)
    assert tool.reused(str(tmp_path), argv + ["--seed", "1"]) is None  # another argv


def test_a_child_run_gets_the_tools_thread_count_whatever_the_environment(tmp_path, monkeypatch):
    """OMP_NUM_THREADS changes CPU results, so each child gets --threads, not the caller's value."""
    import subprocess

    import tools.baselines as tool

    seen = {}

    def run(command, check, env):
        seen.update(env)
        with open(os.path.join(tmp_path, "peak_memory.json"), "w") as f:
            json.dump({"peak_memory_bytes": 7, "source": "VmHWM"}, f)

    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.setattr(subprocess, "run", run)
    _, peak = tool.train("nlu", ["--out", str(tmp_path)], "cpu", isolate=True, threads=2)
    assert seen["OMP_NUM_THREADS"] == "2" and peak == 7


def test_paper_scale_params_come_from_the_trainers_code_and_match_the_arithmetic():
    """
    tools/baselines.py's #Params table applies each method to LLaMA-2-7B and DeBERTa-v3-base on the
    meta device; the counts equal the arithmetic of each method's factors, and Table 2 where its settings
    are ours (r = 8 on every encoder linear layer).
    """
    import tools.baselines as tool

    def llama(method):
        return tool.paper_scale_parameters(method, "llama-2-7b")

    def deberta(method):
        return round(tool.paper_scale_parameters(method, "deberta-v3-base") / 1e6, 2)

    shapes = baselines.llama_linear_shapes()
    lora = baselines.lora_parameter_count(shapes, r=128)
    assert all(llama(method) == lora for method in ("lora", "pissa", "balora", "loraplus", "milora", "loraga", "corda"))
    assert llama("lorafa") == baselines.lora_parameter_count(shapes, r=128, train_A=False)
    assert llama("dora") == lora + sum(fan_out for fan_out, _ in shapes)  # a magnitude per output feature
    assert llama("adalora") == lora + 128 * len(shapes)  # Lambda: r entries per matrix
    # embedding and head 2 x 32000 x 4096; per layer 4 x 4096^2 (attention) + 3 x 4096 x 11008 (MLP) + 2 norms; final norm
    assert llama("full") == 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 == 6_738_415_616
    assert llama("bitfit") is None  # LLaMA has no biases
    assert (deberta("lora"), deberta("pissa"), deberta("bitfit"), round(deberta("full"))) == (1.33, 1.33, 0.1, 184)
    assert (deberta("hadapter"), deberta("padapter")) == (1.20, 1.19)  # Table 2: 1.22M, 1.18M (docs/baselines.md)


def test_the_tool_runs_as_a_script():
    """python tools/baselines.py: its own directory comes first on sys.path, yet the method's baselines.py is imported."""
    import subprocess
    import sys

    import tools.baselines as tool

    shown = subprocess.run([sys.executable, os.path.join(tool.REPO, "tools", "baselines.py"), "--params-only",
                            "--methods", "lora"], capture_output=True, text=True, check=True).stdout
    assert "| lora | 319.82M | 1.33M | 1.33M |" in shown  # Table 2's LoRA: 1.33M


def test_update_readme_replaces_only_the_table_between_the_markers(tmp_path):
    import tools.baselines as tool

    runs = [{"method": "lora", "seed": 42, "trainable_parameters": 10, "step_seconds": 2.0, "gsm8k_ce": 1.5},
            {"method": "full", "seed": 42, "trainable_parameters": 100, "step_seconds": 3.0, "gsm8k_ce": 1.25}]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tool.README_BEGIN}\nold table\n{tool.README_END}\nverdict\n")
    tool.update_readme(tool.summarize(runs), str(readme))
    table = readme.read_text().split(tool.README_BEGIN + "\n")[1].split(tool.README_END)[0]
    assert readme.read_text() == f"intro\n{tool.README_BEGIN}\n{table}{tool.README_END}\nverdict\n"
    assert "| full | 42 | 100 | 1.50 |" in table  # step time over LoRA's: 3.0 / 2.0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one <!-- baselines:begin -->"):
        tool.update_readme(tool.summarize(runs), str(readme))


def test_readme_baselines_table_is_the_committed_cpu_results():
    import tools.baselines as tool

    with open(os.path.join(tool.REPO, "assets", "baselines", "cpu", "results.json")) as f:
        results = json.load(f)
    assert results["budget"] == "cpu" and results["model"] == "smollm2-135m-instruct"
    assert {run["method"] for run in results["runs"]} == set(training.METHODS)  # every method is a row
    with open(tool.README) as f:
        readme = f.read()
    table = readme.split(tool.README_BEGIN + "\n")[1].split(tool.README_END)[0]
    # recomputed from the runs, not copied from the file's own summary
    assert table == tool.render_table(tool.summarize(results["runs"]), tool.README_COLUMNS)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_a_child_run_reports_its_own_peak_memory_not_its_parents(tmp_path):
    """Linux carries ru_maxrss over from the parent at exec; VmHWM starts afresh. The tool's children use VmHWM."""
    import subprocess
    import sys

    import tools.baselines as tool

    held = bytearray(1536 * 2**20)  # this process holds 1.5 GiB, touched
    held[::4096] = b"\x01" * len(held[::4096])
    code = ("import resource, sys; sys.path.insert(0, {repo!r}); import tools.baselines as tool; "
            "print(tool.peak_memory_bytes('cpu')[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", code.format(repo=tool.REPO)], capture_output=True,
                                             text=True, check=True).stdout.split())
    assert inherited >= len(held) > own  # ru_maxrss would have reported the parent's 1.5 GiB
    del held
    # results measured before the source was recorded have no peak in the table; those with it do
    runs = [{"method": "lora", "seed": 42, "peak_memory_bytes": 100, "peak_memory_source": "own"},
            {"method": "dora", "seed": 42, "peak_memory_bytes": 150, "peak_memory_source": "own"},
            {"method": "full", "seed": 42, "peak_memory_bytes": 900}]
    rows = {row["method"]: row for row in tool.summarize(runs)}
    assert rows["dora"]["peak_memory_bytes"]["mean"] == 1.5 and "peak_memory_bytes" not in rows["full"]
