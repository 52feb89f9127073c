"""
Text in, token ids out: the tokenizers, chat templates, data formats and collate functions that
train_nlg.py, train_nlu.py, eval.py and the tools share. model.py holds only models and weights.

  Tokenizer          a causal LM's tokenizer.json (the `tokenizers` library) or tokenizer.model
                     (sentencepiece), with the checkpoint's BOS/EOS rules and chat template, behaving
                     as transformers' AutoTokenizer on the same directory
  DebertaTokenizer   DeBERTa-v3's spm.model, [CLS] A [SEP] (B [SEP])
  RobertaTokenizer   RoBERTa's byte-level BPE (tokenizer.json or vocab.json + merges.txt), <s> A </s>(</s> B </s>)
  T5Tokenizer        T5's sentencepiece vocabulary (tokenizer.json or spiece.model), A </s>(B </s>)
  load_records       rows of a local .jsonl/.json/.parquet file, or of a `datasets` hub name or local dataset
                     directory (a sub-directory of it with data_dir)
  query_and_response the (query, response) of a record under --format
  prompt_ids, tokenize_example, collate
                     an instruction example as tokens, the prompt masked out of the loss, in the
                     Alpaca prompt of PiSSA / MetaMath or the checkpoint's own chat template
"""

import json
import os
import re
from datetime import datetime

import torch

# -----------------------------------------------------------------------------
# Causal LM tokenizer


def parse_json(raw, where, expected, text_errors="strict"):
    """
    The JSON value (of type `expected`) in `raw` bytes; anything else is a ValueError naming `where`.
    text_errors="surrogateescape" reads bytes that are not UTF-8 as lone surrogates instead.
    """
    try:
        value = json.loads(raw.decode("utf-8", text_errors))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(value, expected):
        raise ValueError(f"{where}: expected a JSON {expected.__name__}, got {type(value).__name__}")
    return value


def _read_json(path):
    """The dict in a JSON file, {} when the file does not exist; a bad file is named in the error."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        return parse_json(f.read(), path, dict)


def _token_content(token):
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def _as_list(ids):
    """An `eos_token_id` entry of a config: None, an int, or a list of ints."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _chat_template_source(directory, tokenizer_config):
    """
    The chat template's jinja source, where transformers looks for it: chat_template.jinja first, then
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: the "default"
    one). None when the checkpoint has none.
    """
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def compile_chat_template(source):
    """
    A jinja2 template in the environment transformers renders chat templates with, so that both give
    byte-identical strings: a sandbox (templates come from the hub: no attribute tricks), trim_blocks
    and lstrip_blocks (templates are written with one tag a line and expect those lines to vanish),
    loop controls, `tojson` without HTML escaping, and the helpers templates call: raise_exception,
    strftime_now. A `{% generation %}` block (transformers' marker for assistant tokens) renders its
    body as is.
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)


class Tokenizer:
    """
    A causal LM's tokenizer from its checkpoint directory, read as transformers' AutoTokenizer reads it:
      tokenizer.json (Llama-3, Qwen2.5/3, SmolLM2, Mistral) with the `tokenizers` library, else
      tokenizer.model (LLaMA-2 style sentencepiece); tokenizer_config.json for the special tokens,
      `add_bos_token` / `add_eos_token` and the chat template (or chat_template.jinja);
      generation_config.json / config.json for the ids that end a generation.

    Attributes: bos_id, eos_id (the tokenizer's EOS, which training appends), eos_ids (every id that
    ends generation: EOS plus the end-of-turn ids of generation_config.json, e.g. Llama-3-Instruct's
    <|eot_id|>), pad_id (pad token, else EOS: attention masks padding out anyway), vocab_size (every id,
    added tokens included), chat_template (jinja source or None), path.
    """

    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model {path!r} does not exist")
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        self.path = directory
        self.config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(directory, "config.json"))
        generation_config = _read_json(os.path.join(directory, "generation_config.json"))
        json_file, sentencepiece_file = (os.path.join(directory, name) for name in ("tokenizer.json", "tokenizer.model"))
        if os.path.isfile(path) and path.endswith(".model"):
            json_file = None  # a sentencepiece file named directly
        if json_file and os.path.isfile(json_file):
            self._load_tokenizer_json(json_file)
        elif os.path.isfile(sentencepiece_file):
            self._load_sentencepiece(sentencepiece_file)
        else:
            raise FileNotFoundError(f"{directory!r} has no tokenizer: expected tokenizer.json or tokenizer.model")
        for name in ("bos", "eos"):
            token = _token_content(self.config.get(f"{name}_token"))
            if token is not None:  # tokenizer_config.json names the special token: its id wins
                setattr(self, f"{name}_id", self._token_id(token, f"{name}_token"))
            elif getattr(self, f"{name}_id") is None:
                setattr(self, f"{name}_id", model_config.get(f"{name}_token_id"))
        pad_token = _token_content(self.config.get("pad_token"))
        self.pad_id = self._token_id(pad_token, "pad_token") if pad_token is not None else self.eos_id or 0
        self.eos_ids = list(dict.fromkeys(
            [i for i in [self.eos_id] if i is not None]
            + _as_list(generation_config.get("eos_token_id", model_config.get("eos_token_id")))))
        self.chat_template = _chat_template_source(directory, self.config)
        self._compiled_template = None

    def _load_tokenizer_json(self, json_file):
        import tokenizers

        self.backend = tokenizers.Tokenizer.from_file(json_file)
        self._sentencepiece = None
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        # Without tokenizer_config.json's tokens the ids come from config.json (set by the caller).
        self.bos_id = self.eos_id = None

    def _load_sentencepiece(self, model_file):
        import sentencepiece

        self._sentencepiece = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.backend = None
        self.vocab_size = self._sentencepiece.get_piece_size()
        self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self._sentencepiece.bos_id(), self._sentencepiece.eos_id()))

    def _token_id(self, token, key):
        """The id of a special token named in tokenizer_config.json; an error if the vocabulary lacks it."""
        if self.backend is not None:
            token_id = self.backend.token_to_id(token)
        else:  # sentencepiece maps an unknown piece to <unk>: check that the id spells the token
            token_id = self._sentencepiece.piece_to_id(token)
            token_id = token_id if self._sentencepiece.id_to_piece(token_id) == token else None
        if token_id is None:
            raise ValueError(f"{os.path.join(self.path, 'tokenizer_config.json')}: {key} {token!r} is not in the vocabulary")
        return token_id

    def token_text(self, token_id):
        """The string of one token id (a special token's text, e.g. '<|im_end|>')."""
        return self.backend.id_to_token(token_id) if self.backend else self._sentencepiece.id_to_piece(token_id)

    def encode(self, text, bos=None, eos=False):
        """
        Token ids of `text`. bos=None: the checkpoint's own rule, so that encode(text) equals
        AutoTokenizer(dir)(text)["input_ids"]: for tokenizer.json its post-processor (Llama-3's adds
        <|begin_of_text|>, Qwen's adds nothing; transformers 5 ignores add_bos_token next to a
        tokenizer.json), for sentencepiece tokenizer_config.json's add_bos_token / add_eos_token
        (LLaMA-2: BOS, no EOS). bos=True/False forces BOS on or off, with no other special token.
        eos=True appends EOS. Special-token strings in `text` become their ids, as in transformers.
        """
        if bos is None and self.backend is not None:
            ids = self.backend.encode(text, add_special_tokens=True).ids  # the post-processor decides
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids if self.backend else self._sentencepiece.encode(text)
            if bos is None:
                bos = self.config.get("add_bos_token", True)
                eos = eos or self.config.get("add_eos_token", False)
            if bos:
                if self.bos_id is None:
                    raise ValueError(f"{self.path}: a BOS token was asked for but the tokenizer has none")
                ids = [self.bos_id] + ids
        if eos and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        """The text of `ids`, special tokens kept (transformers' decode with its defaults)."""
        ids = list(ids)
        if self.backend is None:
            return self._sentencepiece.decode(ids)
        text = self.backend.decode(ids, skip_special_tokens=False)
        # transformers' clean-up of " ." and " n't" is meant for WordPiece; it skips it for BPE.
        if self.config.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(spaced, joined)
        return text

    def apply_chat_template(self, messages, add_generation_prompt=False):
        """
        The conversation `messages` ([{"role": ..., "content": ...}, ...]) rendered by the checkpoint's
        chat template: the string transformers' apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...) returns. Encode it with bos=False: templates write BOS themselves.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.path}: the checkpoint has no chat template (no chat_template.jinja, no "
                             "`chat_template` in tokenizer_config.json); use --prompt-format alpaca")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        # The special tokens are template variables, as transformers passes its special_tokens_map.
        special = {key: _token_content(self.config[key]) for key in
                   ("bos_token", "eos_token", "unk_token", "pad_token") if self.config.get(key) is not None}
        return self._compiled_template.render(messages=messages, tools=None, documents=None,
                                              add_generation_prompt=add_generation_prompt, **special)

    def pad_batch(self, sequences, padding_side="right"):
        """(input_ids, attention_mask) LongTensors (B, longest); left padding for generation."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        return input_ids, attention_mask


# -----------------------------------------------------------------------------
# DeBERTa-v3 tokenizer (train_nlu.py, eval.py glue / cluster)


class DebertaTokenizer:
    """
    DeBERTa-v3's sentencepiece spm.model with its special ids [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3:
    a sentence is [CLS] A [SEP], a pair [CLS] A [SEP] B [SEP]. As in transformers, a special token
    written in a text is that token, and [MASK] is one too: the spm's piece, or the id after its last
    (DeBERTa-v3: 128000).

    Any spm.model with those four pieces at ids 0-3 works; one trained with
    sentencepiece.SentencePieceTrainer.train(..., pad_id=0, pad_piece="[PAD]", bos_id=1,
    bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]") has them.
    """

    pad_id, cls_id, sep_id, unk_id = 0, 1, 2, 3
    special_pieces = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]

    def __init__(self, path):
        import sentencepiece

        model_file = os.path.join(path, "spm.model") if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"no sentencepiece model at {model_file!r}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        pieces = [self.sp.id_to_piece(i) for i in range(min(4, self.sp.get_piece_size()))]
        if pieces != self.special_pieces or self.sp.unk_id() != self.unk_id:
            raise ValueError(f"{model_file!r}: ids 0-3 are {pieces} (unk id {self.sp.unk_id()}), "
                             f"expected {self.special_pieces} as in DeBERTa-v3")
        mask_id = self.sp.piece_to_id("[MASK]")
        if mask_id == self.unk_id:  # not a piece of the spm: transformers adds it after the last
            mask_id = self.sp.get_piece_size()
        self.special_ids = {piece: i for i, piece in enumerate(self.special_pieces)} | {"[MASK]": mask_id}
        # one group of all of them: re.split keeps each special it splits at
        self.special_split = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")
        self.vocab_size = max(self.sp.get_piece_size(), mask_id + 1)

    def pieces(self, text):
        """The spm ids of `text`, the special tokens written in it as their ids: each text between two is
        encoded on its own, as transformers' added-token split does ("a[SEP]b" -> ▁a [SEP] ▁b)."""
        ids = []
        for segment in self.special_split.split(text):
            ids += [self.special_ids[segment]] if segment in self.special_ids else self.sp.encode(segment)
        return ids

    def encode(self, text_a, text_b=None, max_length=128):
        """[CLS] A [SEP] (B [SEP]) ids, at most max_length; a pair is truncated longest-first."""
        a = self.pieces(text_a)
        if text_b is None:
            if max_length < 2:
                raise ValueError(f"max_length={max_length}: a sentence needs at least 2 ([CLS], [SEP])")
            return [self.cls_id] + a[: max_length - 2] + [self.sep_id]
        if max_length < 3:
            raise ValueError(f"max_length={max_length}: a pair needs at least 3 ([CLS], [SEP], [SEP])")
        a, b = truncate_longest_first(a, self.pieces(text_b), max_length - 3)
        return [self.cls_id] + a + [self.sep_id] + b + [self.sep_id]

    def encode_batch(self, texts_a, texts_b=None, max_length=128):
        """(input_ids, attention_mask) LongTensors (B, longest), right padded with pad_id ([PAD] = 0, RoBERTa: <pad>)."""
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"texts_b has {len(texts_b)} texts for {len(texts_a)} texts_a")
        sequences = [self.encode(a, None if texts_b is None else texts_b[n], max_length) for n, a in enumerate(texts_a)]
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


# -----------------------------------------------------------------------------
# RoBERTa tokenizer (train_nlu.py, eval.py glue / cluster on a RoBERTa --model)


class RobertaTokenizer:
    """
    RoBERTa's byte-level BPE (GPT-2's: text as bytes mapped to printable characters, "Ġ" marking a
    leading space, merges.txt's merges applied in rank order), run by the `tokenizers` library from
    tokenizer.json, or from vocab.json + merges.txt as transformers' RobertaTokenizer builds it. A
    sentence is <s> A </s>, a pair <s> A </s></s> B </s> (RoBERTa's doubled separator). The ids of
    <s>, <pad>, </s>, <unk> are read from the vocabulary (roberta-base: 0, 1, 2, 3).
    """

    special_tokens = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

    def __init__(self, path):
        import tokenizers

        json_file, vocab_file, merges_file = (os.path.join(path, name)
                                              for name in ("tokenizer.json", "vocab.json", "merges.txt"))
        if os.path.isfile(json_file):
            self.backend, source = tokenizers.Tokenizer.from_file(json_file), json_file
        elif os.path.isfile(vocab_file) and os.path.isfile(merges_file):
            self.backend, source = self._from_vocab_and_merges(path, vocab_file, merges_file), vocab_file
        else:
            raise FileNotFoundError(f"{path!r} has no RoBERTa tokenizer: expected tokenizer.json or vocab.json + merges.txt")
        ids = {token: self.backend.token_to_id(token) for token in self.special_tokens[:4]}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise ValueError(f"{source}: no {missing} in the vocabulary, which RoBERTa's special tokens need")
        self.cls_id, self.pad_id, self.sep_id, self.unk_id = (ids[token] for token in self.special_tokens[:4])
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _from_vocab_and_merges(path, vocab_file, merges_file):
        """transformers' RobertaTokenizer on the two files: plain BPE, byte-level pre-tokenizer, specials whole."""
        import tokenizers

        add_prefix_space = _read_json(os.path.join(path, "tokenizer_config.json")).get("add_prefix_space", False)
        backend = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab_file, merges_file))
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = tokenizers.decoders.ByteLevel()
        # "<s>" written in a text is the special token, not the bytes <, s, > (as in transformers)
        backend.add_special_tokens([token for token in RobertaTokenizer.special_tokens
                                    if backend.token_to_id(token) is not None])
        return backend

    def encode(self, text_a, text_b=None, max_length=128):
        """<s> A </s>(</s> B </s>) ids, at most max_length; a pair is truncated longest-first."""
        a = self.backend.encode(text_a, add_special_tokens=False).ids
        if text_b is None:
            if max_length < 2:
                raise ValueError(f"max_length={max_length}: a sentence needs at least 2 (<s>, </s>)")
            return [self.cls_id] + a[: max_length - 2] + [self.sep_id]
        if max_length < 4:
            raise ValueError(f"max_length={max_length}: a pair needs at least 4 (<s>, </s>, </s>, </s>)")
        a, b = truncate_longest_first(a, self.backend.encode(text_b, add_special_tokens=False).ids, max_length - 4)
        return [self.cls_id] + a + [self.sep_id, self.sep_id] + b + [self.sep_id]

    # the same batching as DeBERTa's: right padded with this tokenizer's pad id
    encode_batch = DebertaTokenizer.encode_batch


# -----------------------------------------------------------------------------
# T5 tokenizer (train_nlu.py on a T5 --model)


class T5Tokenizer:
    """
    T5's sentencepiece vocabulary, from tokenizer.json (the `tokenizers` library) or spiece.model
    (sentencepiece), with <pad>, </s>, <unk> read from it (T5: 0, 1, 2). A sentence is A </s>, a pair
    A </s> B </s>, as transformers' T5 tokenizer builds them; T5 has no start token.
    """

    def __init__(self, path):
        json_file, sentencepiece_file = (os.path.join(path, name) for name in ("tokenizer.json", "spiece.model"))
        if os.path.isfile(json_file):
            import tokenizers

            backend = tokenizers.Tokenizer.from_file(json_file)
            self.pieces, token_id, source = (lambda text: backend.encode(text, add_special_tokens=False).ids,
                                             backend.token_to_id, json_file)
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        elif os.path.isfile(sentencepiece_file):
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_file)
            self.pieces, source = sp.encode, sentencepiece_file
            token_id = lambda piece: sp.piece_to_id(piece) if sp.id_to_piece(sp.piece_to_id(piece)) == piece else None
            self.vocab_size = sp.get_piece_size()
        else:
            raise FileNotFoundError(f"{path!r} has no T5 tokenizer: expected tokenizer.json or spiece.model")
        ids = {piece: token_id(piece) for piece in ("<pad>", "</s>")}
        missing = [piece for piece, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: no {missing} in the vocabulary, which T5's special tokens need")
        self.pad_id, self.eos_id = ids["<pad>"], ids["</s>"]

    def encode(self, text_a, text_b=None, max_length=128):
        """A </s> (B </s>) ids, at most max_length; a pair is truncated longest-first."""
        a = self.pieces(text_a)
        if text_b is None:
            if max_length < 1:
                raise ValueError(f"max_length={max_length}: a sentence needs at least 1 (</s>)")
            return a[: max_length - 1] + [self.eos_id]
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: a pair needs at least 2 (</s>, </s>)")
        a, b = truncate_longest_first(a, self.pieces(text_b), max_length - 2)
        return a + [self.eos_id] + b + [self.eos_id]

    # the same batching as DeBERTa's: right padded with this tokenizer's pad id
    encode_batch = DebertaTokenizer.encode_batch


def truncate_longest_first(a, b, budget):
    """
    Drop tokens from the ends of a and b until len(a) + len(b) <= budget, as the `tokenizers` library's
    "longest_first" (what transformers' DeBERTa-v2 and RoBERTa tokenizers run): the shorter text is kept
    whole if the longer can still have as many tokens, else both get half the budget, the odd token of
    an odd budget going to the longer text (to b on ties).
    """
    if len(a) + len(b) <= budget:
        return a, b
    a_is_longer = len(a) > len(b)
    shorter = len(b) if a_is_longer else len(a)
    if shorter <= budget - shorter:  # the longer is cut down to what the shorter leaves
        keep_shorter, keep_longer = shorter, budget - shorter
    else:  # both are cut to half
        keep_shorter, keep_longer = budget // 2, budget - budget // 2
    keep_a, keep_b = (keep_longer, keep_shorter) if a_is_longer else (keep_shorter, keep_longer)
    return a[:keep_a], b[:keep_b]


# -----------------------------------------------------------------------------
# Records: a local file or a hub dataset, and the (query, response) of each under --format


# --format -> (query field, response field); alpaca also appends a non-empty "input" to the query,
# wizardlm may instead hold a `conversations` list [{"from": "human", ...}, {"from": "gpt", ...}].
# pissa: fxmeng/pissa-dataset, whose fields the official script names (scripts/ba-lora.sh's
# --dataset_field instruction output, llm172/BA-LoRA at 2829797): nothing else is read.
# gsm8k: GSM8K's own records (openai/gsm8k, assets/data/gsm8k), the answer rewritten in MetaMath's
# format (metamath_response), the one the metamath data and eval.py's answer reading use.
FORMATS = {
    "metamath": ("query", "response"),
    "pissa": ("instruction", "output"),
    "codefeedback": ("query", "answer"),
    "wizardlm": ("instruction", "output"),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
}


def metamath_response(answer):
    """
    A GSM8K solution in MetaMath's format, the one eval.py's gsm8k extraction reads (paper protocol):
    the calculator annotations <<48/2=24>> removed and the final "#### 72" written "The answer is: 72".
    """
    steps, _, final = re.sub(r"<<[^>]*>>", "", answer).rpartition("####")
    return f"{steps.strip()}\nThe answer is: {final.strip()}"


def query_and_response(record, data_format, index=0):
    """(query, response) strings of one record under --format; ValueError naming missing fields."""
    if data_format == "wizardlm" and "conversations" in record:
        turns = record["conversations"]
        human = next((i for i, turn in enumerate(turns) if turn.get("from") == "human"), None)
        if human is None or human + 1 >= len(turns) or turns[human + 1].get("from") != "gpt":
            raise ValueError(f"record {index}: `conversations` needs a 'human' turn followed by a 'gpt' turn")
        return turns[human]["value"], turns[human + 1]["value"]
    query_field, response_field = FORMATS[data_format]
    missing = [field for field in (query_field, response_field) if field not in record]
    if missing:
        alternative = " (or `conversations`)" if data_format == "wizardlm" else ""
        fits = [name for name, fields in FORMATS.items() if all(field in record for field in fields)]
        hint = f": pass --format {' or '.join(fits)}" if fits else ""
        raise ValueError(f"--format {data_format} needs the fields {missing}{alternative}; "
                         f"record {index} has {sorted(record)}{hint}")
    for field in (query_field, response_field):
        if not isinstance(record[field], str):
            raise ValueError(f"record {index}: field {field!r} is {record[field]!r}, expected a string")
    query, response = record[query_field], record[response_field]
    if data_format == "alpaca" and record.get("input"):
        query = f"{query}\n{record['input']}"
    if data_format == "gsm8k":
        if "####" not in response:
            raise ValueError(f"record {index}: --format gsm8k needs an answer ending in '#### <number>', got {response[-60:]!r}")
        response = metamath_response(response)
    return query, response


def load_records(data, limit=None, split="train", config=None, data_dir=None):
    """
    The first `limit` rows (dicts; all when None) of a local .jsonl/.json/.parquet file, or of `split`
    of a `datasets` hub name or local dataset directory, read from its sub-directory `data_dir` when
    given (the official BA-LoRA script trains on fxmeng/pissa-dataset, data_dir "metamath", split
    "train[:100000]"). eval.py reads its benchmarks through this too.
    """
    if not os.path.isfile(data):
        if data.endswith((".jsonl", ".json", ".parquet", ".txt", ".csv", ".tsv")) and not os.path.isdir(data):
            raise FileNotFoundError(f"--data {data!r} does not exist")
        split = split if limit is None else f"{split}[:{limit}]"
        return load_hub_dataset(data, config, split, data_dir=data_dir).to_list()
    if data_dir is not None:
        raise ValueError(f"--data-dir {data_dir!r} names a sub-directory of a dataset directory or hub name; "
                         f"--data {data!r} is a file, read as it is (drop --data-dir)")
    extension = os.path.splitext(data)[1]
    if extension == ".jsonl":
        records = read_jsonl(data)
    elif extension == ".json":
        with open(data, "rb") as f:
            records = parse_json(f.read(), f"--data {data}", list)
    elif extension == ".parquet":
        import pyarrow.parquet

        records = pyarrow.parquet.read_table(data).to_pylist()
    elif extension == ".csv":  # a header row names the fields
        import csv

        with open(data, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        raise ValueError(f"--data {data!r}: expected a .jsonl, .json, .parquet or .csv file, or a datasets hub name")
    return records if limit is None else records[:limit]


def load_hub_dataset(name, config, split, local_flag="--data FILE", data_dir=None):
    """`split` of the `datasets` hub dataset (or local dataset directory) `name`, from its sub-directory
    `data_dir` when given; offline (the hub unreachable), a one-line error that says which flag takes a
    local file instead."""
    import datasets

    try:
        if not os.path.isdir(name) and not hub_reachable():  # datasets alone retries for ~30 s before it says so
            datasets.config.HF_HUB_OFFLINE = True  # then only its cache is read, at once
        return datasets.load_dataset(name, config, data_dir=data_dir, split=split)
    except ConnectionError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConnectionError(f"{name!r} is not a local file and the hub cannot be reached ({reason}); "
                              f"offline, pass {local_flag}, a local file") from None


def hub_reachable():
    """Whether the hub answers (any HTTP answer counts), asked once with a short timeout; False offline
    (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) without asking."""
    import datasets
    import huggingface_hub

    if datasets.config.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
    except Exception:  # the connection failed: no network, no DNS, a proxy refusing
        return False
    return True


def read_jsonl(path):
    """The records of a JSON-lines file; a line that is not UTF-8 or not a JSON object is named by its
    line number in the file (blank lines count, as an editor counts them)."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                records.append(parse_json(raw, f"--data {path}, line {number}", dict))
    return records


def load_examples(data, data_format, max_samples, data_dir=None):
    """(query, response) pairs of the first `max_samples` records (of the sub-directory `data_dir`) under --format."""
    records = load_records(data, max_samples, data_dir=data_dir)
    try:
        examples = [query_and_response(record, data_format, i) for i, record in enumerate(records)]
    except ValueError as error:
        raise ValueError(f"--data {data}: {error}") from None
    if not examples:
        raise ValueError(f"--data {data!r} gave no examples (empty file, or --max-samples {max_samples})")
    return examples


# A blend (Fig. 5's MetaMathQA-100K + CodeFeedback-100K): comma-separated sources, each
# SOURCE[#DATA_DIR][@FORMAT]:N, the first N records of a hub name, dataset directory (its sub-directory
# DATA_DIR, as --data-dir) or local file, in its own format (--format where none is named):
# "meta-math/MetaMathQA:100000,m-a-p/CodeFeedback-Filtered-Instruction@codefeedback:100000".
_BLEND_SOURCE = re.compile(r"^(?P<source>[^#]+?)(?:#(?P<data_dir>[^@]+))?(?:@(?P<format>[\w-]+))?:(?P<count>\d+)$")


def blend_sources(data):
    """[(source, data_dir or None, format or None, N)] of a blend spec; None when `data` is one source (an
    existing path, or no `:N`)."""
    if os.path.exists(data) or ("," not in data and not _BLEND_SOURCE.match(data)):
        return None
    sources = []
    for part in data.split(","):
        match = _BLEND_SOURCE.match(part.strip())
        if match is None or int(match["count"]) == 0:
            raise ValueError(f"--data {data!r}: {part!r} is not SOURCE[#DATA_DIR][@FORMAT]:N (N > 0 records) of a blend")
        if match["format"] is not None and match["format"] not in FORMATS:
            raise ValueError(f"--data {data!r}: format {match['format']!r} of {match['source']!r} is not one of "
                             f"{sorted(FORMATS)}")
        sources.append((match["source"], match["data_dir"], match["format"], int(match["count"])))
    return sources


def load_blend(data, data_format, seed, max_samples=None, data_dir=None):
    """
    (query, response) pairs of a blend spec (blend_sources): each source's first N records in its format,
    concatenated and shuffled by a permutation drawn from `seed`, then the first `max_samples` (None: all).
    A pure function of its arguments, so a resumed run rebuilds the same list. A source with fewer than
    N records is an error naming it, not a smaller share of the blend.
    """
    if data_dir is not None:
        raise ValueError(f"--data-dir {data_dir!r} reads one dataset's sub-directory; in a blend write SOURCE#DATA_DIR")
    examples = []
    for source, source_dir, source_format, count in blend_sources(data):
        source_examples = load_examples(source, source_format or data_format, count, source_dir)
        if len(source_examples) < count:
            raise ValueError(f"--data {data!r}: {source!r} has {len(source_examples)} records, the blend asks for {count}")
        examples += source_examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order][:max_samples]


# -----------------------------------------------------------------------------
# Prompts: Alpaca (PiSSA / MetaMath fine-tune base models with it) or the checkpoint's chat template

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{query}\n\n### Response:"
)

PROMPT_FORMATS = ("alpaca", "chat")


def resolve_prompt_format(prompt_format, tokenizer):
    """--prompt-format: as given, else chat when the checkpoint has a chat template, alpaca otherwise."""
    if prompt_format is None:
        return "chat" if tokenizer.chat_template is not None else "alpaca"
    if prompt_format == "chat" and tokenizer.chat_template is None:
        raise ValueError(f"--prompt-format chat: {tokenizer.path} has no chat template "
                         "(chat_template.jinja or tokenizer_config.json `chat_template`)")
    return prompt_format


def prompt_ids(tokenizer, query, prompt_format):
    """
    The token ids a model sees before its answer: the Alpaca prompt (with the checkpoint's BOS rule),
    or the chat template rendered with one user turn and the generation prompt (the template writes
    its own BOS). Training (tokenize_example) and evaluation (eval.py) both call this.
    """
    if prompt_format == "alpaca":
        return tokenizer.encode(PROMPT_TEMPLATE.format(query=query))
    user_turn = [{"role": "user", "content": query}]
    return tokenizer.encode(tokenizer.apply_chat_template(user_turn, add_generation_prompt=True), bos=False)


def chat_example_ids(tokenizer, query, response):
    """
    (prompt tokens, response tokens) of a chat example. The template renders the user turn with the
    generation prompt (the prompt, as prompt_ids gives it) and the two-turn conversation; the response
    is what follows the prompt up to and including the first end-of-turn token (any of
    tokenizer.eos_ids: SmolLM2's and Qwen's <|im_end|>, Llama-3's <|eot_id|>), which is what the model
    must learn to emit. The prompt's tokens must be a prefix of the conversation's tokens: then
    prompt + response is exactly the template's tokenization of the conversation, with no merge
    across the boundary.
    """
    user_turn = [{"role": "user", "content": query}]
    prompt = tokenizer.apply_chat_template(user_turn, add_generation_prompt=True)
    conversation = tokenizer.apply_chat_template(user_turn + [{"role": "assistant", "content": response}])
    if not conversation.startswith(prompt):
        raise ValueError(f"{tokenizer.path}: the chat template renders the conversation without its own "
                         "generation prompt as a prefix; it cannot be used for supervised fine-tuning")
    end_texts = [tokenizer.token_text(i) for i in tokenizer.eos_ids]
    found = [(start, text) for text in end_texts if (start := conversation.find(text, len(prompt))) >= 0]
    if not found:
        raise ValueError(f"{tokenizer.path}: the chat template writes none of the end-of-turn tokens "
                         f"{end_texts} after the assistant turn")
    start, text = min(found, key=lambda hit: (hit[0], len(hit[1])))  # the first end of turn
    prompt_tokens = tokenizer.encode(prompt, bos=False)
    conversation_tokens = tokenizer.encode(conversation[:start + len(text)], bos=False)
    if conversation_tokens[:len(prompt_tokens)] != prompt_tokens:
        raise ValueError(f"{tokenizer.path}: the chat prompt's tokens are not a prefix of the conversation's "
                         f"(a token merges across the boundary) for the query {query[:40]!r}")
    return prompt_tokens, conversation_tokens[len(prompt_tokens):]


def tokenize_example(tokenizer, query, response, max_len, prompt_format="alpaca"):
    """
    input_ids and labels of one example: prompt + response, cut at max_len, the prompt masked out of
    the loss (label -100).

    Alpaca, as the official `preprocess` (llm172/BA-LoRA train.py, commit 2829797) builds it: prompt +
    response + EOS is tokenized as ONE string, and its first len(tokenize(prompt)) labels are masked.
    The response therefore follows "### Response:" with no space of its own, and a tokenizer may merge
    tokens across the boundary (sentencepiece then writes ':', 'W', 'e', not the ':', '▁W', 'e' of the
    response encoded alone): the mask counts the prompt's own tokens all the same, as there.
    Chat: the response is the assistant turn with its end-of-turn token (chat_example_ids).
    """
    if prompt_format == "alpaca":
        prompt_text = PROMPT_TEMPLATE.format(query=query)
        prompt_length = len(tokenizer.encode(prompt_text))  # with the checkpoint's BOS rule, as the joint string
        input_ids = tokenizer.encode(prompt_text + response, eos=True)
        labels = [-100] * prompt_length + input_ids[prompt_length:]
        return input_ids[:max_len], labels[:len(input_ids)][:max_len]
    prompt, response_ids = chat_example_ids(tokenizer, query, response)
    input_ids = (prompt + response_ids)[:max_len]
    labels = ([-100] * len(prompt) + response_ids)[:max_len]
    return input_ids, labels


def collate(tokenizer, examples, max_len, prompt_format="alpaca"):
    """(input_ids, attention_mask, labels) of a micro-batch, right padded (labels padded with -100)."""
    tokenized = [tokenize_example(tokenizer, query, response, max_len, prompt_format) for query, response in examples]
    input_ids, attention_mask = tokenizer.pad_batch([ids for ids, _ in tokenized], padding_side="right")
    labels = torch.full_like(input_ids, -100)
    for row, (_, row_labels) in enumerate(tokenized):
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
    return input_ids, attention_mask, labels
