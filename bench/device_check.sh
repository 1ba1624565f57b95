#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (the workplace's `device` tool), whose image
# has python3 with torch, numpy, safetensors and pytest but not pydantic, and reaches no registry.
#
#   bench/device_check.sh prepare     # here: wheels pydantic needs -> .whl/, ml-1m -> .devdata/ (both git-ignored
#                                     # through .git/info/exclude, which `prepare` fills in)
#   bench/device_check.sh run         # there, with carry [".whl", ".devdata"]; results go to $OUT (or ./device-out)
#
# `run` does, in order: the device-parity tests (tests/test_cuda.py: Fisher, training of every recipe,
# evaluation and top-k, each against the CPU), then bench/fisher_speed.py on ml-1m with every method on
# the GPU (the issue's goal there: exact per-example Fisher >= 10x the plain per-sequence loop).
# DEVICE=cpu runs the same steps on the CPU, to check this script on a machine without a GPU
# (PYTHON=.venv/bin/python USERS=8 REPEATS=1 make it quick).
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    mkdir -p .git/info
    for p in /.whl/ /.devdata/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
    # The versions this project's own venv resolved, for the device image's Python 3.12.
    local py=${PYTHON:-.venv/bin/python}
    local pkgs
    pkgs=$("$py" -m pip list --format=freeze 2>/dev/null |
           grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pkgs
    rm -rf .devdata && mkdir -p .devdata
    cp -r ../shared/data/ml-1m .devdata/ml-1m
    du -sh .whl .devdata
}

run() {
    local out=${OUT:-device-out} dev=${DEVICE:-cuda} py=${PYTHON:-python3}
    mkdir -p "$out"
    if ! "$py" -c "import pydantic" 2>/dev/null; then  # the device image lacks it: the carried wheels
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    { nvidia-smi || true; "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'; } \
        > "$out/machine.txt" 2>&1
    RECMERGE_TEST_DEVICE=$dev "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" \
        || echo "device-parity tests FAILED" | tee -a "$out/test_cuda.log"
    "$py" bench/fisher_speed.py --source .devdata/ml-1m --device "$dev" --threads 4 --repeats "${REPEATS:-3}" --users "${USERS:-64}" \
        --out "$out/fisher_speed-$dev.md" 2>&1 | tail -n 40 | tee "$out/fisher_speed.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
