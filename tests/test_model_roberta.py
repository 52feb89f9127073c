"""RoBERTa (the encoder of model.py under RoBERTa's flags), its loader and tokenizer against transformers."""

import json
import os

import pytest
import torch

import model
from model import DebertaClassifier, DebertaConfig, checkpoint_keys
from test_model_deberta import rescale_to_order_one

transformers = pytest.importorskip("transformers")

# Tiny RoBERTa configs (transformers' RobertaConfig keys). T = 20 tokens, max_position_embeddings 40
# > T + pad + 1, so every position row a batch reaches is a distinct random O(1) vector: a position id
# off by one anywhere changes the logits by O(1).
BASE = dict(model_type="roberta", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu")
CONFIGS = {
    "binary": dict(BASE, num_labels=2),
    "three-way": dict(BASE, hidden_size=48, num_attention_heads=3, type_vocab_size=2, num_labels=3),
    "regression": dict(BASE, num_labels=1),  # STS-B: one logit
    "pad-0": dict(BASE, pad_token_id=0, bos_token_id=1, num_labels=2),  # the offset follows pad_token_id
}
T = 20


def hf_config(config):
    return transformers.RobertaConfig(**{k: v for k, v in config.items() if k != "model_type"})


def padded_batch(config, seed):
    """3 rows of T tokens, <s> first; rows 1 and 2 right padded with pad_token_id (13 and 6 real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config["vocab_size"], (3, T), generator=generator)
    input_ids[:, 0] = config["bos_token_id"]
    attention_mask = torch.ones(3, T, dtype=torch.long)
    attention_mask[1, 13:] = 0
    attention_mask[2, 6:] = 0
    return input_ids.masked_fill(attention_mask == 0, config["pad_token_id"]), attention_mask


def close(ours, expected):
    """max |Δ| <= 1e-5 of the reference's scale (at least 1)."""
    return (ours - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def classification_pair(request, tmp_path_factory):
    """(transformers RobertaForSequenceClassification at O(1) weights, its save_pretrained dir, config dict)."""
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    reference = rescale_to_order_one(transformers.RobertaForSequenceClassification(hf_config(config)), seed=1)
    path = str(tmp_path_factory.mktemp(f"roberta-{request.param}"))
    reference.save_pretrained(path)
    return reference, path, config


def test_classifier_matches_transformers(classification_pair):
    reference, path, config = classification_pair
    ours = DebertaClassifier.from_pretrained(path)
    assert ours.num_labels == config["num_labels"] and ours.config.model_type == "roberta"
    input_ids, attention_mask = padded_batch(config, seed=2)
    token_type_ids = torch.randint(0, config["type_vocab_size"], input_ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        expected_hidden = reference.roberta(input_ids, attention_mask=attention_mask).last_hidden_state
        logits, cls = ours(input_ids, attention_mask, return_cls=True)
        hidden = ours.deberta(input_ids, attention_mask)
        typed = ours(input_ids, attention_mask, token_type_ids=token_type_ids)
        expected_typed = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    assert logits.shape == (3, config["num_labels"]) and cls.shape == (3, config["hidden_size"])
    assert expected.abs().max() > 0.1  # O(1) logits: the tolerance below is not vacuous
    assert close(logits, expected)
    assert close(cls, expected_hidden[:, 0])
    assert close(typed, expected_typed)
    # Real tokens' states agree everywhere. Padded rows differ on purpose: ours attend uniformly (as the
    # DeBERTa path does), transformers' attend to the real keys; neither is ever read.
    real = attention_mask.bool()
    assert close(hidden[real], expected_hidden[real]) and torch.isfinite(hidden).all()


def test_a_wrong_position_offset_is_caught(classification_pair, monkeypatch):
    """Positions counted from 0 (BERT's) instead of from pad_token_id + 1 shift every position row: caught."""
    reference, path, config = classification_pair
    counted_from_zero = lambda input_ids, pad, max_positions: (  # noqa: E731
        (torch.cumsum(input_ids.ne(pad).long(), 1) - 1).clamp(min=0))
    monkeypatch.setattr(model, "padding_offset_position_ids", counted_from_zero)
    ours = DebertaClassifier.from_pretrained(path)
    input_ids, attention_mask = padded_batch(config, seed=2)
    with torch.no_grad():
        assert not close(ours(input_ids, attention_mask), reference(input_ids, attention_mask=attention_mask).logits)


def test_position_ids_are_padding_offset():
    # pad 1: real tokens at 2, 3, ...; pads at 1 (fairseq's make_positions), wherever the pads are.
    input_ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 5, 1, 6, 2, 1]])
    expected = torch.tensor([[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]])
    assert torch.equal(model.padding_offset_position_ids(input_ids, 1, 514), expected)
    # The longest input: 514 - 1 - 1 = 512 tokens (roberta-base's max length) reaches row 513, the last.
    assert model.padding_offset_position_ids(torch.full((1, 512), 7), 1, 514).max() == 513
    with pytest.raises(ValueError, match="at most max_position_embeddings - pad_token_id - 1 = 512"):
        model.padding_offset_position_ids(torch.full((1, 513), 7), 1, 514)


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    """FacebookAI/roberta-base's layout: RobertaForMaskedLM (roberta.* + lm_head.*), and a bare RobertaModel."""
    config = CONFIGS["binary"]
    torch.manual_seed(0)
    reference = rescale_to_order_one(transformers.RobertaForMaskedLM(hf_config(config)), seed=4)
    path = str(tmp_path_factory.mktemp("roberta-mlm"))
    reference.save_pretrained(path)
    bare_path = str(tmp_path_factory.mktemp("roberta-bare"))
    reference.roberta.save_pretrained(bare_path)
    return reference.roberta, path, bare_path, config


def test_pretrained_checkpoints_load_with_fresh_seeded_head(masked_lm):
    encoder, path, bare_path, config = masked_lm
    assert any(key.startswith("lm_head.") for key in checkpoint_keys(path))
    assert not any(key.startswith("roberta.") for key in checkpoint_keys(bare_path))
    input_ids, attention_mask = padded_batch(config, seed=5)
    with torch.no_grad():
        expected = encoder(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    for directory in (path, bare_path):
        ours = DebertaClassifier.from_pretrained(directory, num_labels=3)
        with torch.no_grad():
            assert close(ours.deberta(input_ids, attention_mask)[real], expected[real])
            assert torch.isfinite(ours(input_ids, attention_mask)).all()
        # classifier.dense and out_proj: N(0, 0.02), zero bias, drawn from the seed
        assert 0.01 < ours.classifier.weight.std() < 0.03 and (ours.classifier.bias == 0).all()
        assert 0.01 < ours.pooler.dense.weight.std() < 0.03 and (ours.pooler.dense.bias == 0).all()
    again = DebertaClassifier.from_pretrained(path, num_labels=3)
    other = DebertaClassifier.from_pretrained(path, num_labels=3, seed=1)
    assert torch.equal(again.classifier.weight, ours.classifier.weight)
    assert not torch.equal(other.classifier.weight, ours.classifier.weight)


def test_mapping_table_covers_every_parameter():
    """Every parameter of RoBERTa's model is the image of exactly one Hugging Face key, and the shapes agree."""
    config = CONFIGS["three-way"]
    reference = transformers.RobertaForSequenceClassification(hf_config(config))
    ours = DebertaClassifier(DebertaConfig.from_hf(config), num_labels=3)
    own = dict(ours.named_parameters())
    mapped = {model.roberta_key(key): key for key in reference.state_dict() if model.roberta_key(key) is not None}
    assert sorted(mapped) == sorted(own)
    for name, hf_key in mapped.items():
        assert own[name].shape == reference.state_dict()[hf_key].shape, name
    assert model.roberta_key("roberta.encoder.layer.1.attention.self.query.weight") == \
        "deberta.encoder.layer.1.attention.self.query_proj.weight"
    assert model.roberta_key("roberta.pooler.dense.weight") is None


def test_loading_is_strict_and_names_offenders(tmp_path):
    from safetensors.torch import save_file

    config = CONFIGS["binary"]
    state = transformers.RobertaForSequenceClassification(hf_config(config)).state_dict()
    del state["roberta.encoder.layer.1.attention.self.value.bias"]
    state["roberta.encoder.layer.1.attention.self.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing.*value_proj.bias.*unexpected.*roberta.encoder.layer.1.attention.self.extra"):
        DebertaClassifier.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="shape mismatches.*classifier.out_proj.weight"):
        DebertaClassifier.from_pretrained(str(tmp_path), num_labels=4)


def test_from_hf_reads_roberta_base_config():
    # FacebookAI/roberta-base's config.json, as published
    config = DebertaConfig.from_hf(dict(
        model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-05,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, initializer_range=0.02))
    assert (config.relative_attention, config.pos_att_type, config.pooler_activation) == (False, (), "tanh")
    assert (config.max_position_embeddings, config.type_vocab_size, config.pad_token_id) == (514, 1, 1)
    assert config.cls_dropout == config.pooler_dropout == 0.1  # classifier_dropout None -> hidden_dropout_prob


@pytest.mark.parametrize("flag, value", [
    ("hidden_act", "gelu_new"),
    ("position_embedding_type", "relative_key"),
    ("is_decoder", True),
    ("add_cross_attention", True),
    ("num_attention_heads", 5),
    ("pad_token_id", 39),
])
def test_unsupported_flag_raises_naming_it(flag, value):
    with pytest.raises(ValueError, match=flag if flag != "num_attention_heads" else "multiple of"):
        DebertaConfig.from_hf(dict(BASE, **{flag: value}))


def test_input_longer_than_the_positions_is_refused(classification_pair):
    _, path, config = classification_pair
    ours = DebertaClassifier.from_pretrained(path)
    too_long = config["max_position_embeddings"] - config["pad_token_id"]
    with pytest.raises(ValueError, match="max_position_embeddings - pad_token_id - 1"):
        ours(torch.full((1, too_long), 5))


# -----------------------------------------------------------------------------
# Tokenizer: ours against transformers' RobertaTokenizer on the same files

SENTENCES = [
    "The cat sat on the mat.", "A dog ran under the rug, quickly!", "  leading and  double  spaces ",
    "naïve café — déjà vu 😀", "tabs\tand\nnewlines", "numbers 12345 and symbols #@$%^&*()",
    "<s> written out, and </s> too", "", "x",
]


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    """A small byte-level BPE (vocab.json + merges.txt) and the tokenizer.json transformers writes for it."""
    import tokenizers

    corpus = [" ".join(SENTENCES[i % 7].split()[: 1 + i % 5]) + f" word{i % 37} the cat" for i in range(400)]
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=400, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    files = str(tmp_path_factory.mktemp("roberta-bpe"))
    trainer.save_model(files)
    reference = transformers.RobertaTokenizer.from_pretrained(files)
    json_dir = str(tmp_path_factory.mktemp("roberta-tokenizer-json"))
    reference.save_pretrained(json_dir)
    for name in ("vocab.json", "merges.txt"):  # tokenizer.json alone must do
        if os.path.exists(os.path.join(json_dir, name)):
            os.remove(os.path.join(json_dir, name))
    return reference, files, json_dir


@pytest.mark.parametrize("source", ["vocab+merges", "tokenizer.json"])
def test_tokenizer_matches_transformers(bpe_dirs, source):
    from data import RobertaTokenizer

    reference, files, json_dir = bpe_dirs
    ours = RobertaTokenizer(files if source == "vocab+merges" else json_dir)
    assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id) == (0, 1, 2, 3) == (
        reference.cls_token_id, reference.pad_token_id, reference.sep_token_id, reference.unk_token_id)
    pieces = set()
    for a in SENTENCES:
        expected = reference(a)["input_ids"]
        assert ours.encode(a) == expected, a
        pieces.update(expected[1:-1])
        for b in [text for text in SENTENCES[::-1] if text]:  # transformers takes an empty text_b for no pair
            assert ours.encode(a, b) == reference(a, b)["input_ids"], (a, b)
            for max_length in (5, 9, 14):  # truncation of the longer text first, as transformers' longest_first
                assert ours.encode(a, b, max_length=max_length) == reference(
                    a, b, truncation="longest_first", max_length=max_length)["input_ids"], (a, b, max_length)
        assert ours.encode(a, max_length=4) == reference(a, truncation=True, max_length=4)["input_ids"]
    assert len(pieces) > 50  # the texts exercise many merges and raw bytes, not a handful of tokens
    assert ours.encode("a b")[:1] == [0] and ours.encode("a", "b").count(2) == 3  # <s> a </s></s> b </s>


def test_tokenizer_batches_pad_with_pad_id_and_names_missing_files(bpe_dirs, tmp_path):
    from data import RobertaTokenizer

    _, files, _ = bpe_dirs
    tokenizer = RobertaTokenizer(files)
    input_ids, attention_mask = tokenizer.encode_batch(["the cat", "a dog ran under the rug"], ["sat", "on the mat"])
    short = tokenizer.encode("the cat", "sat")
    assert input_ids[0].tolist() == short + [1] * (input_ids.shape[1] - len(short))  # <pad> = 1
    assert attention_mask.sum(1).tolist() == [len(short), input_ids.shape[1]]
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json"):
        RobertaTokenizer(str(tmp_path))
    vocab = json.loads(open(os.path.join(files, "vocab.json")).read())
    del vocab["<pad>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(open(os.path.join(files, "merges.txt")).read())
    with pytest.raises(ValueError, match=r"vocab.json: no \['<pad>'\]"):
        RobertaTokenizer(str(tmp_path))


def test_pair_truncation_is_the_tokenizers_librarys():
    """Every split of len(a), len(b) in 1..8 into budgets 0..9, against transformers' RobertaTokenizer."""
    from data import truncate_longest_first

    # one token per letter: "a a a" is a, Ġa, Ġa
    reference = transformers.RobertaTokenizer(
        vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "Ġa": 5, "b": 6, "Ġb": 7}, merges=[])
    for length_a in range(1, 9):
        for length_b in range(1, 9):
            for budget in range(10):
                ids = reference(" a" * length_a, " b" * length_b, truncation="longest_first",
                                max_length=budget + 4)["input_ids"]
                expected = (sum(i in (4, 5) for i in ids), sum(i in (6, 7) for i in ids))
                a, b = truncate_longest_first(list(range(length_a)), list(range(length_b)), budget)
                assert (len(a), len(b)) == expected, (length_a, length_b, budget)
                assert a == list(range(len(a))) and b == list(range(len(b)))  # cut from the end
