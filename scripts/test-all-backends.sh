#!/usr/bin/env bash
# Create a virtual environment, install keras_peft with every backend, and run
# the test suite under JAX, TensorFlow and PyTorch in turn.
#
# Usage: bash scripts/test-all-backends.sh [extra pytest arguments]
# Environment: VENV (default .venv) is the virtual environment to create or reuse.
set -uo pipefail

cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"

python3 -m venv "$venv" || exit 1
"$venv/bin/python" -m pip install --quiet --upgrade pip || exit 1
"$venv/bin/python" -m pip install --quiet -c constraints.txt \
    -e ".[tensorflow,jax,torch,test,examples]" || exit 1

failed=()
for backend in jax tensorflow torch; do
    echo "=== KERAS_BACKEND=$backend"
    start=$(date +%s)
    KERAS_BACKEND="$backend" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
    status=$?
    echo "=== KERAS_BACKEND=$backend finished with exit status $status in $(( $(date +%s) - start )) s"
    if [ "$status" -ne 0 ]; then
        failed+=("$backend")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "Tests failed under: ${failed[*]}"
    exit 1
fi
echo "Tests passed under jax, tensorflow and torch."
