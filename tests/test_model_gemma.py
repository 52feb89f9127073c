"""
Gemma, Gemma-2 and Gemma-3 (text) as flags of model.py's decoder, against transformers (the test oracle)
on tiny random models: logits under padding with inputs longer than the sliding window, greedy
generation with the KV cache, both config dialects, Gemma-3's multimodal checkpoints, LoRA targets,
and train_nlg.py end to end.

Random weights are rescaled to O(1) before saving, as in test_model_llama.py: Gemma's norms store
w with a scale of (1 + w), so theirs are drawn around 0.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import balora
import model as M
from test_model_llama import hf_logits, padded_batch  # vocab 128 as here

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# head_dim 32 != hidden / heads, query_pre_attn_scalar 24 != head_dim (a wrong attention scale shows),
# a window of 6 slots under inputs of 20 and generations of 21 tokens.
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=32,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 6

# name -> (transformers config class, kwargs)
CONFIGS = {
    # Gemma-1 (Gemma-2B's multi-query attention): GeGLU, sqrt(hidden) embeddings, (1 + w) norms, tied head.
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2, num_key_value_heads=1, rope_theta=10000.0)),
    # Gemma-2: sandwich norms, local / global / local layers, soft-capping small enough to bend the
    # scores and logits of O(1) weights, GQA.
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, num_key_value_heads=2, query_pre_attn_scalar=24,
                                    sliding_window=WINDOW, attn_logit_softcapping=8.0, final_logit_softcapping=6.0)),
    # Gemma-3: qk-norm, a local RoPE base (100) far from the global one (10000, linearly scaled by 4 as
    # Gemma-3 4B+ do by 8), layers local, global, local, global; untied to cover both heads.
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=False,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)})),
}


def rescale_(hf_model, seed):
    """Replace transformers' init (norm weights 0, std-0.02 linears) by O(1) weights; q/k larger."""
    g = torch.Generator().manual_seed(seed)
    hidden = hf_model.config.hidden_size
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:  # the scale is 1 + w: about 1 (2 for Gemma-3's q_norm / k_norm, as q_proj's gain)
                p.copy_(0.2 * noise + (1.0 if ("q_norm" in name or "k_norm" in name) else 0.0))
            elif "embed_tokens" in name:  # times sqrt(hidden) in the model: O(1) there
                p.copy_(noise / hidden ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(noise * gain / p.shape[1] ** 0.5)


def tiny_hf(name, seed):
    config_class, kwargs = CONFIGS[name]
    config = getattr(transformers, config_class)(**SMALL, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    rescale_(hf, seed)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each tiny config saved once with save_pretrained: name -> (path, transformers model)."""
    out = {}
    for seed, name in enumerate(CONFIGS):
        hf = tiny_hf(name, seed)
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = (path, hf)
    return out


def assert_close_at_scale(logits, expected, where, what):
    """max |dlogits| <= 1e-5 of the logits' scale, on the positions `where` (bool (B, T))."""
    assert logits.shape == expected.shape
    assert torch.isfinite(logits).all()  # fully padded query rows must not give NaN
    scale = expected[where].abs().max()
    assert scale > 1.0  # O(1) weights: logits that are not all near zero
    error = (logits[where] - expected[where]).abs().max()
    assert error <= 1e-5 * scale, f"{what}: max |dlogits| {error:.3g} (scale {scale:.3g})"


def test_configs_carry_the_features_under_test(checkpoints):
    gemma, gemma2, gemma3 = (M.Llama.from_pretrained(checkpoints[name][0]).config for name in CONFIGS)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.scale_embeddings and gemma.norm_unit_offset
    assert gemma.tie_word_embeddings and not gemma.sandwich_norm and gemma.local_layers == ()
    assert gemma2.local_layers == (True, False, True) and gemma2.sliding_window == WINDOW
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.query_pre_attn_scalar) == (8, 6, 24)
    assert gemma3.local_layers == (True, False, True, False) and gemma3.qk_norm and not gemma3.tie_word_embeddings
    assert (gemma3.rope_theta, gemma3.rope_type, gemma3.rope_linear_factor, gemma3.rope_local_theta) == (
        10000.0, "linear", 4.0, 100.0)
    assert gemma3.attn_logit_softcapping is None and gemma3.final_logit_softcapping is None


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name, padding_side):
    path, hf = checkpoints[name]
    ours = M.Llama.from_pretrained(path)
    input_ids, attention_mask = padded_batch([20, 13, 7], padding_side)  # 20 and 13 > the window of 6
    with torch.no_grad():
        logits = ours(input_ids, attention_mask)
    assert_close_at_scale(logits, hf_logits(hf, input_ids, attention_mask), attention_mask.bool(),
                          f"{name} {padding_side}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unpadded_causal_path_and_teacher_head(checkpoints, name):
    """attention_mask=None (no explicit mask from the caller) matches transformers, and the final hidden
    states through model.logits (the teacher head of Eq. 9) give the same logits, soft-capped."""
    path, hf = checkpoints[name]
    ours = M.Llama.from_pretrained(path)
    input_ids, attention_mask = padded_batch([20, 20], "right")
    with torch.no_grad():
        logits = ours(input_ids)
        hidden = ours(input_ids, return_hidden=True)
    assert_close_at_scale(logits, hf_logits(hf, input_ids, attention_mask), attention_mask.bool(), name)
    assert torch.equal(ours.logits(hidden), logits)


def test_rope_tables_match_transformers(checkpoints):
    ours = M.Llama.from_pretrained(checkpoints["gemma3"][0]).model.rotary_emb
    theirs = checkpoints["gemma3"][1].model.rotary_emb
    torch.testing.assert_close(ours.inv_freq, theirs.full_attention_inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(M.rope_inv_freq(ours.local_config), theirs.sliding_attention_inv_freq, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_transformers(checkpoints, name):
    """Left-padded prompts of 9 slots + 12 new tokens: the KV cache holds more than the window of 6."""
    path, hf = checkpoints[name]
    ours = M.Llama.from_pretrained(path)
    input_ids, attention_mask = padded_batch([9, 5, 7], "left", T=9, seed=1)
    generated = ours.generate(input_ids, attention_mask, max_new_tokens=12)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           max_new_tokens=12, pad_token_id=0)
    assert generated.shape == (3, 21)
    assert len(set(generated[:, 9:].flatten().tolist())) > 3  # not one token repeated: the test can tell
    assert torch.equal(generated, expected)


def classic_dialect(config):
    """A transformers 5 config.json dict rewritten as transformers 4.x / the hub write it."""
    config = dict(config)
    rope = config.pop("rope_parameters")
    if config["model_type"] == "gemma3_text":
        # global RoPE: rope_theta + rope_scaling; local: rope_local_base_freq; layer_types from the pattern
        full, local = dict(rope["full_attention"]), rope["sliding_attention"]
        config["rope_theta"] = full.pop("rope_theta")
        config["rope_scaling"] = full
        config["rope_local_base_freq"] = local["rope_theta"]
        assert config.pop("layer_types") == ["sliding_attention", "full_attention"] * 2
        config["sliding_window_pattern"] = 2
    else:
        config["rope_theta"] = rope["rope_theta"]
        config.pop("layer_types", None)  # gemma2: alternating from a local layer 0
    if config["model_type"] == "gemma":  # Gemma-1's hub configs: hidden_act "gelu", meaning the tanh one
        config["hidden_act"] = "gelu"
    return config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_classic_config_dialect_parses_to_the_same_model(checkpoints, tmp_path, name):
    path, _ = checkpoints[name]
    config = M.read_config(path)
    classic = classic_dialect(config)
    assert "rope_parameters" not in classic and "layer_types" not in classic
    assert M.LlamaConfig.from_hf(classic) == M.LlamaConfig.from_hf(config)
    # and transformers reads it as the same model
    hf_classic = transformers.AutoConfig.for_model(**classic)
    assert list(hf_classic.layer_types if name != "gemma" else []) == list(config.get("layer_types", []))


def multimodal_checkpoint(text_path, directory, prefix_style):
    """
    A Gemma3ForConditionalGeneration checkpoint around the tiny text model: config.json nests its config
    as text_config; the language model's keys are prefixed as transformers 5 (`model.language_model.`,
    `lm_head.`) or the hub's checkpoints (`language_model.model.`, `language_model.lm_head.`) save them,
    beside vision tower and projector tensors.
    """
    text_config = M.read_config(text_path)
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "tie_word_embeddings": text_config["tie_word_embeddings"], "text_config": text_config,
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16}}
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    body, head = {"new": ("model.language_model.", "lm_head."),
                  "hub": ("language_model.model.", "language_model.lm_head.")}[prefix_style]
    vision = {"new": "model.vision_tower.", "hub": "vision_tower."}[prefix_style]
    state = {}
    for key, tensor in load_file(os.path.join(text_path, "model.safetensors")).items():
        state[head + key[len("lm_head."):] if key.startswith("lm_head.") else body + key[len("model."):]] = tensor
    state[vision + "vision_model.embeddings.patch_embedding.weight"] = torch.ones(16, 3, 2, 2)
    state[vision.replace("vision_tower.", "multi_modal_projector.") + "mm_input_projection_weight"] = torch.ones(16, 64)
    save_file(state, os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("prefix_style", ["new", "hub"])
def test_gemma3_multimodal_checkpoint_loads_its_language_model(checkpoints, tmp_path, prefix_style):
    path, hf = checkpoints["gemma3"]
    directory = str(tmp_path / prefix_style)
    multimodal_checkpoint(path, directory, prefix_style)
    ours = M.Llama.from_pretrained(directory)
    assert ours.config == M.Llama.from_pretrained(path).config
    input_ids, attention_mask = padded_batch([20, 11], "left")
    with torch.no_grad():
        logits = ours(input_ids, attention_mask)
    assert_close_at_scale(logits, hf_logits(hf, input_ids, attention_mask), attention_mask.bool(), prefix_style)


def test_gemma3_multimodal_checkpoint_from_transformers(tmp_path):
    """Gemma3ForConditionalGeneration.save_pretrained (a tiny SigLIP tower): its text logits, ours."""
    text = transformers.Gemma3TextConfig(**SMALL, **CONFIGS["gemma3"][1])
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=8, patch_size=4)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(3)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    rescale_(hf.model.language_model, 3)
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight  # the outer config ties it
    hf.save_pretrained(str(tmp_path))
    ours = M.Llama.from_pretrained(str(tmp_path))
    assert ours.config.tie_word_embeddings
    input_ids, attention_mask = padded_batch([20, 11], "right")
    input_ids = input_ids.clamp(max=120)  # no image tokens
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = ours(input_ids, attention_mask)
    assert_close_at_scale(logits, expected, attention_mask.bool(), "Gemma3ForConditionalGeneration")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_adapts_the_projections_by_suffix(checkpoints, name):
    ours = M.Llama.from_pretrained(checkpoints[name][0])
    layers = ours.config.num_hidden_layers
    info = balora.add_lora(ours, "all-linear", r=4, alpha=8)
    suffixes = sorted({target.rpartition(".")[2] for target in info["replaced"]})
    assert suffixes == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(info["replaced"]) == 7 * layers
    # PiSSA's split leaves the function unchanged
    input_ids, attention_mask = padded_batch([20, 9], "left")
    with torch.no_grad():
        adapted = ours(input_ids, attention_mask)
        base = M.Llama.from_pretrained(checkpoints[name][0])(input_ids, attention_mask)
    real = attention_mask.bool()
    assert (adapted[real] - base[real]).abs().max() <= 1e-4 * base[real].abs().max()


def gemma_dict(model_type="gemma2", **changes):
    config = dict(model_type=model_type, **SMALL, num_hidden_layers=2, num_key_value_heads=2)
    config.update(changes)
    return config


@pytest.mark.parametrize("config, message", [
    (gemma_dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported"),
    (gemma_dict("gemma", hidden_act="silu"), "hidden_activation='silu' is not supported"),
    (gemma_dict(layer_types=["sliding_attention"]), "expected num_hidden_layers=2 entries"),
    (gemma_dict(layer_types=["sliding_attention", "chunked_attention"]), "'full_attention'"),
    (gemma_dict(sliding_window=None), "sliding_window=None: local"),
    (gemma_dict(sliding_window=0), "sliding_window=0: local"),
    (gemma_dict("gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (gemma_dict("gemma3_text", rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "sliding_attention.rope_type='linear'"),
    (gemma_dict("gemma3_text", rope_scaling={"rope_type": "linear"}), "needs a number 'factor'"),
    (gemma_dict("gemma2", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "expected default or linear"),
    ({"model_type": "gemma3", "vision_config": {}}, "'text_config'"),
])
def test_unsupported_gemma_configs_raise_one_line(config, message):
    with pytest.raises(ValueError, match=message):
        M.LlamaConfig.from_hf(config)


def test_gemma3_text_config_defaults_are_transformers(tmp_path):
    """A hub Gemma-3 text_config names a few keys; the rest are Gemma3TextConfig's defaults."""
    sparse = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 16}
    ours = M.LlamaConfig.from_hf(sparse)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in sparse.items() if k != "model_type"})
    assert (ours.vocab_size, ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim)
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    assert ours.local_layers == tuple(kind == "sliding_attention" for kind in theirs.layer_types)
    assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert ours.rope_local_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings and ours.rms_norm_eps == theirs.rms_norm_eps


# -----------------------------------------------------------------------------
# train_nlg.py end to end on a tiny random Gemma-2 and Gemma-3


@pytest.fixture(scope="module")
def tiny_gemma_dirs(tmp_path_factory):
    """save_pretrained tiny Gemma-2 / Gemma-3 with assets/tiny-llama's tokenizer (vocab covered)."""
    import data

    tokenizer_file = os.path.join(REPO, "assets", "tiny-llama", "tokenizer.model")
    vocab_size = data.Tokenizer(os.path.dirname(tokenizer_file)).vocab_size
    out = {}
    for seed, name in enumerate(("gemma2", "gemma3")):
        config_class, kwargs = CONFIGS[name]
        small = dict(SMALL, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, head_dim=16,
                     num_attention_heads=2)
        config = getattr(transformers, config_class)(**small, **dict(kwargs, num_key_value_heads=1))
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config)
        rescale_(hf, seed)  # O(1) logits: Gemma-2's final soft-cap bends them
        path = str(tmp_path_factory.mktemp(f"tiny_{name}"))
        hf.save_pretrained(path)
        shutil.copy(tokenizer_file, path)
        out[name] = path
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_train_nlg_runs_on_gemma_and_resumes(tiny_gemma_dirs, tmp_path, monkeypatch, name):
    """BA-LoRA for 4 steps, killed after the checkpoint of step 2 and --resume'd: the same adapter as an
    uninterrupted run. Step 1's consistency term is 0 up to rounding: PiSSA leaves the student equal to
    the teacher, whose logits the trainer forms from hidden states through model.logits (soft-capped).
    The peft export loads onto transformers' model."""
    import train_nlg
    import training

    args = ["--model", tiny_gemma_dirs[name], "--data", os.path.join(REPO, "assets", "data", "metamath_train.jsonl"),
            "--max-samples", "16", "--method", "balora", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-steps", "4", "--save-every", "2", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5",
            "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu",
            "--max-length", "64", "--no-progress", "--report-to", "none"]
    train_nlg.main(args + ["--out", str(tmp_path / "full")])
    real_save = training.save_checkpoint

    def save_then_crash(path, model, optimizer, scheduler, step, **kwargs):
        real_save(path, model, optimizer, scheduler, step, **kwargs)
        if step == 2:
            raise KeyboardInterrupt("simulated crash after step 2")

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_nlg.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    train_nlg.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])

    def log(run):
        with open(tmp_path / run / "log.jsonl") as f:
            return [json.loads(line) for line in f]

    full, resumed = log("full"), log("resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["total"] for r in full] == [r["total"] for r in resumed]
    assert abs(full[0]["consistency"]) < 1e-6 and full[-1]["consistency"] > 1e-6
    trainable = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["trainable"] for run in ("full", "resumed")]
    assert trainable[0].keys() == trainable[1].keys()
    assert all(torch.equal(trainable[0][k], trainable[1][k]) for k in trainable[0])
    # its peft export, applied by peft onto transformers' Gemma, gives the logits of ours with its adapter
    import adapters

    peft = pytest.importorskip("peft")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "full" / "peft_adapter")).eval()
    ours = adapters.load_adapter(M.Llama.from_pretrained(tiny_gemma_dirs[name]), str(tmp_path / "full" / "adapter"))
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.eval()(input_ids)
        logits = theirs(input_ids=input_ids).logits
        base = M.Llama.from_pretrained(tiny_gemma_dirs[name])(input_ids)
    scale = expected.abs().max()
    assert (logits - expected).abs().max() <= 1e-5 * scale
    assert (base - expected).abs().max() > 1e-3 * scale  # the adapter changed the model: the match means something


def test_bf16_norm_and_embedding_scale_round_as_transformers():
    """In bf16, Gemma's RMSNorm multiplies by (1 + w) in float32 and casts last, and sqrt(hidden) is
    rounded to bf16 before scaling the embeddings: both bit for bit as transformers."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 7, 3072, generator=g)).bfloat16()
    weight = (0.5 * torch.randn(3072, generator=g)).bfloat16()
    ours, theirs = M.RMSNorm(3072, 1e-6, unit_offset=True).bfloat16(), GemmaRMSNorm(3072, 1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    assert torch.equal(ours(x), theirs(x))
    config = transformers.GemmaConfig(vocab_size=16, hidden_size=3072, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    hf = transformers.GemmaForCausalLM(config).bfloat16()
    net = M.Llama(M.LlamaConfig.from_hf(config.to_dict())).bfloat16()
    net.model.embed_tokens.weight.data.copy_(hf.model.embed_tokens.weight)
    input_ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(net.embed(input_ids), hf.model.embed_tokens(input_ids))


# -----------------------------------------------------------------------------
# On a GPU (tools/gpu_check.sh runs these): bf16 logits and bf16 training on CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh)")


def bf16_logits_error(path, device):
    """
    [(ours, transformers')] relative errors ||bf16 logits on `device` - fp32 logits on the CPU|| / ||fp32||
    over the real positions, of a left-padded batch and of an unpadded one (no mask: SDPA's causal kernel
    where the layer needs none). These O(1), peaked models are hard on bf16: transformers' own is 1-4% off.
    """
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                attn_implementation="eager").to(device)
    ours_bf16, ours = M.Llama.from_pretrained(path, dtype=torch.bfloat16, device=device), M.Llama.from_pretrained(path)
    errors = []
    for lengths in ([20, 11], [20, 20]):
        input_ids, attention_mask = padded_batch(lengths, "left")
        real = attention_mask.bool()
        with torch.no_grad():
            full = ours(input_ids, attention_mask)[real]
            mask = None if real.all() else attention_mask.to(device)
            low = ours_bf16(input_ids.to(device), mask).float().cpu()[real]
            reference_low = hf_logits(hf_bf16, input_ids.to(device), attention_mask.to(device)).float().cpu()[real]
        errors.append(((low - full).norm().item() / full.norm().item(),
                       (reference_low - full).norm().item() / full.norm().item()))
    return errors


@needs_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_bf16_logits_as_close_as_transformers(checkpoints, name):
    for ours, theirs in bf16_logits_error(checkpoints[name][0], "cuda"):
        assert ours <= 1.5 * theirs, f"{name}: bf16 relative error {ours:.3g}, transformers' {theirs:.3g}"


@needs_cuda
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_cuda_bf16_training_steps(tiny_gemma_dirs, tmp_path, name):
    import train_nlg

    train_nlg.main(["--model", tiny_gemma_dirs[name], "--data", os.path.join(REPO, "assets", "data", "metamath_train.jsonl"),
                    "--max-samples", "16", "--method", "balora", "--batch-size", "4", "--micro-batch-size", "2",
                    "--max-steps", "4", "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5", "--rank", "4",
                    "--alpha", "8", "--dtype", "bf16", "--device", "cuda", "--max-length", "64", "--no-progress",
                    "--report-to", "none", "--out", str(tmp_path)])
    with open(tmp_path / "log.jsonl") as f:
        totals = [json.loads(line)["total"] for line in f]
    assert len(totals) == 4 and all(torch.isfinite(torch.tensor(totals)))
