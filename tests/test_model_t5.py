"""t5.py against transformers (the oracle) on tiny random T5s with O(1) weights, padded batches."""

import json

import pytest
import torch
import torch.nn.functional as F

import t5

transformers = pytest.importorskip("transformers")

VOCAB, D_MODEL = 48, 16


def tiny_config(feed_forward, tie_word_embeddings, **extra):
    return transformers.T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=3,
                                 num_heads=3, feed_forward_proj=feed_forward, tie_word_embeddings=tie_word_embeddings,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                                 decoder_start_token_id=0,
                                 **extra)


def o1_weights(model, seed):
    """Every parameter N(0, 1): a mistake in any term moves the logits by O(1), not by init-sized noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model.eval()


def untie_lm_head(directory, seed):
    """Turn a saved checkpoint into the hub layout of T5 v1.1 / Flan-T5: its own lm_head.weight, and a
    transformers 4 config (tie_word_embeddings false, no scale_decoder_outputs)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    state["lm_head.weight"] = torch.randn(VOCAB, D_MODEL, generator=torch.Generator().manual_seed(seed))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """v1.0 (relu, tied, rescaled), v1.1 (gated-gelu, untied, not rescaled) and a sequence classifier, saved."""
    root = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    o1_weights(transformers.T5ForConditionalGeneration(tiny_config("relu", True)), 1).save_pretrained(root / "v10")
    o1_weights(transformers.T5ForConditionalGeneration(tiny_config("gated-gelu", False)), 2).save_pretrained(root / "v11")
    untie_lm_head(root / "v11", 3)
    o1_weights(transformers.T5ForSequenceClassification(tiny_config("gated-gelu", True, num_labels=3)), 4).save_pretrained(
        root / "cls")
    return root


def padded_batch(seed, batch=3, length=11, eos_per_row=1):
    """input_ids right padded (pad 0), each row ending with `eos_per_row` </s> (id 1) among its real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    lengths = [length, length - 4, 5][:batch]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
        ids[row, n - 1] = 1
        if eos_per_row == 2:
            ids[row, n // 2] = 1  # a pair: A </s> B </s>
    return ids, mask


def lm_inputs():
    ids, mask = padded_batch(0)
    decoder_ids, decoder_mask = padded_batch(1, length=9)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)


def relative_error(ours, theirs):
    """max |ours - theirs| over the logits' scale (max |theirs|)."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def lm_error(directory):
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    ours = t5.T5LM.from_pretrained(directory)
    inputs = lm_inputs()
    with torch.no_grad():
        expected = theirs(**inputs).logits
        return relative_error(ours(*inputs.values()), expected), ours, inputs, expected


def test_relative_position_buckets_by_hand():
    # 32 buckets, max distance 128 (T5's defaults). Bidirectional: 16 per direction, 8 exact distances,
    # then 8 log bins up to 128: distance d >= 8 -> 8 + floor(8 * log(d / 8) / log(16)).
    distance = torch.tensor([0, -1, 1, -7, 7, -8, 8, -15, -16, -31, -32, -127, -128, -1000, 1000])
    expected = [0, 1, 17, 7, 23, 8, 24, 9, 10, 11, 12, 15, 15, 15, 31]
    assert t5.relative_position_bucket(distance, True, 32, 128).tolist() == expected
    # causal: keys ahead (positive) all in bucket 0; 16 exact distances back, then log bins: 16 + floor(16 * log(d / 16) / log(8))
    assert t5.relative_position_bucket(distance, False, 32, 128).tolist() == [
        0, 1, 0, 7, 0, 8, 0, 15, 16, 21, 21, 31, 31, 31, 0]


def test_relative_position_buckets_equal_transformers():
    distance = torch.arange(-300, 301)[:, None] - torch.zeros(1, dtype=torch.long)
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 12), (6, 20)):
            assert torch.equal(t5.relative_position_bucket(distance, bidirectional, buckets, max_distance),
                               bucket(distance, bidirectional, buckets, max_distance))


def test_v10_relu_tied_rescaled_equals_transformers(checkpoints):
    error, ours, _, expected = lm_error(checkpoints / "v10")
    assert ours.lm_head.weight is ours.shared.weight and ours.config.scale_decoder_outputs and not ours.config.gated
    assert expected.abs().max() > 1.0  # O(1) logits
    assert error <= 1e-5, error


def test_v11_gated_gelu_untied_equals_transformers(checkpoints):
    error, ours, _, _ = lm_error(checkpoints / "v11")
    assert ours.lm_head.weight is not ours.shared.weight and not ours.config.scale_decoder_outputs and ours.config.gated
    assert error <= 1e-5, error


def test_transformers_5_config_of_v11_reads_the_same():
    """transformers 5 writes v1.1 as tie_word_embeddings true + scale_decoder_outputs false: no rescale either way."""
    hf = tiny_config("gated-gelu", False).to_dict()
    assert hf["tie_word_embeddings"] is True and hf["scale_decoder_outputs"] is False
    assert not t5.T5Config.from_hf(hf).scale_decoder_outputs
    legacy = {key: value for key, value in hf.items() if key != "scale_decoder_outputs"}
    assert not t5.T5Config.from_hf(dict(legacy, tie_word_embeddings=False)).scale_decoder_outputs
    assert t5.T5Config.from_hf(legacy).scale_decoder_outputs  # a tied transformers 4 config: T5 v1.0's rescale


@pytest.mark.parametrize("eos_per_row", [1, 2])
def test_sequence_classifier_equals_transformers(checkpoints, eos_per_row):
    theirs = transformers.T5ForSequenceClassification.from_pretrained(checkpoints / "cls").eval()
    ours = t5.T5Classifier.from_pretrained(checkpoints / "cls", num_labels=3)
    ids, mask = padded_batch(5, eos_per_row=eos_per_row)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        assert expected.shape == (3, 3) and expected.abs().max() > 1.0
        assert relative_error(ours(ids, mask), expected) <= 1e-5


def test_classifier_on_a_generation_checkpoint_gets_a_fresh_head(checkpoints):
    """A T5ForConditionalGeneration directory loads its backbone (the LM head unused) under a fresh head;
    with the same head copied into transformers' classifier on that backbone, the logits agree."""
    ours = t5.T5Classifier.from_pretrained(checkpoints / "v11", num_labels=2, seed=7)
    again = t5.T5Classifier.from_pretrained(checkpoints / "v11", num_labels=2, seed=7)
    head = ours.classification_head
    assert torch.equal(head.dense.weight, again.classification_head.dense.weight)  # the seed decides it
    assert head.dense.bias.abs().max() == 0 and head.out_proj.bias.abs().max() == 0
    assert head.dense.weight.std().item() == pytest.approx(D_MODEL ** -0.5, rel=0.3)  # transformers' init
    config = transformers.T5Config.from_pretrained(checkpoints / "v11", num_labels=2)
    theirs = transformers.T5ForSequenceClassification(config).eval()
    generation = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints / "v11")
    state = {f"transformer.{key}": value for key, value in generation.state_dict().items() if key != "lm_head.weight"}
    state.update({f"classification_head.{key}": value for key, value in head.state_dict().items()})
    theirs.load_state_dict(state, strict=False)
    ids, mask = padded_batch(6)
    with torch.no_grad():
        assert relative_error(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits) <= 1e-5


def test_classifier_names_rows_without_eos(checkpoints):
    ours = t5.T5Classifier.from_pretrained(checkpoints / "cls", num_labels=3)
    ids, mask = padded_batch(5)
    ids[0, ids[0] == 1] = 5
    with pytest.raises(ValueError, match="</s>"):
        ours(ids, mask)


def test_unsupported_feed_forward_is_named():
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        t5.T5Config.from_hf(dict(tiny_config("relu", True).to_dict(), feed_forward_proj="gated-silu"))


# Deliberate breaks: each departs from T5 in one feature; the parity test above must then fail.


def test_each_feature_is_needed_for_parity(checkpoints, monkeypatch):
    sdpa = F.scaled_dot_product_attention
    errors = {}
    error, ours, inputs, expected = lm_error(checkpoints / "v10")

    def broken(change):
        with torch.no_grad():
            change()
            return relative_error(ours(*inputs.values()), expected)

    # 1. the usual 1/sqrt(d_kv) scale on the scores
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **{**k, "scale": None}))
    errors["scaled attention"] = broken(lambda: None)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    # 2. the decoder's buckets bidirectional (a future key gets its own bucket)
    decoder_bias = ours.decoder.block[0].layer[0].SelfAttention
    decoder_bias.bidirectional = True
    errors["bidirectional decoder buckets"] = broken(lambda: None)
    decoder_bias.bidirectional = False
    # 3. the encoder's buckets causal
    encoder_bias = ours.encoder.block[0].layer[0].SelfAttention
    encoder_bias.bidirectional = False
    errors["causal encoder buckets"] = broken(lambda: None)
    encoder_bias.bidirectional = True
    # 4. no d_model^-0.5 rescale before the tied head
    ours.config.scale_decoder_outputs = False
    errors["no rescale"] = broken(lambda: None)
    ours.config.scale_decoder_outputs = True
    assert broken(lambda: None) == error  # restored
    # 5. a LayerNorm (the mean subtracted) instead of T5's RMS norm
    rms_forward = t5.RMSNorm.forward
    monkeypatch.setattr(t5.RMSNorm, "forward", lambda self, x: rms_forward(self, x - x.mean(-1, keepdim=True)))
    errors["mean-centred layer norm"] = broken(lambda: None)
    monkeypatch.setattr(t5.RMSNorm, "forward", rms_forward)
    # 6. the position bias in the first block only, not shared by the others (they keep just the mask)
    block_forward = t5.T5Block.forward
    first_blocks = {id(ours.encoder.block[0]), id(ours.decoder.block[0])}

    def bias_in_first_block_only(self, x, bias, *rest):
        if id(self) not in first_blocks:
            bias = torch.where(bias < -1e30, bias, torch.zeros_like(bias))
        return block_forward(self, x, bias, *rest)

    monkeypatch.setattr(t5.T5Block, "forward", bias_in_first_block_only)
    errors["bias in the first block only"] = broken(lambda: None)
    monkeypatch.setattr(t5.T5Block, "forward", block_forward)
    assert broken(lambda: None) == error  # restored
    # 7. v1.1: exact GELU instead of gelu_new (the tanh form)
    _, ours_v11, inputs_v11, expected_v11 = lm_error(checkpoints / "v11")
    gelu = F.gelu
    monkeypatch.setattr(F, "gelu", lambda x, approximate="none": gelu(x))
    with torch.no_grad():
        errors["exact gelu"] = relative_error(ours_v11(*inputs_v11.values()), expected_v11)
    monkeypatch.setattr(F, "gelu", gelu)
    # 8. v1.1: the shared embedding as the head, the checkpoint's own lm_head.weight ignored
    untied_head = ours_v11.lm_head.weight
    ours_v11.lm_head.weight = ours_v11.shared.weight
    with torch.no_grad():
        errors["v1.1 head tied"] = relative_error(ours_v11(*inputs_v11.values()), expected_v11)
    ours_v11.lm_head.weight = untied_head
    # 9. the classifier's decoder fed the input itself, not shifted right
    theirs = transformers.T5ForSequenceClassification.from_pretrained(checkpoints / "cls").eval()
    classifier = t5.T5Classifier.from_pretrained(checkpoints / "cls", num_labels=3)
    ids, mask = padded_batch(5)
    monkeypatch.setattr(t5, "shift_right", lambda input_ids, start: input_ids)
    with torch.no_grad():
        errors["unshifted decoder input"] = relative_error(classifier(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits)
    print(errors)
    assert min(errors.values()) > 1e-3, errors


def random_t5_tool():
    """tools/random_t5.py as a module (tools/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "random_t5.py")
    spec = importlib.util.spec_from_file_location("random_t5", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_t5_tool_writes_a_checkpoint_transformers_reads_as_we_do(tmp_path):
    """tools/random_t5.py (the GPU check's T5-base stand-in), tiny: transformers loads it with every key, same logits."""
    random_t5 = random_t5_tool()
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"premise": f"the cat {w} now", "hypothesis": f"a dog {w}"}) + "\n"
                             for w in ("runs", "sleeps", "eats", "sings", "jumps", "reads") * 5))
    random_t5.main([str(tmp_path / "t5"), "--texts", str(texts), "--shape", "tiny", "--vocab-size", "40"])
    theirs, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = t5.T5LM.from_pretrained(tmp_path / "t5")
    ids = torch.randint(3, 40, (2, 7))
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        assert relative_error(ours(ids, decoder_input_ids=ids[:, :5]), expected) <= 1e-5
