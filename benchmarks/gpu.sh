#!/usr/bin/env bash
# The checks a lent GPU is for, as one prepared run of about 9 minutes (the device tool lends 15 minutes a session,
# its start included). In order of value, each under its own time limit, so a short lease still returns the first.
#
#   on the device machine:  bash benchmarks/gpu.sh [GROUP ...]   (from the repo root; output in $OUT)
#   a dry run on a CPU:     GPU_DRY=1 bash benchmarks/gpu.sh       (tiny presets at 64x64: checks the commands only)
#
# GROUPs: wan, mochi, attn, hunyuan (default: those, in that order), wan14 (Wan 14B on 24 GB, on request), ltx
# (LTX-Video 2B LoRA and IC-LoRA, on request, about 4 min). All of them take more than one 10-minute command, so a
# session runs `wan mochi attn` (about 9 min at most) and then `hunyuan` (about 7 min) while the machine is warm.
#
# The device image's python3 has torch with CUDA, safetensors, sentencepiece, tokenizers, numpy and tqdm, but not
# PyAV. The benches below need none (data/video.py imports it only to read or write a file); for anything that does,
# carry its wheel in .whl/ (git-ignored), made here once with
#   pip download av --python-version 3.12 --only-binary=:all: --no-deps --platform manylinux_2_28_x86_64 -d .whl
# Everything lands in one file, $OUT/gpu.log (the device returns at most 8 files): per check its command, its last
# lines (the bench's JSON: step_s, tokens_s, tflops_s, mfu, mem_gb, loss), its exit status and wall time. The
# figures go into BENCHMARKS.md with the card's name and these commands.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
PY=${PY:-python3}
BUDGET=${BUDGET:-540}  # seconds for all checks; a check whose limit does not fit in what is left is skipped
DRY=${GPU_DRY:-0}
export PYTHONUNBUFFERED=1
# (--mode bench itself needs no PyAV: data/video.py imports it only where a file is read or written)
if ! $PY -c "import av" 2>/dev/null && ls .whl/av-*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-deps --no-index --disable-pip-version-check --target /tmp/pyav .whl/av-*.whl; then
    export PYTHONPATH=/tmp/pyav${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "PyAV: installing $(ls .whl/av-*.whl) failed" >> "$LOG"
  fi
fi

GROUPS_WANTED=" ${*:-wan mochi attn hunyuan} "

check() {  # check NAME LIMIT_S SCRIPT ARGS...  (NAME's first word, before '-', is its group)
  local name=$1 limit=$2 script=$3
  shift 3
  case $GROUPS_WANTED in *" ${name%%-*} "*) ;; *) return ;; esac
  local args=("$@")
  if [ "$DRY" = 1 ]; then  # the same flags at a tiny size; no --offload (pinned host memory needs CUDA)
    local a=() skip=0 frames=9
    [ "$script" = train_mochi.py ] && frames=7  # Mochi's clips are 6k+1 frames
    for x in "${args[@]}"; do
      if [ $skip = 1 ]; then skip=0; continue; fi
      case $x in
        --preset) a+=(--preset tiny); skip=1 ;;
        --height|--width) a+=("$x" 64); skip=1 ;;
        --frames) a+=(--frames $frames); skip=1 ;;
        --offload) skip=1 ;;
        *) a+=("$x") ;;
      esac
    done
    args=("${a[@]}" --dtype bf16)
    [ "$script" = benchmarks/attention.py ] && args=("$@" --tiny)
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$limit" -gt "$left" ]; then
    echo "=== $name: skipped (needs $limit s, $left s left)" >> "$LOG"
    return
  fi
  echo "=== $name: $PY $script ${args[*]}" >> "$LOG"
  local t0=$SECONDS
  timeout "$limit" $PY "$script" "${args[@]}" > "$OUT/last.txt" 2>&1
  local rc=$?
  grep -v "it/s\]\|s/it\]" "$OUT/last.txt" | tail -n 4 >> "$LOG"
  echo "--- $name: exit $rc, $((SECONDS - t0)) s" >> "$LOG"
}

{ date -u; nvidia-smi -L 2>&1 | head -n 2
  $PY -c "import torch as t; print('torch', t.__version__, t.cuda.is_available() and t.cuda.get_device_name())"
  git log --oneline -1 2>/dev/null; } >> "$LOG"

B="--mode bench --bench_steps 3"
# Wan 2.1 1.3B full fine-tune (issue 7's MFU target >= 40%), eager then compiled: the two losses must agree
# (the bench seeds its weights and inputs) to bf16 tolerance: the compile correctness check on CUDA (SDPA flash)
check wan-1.3B-full 120 train_wan.py $B --preset 1.3B --ac 1 --height 480 --width 832 --frames 81 \
  --global_batch 1 --micro_batch 1
check wan-1.3B-full-compile 180 train_wan.py $B --preset 1.3B --ac 1 --height 480 --width 832 --frames 81 \
  --global_batch 1 --micro_batch 1 --compile 1
# Mochi 10B LoRA r16 at Genmo's table's shape (issue 10's goal: under 1.67 s a step and 50 GB on an H100)
check mochi-10B-lora 150 train_mochi.py $B --preset 10B --lora_rank 16 --ac 1 --height 480 --width 848 --frames 37 \
  --global_batch 1 --micro_batch 1
# The two-stream models' joint attention with a text key-padding mask at micro_batch 2 (issues 9 and 10: compiled
# flex_attention vs masked SDPA vs one SDPA per sample), fwd + bwd at the Mochi and HunyuanVideo shapes
check attn 90 benchmarks/attention.py --out "$OUT/attention.json"
# HunyuanVideo 13B single-GPU LoRA (issue 9's targets: 24 GB at 33 frames, 48 GB at 129 with --ac 2)
check hunyuan-13B-24GB 180 train_hunyuan.py $B --bench_steps 2 --preset 13B --lora_rank 32 --ac 1 --base_dtype float8 \
  --offload 1 --height 544 --width 960 --frames 33 --global_batch 1 --micro_batch 1
check hunyuan-13B-48GB 250 train_hunyuan.py $B --bench_steps 2 --preset 13B --lora_rank 32 --ac 2 --base_dtype float8 \
  --offload 1 --height 544 --width 960 --frames 129 --global_batch 1 --micro_batch 1
# Wan 2.1 14B single-GPU LoRA, the 24 GB card users ask for (diffusion-pipe #149, #164): float8 base + offload,
# --ac 2 (README "Wan on one GPU"). Not in the default groups: run `bash benchmarks/gpu.sh wan14` on a third call
check wan14-14B-24GB 240 train_wan.py $B --bench_steps 2 --preset 14B --lora_rank 32 --ac 2 --base_dtype float8 \
  --offload 1 --height 480 --width 832 --frames 81 --global_batch 1 --micro_batch 1
# LTX-Video 2B LoRA r32 at the reference shape, plain and IC-LoRA (--reference 1: a reference clip in front, twice
# the tokens). Not in the default groups: `bash benchmarks/gpu.sh ltx`
check ltx-2B-lora 120 train_ltx.py $B --preset 2B --lora_rank 32 --ac 1 --height 512 --width 768 --frames 49 \
  --global_batch 1 --micro_batch 1
check ltx-2B-iclora 150 train_ltx.py $B --preset 2B --lora_rank 32 --ac 1 --height 512 --width 768 --frames 49 \
  --global_batch 1 --micro_batch 1 --reference 1
echo "=== done: $SECONDS s" >> "$LOG"
cat "$LOG"
