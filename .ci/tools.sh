#!/usr/bin/env bash
# Tools the tests use when present: promtool (Debian's prometheus package) checks the metrics
# exposition in tests/test_metrics.py, beside prometheus_client's parser, which always runs.
# Bounded; a failed install leaves the parser check alone and is said, not fatal.
set -uo pipefail
if command -v promtool >/dev/null; then
  exit 0
fi
if timeout 300 bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null'; then
  echo "promtool: $(promtool --version 2>&1 | head -1)"
else
  echo "promtool could not be installed: tests/test_metrics.py checks with the parser only" >&2
fi
exit 0
