#!/usr/bin/env bash
# The main job: set up the environment, execute every notebook on the embedded Oxford/Paris demo with
# papermill (outputs land in book/notebooks/), then build the Jupyter Book into book/_build/html.
# About 10-15 minutes on 2 CPU cores. Extra papermill parameters for all notebooks are not supported on
# purpose: use `python -m csa.batch` for parameter grids.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=book/notebooks
mkdir -p "$OUT"
PARTIAL=$(mktemp -d)            # a notebook lands in book/ only once it has run to the end
trap 'rm -rf "$PARTIAL"' EXIT
export PYTHONUNBUFFERED=1
for nb in 01_data_preparation 02_training 00_inference_in_a_few_lines 03_reranking 04_qualitative_top10 05_comparison 06_ablation; do
    echo ">> executing notebooks/$nb.ipynb"
    start=$(date +%s)
    # papermill runs with notebooks/ as the working directory, so relative paths inside the notebooks
    # resolve the same way as in Jupyter.
    "$PY" -m papermill "notebooks/$nb.ipynb" "$PARTIAL/$nb.ipynb" --cwd notebooks --kernel python3 --progress-bar
    mv "$PARTIAL/$nb.ipynb" "$OUT/$nb.ipynb"
    echo ">> $nb done in $(( $(date +%s) - start )) s"
done
echo ">> building the book"
.venv/bin/jupyter-book build book -W --keep-going
echo ">> book: $(pwd)/book/_build/html/index.html"
