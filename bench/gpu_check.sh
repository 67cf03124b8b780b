#!/usr/bin/env bash
# What a GPU user of SAK depends on, in one command with a JSON report (the checks: bench/gpu_check.py's docstring).
#
#   bash bench/gpu_check.sh [--reduced] [--compile] [--output PATH]
#
# Full mode on a CUDA machine (about 3-4 minutes on one GPU); a reduced run on CPU-only machines or with --reduced
# (about a minute on two cores). Report: --output, default bench/results/gpu_check_<cpu|cuda>.json. Exit status 1 when
# any check failed. The checks run this checkout's modeling_sak (put first on PYTHONPATH), offline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" "${root}/bench/gpu_check.py" "$@"
