#!/usr/bin/env bash
# The 130m and 350m models in bf16 on one NVIDIA GPU, unattended, in under 5 minutes: step time,
# tokens/s, MFU against the chip's peak, memory and compile time, with XLA's attention and with
# cuDNN flash attention (both timed in one process, alternating steps; a variant that fails to
# compile is reported as not run).
#
#   scripts/gpu_bench.sh                  # both sizes; JSON per size in $OUT_DIR/gpu_bench_<size>.json
#   SIZES=350m BATCH_350M=16 scripts/gpu_bench.sh
#   scripts/gpu_bench.sh --config.model.remat_policy=full   # extra flags go to gpas_jax.perf.bench
#   CPU_SMOKE=1 scripts/gpu_bench.sh      # no GPU: tiny dims on the CPU, to check the script itself
#
# bf16 compute with fp32 master weights (model.compute_dtype=bfloat16), scanned layers, batch x 256
# tokens, MFU against the chip's dense bf16 peak (gpas_jax.train.metrics.PEAK_FLOPS). Needs jax with
# CUDA (pip install "jax[cuda12]==<the jax version in requirements.txt>"). Each size: two
# compiles (~20-60 s each) and WARMUP + STEPS rounds, within SIZE_TIMEOUT seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"130m 350m"}
BATCH_130M=${BATCH_130M:-64}
BATCH_350M=${BATCH_350M:-32}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
ATTENTIONS=${ATTENTIONS:-}  # default "xla cudnn"; the first is the main variant, the rest --try'd
SIZE_TIMEOUT=${SIZE_TIMEOUT:-140}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}}
PYTHON=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

fail() { echo "gpu_bench.sh: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH (set PYTHON=...)."
command -v timeout >/dev/null || fail "no 'timeout' command (coreutils)."
mkdir -p "$OUT_DIR" || fail "cannot create OUT_DIR=$OUT_DIR."

extra=()
if [[ "${CPU_SMOKE:-0}" == "1" ]]; then
  # The same commands on the CPU with tiny dims: checks the script, not the GPU figures.
  export JAX_PLATFORMS=cpu
  ATTENTIONS=${ATTENTIONS:-"xla einsum"}  # no cuDNN on the CPU
  STEPS=${STEPS_SMOKE:-2}; WARMUP=0; BATCH_130M=2; BATCH_350M=2
  extra=(--config.model.num_layers=1 --config.model.post_num=0 --config.model.hidden_size=64
         --config.model.num_heads=2
         --config.model.intermediate_size=128 --config.model.vocab_size=512
         --config.data.tokenizer_vocab_size=512)
else
  # Fail in seconds when the GPU stack is missing, naming what to install.
  timeout 120 "$PYTHON" - <<'EOF' || exit 2
import sys
try:
  import jax, flax, optax, ml_collections  # noqa: F401
except ImportError as e:
  sys.exit(f'gpu_bench.sh: {e}: pip install -r requirements.txt, then jax with CUDA '
           '(pip install "jax[cuda12]==<the jax version in requirements.txt>").')
try:
  gpus = jax.devices('gpu')
except RuntimeError as e:
  cpu = jax.devices()[0]
  sys.exit(f'gpu_bench.sh: jax {jax.__version__} sees no GPU (only {cpu.platform}: '
           f'{cpu.device_kind}): {str(e).splitlines()[0][:200]}. Install jax with CUDA '
           f'(pip install "jax[cuda12]=={jax.__version__}") and check nvidia-smi; '
           'CPU_SMOKE=1 runs the script on the CPU.')
from gpas_jax.train import metrics
kind = gpus[0].device_kind
peak = metrics.peak_flops(kind, 'bfloat16')
print(f'GPU: {kind} ({len(gpus)} visible, using 1); bf16 peak '
      + (f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown: MFU will be n/a (add the chip to '
         'gpas_jax.train.metrics.PEAK_FLOPS)'))
EOF
fi

read -r -a attn <<< "${ATTENTIONS:-xla cudnn}"
tries=()
for a in "${attn[@]:1}"; do tries+=(--try "model.attention_impl=$a"); done

files=()
failed=()
for size in $SIZES; do
  [[ -f "configs/llama_${size}.py" ]] || fail "no configs/llama_${size}.py (SIZES=$SIZES)."
  var="BATCH_${size^^}"
  batch=${!var:-32}
  out="${OUT_DIR}/gpu_bench_${size}.json"
  echo "=== ${size}: batch ${batch} x 256, bf16 compute, attention ${attn[*]} ==="
  start=$(date +%s)
  set +e
  timeout "$SIZE_TIMEOUT" "$PYTHON" -m gpas_jax.perf.bench --config "configs/llama_${size}.py" \
      --steps "$STEPS" --warmup "$WARMUP" --nocompare_gpas --nobaseline_faithful --noother_mallocs \
      --json \
      --config.model.compute_dtype=bfloat16 \
      --config.model.attention_impl="${attn[0]}" \
      --config.optim.global_batch_size="$batch" \
      --config.data.eval_batch_size="$batch" \
      --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1 \
      "${tries[@]}" "${extra[@]}" "$@" > "$out" 2> "${out%.json}.log"
  code=$?
  set -e
  if (( code != 0 )); then
    tail -n 15 "${out%.json}.log" >&2
    if (( code == 124 )); then
      why="did not finish in ${SIZE_TIMEOUT} s (raise SIZE_TIMEOUT, or lower BATCH_${size^^} or STEPS)"
    else
      why="failed (exit ${code}; lower BATCH_${size^^} if out of memory)"
    fi
    echo "gpu_bench.sh: ${size} ${why}; log: ${out%.json}.log" >&2
    failed+=("$size")
    continue
  fi
  echo "    (${size}: $(( $(date +%s) - start )) s)"
  files+=("$out")
done
(( ${#files[@]} )) && "$PYTHON" -m gpas_jax.perf.bench_report "${files[@]}"
(( ${#failed[@]} == 0 )) || fail "not measured: ${failed[*]}"
