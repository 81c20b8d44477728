#!/usr/bin/env bash
# Ready for the first GPU? Runs Corral's own entry points on this CUDA machine and prints one
# JSON report: bf16 LoRA and QLoRA steps, FSDP2 with a sharded checkpoint and resume=auto (2+
# GPUs), peak memory against docs/training.md's arithmetic, tokens/s and MFU against the anchors, and
# serving throughput. About 5 minutes with the embedded model; a 7B takes longer (--time-limit).
#
#   scripts/gpu_check.sh                                   # the embedded model (always present)
#   scripts/gpu_check.sh --model meta-llama/Llama-2-7b-hf  # or a local 7B folder
#   scripts/gpu_check.sh --dry-run                         # the plan only, on any machine
#
# Without a CUDA device it prints the plan with "gpu": null and exits 0. Exit status 1 when a
# step failed (the JSON says which, with its stderr), 2 for a bad --model or option.
# Details: scripts/gpu_check.py (--help).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  python=python3
  [ -x "$here/.venv/bin/python" ] && python="$here/.venv/bin/python"
fi
exec "$python" "$here/scripts/gpu_check.py" "$@"
