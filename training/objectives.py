"""What a training method is: its objective, chosen once from the config, owning all that differs.

The loop (training/loop.py) is the same for every method: plan the step's examples, make their
micro-batches, forward and backward, one optimizer step, log, evaluate, checkpoint, save. What
differs lives in one `Objective` per method, picked by `objective_for(config)` from `OBJECTIVES`, a
plain dict of name -> class (the contract each one keeps: `Objective`,
training/objective_base.py):

- `sft` (`SupervisedFineTuning`): Alpaca records or conversations, completion-only cross-entropy
  per trained token;
- `dpo` (`DirectPreference`): preference pairs, the DPO loss against a reference policy (the base
  with the adapter disabled, or the frozen init_adapter copy: training/preference.py);
- `reward` (`RewardModelling`): preference pairs, a scalar head, the pairwise ranking loss;
- `grpo` (`GRPOObjective`, training/grpo_objective.py): prompt records; each step's batches are
  completions the live policy samples, scored by reward functions; GRPO's clipped loss.

The weights that train (lora, qlora, full: `config.weights`) are independent of the objective and
handled by training/model.py; `config.OBJECTIVE_WEIGHTS` says which each objective supports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.training.batches import collate, completion_loss_sum
from corral.training.config import TrainConfig
from corral.training.data import (
    load_records,
    split_validation,
    tokenize_records,
)
from corral.training.grpo_objective import GRPOObjective
from corral.training.objective_base import Objective
from corral.training.preference import (
    PAIR_METRICS,
    collate_pairs,
    dpo_loss_sum,
    prepare_pairs,
    reward_loss_sum,
)

from corral.errors import RecordError

if TYPE_CHECKING:  # training/run.py holds an Objective: the run is named here for typing alone
    from corral.training.run import TrainingRun


class SupervisedFineTuning(Objective):
    """Alpaca records (or conversations): cross-entropy on the answer tokens, per trained token."""

    name = "sft"

    def prepare_examples(self, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
        config = self.config
        records = load_records(config.data, split=config.data_split)
        train_records, val_records = split_validation(records, config.val_size, config.seed)
        common = {
            "max_length": config.max_length,
            "truncation": config.truncation,
            "train_on_inputs": config.train_on_inputs,
            "source": config.data,
        }
        tokenize = tokenize_records
        if records and "messages" in records[0]:
            from corral.training.conversations import tokenize_conversations

            # Conversations: the loss on every answer; the prompt is never trained.
            common.pop("train_on_inputs")
            tokenize = tokenize_conversations
        train_examples, report = tokenize(train_records, tokenizer, template, **common)
        val_examples: list = []
        if val_records:
            # The validation split may lose every record to max_length without being an error.
            try:
                val_examples, _ = tokenize(val_records, tokenizer, template, **common)
            except RecordError:
                val_examples = []
        return train_examples, val_examples, report

    def collate(self, run: TrainingRun, examples: list) -> dict[str, Any]:
        """Padded rows, or with packing one padding-free row per micro-batch."""
        return collate(
            examples,
            packing=self.config.packing,
            pad_token_id=run.tokenizer.pad_token_id,
            row_capacity=self.config.max_length,
        )

    def loss_sum(self, run: TrainingRun, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        loss_sum, _ = completion_loss_sum(run.model, batch, run.device)
        return loss_sum, {}

    def loss_units(self, batch: dict[str, Any]) -> int:
        return int((batch["targets"] != -100).sum())


class PreferencePairs(Objective):
    """What DPO and the reward model share: {prompt, chosen, rejected} pairs, losses per pair."""

    unit = "pairs"

    def prepare_examples(self, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
        return prepare_pairs(self.config, tokenizer, template)

    def collate(self, run: TrainingRun, examples: list) -> dict[str, Any]:
        """One batch of 2n sequences: the n chosen, then the n rejected."""
        return collate_pairs(
            examples,
            packing=self.config.packing,
            pad_token_id=run.tokenizer.pad_token_id,
            row_capacity=self.config.max_length,
        )

    def loss_units(self, batch: dict[str, Any]) -> int:
        return batch["num_pairs"]

    def summary_fields(self, run: TrainingRun) -> dict[str, Any]:
        """The final metrics of this session, means per pair."""
        return {
            "method": self.config.method,
            "train_metrics": _rounded(run.latest_train),
            "eval_metrics": _rounded(run.latest_eval),
        }


class DirectPreference(PreferencePairs):
    """DPO: the policy's log-ratio margin over the reference policy, chosen against rejected."""

    name = "dpo"
    metric_names = PAIR_METRICS["dpo"]

    def describe(self) -> str:
        config = self.config
        start = (
            f"the adapter of {config.init_adapter} (its LoRA settings); reference policy: the base "
            "with that adapter, frozen"
            if config.init_adapter
            else "a fresh adapter; reference policy: the base (adapter disabled)"
        )
        return f"dpo: beta {config.beta}, loss {config.loss_type}; the policy starts from {start}"

    def loss_sum(self, run: TrainingRun, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return dpo_loss_sum(
            run.model,
            batch,
            run.device,
            peft_model=run.accelerator.unwrap_model(run.model),
            beta=self.config.beta,
            loss_type=self.config.loss_type,
        )


class RewardModelling(PreferencePairs):
    """A reward model: a scalar head on the last token, -log sigmoid(r_chosen - r_rejected)."""

    name = "reward"
    metric_names = PAIR_METRICS["reward"]
    sequence_classifier = True

    def loss_sum(self, run: TrainingRun, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return reward_loss_sum(run.model, batch, run.device)

    def summary_fields(self, run: TrainingRun) -> dict[str, Any]:
        # The held-out pairwise accuracy: how often the reward model ranks chosen first.
        return {
            **super().summary_fields(run),
            "pairwise_accuracy": run.latest_eval.get("rewards/accuracies"),
        }


OBJECTIVES: dict[str, type[Objective]] = {
    "sft": SupervisedFineTuning,
    "dpo": DirectPreference,
    "reward": RewardModelling,
    "grpo": GRPOObjective,
}


def objective_for(config: TrainConfig) -> Objective:
    """The objective `config.method` names (lora, qlora, full: sft)."""
    return OBJECTIVES[config.objective](config)


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in metrics.items()}
