#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one go (one GPU; ~8 minutes on an H100 before the
# DDPO epochs were added, which are not measured on a GPU yet):
#   bash bench/gpu.sh [OUTDIR [NAME ...]]
# Writes OUTDIR/<name>.json for each benchmark (only the NAMEs given, if any) and OUTDIR/gpu.log
# with all the output. PYTHON names the interpreter (default: python).
set -u
out=${1:-outputs/bench_gpu}
only=" ${*:2} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$out/gpu.log"

run() {  # run NAME SECONDS SCRIPT ARGS...: one benchmark, its figures in OUTDIR/NAME.json
    local name=$1 seconds=$2
    shift 2
    [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
    echo "== $name: python $*" | tee -a "$out/gpu.log"
    timeout "$seconds" "${PYTHON:-python}" "$@" --json "$out/$name.json" >>"$out/gpu.log" 2>&1 ||
        echo "== $name failed or timed out (exit $?)" | tee -a "$out/gpu.log"
}

run reward_vit_h14 360 bench/reward_throughput.py --compile
run dpo_sdxl_1024 300 bench/dpo_step.py --device cuda --family sdxl --resolution 1024 \
    --precision bf16 --pairs 8 --rank 64 --gradient-checkpointing --steps 5 --warmup 2
run reward_vit_h14_256_images 180 bench/reward_throughput.py --prompts 32 --repeats 5
run dpo_sd15_512 180 bench/dpo_step.py --device cuda --family sd --resolution 512 \
    --precision bf16 --pairs 8 --steps 5 --warmup 2
run dpo_sdxl_1024_no_checkpointing 150 bench/dpo_step.py --device cuda --family sdxl \
    --resolution 1024 --precision bf16 --pairs 2 --rank 64 --steps 5 --warmup 2 --designs ours
run ddpo_sd15_512 300 bench/online.py real --family sd15 --resolution 512 --samples 32 \
    --sample-batch 16 --train-batch 4 --steps 20 --timestep-fraction 0.5 --epochs 3
run ddpo_sdxl_1024 420 bench/online.py real --family sdxl --resolution 1024 --samples 16 \
    --sample-batch 8 --train-batch 2 --steps 20 --timestep-fraction 0.5 --epochs 3 \
    --gradient-checkpointing
