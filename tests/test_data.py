"""
data.py against transformers on the same files: Tokenizer ids and decoding (AutoTokenizer), chat
templates rendered byte for byte (apply_chat_template), chat-format SFT examples tokenized as the
template tokenizes the whole conversation, Alpaca-format examples tokenized as the official
`preprocess` (llm172/BA-LoRA train.py, commit 2829797) tokenizes them, and the errors a user meets first.

Two tokenizer.json styles are built here with the `tokenizers` library (a byte-level BPE with
Llama-3's split regex and a BOS-adding post-processor; a Metaspace BPE with add_bos_token in
tokenizer_config.json, as Mistral / LLaMA-2 conversions), and the third is the real SmolLM2 one that
tools/import_gguf.py reconstructs (the `smollm2_dir` fixture).
"""

import json
import os

import pytest

from data import PROMPT_TEMPLATE, Tokenizer, load_examples, resolve_prompt_format, tokenize_example

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

CORPUS = [
    "Hello world! The answer is: 42.",
    "  leading spaces,\ttabs\t\tand   runs of    spaces  ",
    "new\nlines\n\n\nand\r\nwindows endings",
    "digits 1234567890 and 3.14159 and 1,000,000 and -7",
    "unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "contractions: don't, I'm, we've, they'll, she'd, IT'S",
    "code: def f(x):\n    return x ** 2  # square\n",
    "",
]

# Special-token strings inside user text are matched as special tokens, as transformers does.
SPECIAL_TEXTS = ["before <|eot_id|> after", "<|begin_of_text|>starts with bos", "two<|end_of_text|><|eot_id|>"]

# A Llama-3-style template: BOS written by the template, system header optional, <|eot_id|> ends turns.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A Mistral-style template: alternating user/assistant, refused otherwise through raise_exception;
# block tags on their own lines, which trim_blocks / lstrip_blocks must remove.
MISTRAL_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% else %}
        {{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
"""

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def training_text():
    # "::" and "Response:" as tokens: an Alpaca response starting with ":" merges with the prompt's end
    return CORPUS * 20 + ["system user assistant helpful answer question " * 5, "### Response:: a::b ::= c:: " * 5]


def write_directory(directory, tokenizer, config, generation_config=None):
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return str(directory)


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """Byte-level BPE, Llama-3's pre-tokenizer regex, a post-processor that prepends BOS, and a
    generation_config with two end ids (EOS and end-of-turn)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True}
    generation = {"eos_token_id": [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]}
    return write_directory(tmp_path_factory.mktemp("tok") / "llama3", tokenizer, config, generation)


@pytest.fixture(scope="module")
def metaspace_style(tmp_path_factory):
    """Metaspace BPE (the sentencepiece-converted layout of Mistral / LLaMA-2 tokenizer.json files) with
    a BOS-adding post-processor, tokenizer_config.json's add_bos_token false (transformers 5 ignores it
    beside a tokenizer.json, and so must we), the chat template in chat_template.jinja."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens)
    tokenizer.train_from_iterator(training_text(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": True}
    directory = write_directory(tmp_path_factory.mktemp("tok") / "metaspace", tokenizer, config)
    with open(f"{directory}/chat_template.jinja", "w") as f:
        f.write(MISTRAL_TEMPLATE)
    return directory


@pytest.fixture(params=["llama3_style", "metaspace_style", "smollm2_dir"])
def tokenizer_dir(request):
    return request.getfixturevalue(request.param)


def reference(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def test_encode_and_decode_match_autotokenizer(tokenizer_dir):
    ours, theirs = Tokenizer(tokenizer_dir), reference(tokenizer_dir)
    texts = CORPUS + [text.replace("<|eot_id|>", theirs.eos_token) for text in SPECIAL_TEXTS]
    for text in texts:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        # bos=False: no special token added; bos=True: exactly one BOS in front
        plain = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, bos=False) == plain, text
        assert ours.encode(text, bos=True) == [theirs.bos_token_id] + plain, text
        assert ours.decode(expected) == theirs.decode(expected), text
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)


def conversations():
    """1-, 2- and 3-turn conversations, each with and without a system message."""
    turns = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5. The answer is: 5"},
             {"role": "user", "content": "And  times 4?\nShow the steps 🤔"}]
    system = [{"role": "system", "content": "You are a careful math tutor."}]
    for length in (1, 2, 3):
        yield turns[:length]
        yield system + turns[:length]


def test_chat_templates_render_byte_identical(tokenizer_dir):
    import jinja2

    ours, theirs = Tokenizer(tokenizer_dir), reference(tokenizer_dir)
    rendered = 0
    for messages in conversations():
        for add_generation_prompt in (False, True):
            try:
                expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            except jinja2.exceptions.TemplateError as error:  # the template's own raise_exception
                with pytest.raises(jinja2.exceptions.TemplateError, match=str(error)):
                    ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
                continue
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
            rendered += 1
    assert rendered >= 6  # the Mistral-style template refuses the system-message conversations, no others


def test_generation_stops_at_every_end_id(llama3_style):
    ours = Tokenizer(llama3_style)
    ids = [ours.backend.token_to_id(token) for token in ("<|eot_id|>", "<|end_of_text|>")]
    assert ours.eos_id == ids[0] and sorted(ours.eos_ids) == sorted(ids)


def test_chat_example_tokenizes_like_the_whole_conversation(tokenizer_dir):
    ours, theirs = Tokenizer(tokenizer_dir), reference(tokenizer_dir)
    query, response = "Tom has 3 apples and buys 4 more. How many?", "He has 3 + 4 = 7.\nThe answer is: 7"
    input_ids, labels = tokenize_example(ours, query, response, max_len=10_000, prompt_format="chat")
    user = [{"role": "user", "content": query}]
    prompt = theirs.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    whole = theirs.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False)
    assert input_ids == whole[:len(input_ids)]  # the template's own tokens, cut after the end of the turn
    assert input_ids[-1] in ours.eos_ids and input_ids[-1] not in input_ids[len(prompt):-1]
    assert labels[:len(prompt)] == [-100] * len(prompt) and labels[len(prompt):] == input_ids[len(prompt):]
    assert response.split("\n")[0] in theirs.decode(input_ids[len(prompt):])


# -----------------------------------------------------------------------------
# Alpaca examples as the official preprocess builds them

# Responses whose first characters a tokenizer can join to the prompt's last token(s), ":" and "Response:".
BOUNDARY_RESPONSES = [" 4 + 9 = 13.\nThe answer is: 13", ": 12", "::=", "\n\nStep 1: 3 * 4 = 12", "= 5", "se: 7",
                      ":)", "  two spaces", "-7 + 2 = -5", "", "The answer is: 42"]


def alpaca_pairs():
    """200 MetaMathQA-style (query, response) pairs: the toy MetaMath data, and responses that start
    with what may merge with the prompt's end."""
    pairs = load_examples(os.path.join(ASSETS, "data", "metamath_train.jsonl"), "metamath", 200 - len(BOUNDARY_RESPONSES))
    return pairs + [(f"Question {i}: what follows?", response) for i, response in enumerate(BOUNDARY_RESPONSES)]


def check_official_alpaca(tokenizer, official_ids, official_prompt_length, max_len=10_000):
    """tokenize_example(..., "alpaca") against the official preprocess on alpaca_pairs(): input ids and
    label mask. Returns how many pairs tokenize differently from prompt tokens + response tokens."""
    merged = 0
    pairs = alpaca_pairs()
    assert len(pairs) == 200
    for query, response in pairs:
        prompt = PROMPT_TEMPLATE.format(query=query)
        expected_ids = official_ids(prompt + response)[:max_len]
        source_length = official_prompt_length(prompt)  # label[:source_len] = IGNORE_INDEX
        expected_labels = ([-100] * source_length + expected_ids[source_length:])[:len(expected_ids)]
        input_ids, labels = tokenize_example(tokenizer, query, response, max_len, "alpaca")
        assert input_ids == expected_ids, (query, response)
        assert labels == expected_labels, (query, response)
        separate = official_ids(prompt)[:official_prompt_length(prompt)] + tokenizer.encode(response, bos=False)
        merged += expected_ids[:-1] != separate
    return merged


def test_alpaca_example_is_the_official_preprocess_on_sentencepiece():
    """The official pin (transformers 4.45) tokenizes with the slow LlamaTokenizer, legacy mode, which
    gives BOS + sentencepiece(text) + EOS for text + "</s>" ("</s>" is split off as a special token);
    transformers 5 has no slow tokenizer, so sentencepiece computes it here."""
    import sentencepiece

    directory = os.path.join(ASSETS, "tiny-llama")
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    bos, eos = processor.bos_id(), processor.eos_id()
    tokenizer = Tokenizer(directory)
    merged = check_official_alpaca(tokenizer, lambda text: [bos] + processor.encode(text) + [eos],
                                   lambda prompt: 1 + len(processor.encode(prompt)))
    assert merged >= 190  # sentencepiece's "▁" starts a response encoded alone: nearly every pair differs
    # truncated as the official `tokenizer(..., max_length, truncation=True)`: the cut may take the EOS and the response
    check_official_alpaca(tokenizer, lambda text: ([bos] + processor.encode(text) + [eos])[:40],
                          lambda prompt: min(40, 1 + len(processor.encode(prompt))), max_len=40)


@pytest.mark.parametrize("style", ["llama3_style", "metaspace_style", "smollm2_dir"])
def test_alpaca_example_is_the_official_preprocess_on_tokenizer_json(style, request):
    """A tokenizer.json checkpoint in transformers' fast tokenizer, `tokenizer(text)`: the `tokenizers`
    library with its post-processor, the EOS written as text ("{response}{eos_token}") split off as the
    special token it is."""
    directory = request.getfixturevalue(style)
    tokenizer = Tokenizer(directory)
    eos_text = tokenizer.token_text(tokenizer.eos_id)
    merged = check_official_alpaca(tokenizer,
                                   lambda text: tokenizer.backend.encode(text + eos_text).ids,
                                   lambda prompt: len(tokenizer.backend.encode(prompt).ids))
    assert merged >= 1  # some response joins the prompt's last token: one string is not two


def test_prompt_format_defaults_to_the_checkpoint(llama3_style, tmp_path):
    assert resolve_prompt_format(None, Tokenizer(llama3_style)) == "chat"
    config = json.loads(open(f"{llama3_style}/tokenizer_config.json").read())
    del config["chat_template"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text(open(f"{llama3_style}/tokenizer.json").read())
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(str(plain))
    assert resolve_prompt_format(None, tokenizer) == "alpaca"
    with pytest.raises(ValueError, match="--prompt-format chat: .*plain has no chat template"):
        resolve_prompt_format("chat", tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_directory_without_tokenizer_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(str(tmp_path / "missing"))


def test_unknown_special_token_is_named(llama3_style, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(open(f"{llama3_style}/tokenizer.json").read())
    (broken / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_a_token|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|not_a_token\|>' is not in the vocabulary"):
        Tokenizer(str(broken))


def test_train_nlg_refuses_chat_on_a_checkpoint_without_template(tmp_path):
    """The bundled tiny LLaMA has no chat template: --prompt-format chat stops before --out exists."""
    import train_nlg

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--prompt-format chat: .*tiny-llama has no chat template"):
        train_nlg.main(["--prompt-format", "chat", "--max-steps", "1", "--out", str(out)])
    assert not out.exists()
