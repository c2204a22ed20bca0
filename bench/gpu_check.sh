#!/usr/bin/env bash
# The GPU checks of issue #5 as one prepared call of the device tool (at most 8 minutes):
#   1. the auction solver's tests on the GPU (exactness against scipy, vmap, fusion);
#   2. bench/bench_fusion.py for MLPNet, VGG11 and ViT (configs/fashion_vit.py) pairs by weights: exact-device
#      (optax Hungarian), exact-auction, Sinkhorn; vmap throughput at 1/8/64/256
#      pairs and K-parent fusion for the two parallel solvers; the NumPy + POT
#      reference on the machine's CPU for the ratios;
#   3. bench/bench_many.py: fusion time per K (2, 4, 8) of CCA Merge and the two barycentres (issue 13).
# Results land in $OUT (the device tool brings them back): log, results_gpu.json,
# results_gpu.md, many_gpu.json. Prepare the wheels first with bench/gpu_wheels.sh, then:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# GPU_CHECK_QUICK=1 runs a tiny version (any machine, about 2 minutes on a 2-core CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" | tee -a "$OUT/log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{ date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee -a "$OUT/log"

if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  tests=(tests/test_auction.py -k "integer or out_of_rounds")
  bench=(--quick --models mlpnet --modes weights --solvers exact-auction --vmap-solvers exact-auction --k-solvers exact-auction)
  many=(--ks 3 --samples 40 --repeats 1 --iterations 2 --widths 12 8)
else
  tests=(tests/test_auction.py)
  bench=(--models mlpnet vgg11 vit --modes weights --solvers exact-device exact-auction sinkhorn
         --vmap-solvers exact-auction sinkhorn --k-solvers exact-auction sinkhorn
         --vmap-counts 1 8 64 256 --k-values 2 4 --budget-s 4 --ref-repeats 2 --interleave-rounds 5)
  many=(--ks 2 4 8 --repeats 3)
fi
timeout 120 "$PY" -m pytest -q -x -p no:cacheprovider "${tests[@]}" 2>&1 | tee -a "$OUT/log"
tests_rc=${PIPESTATUS[0]}
timeout 270 "$PY" bench/bench_fusion.py "${bench[@]}" --out "$OUT/results_gpu.json" --markdown "$OUT/results_gpu.md" 2>&1 \
  | tee -a "$OUT/log"
bench_rc=${PIPESTATUS[0]}
timeout 60 "$PY" bench/bench_many.py "${many[@]}" --out "$OUT/many_gpu.json" 2>&1 | tee -a "$OUT/log"
many_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc many rc=$many_rc" | tee -a "$OUT/log"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$many_rc" = 0 ]
