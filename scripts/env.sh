#!/bin/sh
# Creates .venv (reusing a torch and Triton the machine already has, such as a GPU build)
# and installs einflash into it with the pinned versions of everything else.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
if ! .venv/bin/python -c 'import torch, triton; assert tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 6)' 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" "triton==3.6.0"
fi
.venv/bin/python -m pip install -q -r scripts/requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
