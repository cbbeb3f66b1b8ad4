#!/usr/bin/env bash
# bash analyses/setup_gptqmodel_env.sh [VENV_DIR]
#
# Builds a separate virtual environment with gptqmodel (the peer benchmarked in
# analyses/bench_quantize.py) on the CPU torch 2.13.0. gptqmodel asks for torch>=2.14.1, which
# would pull a CUDA build of several GB, so torch is pinned first and gptqmodel plus torchao are
# installed without dependency resolution; the rest of its requirements are installed normally.
set -euo pipefail
VENV=${1:-.venv-gptqmodel}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
tmp=$(mktemp -d)
"$VENV/bin/pip" download -q --no-deps gptqmodel -d "$tmp"
tar xzf "$tmp"/gptqmodel-*.tar.gz -C "$tmp"
grep -vE '^(torch|torchao)\b' "$tmp"/gptqmodel-*/requirements.txt > "$tmp/req.txt"
"$VENV/bin/pip" install -q -r "$tmp/req.txt" "torch==2.13.0"
"$VENV/bin/pip" install -q --no-deps torchao gptqmodel
"$VENV/bin/pip" install -q optimum "torch==2.13.0"   # transformers loads gptq/ through optimum
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "gptqmodel environment ready in $VENV"
