"""Run directories for tests, built with peft directly (no training): random LoRA weights, not
zero, so a run answers differently from its base; recorded through the run-directory contract."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def random_lora_run(
    run: Path,
    model: str,
    base_path: Path,
    *,
    template: str,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    lora_b_scale: float = 1.0,
    max_length: int = 256,
) -> Path:
    """A LoRA run directory on `model` (a built-in name) with seeded random adapter weights;
    `lora_b_scale` below 1 makes the adapter a nudge rather than noise."""
    import torch
    from peft import LoraConfig, get_peft_model

    from corral.models import load_model, load_tokenizer
    from corral.rundir import run_info_for_training, write_run_info
    from corral.templates import get_template

    tokenizer = load_tokenizer(model)
    base = load_model(model, dtype=torch.float32, tokenizer=tokenizer)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    if lora_b_scale != 1.0:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(lora_b_scale)
    peft_model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    info = run_info_for_training(
        base_model=model,
        base_model_path=str(base_path),
        method="lora",
        template=get_template(template, tokenizer),
        max_length=max_length,
        corral_version="0.1.0",
    )
    write_run_info(run, info)
    return run


def random_reward_run(run: Path, model: str, base_path: Path, *, template: str) -> Path:
    """A reward-model run directory (kind `reward`: a peft SEQ_CLS adapter with its score head)
    on `model`, with seeded random weights, so different answers get different scores."""
    import torch
    from corral.training.model import load_sequence_classifier
    from peft import LoraConfig, get_peft_model

    from corral.models import load_tokenizer
    from corral.rundir import run_info_for_training, write_run_info
    from corral.templates import get_template

    tokenizer = load_tokenizer(model)
    backbone = load_sequence_classifier(str(base_path), dtype=torch.float32, tokenizer=tokenizer)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False
    )
    get_peft_model(backbone, config).save_pretrained(run)
    tokenizer.save_pretrained(run)
    info = run_info_for_training(
        base_model=model,
        base_model_path=str(base_path),
        method="reward",
        template=get_template(template, tokenizer),
        max_length=128,
        corral_version="0.1.0",
    )
    write_run_info(run, info)
    return run
