"""`corral export RUN --merge OUT`: fold a run's adapter into its base and save a plain HF model.

A QLoRA adapter was trained against NF4 weights, but merging into 4-bit weights rounds the update
away; the base is loaded unquantized (16/32-bit) and the adapter merged there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from corral.cli import UsageError

RUN_INFO = "run_info.json"


def merge_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> Path:
    """Merge RUN's adapter into its base and write a transformers model folder at `out_dir`."""
    run = Path(run_dir)
    out = Path(out_dir)
    info_path = run / RUN_INFO
    if not info_path.is_file():
        raise UsageError(f"{run}: not a training run directory (no {RUN_INFO})")
    info = json.loads(info_path.read_text())
    if info.get("method") == "full":
        raise UsageError(f"{run}: a full fine-tune has no adapter; load the folder directly")
    if not (run / "adapter_config.json").is_file():
        raise UsageError(f"{run}: no adapter_config.json (did the run finish?)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new folder")

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from corral.models import load_model, quiet_transformers

    torch_dtype = getattr(torch, dtype)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(run)
        base_name = info.get("base_model_path") or info["base_model"]
        if not Path(base_name).exists():
            base_name = info["base_model"]
        base = load_model(base_name, dtype=torch_dtype, tokenizer=tokenizer)
        merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    # Build beside the target and rename, so OUT is either absent or complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        merged_info = {**info, "method": "merged", "merged_from": str(run.resolve())}
        (tmp / RUN_INFO).write_text(json.dumps(merged_info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
