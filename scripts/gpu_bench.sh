#!/usr/bin/env bash
# Step time, tokens/s and MFU of the 130m and 350m models in bf16 on one NVIDIA GPU (< 5 min).
#
#   scripts/gpu_bench.sh                  # both sizes; figures also in $OUT_DIR/gpu_bench_<size>.json
#   SIZES=350m BATCH_350M=64 scripts/gpu_bench.sh
#   GPAS_COMPARE=1 scripts/gpu_bench.sh   # also time the same model without GPAS (2x compiles)
#   scripts/gpu_bench.sh --config.model.remat_policy=full   # extra flags go to gpas_jax.bench
#
# bf16 compute with fp32 master weights (model.compute_dtype=bfloat16), cuDNN flash attention
# (model.attention_impl=cudnn), scanned layers, batch x 256 tokens, MFU against the bf16 dense
# peak of the chip (gpas_jax.metrics.PEAK_FLOPS: H100 SXM 989 TFLOP/s, A100 312, ...).
# Needs jax with CUDA (pip install -U "jax[cuda12]"). Each size: one compile (~20-60 s) and
# WARMUP + STEPS steps. Lower BATCH_* if a size runs out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"130m 350m"}
BATCH_130M=${BATCH_130M:-64}
BATCH_350M=${BATCH_350M:-32}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
ATTENTION=${ATTENTION:-cudnn}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if [[ "${ALLOW_CPU:-0}" != "1" ]]; then
  python - <<'EOF'
import sys
import jax
d = jax.devices()[0]
if d.platform != 'gpu':
  sys.exit(f'gpu_bench.sh: no GPU visible to JAX (found {d.platform}: {d.device_kind}); install '
           'jax[cuda12] or set ALLOW_CPU=1 to try the flags on CPU.')
print(f'GPU: {d.device_kind} ({jax.device_count()} visible)')
EOF
fi

compare=--nocompare_gpas
[[ "${GPAS_COMPARE:-0}" == "1" ]] && compare=--compare_gpas

for size in $SIZES; do
  var="BATCH_${size^^}"
  batch=${!var:-32}
  echo "=== ${size}: batch ${batch} x 256, bf16 compute, attention ${ATTENTION} ==="
  python -m gpas_jax.bench --config "configs/llama_${size}.py" \
    --steps "$STEPS" --warmup "$WARMUP" "$compare" --json \
    --config.model.compute_dtype=bfloat16 \
    --config.model.attention_impl="$ATTENTION" \
    --config.optim.global_batch_size="$batch" \
    --config.data.eval_batch_size="$batch" \
    --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1 \
    "$@" > "${OUT_DIR}/gpu_bench_${size}.json"
  python - "${OUT_DIR}/gpu_bench_${size}.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
j = r['jax']
mfu = f'{100 * j["mfu"]:.1f}%' if 'mfu' in j else 'n/a (unknown chip)'
print(f'RESULT {r["config"]["size_name"]}: step {1e3 * j["step_time_s"]:.1f} ms, '
      f'{j["tokens_per_s"]:,.0f} tokens/s, MFU {mfu}, compile {j["compile_s"]:.0f} s, '
      f'device peak {(j.get("device_peak_bytes_in_use") or 0) / 2**30:.1f} GiB')
EOF
done
