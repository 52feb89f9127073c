"""
Memory per GPU of a BA-LoRA run (train_nlg.py's paper preset: r = 128 on the seven projections, bf16
base, float32 adapter, AdamW) under DDP and under --fsdp, by arithmetic from the model's shapes:
what docs/fsdp.md's memory table shows. Nothing is measured; every line is a product of the shapes.

    python tools/fsdp_memory.py            # LLaMA-2-7B on 8 GPUs, LLaMA-3-70B on 16 and 64
"""

GB = 1e9
# config.json values of the two models (hidden, intermediate, layers, heads, kv heads, vocabulary)
MODELS = {
    "LLaMA-2-7B": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "LLaMA-3-70B": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
}


def projections(m):
    """(in, out) of the seven adapted projections of one Block."""
    head_dim = m["hidden"] // m["heads"]
    kv = m["kv_heads"] * head_dim
    h, i = m["hidden"], m["intermediate"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down


def per_gpu(m, world_size, sharded, r=128, micro_batch=4, seq_len=512):
    """{line: bytes on one GPU}. Sharded state is divided by world_size; activations and logits are not."""
    block = sum(n_in * n_out for n_in, n_out in projections(m)) + 2 * m["hidden"]  # + its two RMSNorms
    base = m["layers"] * block + 2 * m["vocab"] * m["hidden"] + m["hidden"]  # + embedding, head, final norm
    adapter = m["layers"] * sum(r * (n_in + n_out) for n_in, n_out in projections(m))
    share = 1 / world_size if sharded else 1.0
    tokens = micro_batch * seq_len
    lines = {
        "base weights (bf16)": 2 * base * share,
        "adapter A, B (fp32)": 4 * adapter * share,
        "teacher's A0, B0 (fp32)": 4 * adapter * share,
        "adapter gradients (fp32)": 4 * adapter * share,
        "AdamW exp_avg, exp_avg_sq (fp32)": 8 * adapter * share,
    }
    if sharded:  # FSDP all-gathers one Block for its forward and prefetches the next: two whole ones
        lines["gathered Blocks (2, bf16 + fp32 adapter)"] = 2 * (2 * block + 3 * 4 * adapter / m["layers"])
    # --grad-checkpointing keeps each Block's bf16 input, plus one Block's recomputed working set
    # (~34 bytes x tokens x hidden, Korthikanti et al. 2022, with SDPA's fused attention)
    lines["activations (grad checkpointing)"] = 2 * tokens * m["hidden"] * m["layers"] + 34 * tokens * m["hidden"]
    # the M <= tokens valid rows: student logits in fp32 (the losses), teacher logits in bf16
    lines["student + teacher logits"] = (4 + 2) * tokens * m["vocab"]
    return lines


def table():
    rows = []
    for name, world_sizes in (("LLaMA-2-7B", (8,)), ("LLaMA-3-70B", (16, 64))):
        m = MODELS[name]
        ddp = per_gpu(m, 1, sharded=False)
        for world_size in world_sizes:
            fsdp = per_gpu(m, world_size, sharded=True)
            header = f"| {name} | DDP | FSDP, {world_size} GPUs |"
            rows += [header, "| --- | ---: | ---: |"]
            for line in fsdp:
                rows.append(f"| {line} | {ddp[line] / GB:.1f} GB |  {fsdp[line] / GB:.1f} GB |" if line in ddp
                            else f"| {line} | - | {fsdp[line] / GB:.1f} GB |")
            rows.append(f"| **total per GPU** | **{sum(ddp.values()) / GB:.1f} GB** | **{sum(fsdp.values()) / GB:.1f} GB** |")
            rows.append("")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
