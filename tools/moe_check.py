"""
The sparse-MoE decoder on a device, against transformers (the oracle): write a tiny random Mixtral
with transformers' save_pretrained (the bundled tiny-llama tokenizer beside it, so train_nlg.py can
train on it), then compare our logits and routing decisions with transformers' in --dtype on --device.

    python tools/moe_check.py --out out/tiny_mixtral --device cuda --dtype bf16

Both models in --dtype are measured against transformers in float32: our mean |dlogits| (over the
reference's mean |logits|) must be at most 1.5x transformers' own in --dtype, and the share of real
(token, layer) whose chosen experts equal transformers' at least --min-agreement; else exit 1. In bf16
the two round differently, so a token whose k-th and (k+1)-th router probabilities are within rounding
of each other may pick another expert: the agreement is a share, not 100 %.
"""

import argparse
import os
import shutil
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import model as M  # noqa: E402


def write_tiny_mixtral(out, seed=0):
    """A random Mixtral (vocab of the tiny-llama tokenizer, 2 layers, 4 experts, top-2) saved by transformers."""
    import transformers

    config = transformers.MixtralConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                                        output_router_logits=True, router_aux_loss_coef=0.02)
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # O(1) weights, so the routing and attention are not near-uniform
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0)
    hf.save_pretrained(out)
    shutil.copy(os.path.join(REPO, "assets", "tiny-llama", "tokenizer.model"), out)
    return hf


def batch(device, seed=0):
    """A left-padded batch (4, 64) of random ids and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 1024, (4, 64), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate((0, 9, 23, 40)):
        attention_mask[row, :pad] = 0
    return input_ids.to(device), attention_mask.to(device)


def hf_forward(hf, input_ids, attention_mask):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  output_router_logits=True)


def compare(hf, path, device, dtype):
    """
    Our model and transformers', both in `dtype` on `device`, against transformers in float32 (the
    reference): (our mean |dlogits|, transformers' mean |dlogits|, both over the reference's mean
    |logits|, and the share of real (token, layer) where we choose the same experts as transformers in dtype).
    """
    input_ids, attention_mask = batch(device)
    real = attention_mask.bool()
    reference = hf_forward(hf.to(device=device, dtype=torch.float32).eval(), input_ids, attention_mask).logits[real]
    expected = hf_forward(hf.to(dtype=dtype), input_ids, attention_mask)
    ours = M.Llama.from_pretrained(path, dtype=dtype, device=device)
    with torch.no_grad():
        logits = ours(input_ids, attention_mask)[real].float()
    size = reference.abs().mean()
    ours_error = ((logits - reference).abs().mean() / size).item()
    hf_error = ((expected.logits[real].float() - reference).abs().mean() / size).item()
    k = ours.config.num_experts_per_tok
    agree = [(block.router_logits.topk(k).indices.sort(-1).values == hf_logits.topk(k).indices.sort(-1).values)
             .all(-1)[real.reshape(-1)] for block, hf_logits in zip(M.moe_blocks(ours), expected.router_logits)]
    return ours_error, hf_error, torch.cat(agree).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the tiny Mixtral into")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--min-agreement", type=float, default=None, help="default: 0.97 bf16, 1.0 fp32")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    min_agreement = args.min_agreement if args.min_agreement is not None else (0.97 if args.dtype == "bf16" else 1.0)
    hf = write_tiny_mixtral(args.out)
    ours_error, hf_error, agreement = compare(hf, args.out, torch.device(args.device), dtype)
    print(f"tiny Mixtral, {args.dtype} on {args.device}, mean |dlogits| / mean |logits| against transformers in "
          f"float32: ours {ours_error:.3g}, transformers' own {hf_error:.3g}; routing agreement with transformers "
          f"in {args.dtype}: {agreement:.4f} (min {min_agreement:g})")
    # ours may round differently, not worse: at most 1.5x transformers' own error (+1e-6 for float32's 0)
    if ours_error > 1.5 * hf_error + 1e-6 or agreement < min_agreement:
        sys.exit(1)


if __name__ == "__main__":
    main()
