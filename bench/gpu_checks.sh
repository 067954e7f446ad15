#!/bin/bash
# Issue 16's GPU checks in one run, in priority order, for a short lease on one GPU (~6-7 minutes on an H200, most of
# it compilation and model set-up; the limits below are ~1.5x what each took there): the 1.4b preset's pretraining
# MFU and memory at seq 4096 (batch 4, batch 8), soft-mask ÷ bidirectional at seq 2048 (the 1.4b's layer shapes, both
# paths through FlexAttention, the default shapes, varying lengths and alpha), then batch 8 with activation
# checkpointing and a profile of the batch-4 step. Each check has its own time limit, so one that
# hangs costs only its own; each log is also written to $OUT when that is set (else ./gpu_checks/).
#
#     bash bench/gpu_checks.sh            # with conan's dependencies importable (PYTHONPATH or an installed venv)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu_checks}
mkdir -p "$out"
python=${PYTHON:-python3}
check() {  # check NAME SECONDS ARGS...: run one bench under a time limit, its output kept in $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$seconds" "$python" "$@" 2>&1 | grep -vE "WARNING|INFO|USDT|_warn_once|UserWarning" > "$out/$name.log"
    tail -n 3 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
check mfu_1.4b_b4 70 bench/mfu.py --preset conan-1.4b --seq 4096 --batch 4 --steps 5
check mfu_1.4b_b8 75 bench/mfu.py --preset conan-1.4b --seq 4096 --batch 8 --steps 4
check soft_1.4b_shapes 100 bench/soft_mask.py --device cuda --seq 2048 --preset conan-1.4b --layers 2 --steps 10
check soft_1.4b_shapes_flex 90 bench/soft_mask.py --device cuda --seq 2048 --preset conan-1.4b --layers 2 --steps 10 --backend flex
check soft_default 60 bench/soft_mask.py --device cuda --seq 2048 --steps 10
check soft_vary 90 bench/soft_mask.py --device cuda --seq 2048 --steps 12 --vary-lengths 6
check mfu_1.4b_b8_ac 70 bench/mfu.py --preset conan-1.4b --seq 4096 --batch 8 --steps 4 --activation-checkpointing
check mfu_1.4b_profile 90 bench/mfu.py --preset conan-1.4b --seq 4096 --batch 4 --steps 1 --profile
echo "=== done ($(date +%T))"
