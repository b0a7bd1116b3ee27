#!/usr/bin/env bash
# Train on a GPU machine from the carried cache, for a given number of minutes; results to $OUT.
#
# Usage (on the GPU machine, in the repository root, with runs/cache-small and .whl carried in):
#   scripts/gpu_train.sh [MINUTES=8] [CONFIG=configs/train_small.yaml] [BATCH=8] [WORKERS=14] [INIT=]
# Before: `python -m RefSAM3DLib.training prepare --config CONFIG` where the data and MiniLM are
# (it writes the cache + prompt table), and `.whl/` holding the wheels the GPU image lacks (monai,
# segment_anything, open_clip_torch, ftfy). The machine needs no SimpleITK, raw data or text weights.
#
# Comes back in $OUT (at most 8 files of < 16 MB): log.csv, curves.png, validation.json, train.log,
# checkpoint/config.json and checkpoint/model.safetensors split in < 15 MB parts. Reassemble with
#   cat checkpoint/model.safetensors.part* > checkpoint/model.safetensors
# and check it against "weights_sha256" in checkpoint/config.json (load_model does that too).
set -euo pipefail

MINUTES=${1:-8}
CONFIG=${2:-configs/train_small.yaml}
BATCH=${3:-8}
WORKERS=${4:-14}
INIT=${5:-}
OUT=${OUT:-$PWD/gpu_out}
RUN=/tmp/refsam3d_run

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT/checkpoint"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/train.log"

# The budget covers training; keep ~1 minute for the start, the last checkpoint and the copy back.
START=$(date +%s)
train_once() {  # $1 = DataLoader workers, $2 = minutes
    python3 -m RefSAM3DLib.training train --config "$CONFIG" --device "${DEVICE:-cuda}" --output "$RUN" \
        --steps auto --max-minutes "$2" --batch-size "$BATCH" --num-workers "$1" \
        ${INIT:+--init "$INIT"} 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*%|' | tee -a "$OUT/train.log"
    return "${PIPESTATUS[0]}"
}
set +e
train_once "$WORKERS" "$(python3 -c "print(max(1.0, $MINUTES - 1.0))")"
STATUS=$?
if [ "$STATUS" -ne 0 ] && [ ! -f "$RUN/checkpoint/model.safetensors" ]; then
    # worker processes can fail in sandboxed machines (shared memory); retry in-process
    LEFT=$(python3 -c "print(max(1.0, $MINUTES - 1.5 - ($(date +%s) - $START) / 60))")
    echo "retrying without DataLoader workers for $LEFT minutes" | tee -a "$OUT/train.log"
    rm -rf "$RUN"
    train_once 0 "$LEFT"
    STATUS=$?
fi
set -e

cp "$RUN"/log.csv "$RUN"/curves.png "$RUN"/validation.json "$OUT"/ 2>/dev/null || true
if [ -f "$RUN/checkpoint/model.safetensors" ]; then
    cp "$RUN/checkpoint/config.json" "$OUT/checkpoint/"
    split -b 15M -d "$RUN/checkpoint/model.safetensors" "$OUT/checkpoint/model.safetensors.part"
fi
tail -n 3 "$RUN/log.csv" 2>/dev/null || true
exit "$STATUS"
