"""DeBERTa-v3 encoder, classifier, loader and tokenizer of model.py against transformers (the oracle)."""

import json
import math
import os
import random

import pytest
import torch

from data import DebertaTokenizer, truncate_longest_first
from model import DebertaClassifier, DebertaConfig, checkpoint_keys

transformers = pytest.importorskip("transformers")

# Tiny DeBERTa-v3-style configs. Sequences are T = 20 long, so the relative positions cover:
#   "wide":   position_buckets 32 > T, every distance its own row (linear part only);
#   "narrow": position_buckets 6 (mid 3) < T with max_relative_positions 10, so distances 4..9 are
#             log-bucketed and 10..19 clamped to the edge rows; embedding_size != hidden (embed_proj);
#   "c2p":    only the content->position term, max_relative_positions -1 (-> max_position_embeddings 24);
#   "p2c":    only the position->content term, 2 buckets each side.
V3 = dict(
    model_type="deberta-v2", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64, relative_attention=True, position_buckets=32,
    max_relative_positions=-1, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
    position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu",
)
CONFIGS = {
    "wide": dict(V3, num_labels=2),
    "narrow": dict(V3, hidden_size=48, num_attention_heads=3, embedding_size=24, position_buckets=6,
                   max_relative_positions=10, pos_att_type=["c2p", "p2c"], num_labels=3),
    "c2p": dict(V3, position_buckets=8, max_position_embeddings=24, pos_att_type="c2p", num_labels=1),
    "p2c": dict(V3, position_buckets=4, max_relative_positions=7, pos_att_type="p2c", num_labels=2),
}
T = 20


def hf_config(config):
    return transformers.DebertaV2Config(**{k: v for k, v in config.items() if k != "model_type"})


def rescale_to_order_one(module, seed):
    """
    Redraw every weight at O(1) scale. With the std-0.02 init attention is near uniform, which would
    hide a wrong relative-position index; here scores differ by O(1) between positions.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "LayerNorm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.dim() == 2 and "embeddings" not in name:  # Linear: unit-variance outputs, then some
                p.copy_(noise * 1.5 / math.sqrt(p.shape[1]))
            else:  # embedding tables, biases
                p.copy_(noise if p.dim() == 2 else 0.2 * noise)
    return module.eval()


def padded_batch(vocab_size, seed):
    """3 rows of T tokens; rows 1 and 2 are right padded (13 and 6 real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (3, T), generator=generator)
    attention_mask = torch.ones(3, T, dtype=torch.long)
    attention_mask[1, 13:] = 0
    attention_mask[2, 6:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.fixture(scope="module", params=list(CONFIGS))
def classification_pair(request, tmp_path_factory):
    """(transformers DebertaV2ForSequenceClassification, its save_pretrained dir, config dict)."""
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    reference = rescale_to_order_one(transformers.DebertaV2ForSequenceClassification(hf_config(config)), seed=1)
    path = str(tmp_path_factory.mktemp(f"deberta-{request.param}"))
    reference.save_pretrained(path)
    return reference, path, config


def test_classifier_matches_transformers(classification_pair):
    reference, path, config = classification_pair
    ours = DebertaClassifier.from_pretrained(path)  # num_labels from config.json (absent for 2 labels)
    assert ours.num_labels == config["num_labels"]
    input_ids, attention_mask = padded_batch(config["vocab_size"], seed=2)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        expected_hidden = reference.deberta(input_ids, attention_mask=attention_mask).last_hidden_state
        logits, cls = ours(input_ids, attention_mask, return_cls=True)
        hidden = ours.deberta(input_ids, attention_mask)
    assert logits.shape == (3, config["num_labels"]) and cls.shape == (3, config["hidden_size"])
    assert (cls - expected_hidden[:, 0]).abs().max() <= 1e-5 * max(1.0, expected_hidden[:, 0].abs().max())
    assert (logits - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
    real = attention_mask.bool()
    assert (hidden - expected_hidden)[real].abs().max() <= 1e-5 * max(1.0, expected_hidden[real].abs().max())
    # Padded rows (attending uniformly to everything, from zeroed embeddings) are finite and, though
    # ignored downstream, the same as transformers' too.
    assert torch.isfinite(hidden).all()
    assert (hidden - expected_hidden)[~real].abs().max() <= 1e-5 * max(1.0, expected_hidden.abs().max())


@pytest.fixture(scope="module")
def bare_encoder(tmp_path_factory):
    """(transformers DebertaV2Model on the "narrow" config, its save_pretrained dir: keys without `deberta.`)."""
    torch.manual_seed(0)
    reference = rescale_to_order_one(transformers.DebertaV2Model(hf_config(CONFIGS["narrow"])), seed=3)
    path = str(tmp_path_factory.mktemp("deberta-bare"))
    reference.save_pretrained(path)
    return reference, path


def test_bare_encoder_loads_with_fresh_seeded_head(bare_encoder):
    reference, path = bare_encoder
    assert not any(key.startswith("deberta.") for key in checkpoint_keys(path))
    ours = DebertaClassifier.from_pretrained(path, num_labels=5)
    input_ids, attention_mask = padded_batch(CONFIGS["narrow"]["vocab_size"], seed=4)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = ours.deberta(input_ids, attention_mask)
        logits = ours(input_ids, attention_mask)
    real = attention_mask.bool()
    assert (hidden - expected)[real].abs().max() <= 1e-5 * max(1.0, expected[real].abs().max())
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    # The head is N(0, 0.02) with zero bias, and the same for the same seed.
    assert 0.01 < ours.classifier.weight.std() < 0.03 and (ours.classifier.bias == 0).all()
    assert 0.01 < ours.pooler.dense.weight.std() < 0.03 and (ours.pooler.dense.bias == 0).all()
    again = DebertaClassifier.from_pretrained(path, num_labels=5)
    other = DebertaClassifier.from_pretrained(path, num_labels=5, seed=1)
    assert torch.equal(again.classifier.weight, ours.classifier.weight)
    assert not torch.equal(other.classifier.weight, ours.classifier.weight)


def test_pretraining_checkpoint_bin_skips_pretraining_heads(bare_encoder, tmp_path):
    """microsoft/deberta-v3-base layout: `deberta.` keys plus lm_predictions / mask_predictions, as a .bin."""
    reference, path = bare_encoder
    state = {f"deberta.{key}": value for key, value in reference.state_dict().items()}
    state["deberta.embeddings.position_ids"] = torch.arange(64)[None]
    state["lm_predictions.lm_head.bias"] = torch.zeros(100)
    state["mask_predictions.classifier.weight"] = torch.zeros(1, 48)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    ours = DebertaClassifier.from_pretrained(str(tmp_path), num_labels=2)
    input_ids, attention_mask = padded_batch(100, seed=5)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = ours.deberta(input_ids, attention_mask)
    real = attention_mask.bool()
    assert (hidden - expected)[real].abs().max() <= 1e-5 * max(1.0, expected[real].abs().max())


def test_loading_is_strict_and_names_offenders(tmp_path):
    from safetensors.torch import save_file

    config = CONFIGS["wide"]
    state = transformers.DebertaV2ForSequenceClassification(hf_config(config)).state_dict()
    del state["deberta.encoder.layer.1.attention.self.query_proj.bias"]
    state["deberta.encoder.layer.1.attention.self.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing.*query_proj.bias.*unexpected.*extra.weight"):
        DebertaClassifier.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="shape mismatches.*classifier.weight"):
        DebertaClassifier.from_pretrained(str(tmp_path), num_labels=4)


def test_from_hf_reads_v3_config():
    config = DebertaConfig.from_hf(dict(V3, pos_att_type=["c2p", "p2c"]))
    assert set(config.pos_att_type) == {"c2p", "p2c"}
    assert set(DebertaConfig.from_hf(V3).pos_att_type) == {"c2p", "p2c"}  # "p2c|c2p"
    assert config.max_relative_positions == 64  # -1 -> max_position_embeddings
    assert config.embedding_size == config.hidden_size


@pytest.mark.parametrize("flag, value", [
    ("model_type", "deberta"),
    ("relative_attention", False),
    ("share_att_key", False),
    ("norm_rel_ebd", "none"),
    ("position_biased_input", True),
    ("type_vocab_size", 2),
    ("conv_kernel_size", 3),
    ("position_buckets", -1),
    ("pos_att_type", "p2p|c2p"),
    ("hidden_act", "gelu_new"),
    ("pooler_hidden_act", "tanh"),
    ("pooler_hidden_size", 16),
    ("attention_head_size", 4),
])
def test_unsupported_flag_raises_naming_it(flag, value):
    with pytest.raises(ValueError, match=flag):
        DebertaConfig.from_hf(dict(V3, **{flag: value}))


def test_absent_v3_flags_fall_back_to_transformers_defaults_and_raise():
    config = dict(V3)
    del config["relative_attention"]  # transformers' default is False
    with pytest.raises(ValueError, match="relative_attention"):
        DebertaConfig.from_hf(config)


# -----------------------------------------------------------------------------
# Tokenizer

WORDS = "the a cat dog sat ran on under mat rug quickly slowly red blue big small".split()


def train_spm(directory, special_ids=True, model_type="word"):
    """An spm on a few hundred generated sentences; word-level (each word one piece `▁word`) or, as the
    DeBERTa-v3 release, unigram."""
    import sentencepiece

    rng = random.Random(0)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(300)))
    specials = dict(pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]",
                    unk_id=3, unk_piece="[UNK]") if special_ids else {}
    prefix = os.path.join(directory, "spm")
    sentencepiece.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, model_type=model_type,
                                             vocab_size=(len(WORDS) if model_type == "word" else 36) + 4 - (not special_ids),
                                             hard_vocab_limit=False,
                                             minloglevel=2, **specials)
    return sentencepiece.SentencePieceProcessor(model_file=prefix + ".model"), directory


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def test_pair_encoding_exact_ids(spm_dir):
    sp, directory = spm_dir
    tokenizer = DebertaTokenizer(directory)  # finds spm.model in the directory
    piece = {word: sp.piece_to_id("▁" + word) for word in WORDS}
    assert 3 not in piece.values()  # every word is a whole piece
    expected = [1, piece["the"], piece["cat"], piece["sat"], 2, piece["a"], piece["dog"], piece["ran"], 2]
    assert tokenizer.encode("the cat sat", "a dog ran") == expected
    assert tokenizer.encode("the cat sat") == [1, piece["the"], piece["cat"], piece["sat"], 2]
    assert tokenizer.encode("the zebra") == [1, piece["the"], 3, 2]  # unknown word -> [UNK]


def test_truncation_longest_first_keeps_both_separators(spm_dir):
    sp, directory = spm_dir
    tokenizer = DebertaTokenizer(os.path.join(directory, "spm.model"))
    p = {word: sp.piece_to_id("▁" + word) for word in WORDS}
    # 5 + 3 words into 8 - 3 = 5 slots: the first loses 2 (down to 3), then the tie costs the second 1.
    ids = tokenizer.encode("the big red cat sat", "on a mat", max_length=8)
    assert ids == [1, p["the"], p["big"], p["red"], 2, p["on"], p["a"], 2]
    assert tokenizer.encode("the big red cat sat", max_length=4) == [1, p["the"], p["big"], 2]
    # Equal lengths, 3 too many: each keeps 5 // 2 = 2, and the odd slot goes to the second (a tie).
    assert truncate_longest_first(list(range(4)), list(range(4)), 5) == ([0, 1], [0, 1, 2])
    assert truncate_longest_first([0], list(range(10)), 4) == ([0], [0, 1, 2])
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode("the cat", "a dog", max_length=2)


def test_tokenizer_matches_transformers_on_a_unigram_spm(tmp_path):
    """
    Ours against transformers' DebertaV2Tokenizer (which converts spm.model for the `tokenizers` library)
    on the same unigram spm: single sentences, and pairs of 1..8 + 1..8 words into every max_length from
    3 (both separators only) to the untruncated length, where the odd token of an odd budget is what
    tells truncation rules apart.
    """
    sp, directory = train_spm(str(tmp_path), model_type="unigram")
    reference = transformers.DebertaV2Tokenizer.from_pretrained(directory)
    ours = DebertaTokenizer(directory)
    rng = random.Random(1)
    words = WORDS + ["catmat", "bigdog", "slowred"]  # unseen compounds: several pieces each
    sentences = [" ".join(rng.choice(words) for _ in range(length)) for length in range(1, 9)]
    assert any(len(sp.encode(s)) > len(s.split()) for s in sentences)
    # special tokens written in a text are those tokens ([MASK] is added after the spm's last id)
    for text in ("the cat [SEP] sat", "a[MASK]dog", "[CLS]", "[SEP][SEP] on  [UNK] mat", "[cls] is text", "  "):
        assert ours.encode(text) == reference(text)["input_ids"], text
    assert ours.encode("[MASK]")[1] == sp.get_piece_size() == ours.vocab_size - 1
    for a in sentences:
        assert ours.encode(a) == reference(a)["input_ids"], a
        for b in sentences:
            for max_length in range(3, len(sp.encode(a)) + len(sp.encode(b)) + 4):
                expected = reference(a, b, truncation="longest_first", max_length=max_length)["input_ids"]
                assert ours.encode(a, b, max_length=max_length) == expected, (a, b, max_length)


def test_encode_batch_right_pads_with_zero(spm_dir):
    _, directory = spm_dir
    tokenizer = DebertaTokenizer(directory)
    input_ids, attention_mask = tokenizer.encode_batch(["the cat", "a big red dog"], ["sat", "ran on the mat"])
    first, second = tokenizer.encode("the cat", "sat"), tokenizer.encode("a big red dog", "ran on the mat")
    assert input_ids.shape == attention_mask.shape == (2, len(second))
    assert input_ids[0].tolist() == first + [0] * (len(second) - len(first))
    assert input_ids[1].tolist() == second
    assert attention_mask.sum(1).tolist() == [len(first), len(second)]
    assert attention_mask[0].tolist() == [1] * len(first) + [0] * (len(second) - len(first))


def test_spm_without_deberta_special_ids_is_refused(tmp_path):
    _, directory = train_spm(str(tmp_path), special_ids=False)  # sentencepiece defaults: <unk> <s> </s>
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        DebertaTokenizer(directory)
