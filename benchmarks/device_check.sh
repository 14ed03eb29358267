#!/usr/bin/env bash
# One-command device check for a GPU (or TPU) machine: kernel correctness on
# the device, the SSD and attention kernel benchmarks at the key shapes, and
# the end-to-end hybrid vs same-size transformer throughput, all written to
# ONE markdown report.
#
#   bash benchmarks/device_check.sh              # on the GPU/TPU machine
#   bash benchmarks/device_check.sh --dry-run    # CPU plumbing check, tiny shapes
#   CPU_SMOKE=1 bash benchmarks/device_check.sh  # the same
#
# Sections, in order (each under its own `timeout`, output streamed into the
# report as it comes, so a section cut short keeps what it printed):
#   1. environment: date, nvidia-smi, python/jax/jaxlib/flax/triton versions
#   2. on-device kernel tests: pytest -k on_device, tests/test_kernels_{ssd,attention}.py
#   3. end-to-end (benchmarks/end_to_end.py): configs/hybridna_300m.py, the
#      same-size transformer first, then the hybrid, at 32k, 32768 tokens/step,
#      one document per row (both take their fastest attention), tokens/s, MFU,
#      compile seconds: the number the first device run could not reach
#   4. SSD benchmark (benchmarks/ssd.py): L=32k, h=32, p=64, n=128, bf16,
#      Pallas vs the XLA chunked reference, forward and forward+backward
#   5. attention benchmark (benchmarks/attention.py): causal, d=128, L=32k,
#      h=16, Triton (pallas_gpu) / cuDNN / torch flash vs XLA (blockwise, plain)
# A section that exits 0 with failure cells in its table (error: / OOM:) is
# reported with their count.
#
# The whole run is held to DEVICE_CHECK_BUDGET seconds (default 450: 7.5
# minutes, kill grace included, so under 8 minutes in all): each section's
# timeout is its own cap, shortened where needed so that every later section
# keeps a minimum share; time a section does not use goes to the later ones
# (mostly the end-to-end run, whose compiles are the slowest part).
#
# Report: $REPORT if set, else $OUT/device_report.md when $OUT is set, else
# runs/device_report.md (overwritten at the start of each run). The copy on a
# device machine may carry stale git metadata: DEVICE_CHECK_COMMIT=<sha> in
# the run command names the commit the report was run at.
#
# Missing Python packages (grain, ml-collections, ...) travel as wheels in
# .whl/ (git-ignored); they are installed into /tmp/site (DEVICE_CHECK_SITE)
# before anything runs (in the dry run only with DEVICE_CHECK_WHEELS=1, for a
# Python that matches the wheels).
# Environment knobs: PYTHON (default python3), DEVICE_CHECK_BUDGET,
# JAX_PLATFORMS (default: cuda where nvidia-smi sees a GPU, tpu where
# /dev/accel* or /dev/vfio exists, cpu in the dry run).

set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD

DRY_RUN=${CPU_SMOKE:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu-smoke) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = "1" ] || DRY_RUN=0

PYTHON=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET:-450}
KILL_GRACE=10

if [ -n "${REPORT:-}" ]; then
  :
elif [ -n "${OUT:-}" ]; then
  REPORT=$OUT/device_report.md
else
  REPORT=runs/device_report.md
fi
mkdir -p "$(dirname "$REPORT")"

# -- Python packages that are not on the device image ---------------------------
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
WHEELS_NOTE="no .whl folder"
if [ -d .whl ] && { [ "$DRY_RUN" = 0 ] || [ "${DEVICE_CHECK_WHEELS:-0}" = 1 ]; }; then
  if PIP_LOG=$(timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" .whl/*.whl 2>&1); then
    export PYTHONPATH=$SITE:$ROOT
    WHEELS_NOTE="installed into $SITE: $(cd .whl && echo ./*.whl)"
  else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    WHEELS_NOTE="FAILED to install the wheels in .whl/: $(echo "$PIP_LOG" | grep -v '^WARNING' | tail -3 | tr '\n' ' ')"
  fi
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  [ -d .whl ] && WHEELS_NOTE="dry run: .whl/ not installed (DEVICE_CHECK_WHEELS=1 installs it)"
fi

# The configs need ml-collections: without it every section fails in seconds.
if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import ml_collections" >/dev/null 2>&1; then
  echo "ml_collections does not import ($WHEELS_NOTE): build .whl/ here first (the" \
    "pip download command in benchmarks/RESULTS.md, 'Device check') and run with" \
    "carry: [\".whl\"]." >&2
  exit 2
fi

# -- Platform --------------------------------------------------------------------
if [ -z "${JAX_PLATFORMS:-}" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    JAX_PLATFORMS=cpu
  elif nvidia-smi -L >/dev/null 2>&1; then
    JAX_PLATFORMS=cuda
  elif compgen -G "/dev/accel*" >/dev/null || [ -d /dev/vfio ]; then
    JAX_PLATFORMS=tpu
  else
    JAX_PLATFORMS=cpu
    echo "WARNING: no GPU or TPU found; running on the CPU (use --dry-run for tiny shapes)" >&2
  fi
fi
export JAX_PLATFORMS
export PYTHONUNBUFFERED=1
# A dedicated machine: let JAX take 90% of the accelerator's memory (default
# 75%), which leaves PyTorch (torch_flash in the attention grid) a few GiB.
[ "$DRY_RUN" = 1 ] || export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

# -- Report helpers -------------------------------------------------------------
SUMMARY=()
STATUS=0
LAST_LOG=$(mktemp)
trap 'rm -f "$LAST_LOG"' EXIT

note() { echo "$*" | tee -a "$REPORT"; }

# run_section TITLE CAP RESERVE_AFTER CMD...
# Runs CMD under `timeout` (CAP seconds, less where the remaining budget minus
# RESERVE_AFTER, the minimum kept for the later sections, is smaller), streams
# its output into the report inside a code block, and records status and time.
run_section() {
  local title=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET - SECONDS - reserve - KILL_GRACE))
  local limit=$((cap < left ? cap : left))
  {
    echo
    echo "## $title"
    echo
    echo "\`$*\`"
    echo
  } >> "$REPORT"
  echo ">>> [$(date -u +%H:%M:%S) +${SECONDS}s] $title (timeout ${limit}s)"
  : > "$LAST_LOG"
  if [ "$limit" -lt 15 ]; then
    note "SKIPPED: only ${limit}s of the ${BUDGET}s budget left for this section."
    SUMMARY+=("| $title | skipped (no time left) | 0 |")
    STATUS=1
    return
  fi
  echo '```' >> "$REPORT"
  local start=$SECONDS rc
  timeout -k "$KILL_GRACE" "$limit" "$@" < /dev/null 2>&1 | tee "$LAST_LOG" | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  echo '```' >> "$REPORT"
  local took=$((SECONDS - start)) result
  local failed
  failed=$(grep -cE '(\| |  )(error|OOM): ' "$LAST_LOG")
  case $rc in
    0) result="ok"; [ "$failed" -gt 0 ] && result="ok, $failed row(s) with error/OOM cells" ;;
    124|137) result="TIMEOUT after ${limit}s (output above is partial)" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || STATUS=1
  echo >> "$REPORT"
  note "**$title: $result, ${took}s**"
  SUMMARY+=("| $title | $result | $took |")
}

# -- Header and environment ------------------------------------------------------
MODE=$([ "$DRY_RUN" = 1 ] && echo "DRY RUN (CPU, tiny shapes: numbers mean nothing)" || echo "device")
COMMIT=${DEVICE_CHECK_COMMIT:-}
if [ -z "$COMMIT" ]; then
  COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (git metadata of this copy, unverified: pass DEVICE_CHECK_COMMIT)"
fi
{
  echo "# HybriDNA-JAX device check"
  echo
  echo "- mode: $MODE"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- commit: $COMMIT"
  echo "- host: $(uname -srm), $(nproc) cores"
  echo "- JAX_PLATFORMS=$JAX_PLATFORMS; budget ${BUDGET}s"
  echo "- wheels: $WHEELS_NOTE"
} > "$REPORT"
echo ">>> report: $REPORT"

{
  echo
  echo "## Environment"
  echo
  echo '```'
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md
import platform
print(f"python {platform.python_version()} ({platform.python_implementation()})")
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
             "optax", "orbax-checkpoint", "triton", "torch", "numpy", "grain",
             "ml-collections", "tensorstore", "pytest"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    pass
import jax
print(f"jax backend {jax.default_backend()}; devices {jax.devices()}")
if jax.default_backend() not in ("gpu", "tpu"):
  print("WARNING: JAX runs on the CPU: the on-device tests will be skipped "
        "and the numbers say nothing about a GPU/TPU")
print(f"device_kind {jax.devices()[0].device_kind!r}")
import ml_collections  # noqa: F401  (the configs need it; fails here if a wheel is missing)
print("ml_collections imports")
EOF
  echo '```'
} 2>&1 | tee -a "$REPORT"

# -- Sections --------------------------------------------------------------------
# Caps (s): tests 120, end-to-end 270, SSD 60, attention 60. Minimum kept for
# the later sections, kill grace included: end-to-end 200, SSD 40, attention
# 40; so the reserves after each section are 280, 80, 40 and 0.
TEST_ARGS=(-k on_device -v -rfEs --tb=short -p no:cacheprovider)
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
  TEST_ARGS+=(--timeout=100)
fi

if [ "$DRY_RUN" = 1 ]; then
  SSD_ARGS=(--batch 1 --seqlen 256 --heads 2 --headdim 16 --dstate 16 --chunk 64
            --iters 1 --warmup 1 --impls pallas chunked mamba_ssm)
  ATTN_ARGS=(--small --batch 1 --seqlen 256 --heads 2 --iters 1 --warmup 1)
  E2E_ARGS=(--small --iters 1)
else
  SSD_ARGS=(--batch 1 --seqlen 32768 --heads 32 --headdim 64 --dstate 128
            --dtype bfloat16 --impls pallas chunked mamba_ssm)
  ATTN_ARGS=(--batch 1 --seqlen 32768 --heads 16 --headdim 128 --dtype bfloat16)
  if [ "$JAX_PLATFORMS" = cuda ]; then   # kernels first; torch_flash is added last
    ATTN_ARGS+=(--impls pallas_gpu cudnn xla_blockwise xla)
  fi
  E2E_ARGS=(--config=configs/hybridna_300m.py --seq_lens=32768 --models=transformer,hybrid
            --tokens_per_step=32768 --iters=5 --dtype=bfloat16)
fi

run_section "On-device kernel tests" 120 280 \
  "$PYTHON" -m pytest tests/test_kernels_ssd.py tests/test_kernels_attention.py "${TEST_ARGS[@]}"
if [ "$DRY_RUN" = 0 ] && grep -qE "[0-9]+ skipped" "$LAST_LOG"; then
  note "**WARNING: on-device tests were skipped: JAX did not see a GPU/TPU.**"
  SUMMARY[${#SUMMARY[@]}-1]="| On-device kernel tests | SKIPPED on the device (no GPU/TPU seen) | - |"
  STATUS=1
fi
run_section "End-to-end: hybrid vs transformer" 270 80 \
  "$PYTHON" benchmarks/end_to_end.py "${E2E_ARGS[@]}"
run_section "SSD benchmark" 60 40 \
  "$PYTHON" benchmarks/ssd.py "${SSD_ARGS[@]}"
run_section "Attention benchmark" 60 0 \
  "$PYTHON" benchmarks/attention.py "${ATTN_ARGS[@]}"

# -- Summary ---------------------------------------------------------------------
{
  echo
  echo "## Summary"
  echo
  echo "| section | result | seconds |"
  echo "| --- | --- | ---: |"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "Total wall time: ${SECONDS}s (budget ${BUDGET}s)."
} | tee -a "$REPORT"
echo ">>> report written to $REPORT"
exit $STATUS
