#!/usr/bin/env bash
# Creates .venv with everything l2l-recipes needs, learn2learn 0.2.0 included.
# A second call with unchanged inputs returns at once: the stamp file is keyed on
# the hash of the requirements, the package metadata and this script.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${L2L_RECIPES_VENV:-.venv}
WHEELHOUSE=.wheelhouse
L2L_VERSION=0.2.0
key=$(cat requirements.txt setup.cfg pyproject.toml tools/bootstrap.sh tools/learn2learn_wheel.sh | sha256sum | cut -c1-16)
stamp="$VENV/.stamp-$key"
[ -f "$stamp" ] && exit 0

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "l2l-recipes needs Python 3.11 (found $("$PY" --version)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
echo "setting up $VENV (one time; about 3 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
bin=$(cd "$VENV/bin" && pwd)
pip() { "$bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install 'setuptools>=68' wheel 'cython>=3.0'

# learn2learn 0.2.0's sdist does not build on Python 3.11 as shipped (old Cython output):
# tools/learn2learn_wheel.sh regenerates its C files and builds a wheel once into a local wheelhouse.
if ! ls "$WHEELHOUSE"/learn2learn-$L2L_VERSION-cp311-*.whl >/dev/null 2>&1; then
  bash tools/learn2learn_wheel.sh "$bin" "$WHEELHOUSE" "$L2L_VERSION"
fi

pip install -r requirements.txt
# learn2learn's declared requirements pull in gsutil, which only its QuickDraw download
# calls. gym is imported by `import learn2learn`, so it is installed, without its
# gym-notices banner. qpth (MetaOptNet's SVM head) pins numpy<2 in its metadata but runs on
# numpy 2, so it goes in without dependency resolution; its own import of cvxpy is in
# requirements.txt.
pip install --no-deps "gym==0.26.2" "qpth==0.0.18" "$WHEELHOUSE"/learn2learn-$L2L_VERSION-cp311-*.whl
pip install --no-deps --no-build-isolation -e .
"$bin/python" -c 'import learn2learn, l2l_recipes, qpth.qp' 
rm -f "$VENV"/.stamp-*
touch "$stamp"
