"""
The sparse mixture-of-experts decoders in model.py (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers
(the test oracle) on tiny random models with O(1) weights: logits, routing decisions, the
load-balancing loss, KV-cache greedy generation, transformers 5's fused-experts layout, LoRA on the
experts exported to peft, and train_nlg.py end to end.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import model as M
import test_model_llama as llama_tests
from test_model_llama import hf_logits, padded_batch, rescale_

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, rope_theta=1000.0)

# name -> (transformers config class, kwargs)
CONFIGS = {
    # Mixtral: 4 experts, top-2, renormalized; GQA.
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    # Qwen3-MoE: q/k norms per head, head_dim 24, 6 experts top-2 renormalized (as Qwen3-30B-A3B), layer 1 dense
    # (mlp_only_layers).
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2,
                                         head_dim=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                                         mlp_only_layers=[1])),
    # Qwen2-MoE: q/k/v bias, a shared expert behind its sigmoid gate, top-2 NOT renormalized, and layer 0
    # dense through decoder_sparse_step 2.
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_key_value_heads=4, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2)),
    # OLMoE: one RMSNorm over all query (key) heads together, clip_qkv, attention_bias; 8 experts top-3 not
    # renormalized, every layer sparse.
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                  attention_bias=True, clip_qkv=3.0)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each tiny config saved once with save_pretrained (the hub's per-expert layout): name -> (path, model)."""
    out = {}
    for seed, (name, (config_class, kwargs)) in enumerate(CONFIGS.items()):
        config = getattr(transformers, config_class)(**SMALL, **kwargs)
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        rescale_(hf, seed)
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = (path, hf)
    return out


def checkpoint_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_keys_are_the_hub_layout_and_our_parameter_names(checkpoints):
    """save_pretrained writes one tensor per expert linear (Mixtral under block_sparse_moe, w1/w2/w3),
    and those keys are exactly our parameter names: dense layers keep mlp.gate_proj."""
    for name, (path, _) in checkpoints.items():
        ours = M.Llama.from_pretrained(path)
        assert set(ours.state_dict()) - {k for k in ours.state_dict() if k.endswith("inv_freq")} == checkpoint_keys(path)
    keys = checkpoint_keys(checkpoints["mixtral"][0])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert "model.layers.1.mlp.gate_proj.weight" in checkpoint_keys(checkpoints["qwen3_moe"][0])  # mlp_only_layers
    qwen2 = checkpoint_keys(checkpoints["qwen2_moe"][0])
    assert "model.layers.0.mlp.gate_proj.weight" in qwen2 and "model.layers.1.mlp.shared_expert_gate.weight" in qwen2


def both_models_on_a_padded_batch(checkpoints, name, padding_side):
    """(our model after its forward, our logits, transformers' output with router logits and aux_loss,
    attention_mask) on one padded batch; position ids as transformers' generate makes them."""
    path, hf = checkpoints[name]
    ours = M.Llama.from_pretrained(path)
    input_ids, attention_mask = padded_batch([20, 13, 7], padding_side)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True,
                      position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0))
        logits = ours(input_ids, attention_mask)
    return ours, logits, expected, attention_mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_routing_match_transformers(checkpoints, name, padding_side):
    """Logits within 1e-5 of their scale on a padded batch, and every real token sent to the same k
    experts in every MoE layer (transformers' router logits, recorded by output_router_logits)."""
    ours, logits, expected, attention_mask = both_models_on_a_padded_batch(checkpoints, name, padding_side)
    real = attention_mask.bool()
    scale = expected.logits[real].abs().max()
    assert scale > 1.0
    error = (logits[real] - expected.logits[real]).abs().max()
    assert error <= 1e-5 * scale, f"{name} {padding_side}: max |dlogits| {error:.3g} (scale {scale:.3g})"
    blocks = M.moe_blocks(ours)
    assert len(blocks) == len(expected.router_logits) == (2 if name in ("mixtral", "olmoe") else 1)
    k = ours.config.num_experts_per_tok
    chosen_per_layer = []
    for block, hf_router in zip(blocks, expected.router_logits):
        ours_chosen = block.router_logits.topk(k).indices.sort(-1).values[real.reshape(-1)]
        hf_chosen = hf_router.topk(k).indices.sort(-1).values[real.reshape(-1)]
        assert torch.equal(ours_chosen, hf_chosen)
        chosen_per_layer.append(ours_chosen)
    # the test has teeth: the tokens do not all go to the same experts
    assert len({tuple(row.tolist()) for row in torch.cat(chosen_per_layer)}) >= 3


def naive_load_balancing_loss(router_logits, num_experts, top_k, attention_mask):
    """Switch Transformer's loss by explicit loops: E * sum_e (assignments to e / real tokens) *
    (summed probability of e / real tokens), counted over the real tokens of all layers."""
    assignments, probability, tokens = [0.0] * num_experts, [0.0] * num_experts, 0
    real = attention_mask.reshape(-1).tolist()
    for logits in router_logits:
        for row, is_real in zip(logits.double(), real):
            if not is_real:
                continue
            tokens += 1
            p = row.exp() / row.exp().sum()
            for e in sorted(range(num_experts), key=lambda e: -p[e].item())[:top_k]:
                assignments[e] += 1
            for e in range(num_experts):
                probability[e] += p[e].item()
    return num_experts * sum(a / tokens * q / tokens for a, q in zip(assignments, probability))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_balancing_loss_matches_transformers_and_a_naive_loop(checkpoints, name):
    ours, _, expected, attention_mask = both_models_on_a_padded_batch(checkpoints, name, "left")
    expected = expected.aux_loss
    aux = M.router_aux_loss(ours, attention_mask)
    assert abs(aux.item() - expected.item()) <= 1e-6 * expected.item()
    naive = naive_load_balancing_loss([b.router_logits for b in M.moe_blocks(ours)], ours.config.num_experts,
                                      ours.config.num_experts_per_tok, attention_mask)
    assert abs(aux.item() - naive) <= 1e-6 * naive
    # without a mask every token counts, as transformers without attention_mask
    hf = checkpoints[name][1]
    unpadded = padded_batch([7, 7], "left", T=7)[0]
    with torch.no_grad():
        expected = hf(input_ids=unpadded, output_router_logits=True).aux_loss
        ours(unpadded)
    assert abs(M.router_aux_loss(ours).item() - expected.item()) <= 1e-6 * expected.item()


def test_load_balancing_loss_has_the_gradient_of_its_probabilities():
    """f_e is a count (no gradient), P_e carries it: the gradient of E * sum_e f_e P_e wrt the logits
    is that of E * sum_e f_e * mean softmax_e, with f_e held fixed."""
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    M.load_balancing_loss([logits], 4, 2).backward()
    fixed = torch.zeros(4).scatter_add_(0, logits.detach().topk(2).indices.reshape(-1), torch.ones(20)) / 10
    expected_grad, = torch.autograd.grad(4 * (fixed * logits.softmax(-1).mean(0)).sum(), logits)
    torch.testing.assert_close(logits.grad, expected_grad)


def test_router_as_a_target_and_the_loss_under_gradient_checkpointing(checkpoints):
    """`gate` as a LoRA target adapts the routers; the gradients of task + load-balancing loss are the
    same with gradient checkpointing (the router logits kept from the first forward stay in the graph)."""
    import balora

    def gradients(checkpointing):
        torch.manual_seed(0)
        ours = M.Llama.from_pretrained(checkpoints["mixtral"][0])
        added = balora.add_lora(ours, ["gate"], r=2, alpha=4, init="lora")
        assert added["replaced"] == [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
        with torch.no_grad():
            for module in ours.modules():
                if isinstance(module, balora.LoRALinear):
                    module.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        ours.train()
        ours.gradient_checkpointing = checkpointing
        input_ids, attention_mask = padded_batch([20, 13], "left")
        logits = ours(input_ids, attention_mask)
        (logits.logsumexp(-1).mean() + M.router_aux_loss(ours, attention_mask)).backward()
        return {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == 4 and all(g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_transformers_and_full_forward(checkpoints, name):
    """The dense decoder's generation test on each MoE family: KV-cache greedy decoding of a left-padded
    batch equals transformers' generate and a full forward per token, with and without an EOS."""
    llama_tests.test_greedy_generate_matches_transformers_and_full_forward(checkpoints, name)
    ours = M.Llama.from_pretrained(checkpoints[name][0])
    tokens = ours.generate(*padded_batch([9, 5, 7], "left", T=9, seed=1), max_new_tokens=12)
    assert len(set(tokens[:, 9:].reshape(-1).tolist())) > 3  # the test has teeth: not one token repeated


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_experts_layout_loads_to_the_same_model(checkpoints, tmp_path, name):
    """transformers 5's own layout (save_original_format=False: experts.gate_up_proj / experts.down_proj,
    Mixtral's block under mlp) loads into the same per-expert parameters."""
    path, hf = checkpoints[name]
    hf.save_pretrained(tmp_path, save_original_format=False)
    keys = checkpoint_keys(str(tmp_path))
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
    fused, per_expert = M.Llama.from_pretrained(str(tmp_path)), M.Llama.from_pretrained(path)
    assert fused.state_dict().keys() == per_expert.state_dict().keys()
    for key, tensor in per_expert.state_dict().items():
        assert torch.equal(fused.state_dict()[key], tensor), key


def test_config_fields_of_each_family(checkpoints):
    mixtral = M.LlamaConfig.from_hf(M.read_config(checkpoints["mixtral"][0]))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 48)
    assert mixtral.moe_module == "block_sparse_moe" and mixtral.expert_names == ("w1", "w3", "w2")
    assert mixtral.norm_topk_prob and mixtral.dense_layers == () and mixtral.router_aux_loss_coef == 0.0
    qwen3 = M.LlamaConfig.from_hf(M.read_config(checkpoints["qwen3_moe"][0]))
    assert qwen3.qk_norm and qwen3.dense_layers == (1,) and qwen3.num_experts == 6
    qwen2 = M.LlamaConfig.from_hf(M.read_config(checkpoints["qwen2_moe"][0]))
    assert qwen2.qkv_bias and not qwen2.norm_topk_prob and qwen2.dense_layers == (0,)
    assert qwen2.shared_expert_intermediate_size == 48
    olmoe = M.LlamaConfig.from_hf(M.read_config(checkpoints["olmoe"][0]))
    assert olmoe.qk_norm_full and not olmoe.qk_norm and olmoe.clip_qkv == 3.0 and olmoe.qkv_bias and olmoe.o_bias
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.moe_intermediate_size) == (8, 3, 32)
    # the loss's weight counts only when the config asks transformers to add it
    asked = dict(M.read_config(checkpoints["mixtral"][0]), output_router_logits=True, router_aux_loss_coef=0.02)
    assert M.LlamaConfig.from_hf(asked).router_aux_loss_coef == 0.02
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 is not supported"):
        M.LlamaConfig.from_hf(dict(asked, router_jitter_noise=0.1))


def test_lora_on_the_experts_exports_to_peft_on_transformers_mixtral(checkpoints, tmp_path):
    """LoRA on w1, w2, w3 of every expert (the router frozen), exported with adapters.export_peft, loads
    with peft onto transformers' Mixtral (which fuses the experts and converts the adapter) with equal logits."""
    peft = pytest.importorskip("peft")
    import balora
    from adapters import export_peft

    path, _ = checkpoints["mixtral"]
    ours = M.Llama.from_pretrained(path)
    added = balora.add_lora(ours, ["w1", "w2", "w3"], r=4, alpha=8, init="lora")
    assert len(added["replaced"]) == 2 * 4 * 3  # layers x experts x linears
    assert all(isinstance(block.gate, torch.nn.Linear) and not block.gate.weight.requires_grad
               for block in M.moe_blocks(ours))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for module in ours.modules():
            if isinstance(module, balora.LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.5)
    input_ids, attention_mask = padded_batch([20, 13, 7], "left")
    with torch.no_grad():
        adapted = ours(input_ids, attention_mask)
        base = M.Llama.from_pretrained(path)(input_ids, attention_mask)
    export_peft(ours, tmp_path / "peft", path)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in config["target_modules"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    reloaded = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    expected = hf_logits(reloaded, input_ids, attention_mask)
    real = attention_mask.bool()
    scale = expected[real].abs().max()
    assert (adapted[real] - base[real]).abs().max() > 0.1 * scale  # the adapter changes the logits
    assert (adapted[real] - expected[real]).abs().max() <= 1e-5 * scale


@pytest.mark.slow
def test_train_nlg_runs_on_a_tiny_mixtral_with_the_router_loss_and_resumes(tmp_path, monkeypatch):
    """train_nlg.py end to end on a tiny Mixtral (transformers' save_pretrained, the bundled tiny-llama
    tokenizer): LoRA on attention and experts, the load-balancing loss logged as router_aux, and a
    killed-and-resumed run equal to the uninterrupted one."""
    import train_nlg
    from test_train_nlg import read_log, run_killed_and_resumed, trainable_after

    config = transformers.MixtralConfig(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                                        output_router_logits=True, router_aux_loss_coef=0.02)
    torch.manual_seed(0)
    model_dir = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(config).save_pretrained(model_dir)
    shutil.copy(os.path.join(REPO, "assets", "tiny-llama", "tokenizer.model"), model_dir)
    tiny = {"model": str(model_dir), "data": os.path.join(REPO, "assets", "data", "metamath_train.jsonl")}
    common = ["--format", "metamath", "--max-samples", "16", "--max-length", "64", "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "4", "--save-every", "2", "--method", "balora",
              "--lambda-warmup-ratio", "0", "--svd-k", "3", "--top-k", "5", "--targets", "q_proj,v_proj,w1,w2,w3",
              "--no-progress"]
    # trained uninterrupted (full), and killed after step 2 and resumed: bit-identical adapters and totals
    full, _ = run_killed_and_resumed(tiny, tmp_path, monkeypatch, common, at_step=2)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    # the config's weight (it sets output_router_logits) is in force: total = task + sum_i lambda_i reg_i
    # + 0.02 router_aux (each the mean over the step's micro-batches); E sum_e f_e P_e >= k (= k: uniform)
    import balora
    for r in full:
        regularizers = sum(r[f"lambda{i}"] * r[name] for i, name in enumerate(balora.REGULARIZERS, 1)
                           if r[name] is not None)  # None: a zero weight, not computed
        assert abs(r["total"] - (r["task"] + regularizers + 0.02 * r["router_aux"])) <= 1e-5 * r["total"]
        assert r["router_aux"] >= 2.0 - 1e-4
    trainable = trainable_after(tmp_path / "full")
    assert any(".block_sparse_moe.experts.3.w2.lora_B" in k for k in trainable)
    assert not any(".gate." in k for k in trainable)  # the router stays frozen
    # --router-aux-loss-coef 0: no loss term, none logged
    from test_train_nlg import tiny_args
    train_nlg.main(tiny_args(tiny, tmp_path / "off", *common, "--router-aux-loss-coef", "0", "--max-steps", "1"))
    assert "router_aux" not in read_log(tmp_path / "off")[0]
