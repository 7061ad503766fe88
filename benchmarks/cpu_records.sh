#!/usr/bin/env bash
# The CPU-budget benchmark records in results/, as run on this project's 2-core CPU
# machines. Each line appends one record and regenerates README.md's table.
# Usage: bash benchmarks/cpu_records.sh [THREADS]   (THREADS=1 leaves a core free)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${1:-2} MKL_NUM_THREADS=${1:-2}
bench() { .venv/bin/l2l-recipes bench "$@" --device cpu --no-progress; }

bench protonet-omniglot-5w1s --seeds 1
bench protonet-omniglot-5w5s --seeds 1 --max-minutes 12
bench protonet-omniglot-20w1s --seeds 1 --max-minutes 12
bench protonet-omniglot-20w5s --seeds 1 --max-minutes 12
bench maml-omniglot-5w1s --seeds 1 --max-minutes 15
bench maml-omniglot-20w1s --seeds 1 --max-minutes 15
bench protonet-mini-imagenet-5w1s --seeds 1 --max-minutes 15 --episodes 600 --set val_episodes=100
bench protonet-mini-imagenet-5w5s --seeds 1 --max-minutes 15 --episodes 600 --set val_episodes=100
