#!/usr/bin/env bash
# Prepares here what a bench on a lent GPU machine needs and cannot download there (it reaches no
# network): wheels for its Python (3.12) of what its torch image lacks (learn2learn 0.2.0, built by
# tools/learn2learn_wheel.sh as for 3.11, gym, qpth, click, tqdm, cloudpickle) and Omniglot as
# one archive. Writes KIT (default .dev, ignored by git):
#   KIT/wh/*.whl  KIT/omniglot.tgz
# Keep a copy outside the work tree (e.g. /root/l2l-long/gpu-kit) and copy it to .dev in a
# session that is lent a GPU (with any runs to continue in .dev/runs/<recipe>/), then run
# benchmarks/gpu_run.sh there with the device tool (`run`, carry [".dev"]); the setting it
# reproduces ran on an H200 with torch 2.11 and Python 3.12 on 2026-12-04 (docs/speed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.dev}
DATA=${L2L_RECIPES_DATA:-$(cd .. && pwd)/shared/data}
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY=${PYTHON:-python3.12}
is312 "$PY" || PY=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python 2>/dev/null | tail -n 1)
is312 "${PY:-none}" \
  || { echo "gpu_kit.sh builds for Python 3.12 (the GPU machine's); set PYTHON=/path/to/python3.12" >&2; exit 1; }
[ -d "$DATA/omniglot-py" ] || { echo "no $DATA/omniglot-py: set L2L_RECIPES_DATA" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
pip() { "$work/venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install 'setuptools>=68' wheel 'cython>=3.0'
bash tools/learn2learn_wheel.sh "$work/venv/bin" "$KIT/wh"
pip wheel --no-deps gym==0.26.2 gym_notices qpth==0.0.18 -w "$KIT/wh"
pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$KIT/wh" \
  "$(grep -E '^click==' requirements.txt)" "$(grep -E '^tqdm==' requirements.txt)" \
  "$(grep -E '^cloudpickle==' requirements.txt)"
tar -czf "$KIT/omniglot.tgz" -C "$DATA" omniglot-py
du -sh "$KIT/wh" "$KIT/omniglot.tgz"
