"""
T5 (Raffel et al., 2020), the encoder-decoder of Table 3's T5-base GLUE runs, written from scratch in
plain PyTorch. Its attention math is shared with neither of model.py's families (relative position
buckets added to unscaled scores, a decoder with cross-attention), so it lives here; checkpoints load
through model.py's readers, without the transformers library.

  T5            shared embedding + encoder + decoder: the decoder's last hidden states
  T5LM          T5 + the LM head (T5ForConditionalGeneration): logits over the vocabulary
  T5Classifier  T5 + a classification head on the decoder's state at the last </s>
                (T5ForSequenceClassification): the GLUE model train_nlu.py trains

One module, both families of checkpoints: T5 v1.0 (t5-base: ReLU feed-forward, tied embeddings, the
decoder output rescaled by d_model^-0.5) and v1.1 / Flan-T5 (gated-GELU feed-forward, an untied LM head,
no rescale), told apart by config.json's feed_forward_proj and the checkpoint's lm_head.weight.

Hugging Face key layout; our module names are the same, so a checkpoint key is a parameter name
(T5ForSequenceClassification puts `transformer.` before every backbone key):

  shared.weight                                                (vocab, d_model)
  encoder.block.{i}.layer.0.SelfAttention.q / k / v .weight    (heads * d_kv, d_model)
  encoder.block.{i}.layer.0.SelfAttention.o.weight             (d_model, heads * d_kv)
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (num_buckets, heads)  block 0 only
  encoder.block.{i}.layer.0.layer_norm.weight                  (d_model,)
  encoder.block.{i}.layer.1.DenseReluDense.wi.weight           (d_ff, d_model)     relu
  encoder.block.{i}.layer.1.DenseReluDense.wi_0 / wi_1.weight  (d_ff, d_model)     gated-gelu
  encoder.block.{i}.layer.1.DenseReluDense.wo.weight           (d_model, d_ff)
  encoder.block.{i}.layer.1.layer_norm.weight                  (d_model,)
  encoder.final_layer_norm.weight                              (d_model,)
  decoder.block.{i}.layer.0.SelfAttention.*                    as the encoder's (causal buckets)
  decoder.block.{i}.layer.1.EncDecAttention.q / k / v / o.weight   cross-attention, no position bias
  decoder.block.{i}.layer.1.layer_norm.weight
  decoder.block.{i}.layer.2.DenseReluDense.* / layer_norm.weight   the feed-forward
  decoder.final_layer_norm.weight
  lm_head.weight                                               (vocab, d_model)  absent when tied
  classification_head.dense.weight / .bias                     (d_model, d_model)     sequence classification
  classification_head.out_proj.weight / .bias                  (num_labels, d_model)  sequence classification

Skipped when present: encoder.embed_tokens.weight / decoder.embed_tokens.weight (copies of shared.weight
older checkpoints store) and decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight
(a table some old checkpoints carry that T5 never reads).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm, _assign, checkpoint_keys, config_from, load_checkpoint_into

# -----------------------------------------------------------------------------
# Config


FEED_FORWARD = {"relu": False, "gated-gelu": True}  # feed_forward_proj -> gated


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # width of one attention head; heads * d_kv need not equal d_model
    d_ff: int
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    gated: bool = False  # v1.1 / Flan-T5: gelu_new(wi_0 x) * wi_1 x; v1.0: relu(wi x)
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model^-0.5 before the LM head
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from <pad>
    classifier_dropout: float = 0.0
    initializer_factor: float = 1.0  # scales the std of a fresh classification head
    model_type: str = "t5"

    @classmethod
    def from_hf(cls, config):
        """Read a Hugging Face config.json dict of model_type t5 (transformers 4.x or 5.x)."""
        if config.get("model_type") != "t5":
            raise ValueError(f"model_type={config.get('model_type')!r} is not supported: expected 't5'")
        feed_forward = config.get("feed_forward_proj", "relu")
        if feed_forward not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj={feed_forward!r} is not supported: expected relu (T5) or "
                             "gated-gelu (T5 v1.1, Flan-T5)")
        eos_token_id = config.get("eos_token_id", 1)
        if not isinstance(eos_token_id, int):
            raise ValueError(f"eos_token_id={eos_token_id!r} is not supported: expected one id")
        # The rescale belongs to the tied head of the original T5. transformers 4 wrote that as
        # tie_word_embeddings (false in v1.1 / Flan-T5 configs); transformers 5 always ties in its
        # config and writes the rescale as scale_decoder_outputs.
        scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False)
        pad_token_id = config.get("pad_token_id", 0)
        start = config.get("decoder_start_token_id")
        return cls(
            vocab_size=config["vocab_size"],
            d_model=config["d_model"],
            d_kv=config["d_kv"],
            d_ff=config["d_ff"],
            num_layers=config["num_layers"],
            num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
            num_heads=config["num_heads"],
            relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
            dropout_rate=config.get("dropout_rate", 0.1),
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
            gated=FEED_FORWARD[feed_forward],
            scale_decoder_outputs=bool(scale),
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=pad_token_id if start is None else start,
            classifier_dropout=config.get("classifier_dropout") or 0.0,
            initializer_factor=config.get("initializer_factor", 1.0),
        )


# -----------------------------------------------------------------------------
# Relative position buckets and attention


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """
    The bucket (LongTensor, the shape of relative_position) of each distance key - query.

    Half of the buckets hold one distance each (0, 1, ..., num_buckets/2 - 1); the other half cover
    distances up to max_distance in logarithmically wider bins, and every farther distance shares the
    last bucket. Bidirectional (the encoder): the buckets are split in two, the upper half for keys
    after the query. Causal (the decoder): keys after the query are never attended, so they all fall
    in bucket 0 and only the distance back is bucketed.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets  # a key after the query
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # how far back the key is; 0 for keys ahead
    exact = num_buckets // 2
    # log bins: exact + (num_buckets - exact) * log(distance / exact) / log(max_distance / exact), truncated
    # (the clamp only keeps the log finite where the exact bucket is taken instead)
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


def additive_mask(visible, dtype):
    """0 where `visible` (bool), the dtype's most negative finite value elsewhere: added to the scores."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


class T5Attention(nn.Module):
    """
    softmax(Q K^T + bias) V over heads, with NO 1/sqrt(d_kv) scale: T5 folds it into the
    initialization of q. `bias` (B or 1, heads, T_q, T_k) is the relative position bias plus the mask;
    only block 0's self-attention owns the bias table, and its bias is shared by every block.
    """

    def __init__(self, config, has_relative_attention_bias=False, bidirectional=True):
        super().__init__()
        self.n_head, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, self.n_head * self.d_kv, bias=False)
        self.k = nn.Linear(config.d_model, self.n_head * self.d_kv, bias=False)
        self.v = nn.Linear(config.d_model, self.n_head * self.d_kv, bias=False)
        self.o = nn.Linear(self.n_head * self.d_kv, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, self.n_head)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
        self.dropout = config.dropout_rate

    def position_bias(self, query_length, key_length):
        """(1, heads, T_q, T_k): the learned scalar of each head for each (query, key) distance's bucket."""
        device = self.relative_attention_bias.weight.device
        relative_position = (torch.arange(key_length, device=device)[None, :]
                             - torch.arange(query_length, device=device)[:, None])  # key - query
        buckets = relative_position_bucket(relative_position, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def split_heads(self, x):
        """(B, T, heads * d_kv) -> (B, heads, T, d_kv)"""
        return x.view(x.shape[0], x.shape[1], self.n_head, self.d_kv).transpose(1, 2)

    def forward(self, x, bias, states=None):
        """x (B, T_q, d_model) attends to itself, or to `states` (B, T_k, d_model): cross-attention."""
        states = x if states is None else states
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(states)), self.split_heads(self.v(states))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_head * self.d_kv))


class T5FeedForward(nn.Module):
    """v1.0: wo(relu(wi x)); v1.1 / Flan-T5: wo(gelu_new(wi_0 x) * wi_1 x), gelu_new being GELU's tanh form."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.gated
        if config.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        if self.gated:
            hidden = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            hidden = F.relu(self.wi(x))
        return self.wo(self.dropout(hidden))


class T5Sublayer(nn.Module):
    """
    Pre-norm residual: x + dropout(f(layer_norm(x))), f registered under its Hugging Face name
    (SelfAttention, EncDecAttention or DenseReluDense). T5's layer norm is RMSNorm: no mean is
    subtracted, no bias, the mean of squares taken in float32 (model.RMSNorm).
    """

    def __init__(self, config, name, module):
        super().__init__()
        self.name = name
        self.add_module(name, module)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, *args):
        return x + self.dropout(getattr(self, self.name)(self.layer_norm(x), *args))


class T5Block(nn.Module):
    def __init__(self, config, is_decoder, first):
        super().__init__()
        self.layer = nn.ModuleList([T5Sublayer(config, "SelfAttention",
                                               T5Attention(config, has_relative_attention_bias=first,
                                                           bidirectional=not is_decoder))])
        if is_decoder:
            self.layer.append(T5Sublayer(config, "EncDecAttention", T5Attention(config)))
        self.layer.append(T5Sublayer(config, "DenseReluDense", T5FeedForward(config)))

    def forward(self, x, bias, encoder_states=None, cross_bias=None):
        x = self.layer[0](x, bias)
        if encoder_states is not None:
            x = self.layer[1](x, cross_bias, encoder_states)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): embeddings in, normed states out."""

    def __init__(self, config, is_decoder):
        super().__init__()
        self.is_decoder = is_decoder
        layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, first=i == 0) for i in range(layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, attention_mask, encoder_states=None, encoder_mask=None):
        """x (B, T, d_model) embeddings; attention_mask (B, T) 0/1 marks padding; encoder_mask (B, S) the encoder's."""
        T = x.shape[1]
        visible = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are never attended
        if self.is_decoder:
            visible = visible & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # nor keys ahead
        # The first block's bias table gives one bias for every block (Raffel et al. share it across layers).
        bias = self.block[0].layer[0].SelfAttention.position_bias(T, T) + additive_mask(visible, torch.float32)
        cross_bias = None
        if self.is_decoder:  # cross-attention has no position bias: only the encoder's padding
            cross_bias = additive_mask(encoder_mask.bool()[:, None, None, :], torch.float32)
        x = self.dropout(x)
        for block in self.block:
            x = block(x, bias, encoder_states, cross_bias)
        return self.dropout(self.final_layer_norm(x))


# -----------------------------------------------------------------------------
# The models


def shift_right(input_ids, start_token_id):
    """The decoder's input for targets `input_ids` (B, T): the start token, then the targets but the last."""
    return torch.cat([torch.full_like(input_ids[:, :1], start_token_id), input_ids[:, :-1]], dim=1)


class T5(nn.Module):
    """The backbone (Hugging Face's T5Model): encoder + decoder over one shared embedding."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        """The decoder's last hidden states (B, T_dec, d_model). Masks default to no padding; the decoder's
        input defaults to shift_right(input_ids), as Hugging Face's sequence classifier feeds it."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(input_ids, self.config.decoder_start_token_id)
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        encoder_states = self.encoder(self.shared(input_ids), attention_mask)
        return self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_states, attention_mask)


# Keys a checkpoint may hold that name nothing of ours (module docstring); with or without `transformer.`.
_UNUSED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _is_unused(key):
    return key.removeprefix("transformer.") in _UNUSED


class T5LM(T5):
    """
    T5 with its LM head (Hugging Face's T5ForConditionalGeneration): logits (B, T_dec, vocab).
    The head is the shared embedding when the checkpoint stores no lm_head.weight (T5 v1.0), its own
    matrix otherwise (v1.1, Flan-T5); the v1.0 head sees the decoder output times d_model^-0.5.
    """

    def __init__(self, config, tie_word_embeddings=True):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tied_keys = {}
        self.tie_word_embeddings = tie_word_embeddings
        self.tie_weights()

    def tie_weights(self):
        if self.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
            self.tied_keys = {"lm_head.weight": "shared.weight"}

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        hidden = super().forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a T5ForConditionalGeneration directory, one tensor at a time into dtype/device."""
        config, _ = config_from(T5Config, path)
        with torch.device("meta"):
            model = cls(config, tie_word_embeddings="lm_head.weight" not in checkpoint_keys(path))
        load_checkpoint_into(model, path, dtype, device, ignore=_is_unused)
        model.tie_weights()
        return model.eval()


class T5ClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on one d_model vector per example."""

    def __init__(self, config, num_labels):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(config.d_model, num_labels)

    def forward(self, x):
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


class T5Classifier(nn.Module):
    """
    Hugging Face's T5ForSequenceClassification: the encoder reads the input, the decoder reads the same
    input shifted right (start token first), and the head classifies the decoder's state at the
    input's last </s>, which, being causal, has read the whole input. logits (B, num_labels);
    num_labels == 1 is regression (STS-B).
    """

    def __init__(self, config, num_labels):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.transformer = T5(config)
        self.classification_head = T5ClassificationHead(config, num_labels)

    def forward(self, input_ids, attention_mask=None, return_cls=False):
        """logits (B, num_labels), or (logits, the decoder's state at the last </s> (B, d_model)) with
        return_cls: the features eval.py cluster projects, as [CLS] is DeBERTa's."""
        hidden = self.transformer(input_ids, attention_mask)  # (B, T, d_model)
        is_eos = input_ids == self.config.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"every input must hold the </s> token (id {self.config.eos_token_id}): "
                             "the classifier reads the decoder's state there")
        # each row's last </s>. (transformers takes the same position and refuses a batch whose rows hold
        # different numbers of </s>; that batch is well defined here.)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_eos = (is_eos * positions).argmax(dim=1)
        eos_state = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last_eos]
        logits = self.classification_head(eos_state)
        return (logits, eos_state) if return_cls else logits

    @classmethod
    def from_pretrained(cls, path, num_labels, dtype=torch.float32, device="cpu", seed=0):
        """
        Load a T5ForSequenceClassification directory (backbone under `transformer.`, with its head), or a
        T5ForConditionalGeneration / T5Model one (google-t5/t5-base, Flan-T5) with a fresh head drawn as
        transformers draws it, N(0, (factor * d_model^-0.5)^2) weights and zero biases, from `seed`.
        The LM head of a generation checkpoint is not used. A stored head of another size is refused.
        """
        config, _ = config_from(T5Config, path)
        with torch.device("meta"):
            model = cls(config, num_labels)
        keys = checkpoint_keys(path)
        has_head = any(key.startswith("classification_head.") for key in keys)
        if any(key.startswith("transformer.") for key in keys):
            load_checkpoint_into(model, path, dtype, device, ignore=_is_unused,
                                 allow_missing=lambda key: not has_head and key.startswith("classification_head."))
        else:
            load_checkpoint_into(model.transformer, path, dtype, device,
                                 ignore=lambda key: _is_unused(key) or key == "lm_head.weight")
        if not has_head:
            model.init_head(seed, dtype, device)
        return model.eval()

    def init_head(self, seed, dtype, device):
        generator = torch.Generator().manual_seed(seed)
        std = self.config.initializer_factor * self.config.d_model ** -0.5
        for name in ("classification_head.dense", "classification_head.out_proj"):
            linear = self.get_submodule(name)
            weight = torch.empty(linear.weight.shape).normal_(0.0, std, generator=generator)
            _assign(self, f"{name}.weight", weight.to(device=device, dtype=dtype))
            _assign(self, f"{name}.bias", torch.zeros(linear.bias.shape, device=device, dtype=dtype))
