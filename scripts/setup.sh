#!/usr/bin/env bash
# Create .venv (Python 3.11) with the project, notebook and test dependencies, and a `python3` Jupyter
# kernel that points at it. Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo ">> creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are pinned in pyproject.toml; installing them first keeps the resolver from
# looking at newer multi-GB builds.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[notebooks,test]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (csa)" >/dev/null
echo ">> environment ready: $(.venv/bin/python -c 'import torch, csa; print("torch", torch.__version__, "| csa", csa.__version__)')"
