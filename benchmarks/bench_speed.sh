#!/usr/bin/env bash
# Seconds per iteration of real `l2l-recipes bench` runs (training, the recipe's validations at its
# interval, its whole test), cut to a few validations, for the Omniglot 5w1s recipes whose paper
# budget issue 16 asks to fit in 3 hours on this machine; prints each budget's projection:
# train_seconds / iterations x the recipe's iterations + the test's seconds. The records (cut
# short, so not for the benchmark table) are copied to benchmarks/speed/bench/. Run it on an
# otherwise idle machine: the long runs of long_runs.sh are paused (SIGSTOP) meanwhile and
# continued after. THREADS (default 2) OpenMP threads; RECIPES="NAME:ITERATIONS ..." to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/speed/bench
export L2L_RECIPES_DATA=${L2L_RECIPES_DATA:-$(cd .. && pwd)/shared/data}  # as long_runs.sh
TMP=$(mktemp -d)
paused=$(pgrep -f "bench_queue.sh|l2l-recipes bench" || true)
[ -n "$paused" ] && kill -STOP $paused
trap '[ -n "$paused" ] && kill -CONT $paused; rm -rf "$TMP"' EXIT
# each budget a multiple of the recipe's validation interval: three validations (SNAIL two)
for item in ${RECIPES:-maml-omniglot-5w1s:1500 fomaml-omniglot-5w1s:1500 metasgd-omniglot-5w1s:1500
                       anil-omniglot-5w1s:1500 reptile-omniglot-5w1s:3000 snail-omniglot-5w1s:1000}; do
  OMP_NUM_THREADS=${THREADS:-2} "$PY" -m l2l_recipes.cli bench "${item%%:*}" --seeds 1 --iterations "${item##*:}" \
    --device cpu --runs-dir "$TMP/runs" --results-dir "$TMP/results" --no-progress
done
mkdir -p "$OUT" && cp "$TMP"/results/*.json "$TMP"/results/*.png "$OUT"/
"$PY" - "$TMP"/results/*.json <<'EOF'
import json, sys
from l2l_recipes import registry
for path in sys.argv[1:]:
    record = json.load(open(path))
    (seed,) = record["seeds"]
    per_it = seed["train_seconds"] / seed["iterations_done"]
    budget = registry.get_recipe(record["recipe"]).config().iterations
    print(f"{record['recipe']}: {per_it:.3f} s/it over {seed['iterations_done']} it (validations included), "
          f"test {seed['eval_seconds']:.0f} s: paper budget {budget} it -> "
          f"{(per_it * budget + seed['eval_seconds']) / 3600:.2f} h")
EOF
