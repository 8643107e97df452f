#!/usr/bin/env bash
# The GPU checks, as one prepared command for a short device window (about 10 minutes).
#
# Run from the repository root on the GPU machine:
#     OUT=/some/folder benchmarks/gpu_check.sh
# It writes at most 7 files under $OUT (the device tool returns at most 8):
#     log.txt                  everything printed
#     bench-fp32/bench.{json,md}, bench-bf16/bench.{json,md}   brainprop bench, every preset
#     torchrun.txt             plain 'train' against 'torchrun --nproc_per_node=1', s/epoch
#     reproduce.tgz            results/measurements/ and every run's history (no checkpoints)
#                              of 'brainprop reproduce', for merging into this repo's results/
#
# Settings, from the environment:
#     DATA        data root holding cifar10/cifar-10-batches-py (default: the repo's data/,
#                 which has MNIST only; without CIFAR-10 the reproduce step is skipped)
#     REPRO_MIN   minutes for the reproduce step (default 6: packed 4 to a GPU, a
#                 CIFAR-10 deep seed may not finish in it); runs still going are stopped
#                 with SIGTERM and their histories kept
#     JOBS        reproduce runs side by side on the GPU (default 4)
#     SMOKE=1     toy sizes on the CPU, to test this script on a machine without a GPU
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DATA=${DATA:-$PWD/data}
REPRO_MIN=${REPRO_MIN:-6}
JOBS=${JOBS:-4}
WORK=$(mktemp -d)
exec > >(tee "$OUT/log.txt") 2>&1

if [[ ${SMOKE:-0} == 1 ]]; then
    DEVICE=cpu
    BENCH=(--presets mnist/dense --steps 2 --warmup 1 --eval-images 256)
    TRAIN=(--dataset mnist --arch dense --epochs 1 --lr 0.5 --init-std 0.03)
    REPRO=(--datasets mnist --archs dense --seeds 1 --max-epochs 1)
    REPRO_DATA=mnist
else
    DEVICE=cuda
    BENCH=()
    TRAIN=(--dataset mnist --arch conv --epochs 4)
    REPRO=(--datasets cifar10 --archs deep --seeds 10)
    REPRO_DATA=cifar10
fi
"$PY" - <<'EOF'
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF

echo "== torchrun --nproc_per_node=1 against plain train (alternated, twice each)"
summary_s_per_epoch() {
    "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["s_per_epoch"])' "$1"
}
for i in 1 2; do
    "$PY" -m brainprop train "${TRAIN[@]}" --device "$DEVICE" --data-dir "$DATA" --quiet \
        --out "$WORK/runs" --name "plain-$i"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m brainprop train \
        "${TRAIN[@]}" --device "$DEVICE" --data-dir "$DATA" --quiet \
        --out "$WORK/runs" --name "torchrun-$i"
done
{
    echo "run s_per_epoch (${TRAIN[*]}, $DEVICE)"
    for run in plain-1 torchrun-1 plain-2 torchrun-2; do
        echo "$run $(summary_s_per_epoch "$WORK/runs/$run/summary.json")"
    done
} | tee "$OUT/torchrun.txt"

echo "== brainprop bench, fp32 then bf16"
"$PY" -m brainprop bench "${BENCH[@]}" --device "$DEVICE" --out "$OUT/bench-fp32"
if [[ $DEVICE == cuda ]]; then
    "$PY" -m brainprop bench "${BENCH[@]}" --device "$DEVICE" --bf16 --out "$OUT/bench-bf16"
fi

if [[ -d $DATA/$REPRO_DATA ]]; then
    echo "== brainprop reproduce ${REPRO[*]} for $REPRO_MIN min, $JOBS at a time"
    # SIGTERM makes every run save its state; the histories of unfinished runs still come back.
    timeout --signal=TERM --kill-after=60 "${REPRO_MIN}m" \
        "$PY" -m brainprop reproduce "${REPRO[@]}" --jobs "$JOBS" --device "$DEVICE" \
        --data-dir "$DATA" --out "$WORK/results" --quiet || echo "reproduce ended with $?"
    tar -czf "$OUT/reproduce.tgz" -C "$WORK/results" --exclude='*.pt' .
else
    echo "== no $DATA/$REPRO_DATA: reproduce skipped"
fi
echo "== done: $(ls -R "$OUT" | tr '\n' ' ')"
