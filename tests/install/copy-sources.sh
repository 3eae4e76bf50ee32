#!/usr/bin/env bash
# copy-sources.sh DEST: the checkout's files as a fresh clone (plus untracked, not ignored,
# files) would have them, so an install can build there without touching the checkout.
set -euo pipefail
dest=$1
cd "$(dirname "$0")/../.."
mkdir -p "$dest"
git ls-files -z --cached --others --exclude-standard \
  | tar -c --null -T - --ignore-failed-read 2>/dev/null | tar -x -C "$dest"
