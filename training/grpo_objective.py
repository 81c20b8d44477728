"""`method=grpo`: online RL of the policy on completions it samples itself (GRPO and variants).

Each rollout takes this process's next prompts, samples `num_generations` completions of each
from the live policy (training/rollouts.py, Corral's own engine), scores them with the run's
reward functions (training/rewards.py) and turns the rewards into group advantages
(training/grpo.py). One rollout serves `num_iterations` optimizer steps; its completions are the
step's forward passes (`micro_batch_size` completions each, `gradient_accumulation_steps` of
them), so a step sees micro_batch_size x gradient_accumulation_steps / num_generations prompts per
process. Each process rolls out its own prompts: the data-parallel ranks together see
`world` times as many, and their gradients are averaged as for any other method.

The sampling policy's log-probabilities (`old`) are computed once per rollout, in eval mode, when
num_iterations > 1 (with one iteration the policy is still the sampler: ratio 1). With beta > 0
the reference policy's log-probabilities come from the same model with the adapter disabled (or
the frozen init_adapter copy), as for DPO: no second model in memory.

The prompt order is a permutation of the training prompts per epoch, drawn from the run's seed,
and each completion's sampling seed derives from (seed, rollout, process, position): a resumed run
draws the same prompts and the same completions. The rollout being reused by later iterations is
saved with each checkpoint (`state_dict`), so a resume in the middle of a rollout continues on the
very completions, advantages and log-probabilities it left.

Evaluation generates one greedy completion per held-out prompt (`val_size` of the prompt records)
and reports each reward function's mean (`rewards/<name>/mean`: with final_number, the held-out
accuracy) and the weighted total (`reward`), and keeps a few sample completions
(`eval_samples.jsonl` in the run directory), since a rising reward can be a hacked one.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from corral.training.grpo import (
    group_advantages,
    loss_terms,
    per_token_policy_loss,
    token_logps_and_entropy,
    token_metric_sums,
    truncation_mask,
)
from corral.training.objective_base import Objective
from corral.training.rewards import (
    BUILTIN_FIELDS,
    build_rewards,
    score_completions,
    weighted_total,
)
from corral.training.rl_data import read_prompt_records
from corral.training.rollouts import (
    Rollout,
    completion_examples,
    generate_rollout,
    render_prompt_ids,
)

from corral.fileio import atomic_write_text

SAMPLE_COMPLETIONS = 4  # kept per evaluation, in eval_samples.jsonl
MAX_ROLLOUT_BATCH = 64  # completions the engine decodes together
# Loss-side metrics, means per counted completion token (TRL's names).
TOKEN_METRIC_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl")


@dataclass
class PromptExample:
    """A prompt record and its rendered token ids; `len()` is its prompt length in tokens."""

    record: dict[str, Any]
    prompt_ids: list[int]
    index: int

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prompt_order(count: int, seed: int, epoch: int) -> list[int]:
    """The training prompts' order in `epoch`: a permutation drawn from (seed, epoch)."""
    order = list(range(count))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def prompts_for_rollout(
    count: int, *, seed: int, rollout: int, per_process: int, world: int, process: int
) -> list[int]:
    """Indices of the prompts process `process` rolls out in rollout number `rollout`."""
    first = (rollout * world + process) * per_process
    found = []
    for position in range(first, first + per_process):
        epoch, offset = divmod(position, count)
        found.append(prompt_order(count, seed, epoch)[offset])
    return found


class GRPOObjective(Objective):
    """GRPO's part of a run (see the module docstring)."""

    name = "grpo"
    unit = "prompts"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.rewards: list | None = None
        self.rollout: Rollout | None = None
        self.rollout_number: int | None = None
        self.last_step: dict[str, float] = {}

    def describe(self) -> str:
        c = self.config
        reference = (
            "no reference policy (beta 0)"
            if not c.beta
            else f"KL to the reference (beta {c.beta}): the base with the adapter disabled"
        )
        return (
            f"grpo: {c.num_generations} completions per prompt, up to {c.max_completion_length} "
            f"tokens, temperature {c.temperature}, loss {c.loss_type}, scale_rewards "
            f"{c.scale_rewards}, {c.num_iterations} update(s) per rollout; {reference}; rewards "
            + ", ".join([*c.reward_funcs, *(["reward_model"] if c.reward_model else [])])
        )

    @property
    def prompts_per_rollout(self) -> int:
        """Prompts each process rolls out per rollout."""
        c = self.config
        return c.micro_batch_size * c.gradient_accumulation_steps // c.num_generations

    # ---------------------------------------------------------------- data

    def prepare_examples(self, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
        from corral.training.data import TokenizationReport, split_validation

        c = self.config
        needed = sorted({f for spec in c.reward_funcs for f in BUILTIN_FIELDS.get(spec, ())})
        records = read_prompt_records(c.data, required_fields=needed)
        train_records, val_records = split_validation(records, c.val_size, c.seed)
        report = TokenizationReport(total=len(train_records))
        train, val = [], []
        for target, chosen in ((train, train_records), (val, val_records)):
            for index, record in enumerate(chosen):
                ids = render_prompt_ids(tokenizer, template, record)
                if len(ids) + c.max_completion_length > c.max_length:
                    if target is train:
                        report.dropped_too_long += 1
                        report.dropped_indices.append(index)
                    continue
                target.append(PromptExample(record=record, prompt_ids=ids, index=index))
        report.kept = len(train)
        report.longest = max((len(e) for e in train), default=0)
        if not train:
            from corral.errors import RecordError

            raise RecordError(
                c.data,
                f"no prompt fits max_length ({c.max_length}) with max_completion_length "
                f"({c.max_completion_length}) tokens of completion; raise max_length",
            )
        return train, val, report

    def _ensure_rewards(self, run: Any) -> list:
        if self.rewards is None:
            c = self.config
            self.rewards = build_rewards(
                c.reward_funcs, c.reward_weights, reward_model=c.reward_model, device=run.device
            )
        return self.rewards

    # ---------------------------------------------------------------- one step

    def make_batches(self, run: Any, micro: Any = None) -> list[dict[str, Any]]:
        """The step's forward passes: a new rollout every num_iterations steps, else the last."""
        c = self.config
        number = run.step // c.num_iterations
        timings = {"time/rollout": 0.0, "time/scoring": 0.0}
        fresh = self.rollout is None or self.rollout_number != number
        if fresh:
            self.rollout = self._roll_out(run, number, timings)
            self.rollout_number = number
        self.last_step = {**timings, **(self.rollout.scores["metrics"] if fresh else {})}
        self._token_sums: dict[str, float] = {}
        self._update_started = time.monotonic()
        return self._batches(run, self.rollout)

    def _roll_out(self, run: Any, number: int, timings: dict[str, float]) -> Rollout:
        import torch

        c, accelerator = self.config, run.accelerator
        rewards = self._ensure_rewards(run)
        indices = prompts_for_rollout(
            len(run.train_examples),
            seed=c.seed,
            rollout=number,
            per_process=self.prompts_per_rollout,
            world=run.world,
            process=accelerator.process_index,
        )
        policy = accelerator.unwrap_model(run.model)
        rollout = generate_rollout(
            policy,
            run.tokenizer,
            run.template,
            [run.train_examples[i].record for i in indices],
            num_generations=c.num_generations,
            max_completion_length=c.max_completion_length,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.seed,
            step=number * run.world + accelerator.process_index,
            # The whole rollout decodes as one batch (as a vLLM rollout would), up to a bound on
            # the KV cache's rows.
            max_batch_size=min(len(indices) * c.num_generations, MAX_ROLLOUT_BATCH),
        )
        timings["time/rollout"] = rollout.seconds
        started = time.monotonic()
        per_function = score_completions(rewards, rollout.records, rollout.completions)
        totals = torch.tensor(weighted_total(per_function, rewards), device=run.device)
        table = torch.tensor(per_function, device=run.device).T  # [completions, functions]
        # Every process's rewards: batch scaling and the logged statistics use them all.
        all_totals = accelerator.gather(totals)
        all_table = accelerator.gather(table)
        local = group_advantages(totals, c.num_generations, c.scale_rewards)
        advantages = local.values
        if c.scale_rewards == "batch":
            std = all_totals.std() if all_totals.numel() > 1 else all_totals.new_tensor(0.0)
            means = totals.view(-1, c.num_generations).mean(1).repeat_interleave(c.num_generations)
            advantages = (totals - means) / (std + 1e-4)
        lengths = torch.tensor(
            [float(len(ids)) for ids in rollout.completion_ids], device=run.device
        )
        truncated = torch.tensor(rollout.truncated, dtype=torch.float32, device=run.device)
        zero_std = torch.tensor([local.zero_std_share], device=run.device)
        all_lengths, all_truncated = accelerator.gather(lengths), accelerator.gather(truncated)
        all_advantages = accelerator.gather(advantages)
        metrics = {
            "reward": float(all_totals.mean()),
            "reward_std": float(all_totals.std()) if all_totals.numel() > 1 else 0.0,
            "advantage_std": float(all_advantages.std()) if all_advantages.numel() > 1 else 0.0,
            "frac_reward_zero_std": float(accelerator.gather(zero_std).mean()),
            "completions/mean_length": float(all_lengths.mean()),
            "completions/clipped_ratio": float(all_truncated.mean()),
        }
        for column, reward in enumerate(rewards):
            values = all_table[:, column]
            metrics[f"rewards/{reward.name}/mean"] = float(values.mean())
            metrics[f"rewards/{reward.name}/std"] = float(values.std()) if len(values) > 1 else 0.0
        rollout.scores = {"advantages": advantages.cpu(), "metrics": metrics}
        timings["time/scoring"] = time.monotonic() - started
        self._score_policies(run, rollout)
        timings["time/scoring"] = time.monotonic() - started
        return rollout

    def _score_policies(self, run: Any, rollout: Rollout) -> None:
        """Token log-probabilities of the sampling policy (when reused) and the reference (beta>0),
        once per rollout, without gradients, in eval mode."""
        import torch
        from corral.training.preference import reference_policy

        c = self.config
        if c.num_iterations == 1 and not c.beta:
            return
        model = run.model
        peft_model = run.accelerator.unwrap_model(model)
        old, ref = [], []
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self._batches(run, rollout, with_logps=False):
                    if c.num_iterations > 1:
                        old.append(self._token_logps(run, batch)[0].cpu())
                    if c.beta:
                        with reference_policy(model, peft_model):
                            ref.append(self._token_logps(run, batch)[0].cpu())
        finally:
            model.train(training)
        rollout.scores["old_logps"] = old or None
        rollout.scores["ref_logps"] = ref or None

    def _batches(
        self, run: Any, rollout: Rollout, *, with_logps: bool = True
    ) -> list[dict[str, Any]]:
        from corral.training.batches import collate_padded

        size = self.config.micro_batch_size
        examples = completion_examples(rollout)
        advantages = rollout.scores["advantages"]
        batches = []
        for number, start in enumerate(range(0, len(examples), size)):
            batch = collate_padded(examples[start : start + size], run.tokenizer.pad_token_id)
            batch["advantages"] = advantages[start : start + size]
            batch["truncated"] = rollout.truncated[start : start + size]
            batch["num_completions"] = len(batch["truncated"])
            if with_logps:
                for key in ("old_logps", "ref_logps"):
                    stored = rollout.scores.get(key)
                    batch[key] = None if stored is None else stored[number]
            batches.append(batch)
        return batches

    def _token_logps(self, run: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(log-probabilities [completions, width], entropies, completion mask [completions,
        width]) of the batch's completion tokens under `run.model` as it computes now."""
        from corral.training.batches import trained_logits

        logits, targets, keep = trained_logits(run.model, batch, run.device)
        logps, entropy = token_logps_and_entropy(logits, targets, self.config.temperature)
        shape = keep.shape
        spread = logps.new_zeros(shape).masked_scatter(keep, logps)
        entropies = entropy.new_zeros(shape).masked_scatter(keep, entropy)
        return spread, entropies, keep

    def _loss_mask(self, batch: dict[str, Any], keep: Any) -> Any:
        import torch

        mask = keep.float()
        if self.config.mask_truncated_completions:
            truncated = torch.tensor(batch["truncated"], device=mask.device)
            mask = truncation_mask(mask, truncated)
        return mask

    def loss_sum(self, run: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        c, device = self.config, run.device
        logps, entropy, keep = self._token_logps(run, batch)
        mask = self._loss_mask(batch, keep)
        old = None if batch["old_logps"] is None else batch["old_logps"].to(device)
        ref = None if batch["ref_logps"] is None else batch["ref_logps"].to(device)
        advantages = batch["advantages"].to(device)
        terms = per_token_policy_loss(
            logps,
            old,
            advantages,
            epsilon=c.epsilon,
            epsilon_high=c.epsilon_high,
            beta=c.beta,
            ref_logps=ref,
        )
        loss, _ = loss_terms(
            terms.per_token_loss, mask, c.loss_type, max_completion_length=c.max_completion_length
        )
        sums = token_metric_sums(
            terms, advantages, mask, epsilon=c.epsilon, epsilon_high=c.epsilon_high, entropy=entropy
        )
        self._token_sums = {k: self._token_sums.get(k, 0.0) + v for k, v in sums.items()}
        return loss, {}

    def loss_units(self, batch: dict[str, Any]) -> float:
        """What loss_sum's sum is divided by over the step (see training/grpo.py loss_terms)."""
        c = self.config
        completions = batch["num_completions"]
        if c.loss_type == "grpo":
            return float(completions)
        if c.loss_type == "dr_grpo":
            return float(completions * c.max_completion_length)
        if c.loss_type == "bnpo":
            return 1.0
        counted = (batch["targets"] != -100).sum(dim=1).tolist()
        if c.mask_truncated_completions:
            counted = [n for n, cut in zip(counted, batch["truncated"], strict=True) if not cut]
        return float(sum(counted))

    def step_metrics(self, run: Any) -> dict[str, float]:
        """Rollout statistics (on the steps that rolled out), the token metrics of the update
        (agreed over processes) and the time split rollout / scoring / update."""
        import torch

        sums = getattr(self, "_token_sums", {})
        names = ("tokens", *TOKEN_METRIC_NAMES, "entropy")
        totals = run.accelerator.reduce(
            torch.tensor([sums.get(n, 0.0) for n in names], dtype=torch.float64, device=run.device),
            reduction="sum",
        ).tolist()
        tokens = max(totals[0], 1.0)
        found = dict(self.last_step)
        found["time/update"] = time.monotonic() - getattr(self, "_update_started", time.monotonic())
        for name, total in zip(names[1:], totals[1:], strict=True):
            if name != "kl" or self.config.beta:
                found[name] = total / tokens
        self._token_sums = {}
        return found

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, run: Any) -> dict[str, float] | None:
        """Greedy completions of the held-out prompts, scored by every reward function."""
        import torch

        if not run.val_examples:
            return None
        rewards = self._ensure_rewards(run)
        accelerator = run.accelerator
        shard = run.val_examples[accelerator.process_index :: run.world]
        records = [example.record for example in shard]
        policy = accelerator.unwrap_model(run.model)
        columns = len(rewards) + 1
        sums = torch.zeros(columns + 1, dtype=torch.float64, device=run.device)
        completions: list[str] = []
        if records:
            rollout = generate_rollout(
                policy,
                run.tokenizer,
                run.template,
                records,
                num_generations=1,
                max_completion_length=self.config.max_completion_length,
                temperature=0.0,
                max_batch_size=min(len(records), MAX_ROLLOUT_BATCH),
            )
            completions = rollout.completions
            per_function = score_completions(rewards, records, completions)
            totals = weighted_total(per_function, rewards)
            values = [sum(v) for v in per_function] + [sum(totals), float(len(records))]
            sums += torch.tensor(values, dtype=torch.float64, device=run.device)
        sums = accelerator.reduce(sums, reduction="sum")
        count = max(float(sums[-1]), 1.0)
        found = {f"rewards/{r.name}/mean": float(sums[i]) / count for i, r in enumerate(rewards)}
        found["reward"] = float(sums[columns - 1]) / count
        found["loss"] = -found["reward"]  # the loop reports eval_loss; here lower is better too
        if accelerator.is_main_process and records:
            self._write_samples(run, records, completions)
        return found

    def _write_samples(self, run: Any, records: list, completions: list[str]) -> None:
        path = run.run_dir / "eval_samples.jsonl"
        previous = path.read_text(encoding="utf-8") if path.is_file() else ""
        lines = [
            json.dumps(
                {
                    "step": run.step,
                    "prompt": r["prompt"],
                    "completion": c,
                    "answer": r.get("answer"),
                },
                ensure_ascii=False,
            )
            for r, c in list(zip(records, completions, strict=True))[:SAMPLE_COMPLETIONS]
        ]
        atomic_write_text(path, previous + "\n".join(lines) + "\n")

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The rollout later iterations reuse (nothing when every step rolls out afresh)."""
        if self.config.num_iterations == 1 or self.rollout is None:
            return {}
        return {"rollout_number": self.rollout_number, "rollout": self.rollout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.rollout_number = state["rollout_number"]
            self.rollout = state["rollout"]

    def summary_fields(self, run: Any) -> dict[str, Any]:
        return {
            "method": "grpo",
            "train_metrics": {k: round(v, 6) for k, v in run.latest_train.items()},
            "eval_metrics": {k: round(v, 6) for k, v in run.latest_eval.items()},
        }
