#!/usr/bin/env bash
# The accelerator check of issue #31 (benchmarks/device_check.py), as one command for a lent GPU machine:
# installs what its image lacks from wheels carried in .whl/ (TransformerLens and its pure-Python dependencies;
# fetch them here with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
# transformer-lens beartype better-abc fancy-einsum typeguard jaxtyping wadler-lindig gguf), then runs the
# check on the device and writes its JSON to $OUT (or ./device_check.json). Budget: about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install --quiet --no-deps --no-index .whl/*.whl
fi
$PY -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD
out=${OUT:-.}/device_check.json
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
timeout 540 $PY benchmarks/device_check.py --device "${DEVICE:-cuda}" --work /tmp/rwasym-device "$@" | tee "$out"
