#!/usr/bin/env bash
# The whole test suite (what CI runs): set up (plus a browser for the site check, and clang: the quantized CPU kernels
# must build with it too, as on macOS), then
#  1. nbdev-export / nbdev-clean leave no diff, README.md is generated from nbs/index.ipynb;
#  2. every notebook runs ONCE (`efficientai notebooks run`: nbdev-test's engine, papermill's quick parameters
#     from quick/NAME.yaml where a notebook has them, two at a time with a core each) and the executed copy is kept;
#  3. the docs site is rendered from those executed copies (nothing runs again);
#  4. pytest, two tests at a time: integration tests, the checks on the executed notebooks (what nbdev-test and
#     nbval checked) and the built site in headless Chromium (screenshots in runs/ci/screenshots);
#  5. the 15 slowest notebooks and tests, with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
EFFICIENTAI_EXTRA_APT="chromium clang" bash scripts/setup.sh
V=.venv/bin
export PYDEVD_DISABLE_FILE_VALIDATION=1
JOBS=${EFFICIENTAI_JOBS:-2}
OUT="$PWD/runs/ci"

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

rm -rf "$OUT"; mkdir -p "$OUT"
echo "== notebooks: each executed once, $JOBS at a time ($((SECONDS - START)) s so far)"
$V/efficientai notebooks run --out "$OUT/executed" --jobs "$JOBS" --hints .ci/notebook-seconds.json

echo "== docs site from the executed notebooks ($((SECONDS - START)) s so far)"
$V/efficientai docs build --executed "$OUT/executed" --out "$OUT/site"

echo "== pytest ($((SECONDS - START)) s so far)"
EFFICIENTAI_CI_OUT="$OUT" $V/python -m pytest tests -n "$JOBS" -p no:cacheprovider -q

echo "== the slowest notebooks and tests"
$V/efficientai notebooks slowest "$OUT"
echo "== test suite: $((SECONDS - START)) s"
