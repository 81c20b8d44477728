"""What a training method is: its objective, chosen once from the config, owning all that differs.

The loop (training/loop.py) is the same for every method: plan the step's examples, make their
micro-batches, forward and backward, one optimizer step, log, evaluate, checkpoint, save. What
differs lives in one `Objective` per method, picked by `objective_for(config)` from `OBJECTIVES`, a
plain dict of name -> class:

- `sft` (`SupervisedFineTuning`): Alpaca records or conversations, completion-only cross-entropy
  per trained token;
- `dpo` (`DirectPreference`): preference pairs, the DPO loss against a reference policy (the base
  with the adapter disabled, or the frozen init_adapter copy: training/preference.py);
- `reward` (`RewardModelling`): preference pairs, a scalar head, the pairwise ranking loss.

The weights that train (lora, qlora, full: `config.weights`) are independent of the objective and
handled by training/model.py; `config.OBJECTIVE_WEIGHTS` says which each objective supports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from corral.training.batches import collate, completion_loss_sum
from corral.training.config import TrainConfig
from corral.training.data import (
    load_records,
    split_by_token_budget,
    split_validation,
    tokenize_records,
)
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


class Objective:
    """One training method's part of a run. The contract the loop relies on:

    Chosen once: `objective_for(config)` builds it before the data are read; the loop never tests
    the method's name. Class attributes describe it: `name` (the config's `method`), `unit` (what
    the data line and losses count: "examples" or "pairs"), `metric_names` (metrics besides the
    loss that a step's batches and an evaluation report, as means per loss unit) and
    `sequence_classifier` (the model is a sequence classifier with a scalar head, not a causal LM).

    A reference policy (DPO's; any objective with a KL term to the starting policy): call
    `training.preference.reference_policy(run.model, run.accelerator.unwrap_model(run.model))` around
    a forward without gradients. It runs the base with the adapter disabled or, with
    `init_adapter`, the frozen copy of that SFT adapter; no second model is held. Objectives listed
    in config.REFERENCE_OBJECTIVES accept `init_adapter`.

    Data: `prepare_examples` returns (train examples, validation examples, TokenizationReport); each
    example has a `len()` in tokens, which plans the batches and bounds forward passes.

    One optimizer step: the loop samples the step's examples (the same on every resume) as
    `micro`, one list of example indices per micro-batch of this process, and calls
    `make_batches(run, micro)` for the step's forward passes. The default splits each micro-batch
    by `max_tokens_per_forward` and `collate`s it; an objective may instead build its batches
    itself, expensively and statefully (generate completions with the live policy, score them, and
    reuse one rollout for several optimizer steps), with `run.model`, `run.tokenizer`,
    `run.accelerator` and `run.step` at hand. Each batch then goes through
    `loss_sum(run, batch)` -> (the loss summed over the batch's units, {metric: sum}) and
    `loss_units(batch)` (what the sum is divided by; the loop normalises over the whole step on
    every process). After the optimizer step, `step_metrics(run)` returns extra fields (timings
    such as rollout/scoring/update seconds, already agreed between processes if they must be) that
    the loop merges into the step's row of metrics.jsonl.

    Evaluation: `evaluate(run)` returns {"loss": ..., other metrics} (None without validation data);
    the default is the validation loss and `metric_names` over `run.val_examples`, reduced over
    processes. An objective may evaluate otherwise (held-out reward or accuracy by generation); the
    loop logs every field as `eval_<name>` and passes the result to callbacks. Sample completions
    of an evaluation go to `run.files.eval_samples_file` (JSONL, main process, a `step` per row).

    Exact resume: `state_dict()` (e.g. a rollout buffer, a sampling RNG) is saved with every
    checkpoint, one file per process, and `load_state_dict(state)` restores it on resume; an
    objective without state returns {} and nothing is written.

    The summary: `summary_fields(run)` adds to train_summary.json (the reward model's held-out
    pairwise accuracy, for one). `describe()` is a line for the start of the run, or None.

    Adding an objective: its class in `OBJECTIVES` below, its name and weights in
    config.OBJECTIVE_WEIGHTS, and its name in corral.rundir.METHODS (run_info.json's `method`).
    """

    name: ClassVar[str]
    unit: ClassVar[str] = "examples"
    metric_names: ClassVar[tuple[str, ...]] = ()
    sequence_classifier: ClassVar[bool] = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def describe(self) -> str | None:
        return None

    # ---- data

    def prepare_examples(self, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
        raise NotImplementedError

    def collate(self, run: TrainingRun, examples: list) -> dict[str, Any]:
        raise NotImplementedError

    def make_batches(self, run: TrainingRun, micro: list[list[int]]) -> list[dict[str, Any]]:
        """The step's forward passes. Each micro-batch may run as several passes of at most
        max_tokens_per_forward tokens: the same examples, the same gradient, bounded memory."""
        budget = self.config.max_tokens_per_forward
        return [
            self.collate(run, [run.train_examples[i] for i in chunk])
            for indices in micro
            for chunk in split_by_token_budget(indices, run.lengths, budget)
        ]

    # ---- the loss

    def loss_sum(self, run: TrainingRun, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError

    def loss_units(self, batch: dict[str, Any]) -> int:
        raise NotImplementedError

    def step_metrics(self, run: TrainingRun) -> dict[str, float]:
        return {}

    # ---- evaluation, resume, summary

    def evaluate(self, run: TrainingRun) -> dict[str, float] | None:
        """The validation loss per unit and `metric_names` (means per unit), over all processes."""
        import torch

        if not run.val_examples:
            return None
        names, device, model = self.metric_names, run.device, run.model
        model.eval()
        shard = run.val_examples[run.accelerator.process_index :: run.world]
        sums = torch.zeros(2 + len(names), dtype=torch.float64, device=device)
        size = self.config.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(shard), size):
                batch = self.collate(run, shard[start : start + size])
                loss_sum, metric_sums = self.loss_sum(run, batch)
                values = [loss_sum.item(), self.loss_units(batch), *(metric_sums[n] for n in names)]
                sums += torch.tensor(values, dtype=torch.float64, device=device)
        model.train()
        sums = run.accelerator.reduce(sums, reduction="sum")
        means = [float(total / sums[1]) for total in sums[2:]]
        return {"loss": float(sums[0] / sums[1]), **dict(zip(names, means, strict=True))}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (nothing to restore by default)."""

    def summary_fields(self, run: TrainingRun) -> dict[str, Any]:
        return {}


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
}


def objective_for(config: TrainConfig) -> Objective:
    """The objective `config.method` names (lora, qlora, full: sft)."""
    return OBJECTIVES[config.objective](config)


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in metrics.items()}
