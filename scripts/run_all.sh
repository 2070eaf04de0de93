#!/usr/bin/env bash
# The main job: set up the environment, execute every notebook on the embedded Oxford/Paris demo with
# papermill (outputs land in book/notebooks/), then build the Jupyter Book into book/_build/html.
# About 10 minutes on 2 CPU cores from a fresh clone (set-up ~1.5 min, descriptor extraction ~2.5 min,
# training ~2.7 min; the measured times per notebook land in book/generated/build_times.md).
# For parameter grids over one notebook use `csa batch` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=book/notebooks
mkdir -p "$OUT"
PARTIAL=$(mktemp -d)            # a notebook lands in book/ only once it has run to the end
trap 'rm -rf "$PARTIAL"' EXIT
export PYTHONUNBUFFERED=1
for nb in 01_data_preparation 02_training 00_inference_in_a_few_lines 03_reranking 04_qualitative_top10 10_query_browser 05_comparison 06_ablation 07_recipe_selection 08_paper_table 09_what_csa_computes 11_worked_example; do
    echo ">> executing notebooks/$nb.ipynb"
    start=$(date +%s)
    # papermill runs with notebooks/ as the working directory, so relative paths inside the notebooks
    # resolve the same way as in Jupyter; --log-output echoes what the cells print (long steps print a
    # plain progress line every ~25 s when their output is not a terminal, csa.progress).
    "$PY" -m papermill "notebooks/$nb.ipynb" "$PARTIAL/$nb.ipynb" --cwd notebooks --kernel python3 --log-output
    mv "$PARTIAL/$nb.ipynb" "$OUT/$nb.ipynb"
    echo ">> $nb done in $(( $(date +%s) - start )) s"
done
echo ">> building the book"
"$PY" book/make_tables.py --build-times "$OUT" >/dev/null
# every number the chapters state must be one this run produced (tests/test_prose_numbers.py checks the same)
"$PY" book/check_numbers.py --executed "$OUT" || echo ">> warning: the prose states numbers this run did not produce (above)"
.venv/bin/jupyter-book build book -W --keep-going
echo ">> book: $(pwd)/book/_build/html/index.html"
