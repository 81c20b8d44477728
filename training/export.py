"""`corral export RUN --merge OUT`: fold a run's adapter into its base and save a plain HF model.

A QLoRA adapter was trained against NF4 weights, but merging into 4-bit weights rounds the update
away; the base is loaded unquantized (16/32-bit) and the adapter merged there. The merged folder
keeps the run's record (`run_info.json`, kind `merged`), so every Corral command prompts it with the
template it was trained with.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from corral.errors import UsageError
from corral.rundir import read_run_info, write_run_info


def merge_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> Path:
    """Merge RUN's adapter into its base and write a transformers model folder at `out_dir`."""
    run = Path(run_dir)
    out = Path(out_dir)
    info = read_run_info(run)
    if info.kind != "adapter":
        raise UsageError(
            f"{run}: a {info.kind} model folder has no adapter to merge; load the folder directly"
        )
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new folder")

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from corral.models import load_model, quiet_transformers

    torch_dtype = getattr(torch, dtype)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(run)
        base = load_model(info.base_model_location(), dtype=torch_dtype, tokenizer=tokenizer)
        merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    # Build beside the target and rename, so OUT is either absent or complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_run_info(tmp, info.merged(run))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
