#!/usr/bin/env bash
# Every GPU measurement that benchmarks/README.md lists as "not measured", in one run (about 8 minutes at most on
# one H100: each step has its own timeout, and a step that fails or times out is recorded and the rest still run).
#
#   bash benchmarks/gpu_check.sh                      # outputs in benchmarks/gpu_results/ (or $OUT)
#   DPMOT_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh  # the same commands on the CPU at tiny sizes (smoke test)
#   DPMOT_GPU_CHECK_ONLY="ot_assignment train_step_cifar10_bf16" bash benchmarks/gpu_check.sh  # a subset of steps
#
# Steps (names = output files <name>.txt in the results folder):
#   ot_assignment   benchmarks/ot_assignment.py --device cuda --sizes 1024 2048 4096 (global batch 4,096 target)
#   semidiscrete_10k / semidiscrete_50k   benchmarks/semidiscrete_ot.py --device cuda, N = 10,000 / 50,000
#   train_step_cifar10_bf16   benchmarks/train_step.py --device cuda --precision bf16-mixed --net ddpmpp-cifar10
#   guidance_cost   benchmarks/guidance_cost.py --device cuda (random weights: costs, not image quality)
# The exit status is 0 only when every step succeeded; summary.txt lists each step's status and seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-benchmarks/gpu_results}"
DRY="${DPMOT_GPU_CHECK_DRY:-0}"
ONLY="${DPMOT_GPU_CHECK_ONLY:-}"
STEPS="ot_assignment semidiscrete_10k semidiscrete_50k train_step_cifar10_bf16 guidance_cost"
for name in $ONLY; do
    if [[ " $STEPS " != *" $name "* ]]; then
        echo "gpu_check: error: unknown step '$name' in DPMOT_GPU_CHECK_ONLY (steps: $STEPS)" >&2
        exit 2
    fi
done
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

if [[ "$DRY" == "1" ]]; then
    DEVICE=cpu
    echo "gpu_check: DRY RUN on the CPU at tiny sizes (no GPU numbers)" | tee "$OUT/device.txt"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1 \
        || ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        echo "gpu_check: error: no CUDA GPU (nvidia-smi and torch.cuda.is_available() must both work);" \
            "set DPMOT_GPU_CHECK_DRY=1 for a CPU smoke run" >&2
        exit 2
    fi
    DEVICE=cuda
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    } | tee "$OUT/device.txt"
fi

# step NAME TIMEOUT_S COMMAND...: run with a timeout, output to $OUT/NAME.txt, status to the summary
STATUS=0
: >"$OUT/summary.txt"
step() {
    local name="$1" limit="$2"
    shift 2
    if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    local start rc=0
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1 || rc=$?
    local took=$(($(date +%s) - start))
    local state=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        state=TIMEOUT
    elif [[ $rc -ne 0 ]]; then
        state="FAILED(rc=$rc)"
    fi
    [[ $state == ok ]] || STATUS=1
    printf '%-26s %-14s %5ss  %s\n' "$name" "$state" "$took" "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
}

if [[ "$DRY" == "1" ]]; then
    step ot_assignment 120 "$PYTHON" benchmarks/ot_assignment.py --device cpu --sizes 16 32 \
        --resolution 4 --repeats 1 --min-time 0 --max-repeats 1
    step semidiscrete_10k 120 "$PYTHON" benchmarks/semidiscrete_ot.py --device cpu --num-targets 100 \
        --dim 48 --num-samples 1000 --chunk-size 256 --target-chunk-size 64 --repeats 1 --memory-samples 1000
    step semidiscrete_50k 120 "$PYTHON" benchmarks/semidiscrete_ot.py --device cpu --num-targets 500 \
        --dim 48 --num-samples 2000 --chunk-size 256 --target-chunk-size 64 --repeats 1 --memory-samples 2000
    step train_step_cifar10_bf16 300 "$PYTHON" benchmarks/train_step.py --device cpu --precision bf16-mixed \
        --net ddpmpp-cifar10 --model-channels 8 --batch-size 2 --blocks 1 --steps 3 --warmup 1
    step guidance_cost 300 "$PYTHON" benchmarks/guidance_cost.py --device cpu --batch-size 1 --steps 2 --repeats 1
else
    # budget (timeouts): 110 + 45 + 110 + 120 + 85 = 470 s
    step ot_assignment 110 "$PYTHON" benchmarks/ot_assignment.py --device cuda --sizes 1024 2048 4096 \
        --repeats 2 --min-time 0 --max-repeats 3
    step semidiscrete_10k 45 "$PYTHON" benchmarks/semidiscrete_ot.py --device cuda --num-targets 10000 \
        --num-samples 100000 --memory-samples 100000
    step semidiscrete_50k 110 "$PYTHON" benchmarks/semidiscrete_ot.py --device cuda --num-targets 50000 \
        --num-samples 500000 --repeats 2 --memory-samples 500000
    step train_step_cifar10_bf16 120 "$PYTHON" benchmarks/train_step.py --device cuda --precision bf16-mixed \
        --net ddpmpp-cifar10 --batch-size 128 --blocks 2 --steps 30 --warmup 5
    step guidance_cost 85 "$PYTHON" benchmarks/guidance_cost.py --device cuda --batch-size 8 --steps 18 --repeats 1
fi

echo "== summary ($DEVICE; results in $OUT)"
cat "$OUT/summary.txt"
exit "$STATUS"
