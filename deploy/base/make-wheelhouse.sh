#!/bin/sh
# Every wheel the image needs, into deploy/wheels (or DIR), for a build with no index at all:
#   deploy/base/make-wheelhouse.sh [DIR] [EXTRAS]
#   docker build -f deploy/Dockerfile --build-arg WHEELS_ONLY=1 ...
# Run it from the repository root with the Python the image has (same version: the wheels are
# per interpreter). Where this machine's virtual environment has fedtune installed, its versions
# are pinned (pip freeze), so the image runs what was tested here.
set -eu
dir=${1:-deploy/wheels}
extras=${2:-ray}
python=${PYTHON:-python3}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$python" -m pip freeze --exclude-editable | grep -v '^fedtune' > "$constraints" || true
"$python" -m pip download --dest "$dir" --constraint "$constraints" ".[$extras]" 'setuptools>=68' wheel
ls "$dir" | grep -c '\.whl$'
