"""Preference pairs: DPO and reward models (the training side of Vicuna/Guanaco-era RLHF recipes).

Data: a JSON list or JSONL of `{"prompt", "chosen", "rejected"}` records (an optional `input` is
rendered as an Alpaca input; other keys are kept and ignored). The prompt is rendered with the
run's template (`format_prompt`), each answer as a completion (`format_completion`: the answer and
its end marker, so stopping is part of what is preferred). Prompt and answers are tokenized
separately, exactly as for SFT (training/data.py), so chosen and rejected share the prompt's ids
and only answer tokens (end marker included) carry log-probabilities.

`method=dpo` (Rafailov et al. 2023) trains a LoRA adapter. For each pair, with log pi(y|x) summed
over the answer's tokens:

    h = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]
    sigmoid: loss = -log sigmoid(beta * h)                    (the DPO paper)
    ipo:     loss = (h' - 1 / (2 beta))^2, h' the same margin of per-token mean log-ratios
             (Azar et al. 2023; length-normalised as the IPO authors ran it, and as TRL does)

The reference policy is the same model, never a second copy in memory:
- without `init_adapter`: the base with the adapter disabled (peft's `disable_adapter()`); the
  fresh adapter starts at zero, so policy and reference agree at step 0 (loss log 2);
- with `init_adapter=SFT_RUN`: the usual DPO setting, where the reference is the SFT model. The
  SFT adapter is loaded twice, once to train and once frozen under the name `reference`; the
  reference forward switches to it. Its LoRA settings are the SFT run's.
The reference forward runs in eval mode without gradients (no dropout), so it is a fixed function:
the same log-probabilities at every step. Metrics, as TRL names them: rewards/chosen and
rewards/rejected (beta times the log-ratio), rewards/margins, rewards/accuracies (chosen above
rejected), logps/chosen and logps/rejected.

`method=reward` (DeepSpeed-Chat's step 2, InstructGPT's reward model): a sequence classifier on the
base (`score`: hidden size -> 1) read at the last non-pad token of prompt + answer + end marker,
LoRA on the backbone and the head trained in full, loss -log sigmoid(r_chosen - r_rejected).
Metrics: rewards/chosen and rewards/rejected (mean scores), rewards/margins, rewards/accuracies
(the pairwise accuracy). The run directory (kind `reward`, corral/rundir.py) holds a plain peft
SEQ_CLS adapter whose `modules_to_save` carry the head; `RewardModel.load(RUN)` scores with it.

DeepSpeed-Chat's step 3, RL on top of the reward model, is `method=grpo` with
`reward_model=RUN` (training/grpo_objective.py; the reward model scores each sampled completion).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.training.batches import collate
from corral.training.data import (
    TokenizationReport,
    TokenizedExample,
    encode_completion,
    mask_prompt_tokens,
    split_validation,
    tokenize_each,
)

from corral.errors import RecordError, RunDirError
from corral.records import iter_json_objects
from corral.served_tokens import tokenize_turns
from corral.templates import PromptTemplate, encode_prompt

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# What each method logs per step and per evaluation, besides the loss (means over pairs).
PAIR_METRICS = {
    "dpo": (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ),
    "reward": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
}


# ---------------------------------------------------------------- reading pairs


def validate_preference_record(
    obj: dict[str, Any], path: str | os.PathLike, location: dict[str, int]
) -> dict[str, Any]:
    """Check one preference record; return it with `input` defaulted to "" (other keys kept)."""
    for name in (*PREFERENCE_FIELDS, "input"):
        if name not in obj:
            if name == "input":
                continue
            raise RecordError(path, "missing required field", field=name, **location)
        value = obj[name]
        if not isinstance(value, str):
            hint = (
                " (conversational pairs are not supported: give the instruction as a string)"
                if isinstance(value, list)
                else ""
            )
            raise RecordError(
                path,
                f"expected a string, got {type(value).__name__}{hint}",
                field=name,
                **location,
            )
        if name != "input" and not value.strip():
            raise RecordError(path, f"{name} is empty", field=name, **location)
    if obj["chosen"] == obj["rejected"]:
        raise RecordError(
            path,
            "identical to 'chosen': a pair must prefer one answer",
            field="rejected",
            **location,
        )
    record = dict(obj)
    record.setdefault("input", "")
    return record


def read_preferences(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate preference pairs (JSON list or JSONL); RecordError names file, record, field."""
    records = [validate_preference_record(obj, path, loc) for obj, loc in iter_json_objects(path)]
    if not records:
        raise RecordError(path, "no records: the file holds an empty list")
    return records


def load_preferences(data: str) -> list[dict[str, Any]]:
    if not data:
        raise RecordError(
            "<config>",
            "no training data: set data=PATH (JSON or JSONL of prompt, chosen, rejected)",
        )
    if not Path(data).expanduser().is_file():
        raise RecordError(data, "file not found (preference data is a JSON or JSONL file)")
    return read_preferences(Path(data).expanduser())


# ---------------------------------------------------------------- tokenizing pairs


@dataclass
class PreferencePair:
    """Chosen and rejected examples of one record: the same prompt ids, different answers."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int

    def __len__(self) -> int:
        """Tokens the pair takes in a padded batch (two rows of the longer one): batch plans and
        max_tokens_per_forward budget pairs by this."""
        return 2 * max(len(self.chosen), len(self.rejected))


def tokenize_pair(
    record: dict[str, Any],
    index: int,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
) -> tuple[PreferencePair | None, str]:
    """Tokenize one pair. Returns (pair or None, "kept" | "truncated" | "too_long")."""
    prompt = template.format_prompt(record["prompt"], record.get("input", ""))
    # Each answer after the prompt as `infer` and `serve` send it: one builder for every example.
    built = [
        tokenize_turns(tokenizer, template, [(prompt, template.format_completion(record[key]))])
        for key in ("chosen", "rejected")
    ]
    prompt_ids = built[0].input_ids[: built[0].answer_starts[0]]
    answers = [tokens.input_ids[tokens.answer_starts[0] :] for tokens in built]
    status = "kept"
    if len(prompt_ids) + max(len(ids) for ids in answers) > max_length:
        if truncation != "truncate" or len(prompt_ids) >= max_length:
            return None, "too_long"
        answers = [ids[: max_length - len(prompt_ids)] for ids in answers]
        status = "truncated"
    chosen, rejected = (
        TokenizedExample(*mask_prompt_tokens(prompt_ids, ids), index=index) for ids in answers
    )
    return PreferencePair(chosen=chosen, rejected=rejected, index=index), status


def tokenize_pairs(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
    source: str = "data",
) -> tuple[list[PreferencePair], TokenizationReport]:
    """Tokenize every pair; raise RecordError when none fits `max_length`."""
    return tokenize_each(
        records,
        lambda record, index: tokenize_pair(
            record, index, tokenizer, template, max_length=max_length, truncation=truncation
        ),
        unit="pair",
        field_name="chosen",
        max_length=max_length,
        truncation=truncation,
        source=source,
        length=lambda pair: max(len(pair.chosen), len(pair.rejected)),
    )


def prepare_pairs(config: Any, tokenizer: Any, template: PromptTemplate) -> tuple[list, list, Any]:
    """(train pairs, validation pairs, tokenization report); bad data raises RecordError."""
    records = load_preferences(config.data)
    train_records, val_records = split_validation(records, config.val_size, config.seed)
    common = {
        "max_length": config.max_length,
        "truncation": config.truncation,
        "source": config.data,
    }
    train_pairs, report = tokenize_pairs(train_records, tokenizer, template, **common)
    val_pairs: list = []
    if val_records:
        try:  # the validation split may lose every pair to max_length without being an error
            val_pairs, _ = tokenize_pairs(val_records, tokenizer, template, **common)
        except RecordError:
            val_pairs = []
    return train_pairs, val_pairs, report


def collate_pairs(
    pairs: Sequence[PreferencePair],
    *,
    packing: bool,
    pad_token_id: int,
    row_capacity: int | None = None,
) -> dict[str, Any]:
    """One batch of 2n sequences, the n chosen then the n rejected (one forward pass for both)."""

    examples = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    batch = collate(examples, packing=packing, pad_token_id=pad_token_id, row_capacity=row_capacity)
    batch["num_pairs"] = len(pairs)
    return batch


# ---------------------------------------------------------------- DPO


def sequence_logps(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """(summed log-probability of each sequence's trained tokens, their count), per sequence.

    Logits only at trained positions (the answer and its end marker), as for the SFT loss.
    """
    import torch.nn.functional as F
    from corral.training.batches import trained_logits

    logits, targets, keep = trained_logits(model, batch, device)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    owners = batch["example_ids"].to(device)[keep]
    count = 2 * batch["num_pairs"]
    sums = token_logps.new_zeros(count).index_add(0, owners, token_logps)
    return sums, owners.bincount(minlength=count)


@contextlib.contextmanager
def reference_policy(model: Any, peft_model: Any) -> Iterator[None]:
    """`model` computes as the reference policy inside: eval mode (no dropout), and the adapter
    disabled or, after init_adapter, the frozen `reference` copy of the SFT adapter active.

    `model` is what is called (a DDP wrapper under data parallelism); `peft_model` is the peft
    model inside it, whose adapters are switched.
    """
    from corral.training.model import REFERENCE_ADAPTER

    training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER in peft_model.peft_config:
            active = peft_model.active_adapter
            peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                peft_model.set_adapter(active)  # trainable again; the reference stays frozen
        else:
            with peft_model.disable_adapter():
                yield
    finally:
        model.train(training)


def dpo_losses(
    policy_chosen: Any,
    policy_rejected: Any,
    reference_chosen: Any,
    reference_rejected: Any,
    *,
    beta: float,
    loss_type: str,
    chosen_tokens: Any,
    rejected_tokens: Any,
) -> tuple[Any, Any, Any]:
    """(loss per pair, chosen rewards, rejected rewards) from summed sequence log-probabilities."""
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
            min=1
        )
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: sigmoid or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metric_sums(chosen: Any, rejected: Any) -> dict[str, float]:
    """Sums over the batch's pairs (the loop divides by the step's pairs) of TRL's reward metrics."""
    return {
        "rewards/chosen": float(chosen.sum()),
        "rewards/rejected": float(rejected.sum()),
        "rewards/margins": float((chosen - rejected).sum()),
        "rewards/accuracies": float((chosen > rejected).sum()),
    }


def dpo_loss_sum(
    model: Any,
    batch: dict[str, Any],
    device: Any,
    *,
    peft_model: Any,
    beta: float,
    loss_type: str,
) -> tuple[Any, dict[str, float]]:
    """(sum of the DPO loss over the batch's pairs, metric sums): reference, then policy forward."""
    import torch

    n = batch["num_pairs"]
    with torch.no_grad(), reference_policy(model, peft_model):
        reference, _ = sequence_logps(model, batch, device)
    policy, tokens = sequence_logps(model, batch, device)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        policy[:n],
        policy[n:],
        reference[:n],
        reference[n:],
        beta=beta,
        loss_type=loss_type,
        chosen_tokens=tokens[:n],
        rejected_tokens=tokens[n:],
    )
    stats = pair_metric_sums(chosen_rewards, rejected_rewards)
    stats["logps/chosen"] = float(policy[:n].detach().sum())
    stats["logps/rejected"] = float(policy[n:].detach().sum())
    return losses.sum(), stats


# ---------------------------------------------------------------- reward model


def reward_loss_sum(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, dict[str, float]]:
    """(sum of -log sigmoid(r_chosen - r_rejected) over the batch's pairs, metric sums)."""
    import torch.nn.functional as F

    n = batch["num_pairs"]
    scores = RewardModel.batch_scores(model, batch, device)
    losses = -F.logsigmoid(scores[:n] - scores[n:])
    return losses.sum(), pair_metric_sums(scores[:n].detach(), scores[n:].detach())


@dataclass
class RewardModel:
    """A trained reward model (a run directory of kind `reward`), ready to score answers.

        reward = RewardModel.load("runs/reward")
        reward.scores(["Name a primary colour."], ["Red."])      # one float per answer
        reward.score_pairs(records)                               # (chosen, rejected) per record

    The folder: run_info.json (kind `reward`, base model, template), the tokenizer, and a peft
    SEQ_CLS adapter (adapter_config.json, adapter_model.safetensors: LoRA on the backbone and the
    `score` head as modules_to_save). Plain peft loads it too:
    `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE,
    num_labels=1, pad_token_id=PAD), RUN)`. Answers are rendered as in training: the run's template,
    answer + end marker, the score read at the last token.
    """

    model: Any
    tokenizer: Any
    template: PromptTemplate
    device: Any = "cpu"

    @classmethod
    def load(
        cls, run_dir: str | os.PathLike, *, device: Any = "cpu", dtype: Any = None
    ) -> RewardModel:
        import torch
        from corral.training.model import load_sequence_classifier
        from peft import PeftModel

        from corral.models import load_tokenizer, quiet_transformers
        from corral.rundir import read_run_info
        from corral.templates import get_template

        info = read_run_info(run_dir)
        if info.kind != "reward":
            raise RunDirError(
                f"{run_dir}: a {info.kind} model folder, not a reward model (run_info.json kind "
                "'reward', written by method=reward)"
            )
        with quiet_transformers():
            tokenizer = load_tokenizer(str(run_dir))
            backbone = load_sequence_classifier(
                info.base_model_location(), dtype=dtype or torch.float32, tokenizer=tokenizer
            )
            model = PeftModel.from_pretrained(backbone, str(run_dir))
        model.to(device).eval()
        template = get_template(info.template, tokenizer)
        info.check_template(template, run_dir)
        return cls(model=model, tokenizer=tokenizer, template=template, device=device)

    @staticmethod
    def batch_scores(model: Any, batch: dict[str, Any], device: Any) -> Any:
        """The scalar score of every sequence of a padded batch (at its last non-pad token)."""
        outputs = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
        )
        return outputs.logits[:, 0].float()

    def scores(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        inputs: Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> list[float]:
        """The reward of each (prompt, answer), rendered with the run's template (with an Alpaca
        input per prompt when `inputs` is given)."""
        import torch
        from corral.training.batches import collate_padded

        examples = []
        for prompt, answer, extra in zip(
            prompts, answers, inputs or [""] * len(prompts), strict=True
        ):
            prompt_ids = encode_prompt(
                self.tokenizer, self.template, self.template.format_prompt(prompt, extra)
            )
            answer_ids = encode_completion(
                self.tokenizer, self.template, self.template.format_completion(answer)
            )
            input_ids, labels = mask_prompt_tokens(prompt_ids, answer_ids)
            examples.append(TokenizedExample(input_ids=input_ids, labels=labels, index=0))
        found: list[float] = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate_padded(
                    examples[start : start + batch_size], self.tokenizer.pad_token_id
                )
                found.extend(self.batch_scores(self.model, batch, self.device).tolist())
        return found

    def score_pairs(
        self, records: Sequence[dict[str, Any]], *, batch_size: int = 8
    ) -> list[tuple[float, float]]:
        """(score of chosen, score of rejected) for each {prompt, chosen, rejected} record."""
        prompts = [r["prompt"] for r in records]
        inputs = [r.get("input", "") for r in records]
        chosen, rejected = (
            self.scores(prompts, [r[key] for r in records], inputs=inputs, batch_size=batch_size)
            for key in ("chosen", "rejected")
        )
        return list(zip(chosen, rejected, strict=True))
