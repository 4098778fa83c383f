#!/usr/bin/env bash
# The one command a lent GPU session runs (`make gpu`, on configs/cifar_gpu_pretrained.yaml): the whole pipeline of CONFIG,
# measured by `pipelines/bench.py pipeline`, with its results packed into $OUT within the device
# tool's return limits (8 files, 16 MiB each; see src/export.py).
#
#   here, once:   bash scripts/gpu_prep.sh          # .device/wheels + .device/data (archive, truth)
#   device tool:  run(command="bash scripts/gpu_run.sh", carry=[".device"], timeout_s=600)
#
# Steps: install the carried wheels into $SITE; check every import; run every stage under a
# deadline (DEADLINE_S from the start of this script; optional stages are skipped when their budgets
# would pass it, and the pipeline is stopped there so the packing still fits the 600 s call); pack bench.json, summary.md, submission.csv, the encoder shards and
# run.tar.gz into $OUT beside log.txt. A failed or stopped run still packs what it has and exits
# non-zero (the pipeline's status: 2 bad input/config, 3 missing package, 124 deadline).
#
# Environment (defaults for the device): OUT (required), CONFIG=configs/cifar_gpu.yaml,
# OVERRIDES="" (extra section.key=value, space-separated), RUN=<config name>_bench, PYTHON=python3,
# WHEELS=.device/wheels, SITE=/tmp/site, ARCHIVE=.device/data/competition.tar.xz,
# TRUTH=.device/data/public_truth.csv (each used when the file exists), DEADLINE_S=570,
# ENCODER_STAGE=auto (the latest stage's encoder), SMOKE="" (overrides of a tiny run <RUN>_smoke made first, at most SMOKE_S=150 s:
# when it fails the full run is not started; the deadline counts from this script's start). The test suite runs this script on CPU with a tiny config (tests/test_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
CONFIG=${CONFIG:-configs/cifar_gpu.yaml}
OVERRIDES=${OVERRIDES:-}
RUN=${RUN:-$(basename "$CONFIG" .yaml)_bench}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.device/wheels}
SITE=${SITE:-/tmp/site}
ARCHIVE=${ARCHIVE:-.device/data/competition.tar.xz}
TRUTH=${TRUTH:-.device/data/public_truth.csv}
DEADLINE_S=${DEADLINE_S:-570}
ENCODER_STAGE=${ENCODER_STAGE:-auto}
SMOKE=${SMOKE:-}
SMOKE_S=${SMOKE_S:-150}
mkdir -p "$OUT"
LOG="$OUT/log.txt"

main() {
  local t0=$SECONDS rc=0
  echo "gpu_run: $(date -u '+%Y-%m-%d %H:%M:%S UTC') config $CONFIG run $RUN deadline ${DEADLINE_S}s"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if (( ${#wheels[@]} )); then
    echo "gpu_run: installing ${#wheels[@]} wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" || { echo "gpu_run: wheel install failed"; return 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_run: no wheels in $WHEELS (using the installed packages)"
  fi
  "$PYTHON" - <<'PY' || { echo "gpu_run: a required package is missing (carry it in .device/wheels)"; return 3; }
import importlib, sys
missing = []
for name in ("torch", "timm", "safetensors", "yaml", "numpy", "pandas", "sklearn", "cv2", "tqdm", "matplotlib",
             "threadpoolctl", "faiss", "lightgbm", "pytorch_metric_learning"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({exc.__class__.__name__}: {exc})")
try:  # the CPU augmentation path only (ssl.gpu_augment: cpu); scripts/gpu_prep.sh leaves it behind
    importlib.import_module("albumentations")
except Exception:
    print("gpu_run: albumentations not installed: CPU-side augmentation (ssl.gpu_augment: cpu) would fail")
import torch
print(f"gpu_run: python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
if missing:
    print("gpu_run: missing " + "; ".join(missing))
    sys.exit(1)
PY
  local args=(-c "$CONFIG")
  [[ -f "$ARCHIVE" ]] && args+=("data.archive=$ARCHIVE")
  [[ -f "$TRUTH" ]] && args+=("data.truth=$TRUTH")
  local extra=()
  read -r -a extra <<< "$OVERRIDES"  # split on spaces, no globbing ([a,b] lists stay as they are)
  args+=(run.progress=false "${extra[@]}")
  if [[ -n "$SMOKE" ]]; then
    # every stage's device code on a tiny slice first: a CUDA-only bug then costs a minute, not the call
    local smoke=()
    read -r -a smoke <<< "$SMOKE"
    echo "gpu_run: smoke run ${RUN}_smoke"
    timeout --signal=TERM --kill-after=10 "$SMOKE_S" "$PYTHON" -u pipelines/bench.py pipeline "${args[@]}" \
      "${smoke[@]}" --run "${RUN}_smoke" --no-roof
    rc=$?
    echo "gpu_run: smoke exit $rc after $(( SECONDS - t0 ))s"
    (( rc )) && { echo "gpu_run: the smoke run failed: no full run"; return "$rc"; }
  fi
  local left=$(( DEADLINE_S - (SECONDS - t0) ))
  echo "gpu_run: bench pipeline, ${left}s left before the deadline"
  # --deadline-s: optional stages (02-04) are skipped when they would leave too little for 05/06, so a
  # slow run still ends with a submission; `timeout` is the hard stop behind it.
  timeout --signal=TERM --kill-after=20 "$left" "$PYTHON" -u pipelines/bench.py pipeline "${args[@]}" --run "$RUN" \
    --deadline-s $(( left - 10 ))
  rc=$?
  echo "gpu_run: pipeline exit $rc after $(( SECONDS - t0 ))s"
  "$PYTHON" pipelines/pack.py out "${args[@]}" "run.name=$RUN" --out "$OUT" --encoder-stage "$ENCODER_STAGE"
  local prc=$?
  echo "gpu_run: done after $(( SECONDS - t0 ))s"
  (( rc )) && return "$rc"
  return "$prc"
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
# The log must come back too: keep its last 15 MiB at most.
if [[ -f "$LOG" ]] && (( $(stat -c %s "$LOG") > 15728640 )); then
  tail -c 15728640 "$LOG" > "$LOG.tmp" && mv "$LOG.tmp" "$LOG"
fi
ls -la "$OUT"
exit "$rc"
