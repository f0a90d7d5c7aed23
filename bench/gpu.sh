#!/bin/sh
# GPU figures in one JSON line, offline, in under 8 minutes on one H100 (bench/gpu.py).
# Run from the repository root: sh bench/gpu.sh [--tiny]
set -e
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m bench.gpu "$@"
