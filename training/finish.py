"""What a finished run leaves at the top of its directory: the weights (adapter or full model), the
tokenizer, run_info.json (how to serve it) and train_summary.json (what the session did)."""

from __future__ import annotations

import json

from corral.training.export import carry_template_for_engines
from corral.training.metrics import Throughput
from corral.training.processes import check_ranks_agree, precision_name
from corral.training.run import TrainingRun
from corral.training.sharding import gather_adapter_state

from corral.fileio import atomic_write_text, weights_follow_umask
from corral.rundir import run_info_for_training, write_run_info


def save_final(run: TrainingRun) -> None:
    """The run directory's top level: adapter (or full weights), tokenizer, run_info.json."""
    from accelerate.utils import DistributedType
    from corral.training.model import REFERENCE_ADAPTER

    import corral
    from corral.models import resolve_model

    accelerator, config = run.accelerator, run.config
    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type == DistributedType.FSDP and config.weights != "full":
        # Only the adapter's tensors travel to rank 0: gathering the whole model would pass the
        # frozen base (14 GB at 7B in bf16) through its memory for peft to keep the LoRA keys.
        state_dict = gather_adapter_state(run.model)
    elif accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(run.model)  # gathers the shards on the main process
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        # An adapter run carries the chat template too: vLLM serves a LoRA module with the base's
        # tokenizer, and takes this folder's template with --chat-template RUN/chat_template.jinja.
        full_weights = config.weights == "full"
        carry_template_for_engines(
            run.tokenizer, run.template, unwrapped.generation_config if full_weights else None
        )
        # dpo after init_adapter: the trained adapter only, not the frozen reference copy.
        only_trained = (
            {"selected_adapters": ["default"]}
            if REFERENCE_ADAPTER in getattr(unwrapped, "peft_config", {})
            else {}
        )
        unwrapped.save_pretrained(
            run.run_dir, state_dict=state_dict, safe_serialization=True, **only_trained
        )
        run.tokenizer.save_pretrained(run.run_dir)
        info = run_info_for_training(
            base_model=config.model,
            base_model_path=resolve_model(config.model),
            method=config.recorded_method,
            objective=config.objective,
            weights=config.weights,
            template=run.template,
            max_length=config.max_length,
            corral_version=corral.__version__,
        )
        write_run_info(run.run_dir, info)
        weights_follow_umask(run.run_dir)
    accelerator.wait_for_everyone()


def write_summary(run: TrainingRun, speed: Throughput, *, seconds: float) -> None:
    """`train_summary.json`, after checking that data-parallel ranks ended with equal weights."""
    fingerprints = check_ranks_agree(run.accelerator, run.model)
    if not run.accelerator.is_main_process:
        return
    summary = {
        "steps": run.step,
        "world_size": run.world,
        "train_examples": len(run.train_examples),
        "validation_examples": len(run.val_examples),
        "tokenization": {k: v for k, v in vars(run.tokenization).items() if k != "dropped_indices"},
        "trainable_parameters": run.trainable_parameters,
        "session_tokens": speed.session_tokens,
        "session_train_seconds": round(speed.session_seconds, 3),
        "session_tokens_per_s": round(speed.session_tokens / speed.session_seconds, 2)
        if speed.session_seconds
        else None,
        "rank_fingerprints": fingerprints,
        "precision": precision_name(run.accelerator),
        "seconds": round(seconds, 2),
        "objective": run.config.objective,
        "weights": run.config.weights,
        **run.objective.summary_fields(run),
    }
    atomic_write_text(run.files.summary_file, json.dumps(summary, indent=2) + "\n")
