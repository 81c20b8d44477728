"""The model to train: a base from corral.models plus LoRA (peft), 4-bit QLoRA, or all weights.

`config.weights` says what trains; the objective (training/objectives.py) says which head: a causal
LM, or for the reward model a sequence classifier whose head (`score`, hidden size -> 1) is trained
in full beside LoRA on the backbone. With `init_adapter` (dpo), an SFT run's adapter is loaded
twice: once to train and once, frozen, as the reference policy under the name `reference`.
"""

from __future__ import annotations

from typing import Any

from corral.training.config import TrainConfig

from corral.errors import ConfigError
from corral.models import load_model

REFERENCE_ADAPTER = "reference"  # dpo with init_adapter: the frozen copy that is the reference


def compute_dtype(config: TrainConfig) -> Any:
    """The precision `auto` resolves to: bf16 on GPUs that support it and on CPUs with native
    bf16 (mixed precision: fp32 master weights for what trains), fp32 otherwise."""
    import torch

    if config.precision == "fp32":
        return torch.float32
    from corral.models import bf16_is_native

    bf16_ok = bf16_is_native()
    if config.precision == "bf16":
        if not bf16_ok and torch.cuda.is_available():
            raise ValueError(
                "precision=bf16 but this GPU does not support bf16; use precision=fp32"
            )
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float32


def lora_target_modules(config: TrainConfig) -> list[str] | str:
    if [m.lower() for m in config.lora_target_modules] == ["all-linear"]:
        return "all-linear"
    return list(config.lora_target_modules)


def check_target_modules(config: TrainConfig) -> None:
    """Every name in lora_target_modules must be a linear layer of the base's architecture.

    Checked on the architecture alone (built on the meta device, no weights read), so a typo stops
    the run in a second with the names that exist, not after loading gigabytes inside peft.
    """
    if (
        config.weights == "full"
        or config.init_adapter
        or lora_target_modules(config) == "all-linear"
    ):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from corral.models import resolve_model

    architecture = AutoConfig.from_pretrained(resolve_model(config.model))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(architecture)
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"
        }
    )
    unknown = [m for m in config.lora_target_modules if m not in linear]
    if unknown:
        raise ConfigError(
            f"key 'lora_target_modules': {', '.join(map(repr, unknown))} is not a linear layer of "
            f"{config.model}; choose from {', '.join(linear)} or all-linear"
        )


def check_init_adapter(config: TrainConfig) -> None:
    """`init_adapter` must be a finished LoRA run on the same base, trained with the same template.

    Read from its run_info.json before any weights load, so a wrong folder stops the run at once.
    """
    if not config.init_adapter:
        return
    from corral.models import resolve_model
    from corral.rundir import read_run_info

    folder = config.init_adapter
    info = read_run_info(folder)
    if info.kind != "adapter":
        raise ConfigError(
            f"key 'init_adapter': {folder} holds a {info.kind} model; dpo starts from a LoRA "
            "adapter run (run_info.json kind 'adapter')"
        )
    same_base = info.base_model == config.model or (
        bool(info.base_model_path) and info.base_model_path == resolve_model(config.model)
    )
    if not same_base:
        raise ConfigError(
            f"key 'init_adapter': {folder} was trained on {info.base_model}, but model is "
            f"{config.model}; set model={info.base_model}"
        )
    if info.template != config.template:
        raise ConfigError(
            f"key 'init_adapter': {folder} was trained with template {info.template!r}, but "
            f"template is {config.template!r}; set template={info.template} (the policy must be "
            "prompted as it learned)"
        )


def load_sequence_classifier(name: str, *, dtype: Any, tokenizer: Any) -> Any:
    """A base as a sequence classifier with one output: the reward model's backbone and `score` head.

    The head (hidden size -> 1, no bias) is new, initialised from the seed; the score of a sequence
    is read at its last token that is not padding, so the pad id is the tokenizer's.
    """
    from transformers import AutoModelForSequenceClassification

    from corral.models import resolve_model

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=1, dtype=dtype
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def attach_initial_adapter(model: Any, folder: str) -> Any:
    """The SFT adapter in `folder` twice: `default` to train, `reference` frozen (the reference policy)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")  # trainable; the reference copy stays frozen
    return model


def build_model(
    config: TrainConfig,
    tokenizer: Any,
    *,
    local_process_index: int,
    sequence_classifier: bool = False,
) -> Any:
    """Load the base and make `config.weights` trainable; a causal LM, or a sequence classifier
    with one output (the reward model's scalar head)."""
    import torch

    dtype = compute_dtype(config)
    if config.weights == "qlora":
        from peft import prepare_model_for_kbit_training

        # device_map "auto" would shard one model over every GPU (model parallelism) and leave the
        # other processes idle; under a multi-process launch each rank loads onto its own device.
        device = local_process_index if torch.cuda.is_available() else "cpu"
        model = load_model(
            config.model,
            dtype=dtype,
            quantization="nf4",
            device_map={"": device},
            tokenizer=tokenizer,
        )
        disable_cpu_inference_packing(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        # Full fine-tuning keeps fp32 master weights; mixed precision computes in bf16.
        load_dtype = torch.float32 if config.weights == "full" else dtype
        if sequence_classifier:
            model = load_sequence_classifier(config.model, dtype=load_dtype, tokenizer=tokenizer)
        else:
            model = load_model(config.model, dtype=load_dtype, tokenizer=tokenizer)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    model.config.use_cache = False

    if config.weights != "full":
        from peft import LoraConfig, get_peft_model

        if config.init_adapter:
            model = attach_initial_adapter(model, config.init_adapter)
        else:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=lora_target_modules(config),
                use_dora=config.use_dora,
                bias="none",
                # SEQ_CLS makes peft train the `score` head in full and save it with the adapter.
                task_type="SEQ_CLS" if sequence_classifier else "CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        if config.gradient_checkpointing and config.weights != "qlora":
            # Frozen embeddings give inputs without grad; checkpointed blocks still need one.
            model.enable_input_require_grads()
    return model


def disable_cpu_inference_packing(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a Linear4bit called in eval mode without grad converts its weight,
    for good, to a layout whose kernel has no backward: after the first evaluation no gradient
    would flow through the frozen layers and the adapter would stop learning.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights counted as stored elements x2)."""
    trainable = total = 0
    for parameter in model.parameters():
        n = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if parameter.requires_grad:
            trainable += n
    return trainable, total


def build_optimizer(config: TrainConfig, model: Any) -> Any:
    """AdamW over trainable parameters; bitsandbytes' paged AdamW for QLoRA on a GPU."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    name = config.optimizer
    if name == "auto":
        name = (
            "paged_adamw_32bit"
            if config.weights == "qlora" and torch.cuda.is_available()
            else "adamw"
        )
    kwargs = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if not torch.cuda.is_available():
        raise ValueError(f"optimizer={name} pages memory between GPU and CPU: it needs a GPU")
    import bitsandbytes as bnb

    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    return bnb.optim.PagedAdamW8bit(params, **kwargs)


def build_scheduler(config: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = config.warmup_steps or int(round(config.warmup_ratio * total_steps))
    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
