"""Checkpoints for exact resume: model (adapter only for LoRA), optimizer, scheduler, RNG, position,
and the objective's own state.

`accelerator.save_state` writes optimizer, scheduler and every process's RNG states (and handles
FSDP / DeepSpeed sharding). For LoRA/QLoRA, a hook replaces its full-model weights file (the frozen
base, gigabytes at 7B) with the trainable tensors only. An objective with state (a rollout buffer, a
sampling RNG: training/objectives.py) adds one file per process. A checkpoint is written into a
temporary folder and renamed when complete, so a kill at any moment leaves either the whole
checkpoint or none. Where each file lies: corral/rundir.py (`RunDir`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from corral.rundir import RunDir

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"


def objective_state_file(checkpoint: str | Path, process_index: int) -> Path:
    return Path(checkpoint) / f"objective_state_{process_index}.pt"


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads(RunDir.trainer_state_file(checkpoint).read_text())


def prune_checkpoints(run_dir: RunDir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for old in run_dir.checkpoints()[:-keep]:
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
    accelerator: Any,
    run_dir: RunDir,
    state: dict[str, Any],
    keep: int,
    objective_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/checkpoint-STEP atomically on every process; returns its path."""
    import torch

    final = run_dir.checkpoint(state["step"])
    tmp = run_dir.partial_checkpoint(state["step"])
    if accelerator.is_main_process:
        run_dir.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if objective_state:
        torch.save(objective_state, objective_state_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.trainer_state_file(tmp).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_objective_state(checkpoint: Path, process_index: int) -> dict[str, Any] | None:
    """This process's objective state in `checkpoint`, or None when the objective saved none."""
    import torch

    path = objective_state_file(checkpoint, process_index)
    # Written by this code for this run's own resume: a pickle with RNG states, not weights.
    return torch.load(path, weights_only=False) if path.is_file() else None
