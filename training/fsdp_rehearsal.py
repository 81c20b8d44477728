"""Rehearse Corral's FSDP path on CPUs: LoRA on a LLaMA, sharded by torch's FSDP2 over gloo.

From the repository's root:

    # train 4 steps on 2 processes, checkpoint at step 2, consolidate the adapter at the end
    torchrun --nproc_per_node 2 -m corral.training.fsdp_rehearsal --out /tmp/fsdp --save-at 2
    # resume from that checkpoint in new processes: steps 3 and 4 again
    torchrun --nproc_per_node 2 -m corral.training.fsdp_rehearsal --out /tmp/fsdp-resumed \
        --resume /tmp/fsdp/checkpoints/checkpoint-2
    # the same global batches in one process, unsharded: the losses to compare with
    python -m corral.training.fsdp_rehearsal --out /tmp/one --one-process 2

The sharding decisions come from an accelerate config (default configs/accelerate/fsdp.yaml, the
file a GPU run launches with). The step is the training loop's SFT step (completion-only loss over
the trained tokens of the whole step, gradient clipping, AdamW, the configured schedule), with
lora_dropout 0: dropout draws from each process's own random stream, so with it the losses of two
processes and of one could only agree on average. Rank 0 prints one JSON object: the losses,
what each rank holds, the wrapping units, the checkpoints written and the consolidated adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for checkpoints, adapter, probe")
    parser.add_argument("--model", default="tiny-random", help="tiny-random, embedded or a folder")
    parser.add_argument("--data", default="configs/training/smoke_alpaca.json")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument(
        "--accelerate-config",
        default="configs/accelerate/fsdp.yaml",
        help="the FSDP config a GPU run launches with: its wrapping decisions are repeated here",
    )
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps in all")
    parser.add_argument("--save-at", type=int, nargs="*", default=[], help="checkpoint steps")
    parser.add_argument("--resume", default="", help="a checkpoint folder to continue from")
    parser.add_argument(
        "--one-process",
        type=int,
        default=0,
        metavar="N",
        help="no sharding: one process replays the micro-batches of N data-parallel processes",
    )
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: the frozen base in bf16 beside fp32 LoRA weights in each unit",
    )
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> Any:
    from corral.training.config import TrainConfig

    return TrainConfig(
        model=args.model,
        data=args.data,
        template=args.template,
        max_length=256,
        method="lora",
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],
        precision=args.precision,
        packing=False,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        max_steps=args.steps,
        seed=args.seed,
        output_dir=args.out,
    )


class StepPlan:
    """Which examples each data-parallel process trains on at each step, as the loop plans them."""

    def __init__(self, config: Any, lengths: list[int], world: int) -> None:
        self.config, self.lengths, self.world = config, lengths, world
        self.steps_per_epoch = len(self._epoch(0)) // world

    def _epoch(self, epoch: int) -> list[list[int]]:
        from corral.training.data import plan_batches

        return plan_batches(
            self.lengths, self.config.micro_batch_size, seed=self.config.seed, epoch=epoch
        )

    def micro_batch(self, step: int, rank: int) -> list[int]:
        from corral.training.data import shard_for_process

        epoch, within = divmod(step, self.steps_per_epoch)
        mine = shard_for_process(
            self._epoch(epoch), num_processes=self.world, process_index=rank, per_step=1
        )
        return mine[within]


def main(argv: list[str] | None = None) -> int:
    from corral.errors import CorralError

    args = parse_args(argv)
    try:
        return rehearse(args)
    except CorralError as error:
        print(f"fsdp_rehearsal: error: {error}", file=sys.stderr)
        return 2


def rehearse(args: argparse.Namespace) -> int:
    """Train, checkpoint, resume, consolidate as `args` say; rank 0 prints the JSON summary."""
    import torch
    import torch.distributed as dist
    from accelerate.utils import set_seed
    from corral.training.batches import collate, completion_loss_sum
    from corral.training.data import IGNORE_INDEX, load_records, tokenize_records
    from corral.training.model import build_model, build_optimizer, build_scheduler
    from corral.training.sharding import (
        consolidate_adapter,
        join_cpu_process_group,
        load_sharded_checkpoint,
        read_fsdp_settings,
        save_sharded_checkpoint,
        shard_model_fsdp2,
        sharding_report,
        trainable_names,
        wrapping_units,
    )
    from safetensors.torch import save_file

    from corral.errors import UsageError
    from corral.models import load_tokenizer, quiet_transformers
    from corral.templates import get_template

    started = time.monotonic()
    config = training_config(args)
    out = Path(args.out)
    sharded = args.one_process == 0
    torch.set_flush_denormal(True)  # as the training loop does on CPUs

    # ---- processes: N ranks sharing one model, or one process standing in for N
    if sharded:
        if "WORLD_SIZE" not in os.environ:
            raise UsageError(
                "launch the sharded rehearsal with torchrun --nproc_per_node N -m "
                "corral.training.fsdp_rehearsal ..., or pass --one-process N to run unsharded"
            )
        mesh = join_cpu_process_group()
        rank, world = dist.get_rank(), dist.get_world_size()
        ranks_here = [rank]
    else:
        mesh, rank, world = None, 0, args.one_process
        ranks_here = list(range(world))

    # ---- data, tokenized and planned as the training loop does
    with quiet_transformers():
        tokenizer = load_tokenizer(config.model)
    template = get_template(config.template, tokenizer)
    examples, _ = tokenize_records(
        load_records(config.data), tokenizer, template, max_length=config.max_length
    )
    plan = StepPlan(config, [len(e) for e in examples], world)

    # ---- model: the same seed on every rank, so every rank starts from the same LoRA init
    set_seed(config.seed)
    with quiet_transformers():
        model = build_model(config, tokenizer, local_process_index=rank)
    trained_before = trainable_names(model)
    units: list[str] = []
    if sharded:
        settings = read_fsdp_settings(args.accelerate_config)
        unit_modules = wrapping_units(model, settings.layer_class_names)
        names = {id(module): name for name, module in model.named_modules()}
        units = [names[id(module)] or "(root)" for module in unit_modules]
        shard_model_fsdp2(
            model,
            mesh=mesh,
            layer_class_names=settings.layer_class_names,
            reshard_after_forward=settings.reshard_after_forward,
        )
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, config.max_steps)
    step = 0
    if args.resume:
        step = load_sharded_checkpoint(model, optimizer, scheduler, args.resume)["step"]

    def total(value: float) -> float:
        """Summed over the data-parallel processes."""
        if not sharded:
            return value
        tensor = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor)

    # ---- the steps: the loop's SFT step (per-token mean over the whole step's trained tokens)
    losses: list[dict[str, Any]] = []
    grads_only_on_trainable = None
    checkpoints: list[str] = []
    model.train()
    while step < config.max_steps:
        batches = [
            collate(
                [examples[i] for i in plan.micro_batch(step, r)],
                packing=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            for r in ranks_here
        ]
        units_of_step = total(sum(float((b["targets"] != IGNORE_INDEX).sum()) for b in batches))
        # FSDP averages gradients over ranks; multiplying by `world` makes it a sum, as in the loop.
        scale = (world if sharded else 1) / units_of_step
        loss_sum = 0.0
        for batch in batches:
            batch_sum, _ = completion_loss_sum(model, batch, "cpu")
            (batch_sum * scale).backward()
            loss_sum += batch_sum.item()
        if grads_only_on_trainable is None:
            grads_only_on_trainable = all(
                (p.grad is not None) == p.requires_grad for p in model.parameters()
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(
            {"step": step, "loss": total(loss_sum) / units_of_step, "grad_norm": float(grad_norm)}
        )
        if sharded and step in args.save_at:
            saved = save_sharded_checkpoint(
                model, optimizer, scheduler, out, {"step": step, "total_steps": config.max_steps}
            )
            checkpoints.append(str(saved))

    # ---- a probe: the trained model's logits on one example, for comparison outside
    model.eval()
    probe = collate([examples[0]], packing=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], use_cache=False).logits
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {"input_ids": probe["input_ids"], "logits": logits.contiguous()},
            str(out / "probe.safetensors"),
        )

    # ---- the adapter, gathered on rank 0 into the folder `corral export` and `serve` take
    adapter = out / "adapter"
    report: dict[str, Any] = {}
    if sharded:
        consolidate_adapter(
            model,
            adapter,
            tokenizer=tokenizer,
            template=template,
            base_model=config.model,
            max_length=config.max_length,
        )
        held = sharding_report(model)
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, held)
        report = {
            "wrapping_units": units,
            "per_rank": per_rank,
            "requires_grad_kept": trainable_names(model) == trained_before,
            "optimizer_holds_trainable_only": {
                id(p) for group in optimizer.param_groups for p in group["params"]
            }
            == {id(p) for p in model.parameters() if p.requires_grad},
        }
    else:
        model.save_pretrained(adapter, safe_serialization=True)
    if rank == 0:
        summary = {
            "world_size": world,
            "sharded": sharded,
            "resumed_from": args.resume or None,
            "losses": losses,
            "grads_only_on_trainable": grads_only_on_trainable,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "dtypes": {
                kind: sorted({str(p.dtype) for p in model.parameters() if p.requires_grad == grad})
                for kind, grad in (("trainable", True), ("frozen", False))
            },
            "checkpoints": checkpoints,
            "adapter": str(adapter),
            "probe": str(out / "probe.safetensors"),
            "seconds": round(time.monotonic() - started, 2),
            **report,
        }
        print(json.dumps(summary))
    if sharded:
        # Every rank past its last collective before any tears gloo down: a rank that destroys the
        # group while another still talks to it can abort in gloo's threads.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
