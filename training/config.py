"""The training config: one dataclass, whose field help texts are the `corral train --help` epilog.

Presets in configs/training/*.yaml set any of these fields; `key=value` overrides win.

A run has an objective and weights. The objective (`method`, training/objectives.py) is what the
loss is: supervised fine-tuning on Alpaca records (`sft`), or on preference pairs `{prompt, chosen,
rejected}` (training/preference.py) Direct Preference Optimization (`dpo`) or a reward model
(`reward`: LoRA + a scalar head). The weights (`weights`) are what trains: a LoRA adapter (`lora`),
LoRA on a 4-bit base (`qlora`) or every weight (`full`). `method=lora|qlora|full`, the names of
earlier versions, still mean `sft` with those weights. Online RL on prompts `{prompt, ...}`:
`grpo` (training/grpo_objective.py: a LoRA adapter trained on completions it samples itself,
scored by reward functions or a reward model), the third step of DeepSpeed-Chat as the field runs
it now (PPO's critic-free successor); its keys are named as TRL's GRPOConfig names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from corral.errors import ConfigError
from corral.rundir import WEIGHTS
from corral.templates import dolly_key_ids

# The weights each objective can train; the one list of objective and weight names (the config's
# choices, the registry in training/objectives.py and run_info.json's fields follow it).
OBJECTIVE_WEIGHTS = {
    "sft": WEIGHTS,
    # The reference policy is the base with the adapter disabled (or a frozen adapter copy): full
    # weights would need a second whole model in memory, which is not offered.
    "dpo": ("lora", "qlora"),
    # The reward model's folder is a peft SEQ_CLS adapter; a 4-bit or full sequence classifier
    # would be a kind of folder nothing loads yet.
    "reward": ("lora",),
    # Online RL: the reference (beta > 0) is the base with the adapter disabled, as for dpo.
    "grpo": ("lora", "qlora"),
}
OBJECTIVES = tuple(OBJECTIVE_WEIGHTS)
PREFERENCE_OBJECTIVES = ("dpo", "reward")  # trained on {prompt, chosen, rejected} pairs
RL_OBJECTIVES = ("grpo",)  # trained on completions sampled from the policy, on {prompt, ...}
REFERENCE_OBJECTIVES = ("dpo", *RL_OBJECTIVES)  # a reference policy: init_adapter applies
DPO_LOSS_TYPES = ("sigmoid", "ipo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
# `method` takes an objective, or (as in earlier versions) a weights name meaning sft.
METHOD_CHOICES = (*OBJECTIVES, *WEIGHTS)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as `corral_config.yaml` in the run directory."""

    # ---- data
    data: str = field(
        default="",
        metadata={
            "help": "Alpaca JSON/JSONL file, a `datasets` folder, or a `datasets` hub id; for "
            "method dpo or reward, a JSON/JSONL file of {prompt, chosen, rejected} pairs (in a "
            "preset, a relative path is found beside the preset first)",
            "input_path": True,
        },
    )
    data_split: str = field(
        default="train", metadata={"help": "split to read when `data` is a datasets id or folder"}
    )
    template: Literal["alpaca", "dolly", "chat", "vicuna", "guanaco"] = field(
        default="alpaca",
        metadata={
            "help": "prompt format from corral.templates; conversations (ShareGPT, OpenAI "
            "messages) are trained on every answer in it"
        },
    )
    # Off by default: new tokens grow the vocabulary, so the run's embedding and output matrices
    # no longer match its base (the adapter carries them, and the run cannot be served as a LoRA
    # module on the unchanged base, as vLLM's --enable-lora does); and any text holding a key is
    # read as that token. Today's runs stay plain adapters on their base.
    dolly_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "template dolly: add `### Instruction:`, `### Response:` and `### End` to the "
            "tokenizer as special tokens, as Dolly did; their embedding rows are trained and saved "
            "with the run, and every engine stops on the end key's id (no stop string)"
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "maximum tokens per example (prompt + answer + end marker)"}
    )
    truncation: Literal["drop", "truncate"] = field(
        default="drop",
        metadata={"help": "examples longer than max_length: drop them, or cut the answer's tail"},
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "also train on the prompt tokens (default: answer only)"}
    )
    val_size: float = field(
        default=0.0,
        metadata={"help": "validation split: a fraction (<1) or a number of records; 0 = none"},
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length to waste less padding"}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "concatenate each micro-batch into one padding-free row; examples cannot "
            "attend to each other (per-example position ids + block-diagonal attention)"
        },
    )
    # ---- model
    model: str = field(
        default="embedded",
        metadata={"help": "base model: embedded, tiny-random, a local folder or a hub id"},
    )
    method: Literal[METHOD_CHOICES] = field(
        default="lora",
        metadata={
            "help": "the objective: sft on Alpaca data; on preference pairs dpo (Direct Preference "
            "Optimization) or reward (a reward model: a scalar head on the last token, pairwise "
            "loss); on prompts grpo (online RL on completions the policy samples, scored by "
            "reward_funcs and/or reward_model). lora, qlora, full (earlier names) mean sft with "
            "those weights"
        },
    )
    weights: Literal[("", *WEIGHTS)] = field(
        default="",
        metadata={
            "help": "what trains: lora (an adapter), qlora (4-bit NF4 base + LoRA) or full (all "
            "weights); empty: lora, or the weights a method lora|qlora|full names. dpo and grpo "
            "take lora or qlora, reward lora"
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "module names to adapt, or [all-linear] (every linear but lm_head)"},
    )
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "auto: bf16 mixed precision on GPUs that support it and on CPUs with native "
            "bf16 (AVX512-BF16, AMX), fp32 otherwise"
        },
    )
    # ---- preferences (method dpo or reward) and online RL (method grpo)
    beta: float | None = field(
        default=None,
        metadata={
            "help": "the KL weight to the reference policy (higher stays closer); dpo: default "
            "0.1 (for loss_type ipo, the regulariser tau); grpo: default 0.0, no reference forward"
        },
    )
    loss_type: Literal["sigmoid", "ipo", "grpo", "dr_grpo", "dapo", "bnpo"] | None = field(
        default=None,
        metadata={
            "help": "dpo: sigmoid (default; -log sigmoid(beta * margin of summed log-ratios)) or "
            "ipo ((margin of per-token mean log-ratios - 1/(2 beta))^2); grpo: the length "
            "normalisation: dapo (default; tokens of the step), grpo (per completion), dr_grpo "
            "(completions x max_completion_length) or bnpo (tokens of each forward pass)"
        },
    )
    init_adapter: str = field(
        default="",
        metadata={
            "help": "dpo, grpo: an SFT run directory whose LoRA adapter the policy starts from "
            "(its r, alpha, targets and dropout win over lora_*); the reference is then base + "
            "that adapter, frozen. Empty: a fresh adapter, and the base alone is the reference"
        },
    )
    num_generations: int = field(
        default=8, metadata={"help": "grpo: completions sampled per prompt (a group; at least 2)"}
    )
    max_completion_length: int = field(
        default=256, metadata={"help": "grpo: most tokens a sampled completion may have"}
    )
    temperature: float = field(default=1.0, metadata={"help": "grpo: sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "grpo: nucleus sampling probability"})
    num_iterations: int = field(
        default=1, metadata={"help": "grpo: optimizer steps on each rollout (PPO epochs)"}
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "grpo: clip the importance ratio below at 1 - epsilon"}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "grpo: clip the ratio above at 1 + epsilon_high (DAPO: 0.28; default epsilon)"
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={
            "help": "grpo: divide advantages by the std of the group, of the batch, or none "
            "(Dr. GRPO)"
        },
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "grpo: leave completions cut at max_completion_length out of the loss"},
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "grpo: reward functions: exact_answer, final_number, format:REGEX, length:N, "
            "or path/to/file.py:function (fn(prompts, completions, **fields) -> list[float])"
        },
    )
    reward_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "grpo: one weight per reward function, reward_model last (empty: all 1)"},
    )
    reward_model: str = field(
        default="",
        metadata={"help": "grpo: a method=reward run directory that scores completions too"},
    )
    # ---- optimisation
    epochs: float = field(default=3.0, metadata={"help": "passes over the training data"})
    max_steps: int = field(
        default=0, metadata={"help": "stop after this many optimizer steps (0: use epochs)"}
    )
    micro_batch_size: int = field(default=4, metadata={"help": "examples per process per forward"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (per process)"}
    )
    max_tokens_per_forward: int = field(
        default=0,
        metadata={
            "help": "run a micro-batch as forward passes of at most this many (padded) tokens; "
            "same gradient, bounded activation memory (0: one pass per micro-batch)"
        },
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "schedule after warmup"}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of steps for linear warmup"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "warmup steps (wins over warmup_ratio)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = field(
        default="auto",
        metadata={
            "help": "auto: paged AdamW (bitsandbytes) for qlora on GPU, torch AdamW otherwise"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed for shuffling, splits, init and dropout"})
    # ---- run directory, logging, checkpoints
    output_dir: str = field(default="runs/corral", metadata={"help": "the run directory"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "train into an output_dir that holds a finished run or other files, "
            "replacing its run (default: refuse; resume=auto continues an interrupted run)"
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N steps"})
    eval_steps: int = field(
        default=0, metadata={"help": "evaluate every N steps (0: at the end only)"}
    )
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every N steps (0: at the end only)"}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "keep only the newest N checkpoints (0: keep all)"}
    )
    resume: str = field(
        default="",
        metadata={"help": "auto (latest checkpoint in output_dir, if any) or a checkpoint folder"},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "trackers besides metrics.jsonl: tensorboard, wandb (when installed)"},
    )
    wandb_project: str = field(default="corral", metadata={"help": "W&B project name"})

    def __post_init__(self) -> None:
        # Checked here, before any model loads: a bad value fails in a second with the key named,
        # not minutes later inside torch or peft.
        at_least_one = (
            "max_length", "micro_batch_size", "gradient_accumulation_steps", "lora_r",
            "lora_alpha", "logging_steps",
        )  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': must be at least 1, got {getattr(self, name)}")
        not_negative = (
            "epochs", "max_steps", "max_tokens_per_forward", "weight_decay", "warmup_steps",
            "max_grad_norm", "eval_steps", "save_steps", "save_total_limit",
        )  # fmt: skip
        for name in not_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"key '{name}': must be 0 or more, got {getattr(self, name)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"key 'learning_rate': must be above 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"key 'lora_dropout': must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("key 'lora_target_modules': name at least one module, or all-linear")
        if self.val_size < 0:
            raise ConfigError(f"key 'val_size': must be >= 0, got {self.val_size}")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise ConfigError("key 'val_size': a fraction below 1 or a whole number of records")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")
        unknown = set(self.report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise ConfigError(f"key 'report_to': unknown tracker(s) {sorted(unknown)}")
        self._resolve_weights()
        if self.weights == "full" and self.use_dora:
            raise ConfigError("key 'use_dora': DoRA needs weights lora or qlora")
        self._resolve_method_defaults()
        if self.init_adapter and self.objective not in REFERENCE_OBJECTIVES:
            raise ConfigError(
                "key 'init_adapter': starts a dpo or grpo run from an SFT adapter; set method=dpo "
                "or method=grpo"
            )
        if self.objective in PREFERENCE_OBJECTIVES and self.train_on_inputs:
            raise ConfigError(
                f"key 'train_on_inputs': method {self.method} compares answers to the same prompt; "
                "the prompt is never trained (set it to false)"
            )
        if self.dolly_special_tokens and self.template != "dolly":
            raise ConfigError("key 'dolly_special_tokens': an option of template=dolly")
        if self.dolly_special_tokens and self.objective != "sft":
            raise ConfigError(
                "key 'dolly_special_tokens': for supervised runs (method sft, lora, qlora or full)"
            )
        if self.objective == "reward" and self.packing:
            raise ConfigError(
                "key 'packing': a reward model reads each sequence's last token, one sequence per "
                "row; set packing=false"
            )

    def trainable_token_rows(self, tokenizer: Any) -> list[int] | None:
        """Embedding rows an adapter trains besides LoRA: Dolly's keys, when they were added."""
        if not self.dolly_special_tokens:
            return None
        return dolly_key_ids(tokenizer)

    def _resolve_weights(self) -> None:
        """Fill `weights` from `method` (lora|qlora|full name the weights of sft) and check it."""
        if self.method in WEIGHTS:
            if self.weights and self.weights != self.method:
                raise ConfigError(
                    f"key 'weights': method {self.method} already means sft with {self.method} "
                    f"weights; for {self.weights} weights set method=sft weights={self.weights}"
                )
            self.weights = self.method
        self.weights = self.weights or "lora"
        allowed = OBJECTIVE_WEIGHTS[self.objective]
        if self.weights not in allowed:
            raise ConfigError(
                f"key 'weights': method {self.objective} trains {' or '.join(allowed)} weights, "
                f"not {self.weights}"
            )

    def _resolve_method_defaults(self) -> None:
        """beta and loss_type mean different things to dpo and grpo: fill in the method's default
        and refuse a value of the other method."""
        rl = self.objective in RL_OBJECTIVES
        if self.beta is None:
            self.beta = 0.0 if rl else 0.1
        if self.loss_type is None:
            self.loss_type = "dapo" if rl else "sigmoid"
        allowed = GRPO_LOSS_TYPES if rl else DPO_LOSS_TYPES
        if self.loss_type not in allowed:
            raise ConfigError(
                f"key 'loss_type': {self.loss_type!r} is not a loss of method {self.method}; "
                f"choose one of {', '.join(allowed)}"
            )
        if rl:
            if self.beta < 0:
                raise ConfigError(f"key 'beta': must be 0 or more, got {self.beta}")
            self._check_grpo()
        elif not self.beta > 0:
            raise ConfigError(f"key 'beta': must be above 0, got {self.beta}")

    def _check_grpo(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"key 'num_generations': must be at least 2, got {self.num_generations} (GRPO "
                "compares each completion with the others of its group)"
            )
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': must be at least 1, got {getattr(self, name)}")
        if not 0 < self.temperature <= 2:
            raise ConfigError(f"key 'temperature': must be in (0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"key 'top_p': must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"key 'epsilon': must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"key 'epsilon_high': must be 0 or more, got {self.epsilon_high}")
        completions = self.micro_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ConfigError(
                f"key 'num_generations': micro_batch_size x gradient_accumulation_steps "
                f"({completions} completions per step and process) must hold whole groups of "
                f"{self.num_generations}"
            )
        if not self.reward_funcs and not self.reward_model:
            raise ConfigError(
                "method grpo needs a reward: set reward_funcs (e.g. [final_number]) or reward_model"
            )
        if self.packing:
            raise ConfigError("key 'packing': method grpo trains padded completions; set false")

    @property
    def objective(self) -> str:
        """What the loss is: sft, dpo, reward or grpo (training/objectives.py)."""
        return "sft" if self.method in WEIGHTS else self.method

    @property
    def recorded_method(self) -> str:
        """run_info.json's `method` as earlier versions wrote it: the weights for sft, else the
        objective (so readers of those versions still load the run)."""
        return self.weights if self.objective == "sft" else self.objective
