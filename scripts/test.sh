#!/usr/bin/env bash
# The whole test suite (what CI runs): set up, then
#  1. nbdev-export / nbdev-clean leave no diff, README.md is generated from nbs/index.ipynb;
#  2. nbdev-test runs every notebook's tests;
#  3. each benchmark notebook gets its quick parameters from papermill (--prepare-only: injected, not run);
#  4. pytest: integration tests in tests/ plus nbval, which executes each parameterised benchmark notebook once
#     (--nbval-lax: its asserts and errors fail the run; outputs are measurements, so they are not compared).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
bash scripts/setup.sh
V=.venv/bin
export PYDEVD_DISABLE_FILE_VALIDATION=1

echo "== nbdev: export and clean must leave no diff"
# Compare the working tree before and after (on a clean clone, as in CI, "before" is the commit itself).
snapshot() { git status --porcelain -- efficientai nbs README.md; git diff HEAD -- efficientai nbs README.md | sha1sum; }
have_git=0; git rev-parse --verify -q HEAD >/dev/null 2>&1 && have_git=1
[ $have_git = 1 ] && before=$(snapshot)
$V/nbdev-export
$V/nbdev-clean
if [ $have_git = 1 ] && [ "$(snapshot)" != "$before" ]; then
  echo "nbdev-export / nbdev-clean changed files: run them and commit the result"
  git status --porcelain -- efficientai nbs README.md; exit 1
fi
$V/efficientai docs readme --check

echo "== nbdev-test"
# Each notebook in a fresh process, one at a time, as a fresh kernel would run it: in-process runs share
# `import mlx` (so the fast BLAS must be loaded first in every one), and two BLAS-heavy notebooks at once make
# OpenBLAS threads wait on each other (10-20x slower).
find nbs -name '*.ipynb' -not -path 'nbs/benchmarks/*' -not -path '*/.*' -not -path 'nbs/_*' | sort | while read -r nb; do
  start=$SECONDS
  $V/nbdev-test "$nb" --n-workers 0 || { echo "FAILED: $nb"; exit 1; }
  echo "   $nb: $((SECONDS - start)) s"
done

echo "== benchmark notebooks (papermill injects the quick parameters)"
OUT="$ROOT/runs/ci"
rm -rf "$OUT"; mkdir -p "$OUT/notebooks"
for nb in nbs/benchmarks/*.ipynb; do
  name=$(basename "$nb" .ipynb)
  $V/papermill "$nb" "$OUT/notebooks/$name.ipynb" -k efficientai --cwd nbs/benchmarks \
    -f "nbs/benchmarks/quick/$name.yaml" -p out_dir "$OUT/results" --no-progress-bar --prepare-only
done

echo "== pytest (integration tests + nbval runs the parameterised benchmark notebooks)"
$V/python -m pytest tests "$OUT/notebooks" --nbval-lax --nbval-kernel-name efficientai \
  --nbval-sanitize-with nbs/benchmarks/sanitize.cfg -p no:cacheprovider -q
