"""Fully sharded data parallel (FSDP2) for a LoRA model: the wrapping units, sharded checkpoints,
and the adapter gathered back into one folder for `export` and serving.

On GPUs, `accelerate launch --config_file configs/accelerate/fsdp.yaml train.py ...` shards the
model inside `accelerator.prepare`, from that file's `fsdp_config`. On CPUs accelerate turns the
same file into plain DDP, so nothing of the sharding would run before a cluster does. The functions
here apply torch's own `fully_shard` with the same decisions (read from the same file), so
`python -m corral.training.fsdp_rehearsal` runs them over gloo on any machine: which modules are units, frozen
and trainable parameters sharded side by side, a sharded checkpoint and its exact resume, and the
adapter consolidated on rank 0.

What a LoRA run sharded this way looks like:
- each LLaMA decoder layer is one unit, with its LoRA modules inside it: the frozen base weights and
  the trainable A/B matrices are all-gathered together before the layer runs; FSDP2 keeps every
  parameter its own DTensor (no flat buffer), so `requires_grad` survives per parameter and the
  gradients reduce-scattered are the LoRA ones alone;
- a checkpoint holds the trainable parameters and their optimizer state only, each rank writing
  its shard (torch.distributed.checkpoint); the frozen base is read again from the model's folder;
- `consolidate_adapter` gathers the full LoRA tensors on rank 0 and writes the same adapter folder
  a one-process run writes (adapter, tokenizer, run_info.json), which `corral export` and
  `corral serve` take as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.training.checkpoint import prune_checkpoints

from corral.errors import ConfigError, RunDirError, UsageError
from corral.rundir import RunDir

# The one policy the accelerate configs name (fsdp_auto_wrap_policy); the other two accelerate
# offers (size-based, none) would cut LoRA layers apart or not shard by layer at all.
TRANSFORMER_BASED_WRAP = "TRANSFORMER_BASED_WRAP"


@dataclass(frozen=True)
class FsdpSettings:
    """The FSDP decisions of an accelerate config file that sharding here must repeat."""

    layer_class_names: tuple[str, ...]  # empty: the model's own `_no_split_modules`
    reshard_after_forward: bool = True
    state_dict_type: str = "SHARDED_STATE_DICT"


def read_fsdp_settings(path: str | os.PathLike) -> FsdpSettings:
    """The `fsdp_config` of an accelerate config (configs/accelerate/fsdp.yaml), checked."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read an accelerate config: {exc}") from None
    if not isinstance(document, dict) or document.get("distributed_type") != "FSDP":
        raise ConfigError(f"{path}: key 'distributed_type': expected FSDP")
    fsdp = document.get("fsdp_config")
    if not isinstance(fsdp, dict):
        raise ConfigError(f"{path}: key 'fsdp_config': missing")
    if fsdp.get("fsdp_version") != 2:
        raise ConfigError(
            f"{path}: key 'fsdp_config.fsdp_version': expected 2 (FSDP2, per-parameter sharding; "
            f"FSDP1 flattens frozen and trainable weights together), got {fsdp.get('fsdp_version')!r}"
        )
    policy = fsdp.get("fsdp_auto_wrap_policy")
    if policy != TRANSFORMER_BASED_WRAP:
        raise ConfigError(
            f"{path}: key 'fsdp_config.fsdp_auto_wrap_policy': expected {TRANSFORMER_BASED_WRAP} "
            f"(one unit per decoder layer, its LoRA modules inside), got {policy!r}"
        )
    names = fsdp.get("fsdp_transformer_layer_cls_to_wrap") or ""
    if isinstance(names, str):  # accelerate takes a comma-separated string
        names = [name.strip() for name in names.split(",")]
    return FsdpSettings(
        layer_class_names=tuple(name for name in names if name),
        reshard_after_forward=bool(fsdp.get("fsdp_reshard_after_forward", True)),
        state_dict_type=str(fsdp.get("fsdp_state_dict_type", "SHARDED_STATE_DICT")),
    )


# ------------------------------------------------------------------------------ CPU rehearsal


def join_cpu_process_group() -> Any:
    """Join the launcher's processes over gloo and return their one-dimensional CPU mesh.

    The one place where the CPU rehearsal departs from accelerate's FSDP path on GPUs, and why:
    - gloo over CPUs instead of NCCL over GPUs: the collectives (all-gather, reduce-scatter) and
      the DTensor shards are the same, only their transport differs;
    - sharding is applied here rather than inside `accelerator.prepare`: accelerate sets FSDP up
      for GPU-like devices only and turns an FSDP config into DDP on CPUs. The units are the
      same (`wrapping_units`, from the same `fsdp_config`), except that accelerate (1.16) also
      gives the input embedding and the [final norm, lm_head] tail units of their own, a
      prefetching choice: what is sharded and what trains is unchanged;
    - the rehearsal computes without a MixedPrecisionPolicy: in fp32 by default, so its losses
      can be compared with a one-process run to float tolerance, or with the frozen base in bf16
      beside fp32 LoRA weights in each unit; under bf16 accelerate casts for compute and keeps
      the fp32 master weights that `shard_model_fsdp2` keeps too;
    - `fsdp_cpu_ram_efficient_loading` (rank 0 reads the weights and broadcasts them) is not
      rehearsed: every rank reads the small model itself.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return init_device_mesh("cpu", (dist.get_world_size(),))


# ------------------------------------------------------------------------------ wrapping units


def wrapping_unit_classes(model: Any, layer_class_names: tuple[str, ...] = ()) -> set[type]:
    """The module classes that each become one FSDP unit, decided as accelerate decides it.

    `layer_class_names` is the accelerate config's `fsdp_transformer_layer_cls_to_wrap`; without
    it, the model's `_no_split_modules` (for LLaMA: `LlamaDecoderLayer`), as accelerate defaults.
    A name the model does not contain is an error: sharding would silently fall back to one
    unit for the whole model, every rank all-gathering every weight at once.
    """
    names = list(layer_class_names)
    present = {type(module).__name__: type(module) for module in model.modules()}
    if not names:
        names = [
            name for name in getattr(model, "_no_split_modules", None) or [] if name in present
        ]
    missing = [name for name in names if name not in present]
    if missing or not names:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap: {', '.join(missing) or '(none)'} is not a "
            f"module class of this model; its layer classes include "
            f"{', '.join(sorted(n for n in present if n.endswith('Layer'))) or 'none'}"
        )
    return {present[name] for name in names}


def wrapping_units(model: Any, layer_class_names: tuple[str, ...] = ()) -> list[Any]:
    """The modules to `fully_shard`, in the order to shard them: the layers, then the root.

    The root unit holds whatever no layer holds (embeddings, final norm, lm_head: tied in small
    LLaMAs, so they must stay in one unit). LoRA modules live inside the layers they adapt, so
    each layer's unit holds its frozen base weights and its trainable LoRA weights together.
    """
    classes = tuple(wrapping_unit_classes(model, layer_class_names))
    layers = [m for m in model.modules() if m is not model and isinstance(m, classes)]
    return [*layers, model]


def shard_model_fsdp2(
    model: Any,
    *,
    mesh: Any = None,
    layer_class_names: tuple[str, ...] = (),
    reshard_after_forward: bool = True,
) -> Any:
    """Shard `model` in place over `mesh` (default: every process of the default group).

    Build the optimizer after this: its parameters must be the sharded ones (accelerate swaps
    them for you; here there is nothing to swap).
    """
    import torch
    from torch.distributed.fsdp import fully_shard

    # FSDP2 needs one dtype among a unit's trainable parameters (it reduce-scatters their
    # gradients in one buffer). A LoRA run on a bf16 base keeps its LoRA weights in fp32 already;
    # anything trainable and lower is raised to fp32 master weights, as accelerate does too.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
    units = wrapping_units(model, layer_class_names)
    for unit in units[:-1]:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again first in backward: keep them gathered (what
    # accelerate and torch's own default choose for the root).
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def sharding_report(model: Any) -> dict[str, Any]:
    """What this rank holds: elements held locally of all elements, trainable and frozen apart.

    Raises if a parameter is not a DTensor shard (the model was not sharded, or a module was
    added after sharding).
    """
    from torch.distributed.tensor import DTensor

    held = {"trainable": 0, "frozen": 0}
    total = {"trainable": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        if not isinstance(parameter, DTensor):
            raise RuntimeError(
                f"{name} is a plain tensor, not a DTensor shard: the model is not sharded"
            )
        kind = "trainable" if parameter.requires_grad else "frozen"
        held[kind] += parameter.to_local().numel()
        total[kind] += parameter.numel()
    return {
        "held_trainable": held["trainable"],
        "held_frozen": held["frozen"],
        "total_trainable": total["trainable"],
        "total_frozen": total["frozen"],
    }


# ------------------------------------------------------------------------------ checkpoints


def trainable_names(model: Any) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _training_state(model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The state a checkpoint holds, as (still sharded) state dicts keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    # `ignore_frozen_params` still returns a tied lm_head.weight (its parameter is listed under the
    # embedding's name only); the adapter checkpoint must not carry a copy of the vocabulary.
    trained = trainable_names(model)
    model_state = {name: value for name, value in model_state.items() if name in trained}
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def save_sharded_checkpoint(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    run_dir: str | os.PathLike,
    state: dict[str, Any],
    *,
    keep: int = 0,
) -> Path:
    """Write checkpoints/checkpoint-STEP: each rank its shard of the trainable weights and their
    optimizer state, plus the schedule and `state` (trainer_state.json, with `step`).

    Called on every rank. Written into a temporary folder and renamed by rank 0 when every rank
    has finished, so a kill leaves the whole checkpoint or none (the same contract as
    training/checkpoint.py: `RunDir.latest_checkpoint` finds these too).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    files = RunDir(run_dir)
    root = files.checkpoints_dir
    final = files.checkpoint(state["step"])
    tmp = files.partial_checkpoint(state["step"])
    main = dist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_training_state(model, optimizer, scheduler), checkpoint_id=str(tmp))
    dist.barrier()
    if main:
        RunDir.trainer_state_file(tmp).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(files, keep)
    dist.barrier()
    return final


def check_checkpoint_matches(checkpoint: Path, model_state: dict[str, Any]) -> None:
    """Every trainable tensor of the model is in the checkpoint, with its shape (read from the
    checkpoint's metadata alone), or one line says which is not."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for name, tensor in sorted(model_state.items()):
        entry = saved.get(f"model.{name}")
        if entry is None:
            problem = f"{name} is missing"
        elif tuple(entry.size) != tuple(tensor.shape):
            problem = f"{name} has shape {tuple(entry.size)}, the model {tuple(tensor.shape)}"
        else:
            continue
        raise RunDirError(
            f"{checkpoint}: does not match the model being trained ({problem}); was it written "
            "with another LoRA config?"
        )


def load_sharded_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, checkpoint: str | os.PathLike
) -> dict[str, Any]:
    """Restore weights, optimizer and schedule from `checkpoint` on every rank; returns its
    trainer state. DCP reshards on load, so another world size could resume it too (not
    rehearsed: the tests resume on as many ranks as wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    checkpoint = Path(checkpoint)
    state_file = RunDir.trainer_state_file(checkpoint)
    if not state_file.is_file():
        raise RunDirError(f"{checkpoint}: not a complete checkpoint folder (no {state_file.name})")
    state = _training_state(model, optimizer, scheduler)
    check_checkpoint_matches(checkpoint, state["model"])
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        # The frozen base is not in the checkpoint: it was loaded from the model's folder.
        options=StateDictOptions(strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    return json.loads(RunDir.trainer_state_file(checkpoint).read_text())


# ------------------------------------------------------------------------------ the adapter


def gather_adapter_state(model: Any) -> dict[str, Any]:
    """The full trainable tensors on rank 0's CPU ({} on the other ranks). Called on every rank.

    Only LoRA weights travel: at 7B the frozen base stays sharded instead of passing through
    rank 0's memory (as a gathered full-model state dict would).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
    )
    trained = trainable_names(model)
    return {name: tensor for name, tensor in full.items() if name in trained}


def consolidate_adapter(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    template: Any,
    base_model: str,
    max_length: int,
    method: str = "lora",
) -> Path:
    """Gather the adapter and write, on rank 0, the folder a one-process LoRA run writes:
    adapter_model.safetensors + adapter_config.json (peft), tokenizer with the template's chat
    template, run_info.json. Called on every rank; the folder appears whole or not at all."""
    import torch.distributed as dist
    from corral.training.export import carry_template_for_engines

    import corral
    from corral.fileio import temporary_folder_beside
    from corral.models import resolve_model
    from corral.rundir import run_info_for_training, write_run_info

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; choose a new folder")
    adapter = gather_adapter_state(model)
    if dist.get_rank() == 0:
        tmp = temporary_folder_beside(out)
        try:
            carry_template_for_engines(tokenizer, template)
            # peft keeps the `lora_` tensors of the state dict given and drops the adapter name
            # from their keys; it reads nothing else from the (sharded) model but its config.
            model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            info = run_info_for_training(
                base_model=base_model,
                base_model_path=resolve_model(base_model),
                method=method,
                template=template,
                max_length=max_length,
                corral_version=corral.__version__,
            )
            write_run_info(tmp, info)
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return out
