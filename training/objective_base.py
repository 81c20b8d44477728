"""The contract between the training loop and a method: the `Objective` base class.

Its own module so that objectives defined in other modules (training/grpo_objective.py) and the
registry in training/objectives.py can both import it; training/objectives.py re-exports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from corral.training.config import TrainConfig
from corral.training.data import split_by_token_budget

if TYPE_CHECKING:  # training/run.py holds an Objective: the run is named here for typing alone
    from corral.training.run import TrainingRun


class Objective:
    """One training method's part of a run. The contract the loop relies on:

    Chosen once: `objective_for(config)` builds it before the data are read; the loop never tests
    the method's name. Class attributes describe it: `name` (the config's `method`), `unit` (what
    the data line and losses count: "examples" or "pairs"), `metric_names` (metrics besides the
    loss that a step's batches and an evaluation report, as means per loss unit) and
    `sequence_classifier` (the model is a sequence classifier with a scalar head, not a causal LM).

    A reference policy (DPO's; any objective with a KL term to the starting policy, as GRPO's with
    beta > 0): call `training.preference.reference_policy(run.model,
    run.accelerator.unwrap_model(run.model))` around a forward without gradients. It runs the base
    with the adapter disabled or, with `init_adapter`, the frozen copy of that SFT adapter; no
    second model is held. Objectives listed in config.REFERENCE_OBJECTIVES accept `init_adapter`.

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
