"""Checkpoints for exact resume: model (adapter only for LoRA), optimizer, scheduler, RNG, position.

`accelerator.save_state` writes optimizer, scheduler and every process's RNG states (and handles
FSDP / DeepSpeed sharding). For LoRA/QLoRA, a hook replaces its full-model weights file (the frozen
base, gigabytes at 7B) with the trainable tensors only. A checkpoint is written into a temporary
folder and renamed when complete, so a kill at any moment leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from corral.fileio import weights_follow_umask

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """Only the parameters that train (LoRA A/B, DoRA magnitudes), detached on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def register_adapter_only_hooks(accelerator: Any) -> None:
    """Make save_state/load_state store only trainable tensors for (unsharded) adapter models."""
    from safetensors.torch import load_file, save_file

    def is_adapter_model(model: Any) -> bool:
        return hasattr(accelerator.unwrap_model(model), "peft_config")

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        # `weights` is empty under FSDP/DeepSpeed, which save their own (sharded) state.
        if len(weights) != len(models):
            return
        for i in reversed(range(len(models))):
            if is_adapter_model(models[i]):
                if accelerator.is_main_process:
                    state = trainable_state_dict(accelerator.unwrap_model(models[i]))
                    save_file(state, str(Path(output_dir) / TRAINABLE_WEIGHTS))
                weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_WEIGHTS
        for i in reversed(range(len(models))):
            if not is_adapter_model(models[i]) or not path.is_file():
                continue
            model = accelerator.unwrap_model(models[i])
            state = load_file(str(path))
            expected = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(state) != expected:
                missing = sorted(expected - set(state))[:3]
                raise ValueError(
                    f"{path}: checkpoint does not match the model being trained "
                    f"(missing e.g. {missing}); was it written with another LoRA config?"
                )
            params = dict(model.named_parameters())
            import torch

            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any, run_dir: str | Path, state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoints/checkpoint-STEP atomically on every process; returns its path."""
    root = checkpoint_root(run_dir)
    final = root / f"checkpoint-{state['step']}"
    tmp = root / f".tmp-checkpoint-{state['step']}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        weights_follow_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final
