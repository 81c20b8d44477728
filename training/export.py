"""`corral export RUN --merge OUT`: fold a run's adapter into its base and save a plain HF model.

A QLoRA adapter was trained against NF4 weights, but merging into 4-bit weights rounds the update
away; the base is loaded unquantized (16/32-bit) and the adapter merged there. The merged folder
keeps the run's record (`run_info.json`, kind `merged`), so every Corral command prompts it with the
template it was trained with, and carries that template for every other engine too
(`carry_template_for_engines`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from corral.errors import UsageError
from corral.fileio import check_output_path, temporary_folder_beside, weights_follow_umask
from corral.models import load_model, quiet_transformers
from corral.rundir import read_run_info, write_run_info
from corral.templates import PromptTemplate, adds_bos, get_template, stop_token_ids


def carry_template_for_engines(
    tokenizer: Any, template: PromptTemplate, generation_config: Any = None
) -> None:
    """Make a folder about to be saved servable as trained by engines that know nothing of Corral.

    - Alpaca and Dolly runs: the tokenizer's chat template becomes one that renders that format
      (saved as `chat_template.jinja`), so `/v1/chat/completions` on vLLM, llama.cpp, Ollama or
      `transformers` prompts the model as it was trained. A `chat` run keeps the tokenizer's own.
    - `generation_config.eos_token_id` lists every token that ends an answer (EOS, and the end
      marker when it is one token), so an engine stops where training taught the model to.

    A multi-token end marker (Dolly's `### End` by default) cannot be a stop token; engines take it
    as a stop string (the request's `stop` on vLLM, `PARAMETER stop` in an Ollama Modelfile). A run
    trained with `dolly_special_tokens` has it as one special token, listed here like EOS.
    """
    if template.name != "chat":
        tokenizer.chat_template = template.jinja_chat_template(bos_token=adds_bos(tokenizer))
    if generation_config is not None:
        generation_config.eos_token_id = list(stop_token_ids(tokenizer, template))
        generation_config.pad_token_id = tokenizer.pad_token_id


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
    check_output_path(out, inputs=(run,), what="export", folder=True)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new folder")

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(run)
        base = load_model(info.base_model_location(), dtype=torch_dtype, tokenizer=tokenizer)
        merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    template = get_template(info.template, tokenizer)
    info.check_template(template, run)
    carry_template_for_engines(tokenizer, template, merged.generation_config)
    # Build beside the target and rename, so OUT is either absent or complete.
    tmp = temporary_folder_beside(out)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_run_info(tmp, info.merged(run))
        weights_follow_umask(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
