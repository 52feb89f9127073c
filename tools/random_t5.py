"""
Write a randomly initialized T5 directory that train_nlu.py loads as it loads google-t5/t5-base: config.json,
model.safetensors (T5ForConditionalGeneration's keys, tied head) and spiece.model, a sentencepiece vocabulary
trained on the premise/hypothesis texts of a GLUE-style .jsonl. For the GPU check (tools/gpu_check.sh) of
train_nlu.py on T5-base's shape where no checkpoint can be downloaded; its numbers mean nothing else.

    python tools/random_t5.py OUT_DIR [--texts assets/data/nli_train.jsonl] [--shape base|tiny]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import t5  # noqa: E402

SHAPES = {  # google-t5/t5-base's config.json, and a tiny one for a quick try
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}


def train_vocabulary(texts_file, out_dir, vocab_size):
    """spiece.model with T5's special ids: <pad> 0, </s> 1, <unk> 2, no start token."""
    import sentencepiece

    with open(texts_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = [row[key] for row in rows for key in ("premise", "hypothesis", "sentence", "sentence1", "sentence2")
             if isinstance(row.get(key), str)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(out_dir, "spiece"), vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>", bos_id=-1, minloglevel=2)


def random_weights(model, seed):
    """Linears N(0, 1/fan_in) (q also / d_kv: T5 folds the attention scale into q), embeddings N(0, 1),
    the bias table N(0, 1/d_model), norms 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("layer_norm.weight") or name.endswith("final_layer_norm.weight"):
            state[name] = torch.ones(p.shape)
            continue
        std = 1.0
        if name.endswith("relative_attention_bias.weight"):
            std = model.config.d_model ** -0.5
        elif p.dim() == 2 and not name.startswith("shared"):
            std = p.shape[1] ** -0.5 * (model.config.d_kv ** -0.5 if name.endswith(".q.weight") else 1.0)
        state[name] = torch.randn(p.shape, generator=generator) * std
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--texts", default="assets/data/nli_train.jsonl", help="GLUE-style .jsonl the vocabulary is trained on")
    parser.add_argument("--shape", default="base", choices=sorted(SHAPES), help="base: t5-base's (default: base)")
    parser.add_argument("--vocab-size", default=256, type=int, help="sentencepiece pieces at most (default: 256)")
    parser.add_argument("--seed", default=0, type=int, help="weights (default: 0)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train_vocabulary(args.texts, args.out, args.vocab_size)
    config = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128,
                  feed_forward_proj="relu", tie_word_embeddings=True, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, pad_token_id=0,
                  eos_token_id=1, decoder_start_token_id=0, **SHAPES[args.shape])
    with torch.device("meta"):
        model = t5.T5LM(t5.T5Config.from_hf(config))
    save_file(random_weights(model, args.seed), os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"random T5 ({args.shape}) in {args.out}")


if __name__ == "__main__":
    main()
