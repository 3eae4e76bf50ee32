#!/usr/bin/env bash
# Lint, format check and type check of the package's code, as CI runs them:
#   bash scripts/lint.sh          (ruff and mypy come with `pip install -e '.[test]'`)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
paths=(registry service protos setup.py)
ruff check "${paths[@]}"
ruff format --check "${paths[@]}"
# mypy knows modules by their import names (paramserve.registry, ...), which pyproject's
# package-dir maps onto the top-level folders: a temporary tree of links gives it that layout.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/paramserve"
for d in registry service protos; do ln -s "$root/$d" "$tree/paramserve/$d"; done
cd "$tree"
MYPYPATH="$tree" mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
  --explicit-package-bases -p paramserve.registry -p paramserve.service
