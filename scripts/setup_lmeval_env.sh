#!/usr/bin/env bash
# Build (or verify) a virtual environment with EleutherAI's lm-evaluation-harness, for the tests
# that evaluate through `corral serve` (`make lmeval-env`, `make test-lm-eval`). It is separate from
# .venv because lm-eval's table writer pins python-dateutil<3, older than Corral's environment has;
# users run lm-eval from its own environment against the server in the same way.
#
#   usage: scripts/setup_lmeval_env.sh [TARGET_DIR]      (default: .venv-lmeval)
#
# Idempotent: an existing healthy venv is only verified; a missing or partial one is (re)installed.
# Needs python3 3.11 and a pip that finds torch==2.13.0 (the CPU build: install it from PyTorch's
# CPU index or a local wheel first if pip cannot). The `hf` extra is the reference backend
# (`lm_eval --model hf`), with the transformers version Corral itself runs.
set -euo pipefail

TARGET="${1:-.venv-lmeval}"
PYTHON="${PYTHON:-python3}"
LM_EVAL_VERSION="0.4.13"
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="5.23.0"

log() { printf '[setup_lmeval_env] %s\n' "$*" >&2; }

verify() {
  "$TARGET/bin/python" - "$LM_EVAL_VERSION" "$TRANSFORMERS_VERSION" <<'PY'
import sys
import lm_eval, torch, transformers
from lm_eval.models import openai_completions, huggingface  # the backends the tests use
want, want_transformers = sys.argv[1:3]
assert lm_eval.__version__ == want, f"lm_eval {lm_eval.__version__} != {want}"
assert transformers.__version__ == want_transformers, transformers.__version__
print(f"ok: lm_eval {lm_eval.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
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
log "installing torch==$TORCH_VERSION, lm-eval[api,hf]==$LM_EVAL_VERSION, transformers==$TRANSFORMERS_VERSION"
"$TARGET/bin/pip" install --disable-pip-version-check "torch==$TORCH_VERSION"
"$TARGET/bin/pip" install --disable-pip-version-check \
  "lm-eval[api,hf]==$LM_EVAL_VERSION" "transformers==$TRANSFORMERS_VERSION"
verify
log "done in $(( $(date +%s) - start )) s"
