#!/usr/bin/env bash
# Runs on a lent GPU machine (the device tool's `run`, with carry [".dev"]) what
# benchmarks/gpu_kit.sh prepared: installs the kit's wheels, unpacks Omniglot, continues the
# runs carried in .dev/runs (copied there from a CPU machine's bench runs folder, if any), runs
# benchmarks/gpu_bench.sh with the chains given until DEADLINE seconds, and leaves the runs and
# records in $OUT (a tarball: continue them anywhere with `bench ... --resume`).
#   DEADLINE=420 COMMIT=<git commit of this tree> BENCH_OPTS="--seeds 3" \
#     bash benchmarks/gpu_run.sh protonet-omniglot-5w1s,protonet-omniglot-20w1s protonet-omniglot-5w5s
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.dev} OUT=${OUT:-/tmp/gpu-out} PY=${PYTHON:-python3}
mkdir -p "$OUT" /tmp/gpu-data "$KIT/runs" "$KIT/results"
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target /tmp/site "$KIT"/wh/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d /tmp/gpu-data/omniglot-py ] || tar -xzf "$KIT/omniglot.tgz" -C /tmp/gpu-data
export L2L_RECIPES_DATA=/tmp/gpu-data L2L_RECIPES_GIT_COMMIT=${COMMIT:-unknown} OMP_NUM_THREADS=2
"$PY" -c "import torch, learn2learn, l2l_recipes; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
printf '#!/bin/sh\nexec %s -m l2l_recipes.cli "$@"\n' "$(command -v "$PY")" >/tmp/l2l-recipes && chmod +x /tmp/l2l-recipes
RUNS=$KIT/runs RESULTS=$KIT/results LOGS=$OUT/logs L2L=/tmp/l2l-recipes bash benchmarks/gpu_bench.sh "$@"
tar -czf "$OUT/gpu-runs.tgz" -C "$KIT" runs results
ls -la "$OUT"
